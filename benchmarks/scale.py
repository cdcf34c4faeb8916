"""Seconds and peak memory of each phase of DPRec at Amazon Electronics' size, on a generated catalogue.

    python benchmarks/scale.py                      # full size, one whole training epoch
    python benchmarks/scale.py --steps 5            # time 5 training steps, extrapolate the epoch
    python benchmarks/scale.py --scale 0.1          # everything 10x smaller (a quick check)
    python benchmarks/scale.py --model lightgcn --set train.batch_size=8192 --set model.knn_k=5

The catalogue has Electronics' counts (192,403 users, 63,001 items, 1,689,188 interactions, MMRec's
5-core set) times ``--scale``: user and item degrees are power laws (Zipf-like weights over a random
order, ``--user-zipf`` / ``--item-zipf``) on top of a floor of 5 (every user and item has at least 5
interactions, as in a 5-core set), each degree sequence summing exactly to the interaction count. The
(user, item) pairs realise both sequences exactly (a configuration model whose repeated pairs are
swapped away), and a per-user random 8:1:1 split is drawn (``dprec.data.splits``). The items get
MMRec's feature shapes, image 4,096-d (VGG) + text 384-d (MiniLM), float32: clustered Gaussians, so
that the kNN graphs have neighbourhoods; the timings do not depend on the values.

Everything stays in memory: the Trainer gets the Dataset and the features directly (nothing is written
to disk). The phases run one after another in this process, each timed, with its own peak resident
memory: ``/proc/self/status`` VmHWM reset at the start of the phase (``/proc/self/clear_refs``) and a
thread sampling VmRSS, the larger of the two. The reset also resets getrusage's ``ru_maxrss``, so the
process's peak so far is the largest of ``ru_maxrss`` read before each reset and the phases' peaks.

DPRec runs with every part on (``dprec.models.every_part``: the expansion perspective and its kNN graphs,
off by default since the sparse catalogues), the costliest configuration; ``--set model.use_expansion=false`` times
the default.

1. generate   the interactions, the split, the Dataset and the features
2. build      the Trainer: training sets, the model with its graphs (the kNN graphs' share is shown)
3. train      one training epoch (with ``--steps N``: N steps timed, the epoch extrapolated, and so marked)
4. evaluate   one full ranking of every validation user over all items (chunks of train.eval_chunk_size)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

ELECTRONICS = {"n_users": 192_403, "n_items": 63_001, "n_interactions": 1_689_188}
"""Amazon Electronics, MMRec's 5-core set."""
MODALITIES = {"image": 4096, "text": 384}
"""MMRec's feature widths: VGG image features and MiniLM text features."""
MIN_DEGREE = 5


@dataclass(frozen=True)
class ScaleSpec:
    """Counts and degree shape of the generated catalogue."""

    n_users: int
    n_items: int
    n_interactions: int
    min_degree: int = MIN_DEGREE
    user_zipf: float = 0.5
    """Exponent of the users' extra-degree weights (rank^-a over a random order; 0 = uniform)."""
    item_zipf: float = 0.6
    """Exponent of the items' extra-degree weights."""
    seed: int = 0

    def __post_init__(self) -> None:
        floor = self.min_degree * max(self.n_users, self.n_items)
        if self.n_users < 1 or self.n_items < 1:
            raise ValueError(f"need users and items, got {self.n_users} users and {self.n_items} items")
        if not floor <= self.n_interactions <= self.n_users * self.n_items:
            raise ValueError(
                f"{self.n_interactions} interactions cannot give every one of {self.n_users} users and "
                f"{self.n_items} items at least {self.min_degree} distinct ones (need {floor} to "
                f"{self.n_users * self.n_items}); use a larger --scale"
            )


def spec_for(scale: float, seed: int = 0, user_zipf: float = 0.5, item_zipf: float = 0.6) -> ScaleSpec:
    """Electronics' counts times ``scale``, rounded."""
    if scale <= 0:
        raise ValueError(f"--scale must be positive, got {scale}")
    counts = {k: max(1, round(v * scale)) for k, v in ELECTRONICS.items()}
    return ScaleSpec(**counts, user_zipf=user_zipf, item_zipf=item_zipf, seed=seed)


