"""Text-embedding throughput of the Ray pipeline against a bare transformers loop, on MovieLens-100K.

Items are the 1,682 movies: title (+ year, genres as categories) from ``ml-100k.item`` and the
IMDb description from ``movielens100k_details.json``. For each model the bare loop and the Ray
pipeline see the same texts, prompt, token limit, batching rule (``TextEncoder``: length-sorted,
at most ``--batch-size`` items, padding at most ``TextConfig.max_padding``) and torch threads.
The bare loop sorts the whole catalogue at once; the pipeline sorts within each shard.

- ``bare``: tokenise, batch, forward, pool in one process (model load not timed).
- ``ray 1x2``: one text actor with 2 CPUs and 2 torch threads; ``ray 2x1``: two actors, 1 each.
  Steady-state items/s is measured from the moment the first wave of shards (one per actor)
  has landed at the driver to the last shard (actor start and model load excluded); ``e2e s``
  is the whole run_extract call.
- Peak memory: the benchmark process (bare) or the sum of the RSS of the driver and all its
  descendant Ray processes (ray), sampled every 0.2 s.

    python benchmarks/extract_throughput.py                       # both models, all 1,682 movies
    python benchmarks/extract_throughput.py --models minilm --limit 400
    python benchmarks/extract_throughput.py --padding-only       # padded tokens of each batching
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # local Ray on 127.0.0.1 only

import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from dprec.data.dataset import make_dataset, save_dataset  # noqa: E402
from dprec.data.schema import ITEM_TEXT_FIELDS  # noqa: E402
from dprec.features.config import ExtractConfig, TextConfig  # noqa: E402
from dprec.features.pipeline import run_extract  # noqa: E402
from dprec.features.text import TextEncoder, length_batches, resolve_text_model  # noqa: E402

SHARED = Path(os.environ.get("DPREC_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
SEED = 0


def ml100k_dataset(folder: Path, limit: int | None):
    root = SHARED / "ml-100k"
    movies = pd.read_csv(root / "ml-100k.item", sep="\t")
    movies.columns = [c.split(":")[0] for c in movies.columns]
    details = {
        d["movie_id"]: d.get("description") or "" for d in json.loads((root / "movielens100k_details.json").read_text())
    }
    if limit:
        movies = movies.iloc[:limit]
    items = pd.DataFrame(
        {
            "item_idx": range(len(movies)),
            "item_id": movies["item_id"].astype(str),
            "title": [
                f"{t} ({y})" if pd.notna(y) else str(t)
                for t, y in zip(movies["movie_title"], movies["release_year"], strict=True)
            ],
            "categories": movies["class"].fillna("").str.replace(" ", "|"),
            "description": [details.get(int(i), "") for i in movies["item_id"]],
        }
    )
    inter = pd.read_csv(root / "ml-100k.inter", sep="\t")
    inter.columns = [c.split(":")[0] for c in inter.columns]
    index = {int(i): k for k, i in enumerate(movies["item_id"])}
    inter = inter[inter["item_id"].isin(index)]
    users = sorted(inter["user_id"].unique())
    uidx = {u: k for k, u in enumerate(users)}
    interactions = pd.DataFrame(
        {
            "user_idx": inter["user_id"].map(uidx),
            "item_idx": inter["item_id"].map(index),
            "timestamp": inter["timestamp"].astype("int64"),
            "rating": inter["rating"],
            "split": 0,
        }
    )
    ds = make_dataset("ml-100k", interactions, items, pd.DataFrame({"user_idx": range(len(users)), "user_id": users}))
    save_dataset(ds, folder)
    return ds


class PeakRSS:
    """Peak summed RSS of this process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def __enter__(self):
        def loop():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._sample())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def item_fields(ds) -> list[dict[str, str]]:
    """Each item's text fields, as the pipeline's work units carry them."""
    return [{k: str(r[k]) for k in ITEM_TEXT_FIELDS} for _, r in ds.items.iterrows()]


