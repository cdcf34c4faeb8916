"""The embedded default dataset: a seeded catalogue with text, images and interactions.

It needs nothing outside the repository, so the demo runs on a fresh clone. Every item has a
hidden category, colour and shape. The text names the category through its own vocabulary
(and the colour in words); the PNG image shows the shape in the colour on a background
tinted by the category. Users prefer one or two categories and a colour, and pick items in
proportion to those preferences times a Zipf popularity. So both modalities carry a real
signal about who buys what, and a content-aware model has something to learn that IDs alone
learn slowly (many items have only a few interactions).

    python -m dprec.prepare synthetic --out data/default        # or: dprec.data.synthetic.generate()
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from dprec.data.dataset import Dataset, make_dataset

CATEGORIES = {
    "kitchen": ("skillet", "whisk", "kettle", "ladle", "colander", "teapot", "spatula", "mixing bowl"),
    "garden": ("trowel", "watering can", "planter", "pruner", "hose reel", "seed tray", "rake", "birdhouse"),
    "toys": ("puzzle", "plush bear", "toy train", "building blocks", "kite", "yo-yo", "rattle", "spinning top"),
    "outdoor": ("tent", "backpack", "lantern", "sleeping bag", "water bottle", "compass", "hammock", "camp stove"),
    "office": ("stapler", "notebook", "desk lamp", "pen holder", "binder", "calculator", "paper tray", "planner"),
    "bath": ("towel", "soap dish", "bath mat", "loofah", "shower caddy", "toothbrush cup", "robe", "bath salts"),
    "fitness": (
        "yoga mat",
        "dumbbell",
        "jump rope",
        "kettlebell",
        "resistance band",
        "foam roller",
        "gym bag",
        "water flask",
    ),
    "pets": ("dog leash", "cat toy", "pet bed", "food bowl", "chew bone", "litter scoop", "collar", "bird perch"),
}
CATEGORY_WORDS = {
    "kitchen": "cooking baking recipes stovetop dishwasher-safe chef",
    "garden": "gardening plants soil flowers outdoor yard seedlings",
    "toys": "children play fun kids ages 3 and up educational",
    "outdoor": "camping hiking trail weatherproof adventure wilderness",
    "office": "work desk organize paperwork productivity study",
    "bath": "bathroom shower spa soft absorbent relaxing",
    "fitness": "workout exercise training strength cardio gym",
    "pets": "dogs cats pet-safe durable animals companion",
}
COLOURS = {
    "red": (210, 40, 40),
    "blue": (40, 80, 210),
    "green": (40, 160, 60),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 170),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUNDS = [
    (250, 235, 215),
    (225, 245, 225),
    (225, 235, 250),
    (245, 225, 240),
    (240, 240, 240),
    (230, 250, 250),
    (250, 250, 220),
    (235, 225, 215),
]
BRANDS = ("Acme", "Northwind", "Globex", "Initech", "Umbra", "Vandelay", "Hooli", "Stark")


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and shape of the generated dataset."""

    n_users: int = 600
    n_items: int = 400
    min_per_user: int = 10
    max_per_user: int = 30
    image_size: int = 64
    zipf: float = 0.8
    """Exponent of the item popularity prior (0 = uniform)."""
    seed: int = 7


def draw_item_image(
    shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], size: int, rng: np.random.Generator
) -> bytes:
    """A PNG of one coloured shape on a tinted background, slightly jittered in place and size."""
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.25, 0.38)
    cx, cy = size / 2 + rng.uniform(-4, 4), size / 2 + rng.uniform(-4, 4)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _items(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    cats = list(CATEGORIES)
    colours = list(COLOURS)
    cat = rng.integers(0, len(cats), spec.n_items)
    col = rng.integers(0, len(colours), spec.n_items)
    shape = rng.integers(0, len(SHAPES), spec.n_items)
    rows = []
    for i in range(spec.n_items):
        c, k = cats[cat[i]], colours[col[i]]
        noun = CATEGORIES[c][rng.integers(0, len(CATEGORIES[c]))]
        brand = BRANDS[rng.integers(0, len(BRANDS))]
        words = CATEGORY_WORDS[c].split()
        picked = " ".join(rng.choice(words, size=3, replace=False))
        rows.append(
            {
                "item_idx": i,
                "item_id": f"SYN{i:05d}",
                "title": f"{brand} {k} {noun}",
                "description": f"A {k} {noun} for {picked}. Model {rng.integers(100, 999)}.",
                "brand": brand,
                "categories": f"Home|{c.capitalize()}",
                "image_bytes": draw_item_image(SHAPES[shape[i]], COLOURS[k], BACKGROUNDS[cat[i]], spec.image_size, rng),
            }
        )
    return pd.DataFrame(rows), cat, col


def _interactions(spec: SyntheticSpec, cat: np.ndarray, col: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    n_cat, n_col = int(cat.max()) + 1, int(col.max()) + 1
    popularity = 1.0 / np.arange(1, spec.n_items + 1) ** spec.zipf
    popularity = popularity[rng.permutation(spec.n_items)]
    rows_u, rows_i = [], []
    for u in range(spec.n_users):
        cat_pref = rng.dirichlet(np.full(n_cat, 0.15))
        col_pref = rng.dirichlet(np.full(n_col, 0.5))
        weight = cat_pref[cat] * col_pref[col] * popularity + 1e-6
        n = int(rng.integers(spec.min_per_user, spec.max_per_user + 1))
        chosen = rng.choice(spec.n_items, size=n, replace=False, p=weight / weight.sum())
        rows_u.append(np.full(n, u))
        rows_i.append(chosen)
    users, items = np.concatenate(rows_u), np.concatenate(rows_i)
    # One shared clock: each user's picks are in order, users interleave.
    timestamps = 1_700_000_000 + np.sort(rng.integers(0, 10_000_000, len(users)))[rng.permutation(len(users))]
    frame = pd.DataFrame({"user_idx": users, "item_idx": items, "timestamp": timestamps, "rating": 1.0})
    return frame.sort_values(["user_idx", "timestamp"], kind="stable").reset_index(drop=True)


def generate(spec: SyntheticSpec | None = None, split: str = "random", cold_share: float | None = None) -> Dataset:
    """Build the dataset (with its split) in memory; same spec, same dataset. ``cold_share``: the share of items a
    ``cold-items`` split holds out (default 20 %)."""
    from dprec.data.splits import (
        COLD_ITEMS,
        COLD_META_KEY,
        DEFAULT_COLD_SHARE,
        assign_split,
        choose_cold_items,
        cold_split_meta,
    )

    spec = spec or SyntheticSpec()
    rng = np.random.default_rng(spec.seed)
    items, cat, col = _items(spec, rng)
    inter = _interactions(spec, cat, col, rng)
    cold_share = DEFAULT_COLD_SHARE if cold_share is None else cold_share
    held_out = choose_cold_items(inter["item_idx"].to_numpy(), spec.seed, cold_share) if split == COLD_ITEMS else None
    inter["split"] = assign_split(inter, split, seed=spec.seed, held_out=held_out)
    users = pd.DataFrame({"user_idx": np.arange(spec.n_users), "user_id": [f"U{u:05d}" for u in range(spec.n_users)]})
    meta = {
        "source": "synthetic",
        "split": split,
        "seed": spec.seed,
        "spec": spec.__dict__,
        "hidden": {"category": cat.tolist(), "colour": col.tolist()},
    }
    if held_out is not None:
        meta[COLD_META_KEY] = cold_split_meta(held_out, spec.seed, cold_share)
    return make_dataset("default", inter, items, users, meta)