def power_law_degrees(
    n: int, total: int, minimum: int, exponent: float, cap: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` degrees in [minimum, cap] summing to ``total``: ``minimum`` each, the rest drawn multinomially
    with Zipf-like weights rank^-exponent over a random order of the nodes (excess over ``cap`` redrawn)."""
    if not n * minimum <= total <= n * cap:
        raise ValueError(f"{n} degrees in [{minimum}, {cap}] cannot sum to {total}")
    weights = (1.0 + np.arange(n)) ** -float(exponent)
    weights = weights[rng.permutation(n)]
    degrees = np.full(n, minimum, dtype=np.int64)
    left = total - n * minimum
    while left:
        room = degrees < cap
        p = np.where(room, weights, 0.0)
        degrees += rng.multinomial(left, p / p.sum())
        excess = np.maximum(degrees - cap, 0)
        degrees -= excess
        left = int(excess.sum())
    return degrees


def match_degrees(
    user_degrees: np.ndarray, item_degrees: np.ndarray, rng: np.random.Generator, max_rounds: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user, item) pairs with exactly these degrees, sorted by user then item.

    Configuration model: user stubs meet shuffled item stubs; every pair that repeats an earlier one
    swaps its item with a random other pair's (degrees unchanged), until no pair repeats.
    """
    n_items = len(item_degrees)
    if user_degrees.sum() != item_degrees.sum():
        raise ValueError(f"degree sums differ: users {user_degrees.sum()}, items {item_degrees.sum()}")
    users = np.repeat(np.arange(len(user_degrees), dtype=np.int64), user_degrees)
    items = np.repeat(np.arange(n_items, dtype=np.int64), item_degrees)
    rng.shuffle(items)
    for _ in range(max_rounds):
        keys = users * n_items + items
        order = np.argsort(keys, kind="stable")
        repeated = order[np.flatnonzero(keys[order][1:] == keys[order][:-1]) + 1]
        if not len(repeated):
            order = np.lexsort((items, users))
            return users[order], items[order]
        others = np.ones(len(items), dtype=bool)
        others[repeated] = False
        partners = rng.choice(np.flatnonzero(others), size=len(repeated), replace=False)
        items[repeated], items[partners] = items[partners], items[repeated].copy()
    raise RuntimeError(f"could not remove repeated pairs in {max_rounds} rounds; lower the Zipf exponents")


def generate_interactions(spec: ScaleSpec) -> pd.DataFrame:
    """``user_idx``, ``item_idx`` (distinct pairs, both degree sequences as in ``spec``) and the random split."""
    from dprec.data.splits import assign_split

    rng = np.random.default_rng(spec.seed)
    total = spec.n_interactions
    user_deg = power_law_degrees(spec.n_users, total, spec.min_degree, spec.user_zipf, spec.n_items, rng)
    item_deg = power_law_degrees(spec.n_items, total, spec.min_degree, spec.item_zipf, spec.n_users, rng)
    users, items = match_degrees(user_deg, item_deg, rng)
    frame = pd.DataFrame({"user_idx": users, "item_idx": items})
    frame["split"] = assign_split(frame, "random", seed=spec.seed)
    return frame


def generate_features(n_items: int, dims: dict[str, int], seed: int = 0, block: int = 8192) -> dict[str, np.ndarray]:
    """Per modality an (n_items x dim) float32 matrix: a cluster centre plus unit noise (sqrt(n) clusters)."""
    rng = np.random.default_rng((seed, 1))
    n_clusters = max(1, math.isqrt(n_items))
    cluster = rng.integers(0, n_clusters, n_items)
    out = {}
    for name, dim in dims.items():
        centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
        matrix = np.empty((n_items, dim), dtype=np.float32)
        for start in range(0, n_items, block):  # block-wise: no second n_items x dim temporary
            part = matrix[start : start + block]
            rng.standard_normal(part.shape, dtype=np.float32, out=part)
            part += centres[cluster[start : start + block]]
        out[name] = matrix
    return out


def make_scale_dataset(spec: ScaleSpec):
    """The in-memory canonical Dataset of ``spec`` (no text, no images: the features come separately)."""
    from dprec.data.dataset import make_dataset

    inter = generate_interactions(spec)
    items = pd.DataFrame({"item_idx": np.arange(spec.n_items), "item_id": [f"E{i:06d}" for i in range(spec.n_items)]})
    users = pd.DataFrame({"user_idx": np.arange(spec.n_users), "user_id": [f"U{u:06d}" for u in range(spec.n_users)]})
    meta = {"source": "scale-benchmark", "split": "random", "split_rule": "random", "seed": spec.seed}
    meta["spec"] = dict(spec.__dict__)
    return make_dataset("electronics-scale", inter, items, users, meta)


# ------------------------------------------------------------------------------------------------ memory


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark VmHWM to the current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def max_rss_mib() -> float:
    """The process's peak resident memory so far (getrusage ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    peak_mib: float = 0.0
    start_mib: float = 0.0
    process_peak_mib: float = 0.0
    note: str = ""
    extra: dict = field(default_factory=dict)


class PhaseMonitor:
    """Times phases and records each one's peak RSS: VmHWM reset at its start, and a VmRSS sampler thread."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.phases: list[Phase] = []
        self.process_peak_mib = max_rss_mib()
        """The process's peak RSS so far (ru_maxrss is reset with VmHWM, so it is kept here)."""

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        gc.collect()
        record = Phase(name, start_mib=_status_kib("VmRSS") / 1024)
        self.process_peak_mib = max(self.process_peak_mib, max_rss_mib())  # before the reset clears it
        hwm_reset = _reset_hwm()
        peak = [_status_kib("VmRSS")]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self.interval):
                peak[0] = max(peak[0], _status_kib("VmRSS"))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        try:
            yield record
        finally:
            elapsed = time.perf_counter() - t0
            stop.set()
            thread.join()
            peak_kib = max(peak[0], _status_kib("VmRSS"), _status_kib("VmHWM") if hwm_reset else 0)
            record.seconds = record.seconds or elapsed
            record.extra.setdefault("measured_s", elapsed)
            record.peak_mib = peak_kib / 1024
            self.process_peak_mib = max(self.process_peak_mib, record.peak_mib, max_rss_mib())
            record.process_peak_mib = self.process_peak_mib
            self.phases.append(record)


# ------------------------------------------------------------------------------------------------ phases


@contextlib.contextmanager
def timed_knn() -> Iterator[list[float]]:
    """Seconds spent in ``dprec.graph.knn.knn_neighbours`` (the block-wise kNN search) while inside."""
    from dprec.graph import knn

    spent: list[float] = []
    original = knn.knn_neighbours

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    knn.knn_neighbours = timed
    try:
        yield spent
    finally:
        knn.knn_neighbours = original


def limit_steps(trainer, steps: int, times: dict) -> None:
    """Make ``trainer.train_epoch`` stop after ``steps`` batches, recording each step's seconds.

    ``times["steps"]``: each step's seconds, from its batch handed out to the next one asked for.
    """
    original = trainer.epoch_batches

    def batches(epoch: int, rank: int = 0, world: int = 1):
        t_prev = None
        for i, batch in enumerate(original(epoch, rank, world)):
            if t_prev is not None:
                times["steps"].append(time.perf_counter() - t_prev)
            if i == steps:
                return
            t_prev = time.perf_counter()
            yield batch
        if t_prev is not None:
            times["steps"].append(time.perf_counter() - t_prev)

    times.setdefault("steps", [])
    trainer.epoch_batches = batches


def run(args: argparse.Namespace) -> tuple[list[Phase], dict]:
    """Run the four phases; returns their records and facts about the run (counts, degrees, steps)."""
    import torch

    from dprec.config import from_dict, merge, parse_overrides
    from dprec.data.dataset import SPLIT_TRAIN
    from dprec.graph.knn import clear_knn_cache
    from dprec.models import every_part
    from dprec.training.config import RunConfig
    from dprec.training.loop import Trainer

    spec = spec_for(args.scale, args.seed, args.user_zipf, args.item_zipf)
    monitor = PhaseMonitor()
    facts: dict = {"spec": spec}

    with monitor.phase("generate") as ph:
        ds = make_scale_dataset(spec)
        feats = generate_features(spec.n_items, MODALITIES, spec.seed)
        feat_mib = sum(f.nbytes for f in feats.values()) / 2**20
        ph.note = f"features {' + '.join(f'{n} {d}-d' for n, d in MODALITIES.items())} ({feat_mib:,.0f} MiB)"
    users, items = ds.interactions["user_idx"].to_numpy(), ds.interactions["item_idx"].to_numpy()
    facts.update(
        n_users=ds.n_users,
        n_items=ds.n_items,
        n_interactions=len(ds.interactions),
        user_degrees=np.bincount(users, minlength=ds.n_users),
        item_degrees=np.bincount(items, minlength=ds.n_items),
        n_per_split=ds.meta["n_per_split"],
    )

    section = {
        "dataset": "in-memory:electronics-scale",
        "model": every_part(args.model),
        "train": {"epochs": 1, "threads": args.threads, "seed": 1},
    }
    cfg = from_dict(RunConfig, merge(section, parse_overrides(args.set)), "scale")
    cfg.model_config()
    facts["cfg"] = cfg
    if args.threads:
        torch.set_num_threads(args.threads)

    clear_knn_cache()  # a second run in this process must not find the neighbours cached
    with monitor.phase("model build (incl. kNN graphs)") as ph, timed_knn() as knn_seconds:
        trainer = Trainer(cfg, ds, features=feats)
    ph.note = f"kNN search {sum(knn_seconds):.1f} s ({len(knn_seconds)} graphs)" if knn_seconds else "no kNN graph"
    facts["params"] = sum(p.numel() for p in trainer.model.parameters())

    n_train = int((ds.interactions["split"] == SPLIT_TRAIN).sum())
    total_steps = math.ceil(n_train / cfg.train.batch_size)
    facts["total_steps"] = total_steps
    if not trainer.trainable:
        monitor.phases.append(Phase("one training epoch", note=f"{args.model} has nothing to train"))
    else:
        extrapolate = bool(args.steps) and args.steps < total_steps
        times: dict = {}
        if extrapolate:
            limit_steps(trainer, args.steps, times)
        with monitor.phase("one training epoch") as ph:
            losses = trainer.train_epoch(0)
        facts["loss"] = losses.get("loss")
        if extrapolate:
            steps, measured = times["steps"], ph.extra["measured_s"]
            per_step = float(np.mean(steps[1:])) if len(steps) > 1 else steps[0]
            # as measured (optimiser build, shuffle and negatives, the first step's warm-up), plus the
            # remaining steps at the mean of the measured ones after the first
            ph.seconds = measured + per_step * (total_steps - len(steps))
            ph.note = (
                f"EXTRAPOLATED from {len(steps)} of {total_steps} steps: measured {measured:.1f} s (set-up "
                f"{measured - sum(steps):.1f} s, first step {steps[0]:.2f} s, then {per_step:.2f} s/step)"
            )
        else:
            ph.note = f"{total_steps} steps measured ({ph.seconds / total_steps:.2f} s/step)"

    chunk = cfg.train.eval_chunk_size
    with monitor.phase("full-ranking evaluation (valid)") as ph:
        metrics = trainer.evaluate("valid")
    n_eval = int(trainer.truth["valid"].users_with_items().size)
    ph.note = f"{n_eval:,} users x {ds.n_items:,} items in chunks of {chunk} (recall@20 {metrics['recall@20']:.4f})"
    facts["metrics"] = metrics
    return monitor.phases, facts


def format_table(phases: list[Phase]) -> str:
    lines = [
        "| phase | seconds | peak RSS MiB (phase) | peak RSS MiB (process so far, ru_maxrss) | notes |",
        "|---|---|---|---|---|",
    ]
    for p in phases:
        peak = f"{p.peak_mib:,.0f}" if p.peak_mib else ""
        maxrss = f"{p.process_peak_mib:,.0f}" if p.process_peak_mib else ""
        lines.append(f"| {p.name} | {p.seconds:,.1f} | {peak} | {maxrss} | {p.note} |")
    return "\n".join(lines)


def describe(facts: dict) -> str:
    spec, cfg = facts["spec"], facts["cfg"]
    ud, idg = facts["user_degrees"], facts["item_degrees"]

    def stats(d: np.ndarray) -> str:
        return f"min {d.min()}, median {int(np.median(d))}, mean {d.mean():.2f}, max {d.max()}"

    splits = facts["n_per_split"]
    return "\n".join(
        [
            f"generated: {facts['n_users']:,} users, {facts['n_items']:,} items, {facts['n_interactions']:,} "
            f"interactions (requested {spec.n_users:,} / {spec.n_items:,} / {spec.n_interactions:,})",
            f"user degrees: {stats(ud)} (zipf {spec.user_zipf}); item degrees: {stats(idg)} (zipf {spec.item_zipf})",
            f"split train/valid/test: {splits['0']:,} / {splits['1']:,} / {splits['2']:,}",
            f"model {cfg.model['name']} ({facts['params']:,} parameters), batch {cfg.train.batch_size}, "
            f"{facts['total_steps']} steps per epoch, {cfg.train.threads or 'default'} threads, "
            f"graph backend {cfg.train.graph_backend}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of Electronics' counts (default 1)")
    p.add_argument("--steps", type=int, default=0, help="time N training steps and extrapolate the epoch (0: all)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (train.threads)")
    p.add_argument("--model", default="dprec", help="a name in dprec.models.MODELS")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config override, e.g. "
                   "train.batch_size=8192 or model.knn_k=5 (repeatable)")  # fmt: skip
    p.add_argument("--user-zipf", type=float, default=0.5, help="exponent of the user degree power law")
    p.add_argument("--item-zipf", type=float, default=0.6, help="exponent of the item degree power law")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.steps < 0:
        p.error("--steps must be >= 0")
    from dprec.models import MODELS

    if a.model not in MODELS:
        p.error(f"--model must be one of {sorted(MODELS)}, got {a.model!r}")
    phases, facts = run(a)
    print(f"\nElectronics x {a.scale:g}\n{describe(facts)}\n")
    print(format_table(phases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