def bare_loop(model: str, ds, batch_size: int, threads: int, cache: str | None) -> dict:
    """The same model, prompt, token limit, batching rule and threads as the pipeline, in one process.

    The whole catalogue is one unit, so its length-sorted batches pad less than a shard's do.
    """
    torch.set_num_threads(threads)
    resolved = resolve_text_model(TextConfig(model=model, cache_dir=cache), "cpu")
    enc = TextEncoder(resolved, batch_size, TextConfig().max_padding)  # loaded before timing
    fields = item_fields(ds)
    t0 = time.perf_counter()  # tokenising is timed, as the pipeline's actors tokenise too
    ids = [enc.prompt_ids(f)[0] for f in fields]
    enc.encode_ids(ids)
    seconds = time.perf_counter() - t0
    return {
        "items_per_s": len(ids) / seconds,
        "e2e_s": seconds,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def padded_tokens(model: str, ds, batch_size: int, items_per_shard: int, cache: str | None) -> list[tuple[str, int]]:
    """Tokens the forward passes compute (batch size x longest prompt, summed) under each batching."""
    resolved = resolve_text_model(TextConfig(model=model, cache_dir=cache), "cpu")
    enc = TextEncoder(resolved, batch_size)
    fields = item_fields(ds)
    lengths = [len(enc.prompt_ids(f)[0]) for f in fields]

    def cost(unit: int, max_padding: float) -> int:
        total = 0
        for start in range(0, len(lengths), unit):
            part = lengths[start : start + unit]
            total += sum(len(b) * max(part[i] for i in b) for b in length_batches(part, batch_size, max_padding))
        return total

    bound = TextConfig().max_padding
    return [
        ("real tokens", sum(lengths)),
        ("whole catalogue, fixed batches", cost(len(lengths), 1.0)),
        (f"whole catalogue, padding <= {bound}", cost(len(lengths), bound)),
        (f"{items_per_shard}-item shards, fixed batches", cost(items_per_shard, 1.0)),
        (f"{items_per_shard}-item shards, padding <= {bound}", cost(items_per_shard, bound)),
        ("256-item shards, fixed batches", cost(256, 1.0)),
        (f"256-item shards, padding <= {bound}", cost(256, bound)),
    ]


def ray_run(
    model: str,
    dataset: Path,
    out: Path,
    actors: int,
    cpus: float,
    threads: int,
    batch_size: int,
    items_per_shard: int,
    cache: str | None,
) -> dict:
    stamps: list[tuple[float, int]] = []
    cfg = ExtractConfig(
        dataset=str(dataset),
        out=str(out),
        text=TextConfig(model=model, batch_size=batch_size, cache_dir=cache),
        image=None,
        items_per_shard=items_per_shard,
        text_actors=actors,
        cpus_per_actor=cpus,
        torch_threads=threads,
    )
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        summary = run_extract(cfg, on_shard=lambda e: stamps.append((time.perf_counter(), e["count"])))
        e2e = time.perf_counter() - t0
    # the first `actors` shards land together after the start-up; count the work after them
    steady = sum(n for _, n in stamps[actors:]) / max(stamps[-1][0] - stamps[actors - 1][0], 1e-9)
    return {"items_per_s": steady, "e2e_s": e2e, "peak_mb": mem.peak / 2**20, "items": summary.items}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    p.add_argument("--limit", type=int, default=None, help="first N movies only")
    p.add_argument("--smollm2-limit", type=int, default=None, help="first N movies for smollm2 (it is ~10x slower)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--items-per-shard", type=int, default=64)
    p.add_argument("--model-cache", default=None)
    p.add_argument("--padding-only", action="store_true", help="only count the padded tokens of each batching")
    a = p.parse_args(argv)
    if a.padding_only:
        with tempfile.TemporaryDirectory(prefix="dprec-bench-") as tmp:
            ds = ml100k_dataset(Path(tmp) / "ml100k", a.limit)
            for model in a.models:
                for label, tokens in padded_tokens(model, ds, a.batch_size, a.items_per_shard, a.model_cache):
                    print(f"{model:8} {label:40} {tokens:9,d}")
        return
    import ray

    torch.manual_seed(SEED)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dprec-bench-") as tmp:
        tmp = Path(tmp)
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False
        )
        try:
            for model in a.models:
                limit = a.smollm2_limit if model == "smollm2" and a.smollm2_limit else a.limit
                folder = tmp / f"ml100k-{limit or 'all'}"
                ds = ml100k_dataset(folder, limit) if not (folder / "dataset.json").exists() else None
                if ds is None:
                    from dprec.data.dataset import load_dataset

                    ds = load_dataset(folder)
                bare = bare_loop(model, ds, a.batch_size, 2, a.model_cache)
                rows.append((model, "bare loop", "1 proc x 2 thr", ds.n_items, bare))
                per_shard = min(a.items_per_shard, max(1, ds.n_items // 12))  # >= 12 shards for the steady state
                for actors, cpus, threads in ((1, 2.0, 2), (2, 1.0, 1)):
                    res = ray_run(
                        model,
                        folder,
                        tmp / f"{model}-{actors}",
                        actors,
                        cpus,
                        threads,
                        a.batch_size,
                        per_shard,
                        a.model_cache,
                    )
                    rows.append((model, "ray pipeline", f"{actors} actor x {threads} thr", ds.n_items, res))
        finally:
            ray.shutdown()
    print(
        f"\n{'model':8} {'runner':13} {'layout':16} {'items':>5} {'items/s':>8} {'ratio':>6} {'e2e s':>7} {'peak MB':>8}"
    )
    base = {}
    for model, runner, layout, n, r in rows:
        base.setdefault(model, r["items_per_s"])
        print(
            f"{model:8} {runner:13} {layout:16} {n:5d} {r['items_per_s']:8.1f} {r['items_per_s'] / base[model]:6.2f} "
            f"{r['e2e_s']:7.1f} {r['peak_mb']:8.0f}"
        )


if __name__ == "__main__":
    main()
