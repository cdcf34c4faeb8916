"""The extraction pipeline: dataset items -> per-shard work units -> model actors -> shards on the driver.

Determinism: the unit of work is one shard (a pure function of the item index), travelling as
one row through the text stage and the image stage; inside a stage its items are batched by a
rule that depends only on the shard's contents (text: by token length, ties by item index;
images: item order). So whichever actor, node or retry computes a shard, it meets the same
batches, and with the same torch thread count the same bits come out; the driver writes every
shard (``FeatureSetWriter``). Failures: a per-item failure gives a zero vector, a flag and a
count, never a failed run; Ray restarts a dead actor and retries its shard; a dead driver leaves
complete shards listed in the manifest, and the rerun computes the rest. The one per-item fault
that fails the run is garbage at scale: when more than ``max_nonfinite_share`` of the items have a
non-finite vector in one modality (``<m>_nonfinite`` / ``<m>_overflow``), the run stops with the
manifest left incomplete, so no reader takes the folder for a good one.

Input is not trusted: image files are read only inside the dataset folder and the source root
``prepare`` recorded (:func:`image_roots`; ``--allow-outside-paths`` lifts it), only when regular
and at most ``max_image_bytes``; URLs only over http(s), capped in size and time
(:mod:`dprec.features.image`). The output folder is locked for the run (``folder_lock``), and a
Ray address is probed with a timeout before Ray is asked to connect (:func:`_init_ray`).

Executors ``ray`` (Ray Data ``map_batches``, callable-class actor pools) and ``local`` (the same
stages in this process) give byte-identical shards. Progress goes to this module's logger at
INFO; Ray actors write theirs to stdout, which Ray forwards to the driver (``ray job logs``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import stat
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dprec.config import DPRecError
from dprec.data.dataset import Dataset, items_hash, items_prefix_hash, load_dataset
from dprec.data.schema import ITEM_IMAGE_COLUMNS, ITEM_TEXT_FIELDS
from dprec.features.config import MAX_IMAGE_BYTES, ExtractConfig, MMRecImportConfig
from dprec.features.image import ImageEncoder, ResolvedImageModel, load_image, resolve_image_model
from dprec.features.prompt import clean_field, extra_value_text
from dprec.features.shards import FeatureSetWriter, ShardError, folder_lock, load_manifest, shard_ranges
from dprec.features.text import ResolvedTextModel, TextEncoder, resolve_text_model
from dprec.io import atomic_write_text, log_to_console, sha256_file

MAX_LOGGED_FAILURES = 5
log = logging.getLogger(__name__)


class ExtractError(DPRecError, RuntimeError):
    """The run cannot proceed as configured (resources, inputs); the message says what to change."""


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def item_extra(value: Any) -> dict[str, Any]:
    """An item's ``extra`` JSON object ({} when empty)."""
    if value is None or value == "" or (isinstance(value, float) and np.isnan(value)):
        return {}
    parsed = json.loads(value)
    return parsed if isinstance(parsed, dict) else {}


def check_extra_fields(dataset: Any, names: list[str]) -> dict[str, int]:
    """How many items carry each named ``extra`` attribute; an attribute no item has is an ExtractError."""
    counts = dict.fromkeys(names, 0)
    if names:
        for value in dataset.items["extra"]:
            present = item_extra(value)
            for name in names:
                counts[name] += extra_value_text(present.get(name)) != ""
    missing = [n for n, c in counts.items() if c == 0]
    if missing:
        raise ExtractError(
            f"the prompt template names {missing}, which no item of dataset {dataset.name!r} has "
            "(neither a text field nor an attribute of items.extra)"
        )
    return counts


def build_work_units(
    dataset: Any,
    shards: list[int],
    items_per_shard: int,
    max_chars: int | None,
    extra_names: list[str] = (),
    ranges: list[tuple[int, int]] | None = None,
) -> list[pa.Table]:
    """One single-row Arrow table per shard to compute: the shard's items as list columns.

    Text fields arrive cleaned (str, capped at ``max_chars``) with their flags, and so do the
    ``extra`` attributes named in ``extra_names`` (shipped as one JSON list of objects); image paths are
    resolved against the dataset folder (kept relative when the folder was given relative, so
    that they resolve in a Ray job's working directory on every node). ``max_chars=None``: no
    text modality, text fields are not shipped. ``ranges``: the shards' item ranges (default: those of a
    catalogue that never grew).
    """
    items = dataset.items
    ranges = ranges if ranges is not None else shard_ranges(len(items), items_per_shard)
    units = []
    for shard in shards:
        first, stop = ranges[shard]
        part = items.iloc[first:stop]
        fields: dict[str, list[str]] = {k: [] for k in ITEM_TEXT_FIELDS}
        flags: list[list[str]] = []
        extras: list[dict[str, str]] = []
        for row in part.itertuples(index=False):
            item_flags: list[str] = []
            for k in ITEM_TEXT_FIELDS:
                value, f = clean_field(getattr(row, k), max_chars) if max_chars else ("", [])
                fields[k].append(value)
                item_flags += f
            attrs = item_extra(row.extra) if extra_names and max_chars else {}
            shown = {}
            for name in extra_names if max_chars else ():
                value, f = clean_field(extra_value_text(attrs.get(name)), max_chars)
                shown[name] = value
                item_flags += f
            extras.append(shown)
            flags.append(item_flags)
        paths = [str(dataset.image_file(i)) if dataset.image_file(i) else "" for i in range(first, stop)]
        columns = {
            "shard": pa.array([shard], pa.int64()),
            "item_idx": pa.array([part["item_idx"].tolist()], pa.list_(pa.int64())),
            "item_id": pa.array([part["item_id"].astype(str).tolist()], pa.list_(pa.string())),
            **{k: pa.array([v], pa.list_(pa.string())) for k, v in fields.items()},
            "prep_flags": pa.array([json.dumps(flags)], pa.string()),
            "extra_fields": pa.array([json.dumps(extras)], pa.string()),
            "image_bytes": pa.array([[bytes(b) if b else b"" for b in part["image_bytes"]]], pa.list_(pa.binary())),
            "image_path": pa.array([paths], pa.list_(pa.string())),
            "image_url": pa.array([part["image_url"].fillna("").astype(str).tolist()], pa.list_(pa.string())),
        }
        units.append(pa.table(columns))
    return units


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray there is no node
        pass
    return "local"


class TextStage:
    """Ray Data callable class: loads the text model once; each call embeds whole shards.

    ``in_actor``: a Ray actor runs no CLI ``main``, so the stage sends its own log lines to stdout.
    """

    def __init__(self, resolved: ResolvedTextModel, batch_size: int, threads: int, max_padding: float, in_actor: bool):
        if in_actor:
            log_to_console()
        _set_threads(threads)
        t0 = time.perf_counter()
        self.encoder = TextEncoder(resolved, batch_size, max_padding)
        log.info(
            "[text] loaded %s (%s, %s) in %.1fs",
            resolved.name,
            resolved.device,
            resolved.dtype,
            time.perf_counter() - t0,
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        out: dict[str, list] = {"text_vectors": [], "text_dim": [], "text_flags": [], "text_node": []}
        for row in table.to_pylist():
            t0 = time.perf_counter()
            extras = json.loads(row["extra_fields"])
            items = [{**{k: row[k][i] for k in ITEM_TEXT_FIELDS}, **extras[i]} for i in range(len(row["item_idx"]))]
            vectors, flags = self.encoder.encode_items(items)
            out["text_vectors"].append(vectors.astype(np.float32).tobytes())
            out["text_dim"].append(vectors.shape[1])
            out["text_flags"].append(json.dumps(flags))
            out["text_node"].append(_node_id())
            bad = sum(1 for f in flags if f)
            log.info(
                "[text] shard %s: %d items, %d flagged, %.2fs", row["shard"], len(items), bad, time.perf_counter() - t0
            )
        table = table.drop_columns([*ITEM_TEXT_FIELDS, "extra_fields"])
        for name, values in out.items():
            table = table.append_column(name, pa.array(values, pa.binary() if name == "text_vectors" else None))
        return table


class ImageStage:
    """Ray Data callable class: loads the image model once; each call embeds whole shards (``in_actor``: as text)."""

    def __init__(
        self,
        resolved: ResolvedImageModel,
        batch_size: int,
        threads: int,
        fetch_urls: bool,
        url_timeout: float,
        in_actor: bool,
        max_bytes: int = MAX_IMAGE_BYTES,
        roots: list[str] | None = None,
    ):
        if in_actor:
            log_to_console()
        _set_threads(threads)
        t0 = time.perf_counter()
        self.encoder = ImageEncoder(resolved, batch_size)
        self.fetch_urls, self.url_timeout = fetch_urls, url_timeout
        self.max_bytes, self.roots = max_bytes, roots
        log.info("[image] loaded %s (%s) in %.1fs", resolved.name, resolved.device, time.perf_counter() - t0)

    def __call__(self, table: pa.Table) -> pa.Table:
        out: dict[str, list] = {"image_vectors": [], "image_dim": [], "image_flags": [], "image_node": []}
        for row in table.to_pylist():
            t0 = time.perf_counter()
            n = len(row["item_idx"])
            flags: list[list[str]] = [[] for _ in range(n)]
            images, rows = [], []
            for i in range(n):
                img, kind, message = load_image(
                    row["image_bytes"][i],
                    row["image_path"][i],
                    row["image_url"][i],
                    self.fetch_urls,
                    self.url_timeout,
                    self.max_bytes,
                    self.roots,
                )
                if img is None:
                    flags[i].append(kind)
                    if sum(1 for f in flags if f) <= MAX_LOGGED_FAILURES and kind != "image_none":
                        log.info("[image] item %s: %s; marked image_missing", row["item_idx"][i], message)
                else:
                    images.append(img)
                    rows.append(i)
            vectors = np.zeros((n, self.encoder.dim), np.float32)
            if images:
                encoded, errors = self.encoder.encode(images)
                vectors[rows] = encoded
                for i, err in zip(rows, errors, strict=True):
                    if err is not None:
                        flags[i].append("image_error")
                        log.info("[image] item %s: model failed (%s); marked image_missing", row["item_idx"][i], err)
            out["image_vectors"].append(vectors.tobytes())
            out["image_dim"].append(self.encoder.dim)
            out["image_flags"].append(json.dumps(flags))
            out["image_node"].append(_node_id())
            log.info(
                "[image] shard %s: %d items, %d missing, %.2fs",
                row["shard"],
                n,
                n - len(images),
                time.perf_counter() - t0,
            )
        table = table.drop_columns(list(ITEM_IMAGE_COLUMNS))
        for name, values in out.items():
            table = table.append_column(name, pa.array(values, pa.binary() if name == "image_vectors" else None))
        return table


@dataclass
class RunSummary:
    items: int
    shards_total: int
    shards_written: int
    shards_skipped: int
    items_computed: int
    failures: dict[str, int]
    seconds: float
    items_per_second: float
    nodes: int
    out: str

    def line(self) -> str:
        return json.dumps({"event": "extract_summary", **asdict(self)}, sort_keys=True)


class _Collector:
    """Turns finished work-unit rows into shards through the writer, with progress lines."""

    def __init__(
        self,
        writer: FeatureSetWriter,
        modalities: list[str],
        total_items: int,
        on_shard: Callable[[dict[str, Any]], None] | None,
        check: Callable[[], None] = lambda: None,
    ):
        self.writer, self.modalities, self.on_shard, self.check = writer, modalities, on_shard, check
        self.total_items = total_items
        self.items = self.shards = 0
        self.nodes: set[str] = set()
        self.t0 = time.perf_counter()

    def add_table(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            n = len(row["item_idx"])
            flags = json.loads(row["prep_flags"])
            vectors = {}
            for m in self.modalities:
                vectors[m] = np.frombuffer(row[f"{m}_vectors"], np.float32).reshape(n, row[f"{m}_dim"])
                for i, f in enumerate(json.loads(row[f"{m}_flags"])):
                    flags[i] += f
                self.nodes.add(row[f"{m}_node"])
            entry = self.writer.add(row["shard"], row["item_id"], vectors, flags)
            self.items += n
            self.shards += 1
            rate = self.items / max(time.perf_counter() - self.t0, 1e-9)
            missing = ", ".join(f"{m} missing {entry['missing'][m]}" for m in self.modalities)
            log.info(
                "[extract] wrote %s (%d items, %s); %d shards / %d of %d items this run, %.1f items/s",
                entry["name"],
                n,
                missing,
                self.shards,
                self.items,
                self.total_items,
                rate,
            )
            self.check()
            if self.on_shard is not None:
                self.on_shard(entry)


def dataset_spec(dataset: Any) -> dict[str, Any]:
    """What the features depend on: the item catalogue (by hash) and its size, not the interactions or split."""
    return {"name": dataset.name, "items_hash": items_hash(dataset), "n_items": dataset.n_items}


def with_growth(spec: dict[str, Any], out: str | Path, dataset: Any) -> dict[str, Any]:
    """``spec`` with the growth record of the catalogue whose features ``out`` already holds.

    When ``out``'s manifest has the same spec but for a smaller catalogue whose items are this dataset's first
    ones (same items hash), ``spec.dataset.grown_from`` records it: its shards stay as they are and the new items
    get shards of their own (``shards.shard_ranges``). The same catalogue again keeps its recorded growth, so a
    rerun resumes. Anything else is left to ``FeatureSetWriter`` (refused unless --overwrite).
    """
    try:
        old = load_manifest(out)
    except ShardError:
        return spec  # the writer names what is wrong with it
    if old is None or {k: v for k, v in old["spec"].items() if k != "dataset"} != {
        k: v for k, v in spec.items() if k != "dataset"
    }:
        return spec
    before, now = old["spec"]["dataset"], spec["dataset"]
    if before.get("items_hash") == now["items_hash"] and before["n_items"] == now["n_items"]:
        grown = before.get("grown_from")
        return spec if grown is None else {**spec, "dataset": {**now, "grown_from": grown}}
    n_before = before["n_items"]
    if 0 < n_before < now["n_items"] and items_prefix_hash(dataset, n_before) == before.get("items_hash"):
        earlier = {"n_items": n_before, "items_hash": before["items_hash"]}
        return {**spec, "dataset": {**now, "grown_from": [*before.get("grown_from", []), earlier]}}
    return spec


def _spec(dataset: Any, cfg: ExtractConfig, text: ResolvedTextModel | None, image: ResolvedImageModel | None):
    """(spec: what decides the numbers, provenance: where things were loaded from and how they ran)."""
    modalities: dict[str, Any] = {}
    provenance: dict[str, Any] = {
        "executor": cfg.executor,
        "torch_threads": cfg.threads,
        "dataset_content_hash": dataset.meta["content_hash"],
    }
    if text is not None:
        d = text.describe()
        provenance["text"] = {
            "load_path": d.pop("load_path"),
            "device": d.pop("device"),
            "batch_size": cfg.text.batch_size,
            "max_padding": cfg.text.max_padding,
        }
        d.pop("extra")
        modalities["text"] = d | {"max_chars": cfg.text.max_chars}
    if image is not None:
        d = image.describe()
        provenance["image"] = {
            "load_path": d.pop("load_path"),
            "device": d.pop("device"),
            "batch_size": cfg.image.batch_size,
        }
        d.pop("extra")
        modalities["image"] = d
    spec = {
        "dataset": dataset_spec(dataset),
        "items_per_shard": cfg.items_per_shard,
        "store_dtype": cfg.store_dtype,
        "modalities": modalities,
    }
    return spec, provenance


# Ray's own waits when an address does not answer: its C++ clients read these at ``import ray``, the
# connect loop of ray.init reads the last at each call. Without them a wrong address waits minutes.
_RAY_IMPORT_TIMEOUTS = ("RAY_py_gcs_connect_timeout_s", "RAY_gcs_rpc_server_connect_timeout_s")
_RAY_CONNECT_RETRIES = "RAY_gcs_server_port_wait_time_s"


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set where the user has not set them, restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ray_endpoint(address: str, where: str) -> tuple[str, int] | None:
    """(host, port) that ``address`` makes Ray connect to; None for ``auto``. A form Ray does not take is refused."""
    if address == "auto":
        return None
    rest, default_port = address, None
    if "://" in address:
        scheme, _, rest = address.partition("://")
        if scheme.lower() != "ray":
            raise ExtractError(
                f"Ray address {address!r} ({where}): {scheme}:// is not an address Ray connects to; give the head's "
                "GCS address HOST:6379 or ray://HOST:10001 (http://HOST:8265 is for `ray job submit --address`)"
            )
        default_port = 10001
    hostport = rest.split("/", 1)[0]
    match = re.fullmatch(r"\[(?P<v6>[^\]]+)\](?::(?P<p6>[^:]*))?|(?P<host>[^:\[\]]+)(?::(?P<port>[^:]*))?", hostport)
    host = match and (match["v6"] or match["host"])
    port = match and (match["p6"] or match["port"])
    if not host or (port is None and default_port is None) or (port is not None and not port.isdigit()):
        raise ExtractError(
            f"Ray address {address!r} ({where}): expected HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:PORT"
        )
    return host, int(port) if port is not None else default_port


def probe_ray_address(address: str, where: str, timeout: float) -> None:
    """Open (and close) a TCP connection to ``address`` within ``timeout`` s; an ExtractError naming it if none."""
    endpoint = ray_endpoint(address, where)
    if endpoint is None:
        return
    try:
        with socket.create_connection(endpoint, timeout=timeout):
            pass
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc) or type(exc).__name__)
        raise ExtractError(
            f"cannot reach the Ray cluster at {address} ({where}): {reason} within {timeout:g}s; start the head "
            "(cluster/start_ray_head.sh), correct the address, or leave --address and RAY_ADDRESS unset for a "
            "local Ray instance"
        ) from exc


def _init_ray(cfg: ExtractConfig) -> bool:
    """Connect to RAY_ADDRESS / ``cfg.address``, or start a local instance on 127.0.0.1; True when we started it.

    A given address is first probed with a TCP connection (``connect_timeout``): nothing listening
    fails at once with the address named. Ray's own connection waits are bounded by the same
    timeout (when this process imports Ray), so a server that is not Ray's fails within seconds
    too, instead of Ray retrying for minutes with SIGTERM unheard.
    """
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    address, where = (cfg.address, "--address") if cfg.address else (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")
    if address and address != "local":
        probe_ray_address(address, where, cfg.connect_timeout)
        seconds = str(max(1, math.ceil(cfg.connect_timeout)))
        with _environ(dict.fromkeys(_RAY_IMPORT_TIMEOUTS, seconds)):
            import ray
        log.info("[extract] connecting to Ray at %s", address)
        with _environ({_RAY_CONNECT_RETRIES: "1"}):
            try:
                ray.init(address=address)
            except Exception as exc:  # noqa: BLE001 - any failure to connect names the address
                first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                raise ExtractError(
                    f"cannot connect to the Ray cluster at {address} ({where}): {first}; is it a Ray head's "
                    "GCS address (HOST:6379) or Ray client address (ray://HOST:10001)?"
                ) from exc
        return False
    import ray
    from ray._private import ray_constants

    log.info("[extract] no RAY_ADDRESS: starting a local Ray instance on 127.0.0.1")
    # On Linux Ray swaps 127.0.0.1 for the machine's outward address and then binds its servers to
    # all interfaces; this switch (read at import, and inherited by Ray's processes) keeps them on loopback.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", include_dashboard=cfg.include_dashboard, _node_ip_address="127.0.0.1")
    return True


def _user_errors() -> set[str]:
    """Names of every DPRecError class (the errors that name a user's mistake)."""
    names, todo = set(), [DPRecError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


def user_error_message(exc: BaseException) -> str | None:
    """The message of the user's mistake (a DPRecError) that a Ray error wraps, if it wraps one.

    Ray re-raises an actor's exception as its own types; the original is its ``cause`` or, for an
    actor whose ``__init__`` raised, only in the text (``... TextModelError: <message>``).
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DPRecError):
            return str(e)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    names = "|".join(sorted(map(re.escape, _user_errors())))
    pattern = rf"\b(?:{names}): (.+)"
    found = re.findall(pattern, str(exc))
    return found[-1].strip() if found else None


def _gpus_per_actor(cfg: ExtractConfig, cluster_gpus: float, n_actors: int) -> float:
    if cfg.gpus_per_actor is None:
        return min(1.0, cluster_gpus / n_actors) if cluster_gpus > 0 else 0.0
    if cfg.gpus_per_actor > 0 and cfg.gpus_per_actor * n_actors > cluster_gpus:
        raise ExtractError(
            f"{n_actors} actors x {cfg.gpus_per_actor} GPUs need {cfg.gpus_per_actor * n_actors} GPUs, the Ray cluster "
            f"has {cluster_gpus:g}; lower --gpus-per-actor (0 runs on CPU) or the actor counts"
        )
    return cfg.gpus_per_actor


def _run_ray(
    cfg: ExtractConfig,
    units: list[pa.Table],
    text: ResolvedTextModel | None,
    image: ResolvedImageModel | None,
    collector: _Collector,
    roots: list[str] | None,
) -> None:
    import ray

    resources = ray.cluster_resources()
    n_actors = (cfg.text_actors if text else 0) + (cfg.image_actors if image else 0)
    cpus = resources.get("CPU", 0.0)
    if n_actors * cfg.cpus_per_actor > cpus:
        raise ExtractError(
            f"{n_actors} actors x {cfg.cpus_per_actor} CPUs need {n_actors * cfg.cpus_per_actor:g} CPUs, the Ray "
            f"cluster has {cpus:g}; lower --cpus-per-actor or the actor counts"
        )
    gpus = _gpus_per_actor(cfg, resources.get("GPU", 0.0), n_actors)
    log.info(
        "[extract] Ray cluster: %g CPUs, %g GPUs; %d actors with %g CPUs, %g GPUs, %d torch threads each",
        cpus,
        resources.get("GPU", 0.0),
        n_actors,
        cfg.cpus_per_actor,
        gpus,
        cfg.threads,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    common: dict[str, Any] = dict(
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=cfg.cpus_per_actor,
        num_gpus=gpus,
        max_restarts=cfg.max_restarts,
        max_task_retries=cfg.max_task_retries,
    )
    if cfg.spread:
        common["scheduling_strategy"] = "SPREAD"
    ds = ray.data.from_arrow(units)
    with warnings.catch_warnings():
        # max_restarts / max_task_retries / scheduling_strategy have no named map_batches parameter in Ray 2.60
        warnings.simplefilter("ignore", DeprecationWarning)
        if text is not None:
            ds = ds.map_batches(
                TextStage,
                compute=ray.data.ActorPoolStrategy(size=cfg.text_actors),
                fn_constructor_kwargs=dict(
                    resolved=text,
                    batch_size=cfg.text.batch_size,
                    threads=cfg.threads,
                    max_padding=cfg.text.max_padding,
                    in_actor=True,
                ),
                **common,
            )
        if image is not None:
            ds = ds.map_batches(
                ImageStage,
                compute=ray.data.ActorPoolStrategy(size=cfg.image_actors),
                fn_constructor_kwargs=dict(
                    resolved=image,
                    batch_size=cfg.image.batch_size,
                    threads=cfg.threads,
                    fetch_urls=cfg.image.fetch_urls,
                    url_timeout=cfg.image.url_timeout,
                    in_actor=True,
                    max_bytes=cfg.image.max_image_bytes,
                    roots=roots,
                ),
                **common,
            )
    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            collector.add_table(table)
    except DPRecError:
        raise
    except Exception as exc:
        message = user_error_message(exc)
        if message is None:
            raise
        raise ExtractError(message) from exc


def _run_local(
    cfg: ExtractConfig,
    units: list[pa.Table],
    text: ResolvedTextModel | None,
    image: ResolvedImageModel | None,
    collector: _Collector,
    roots: list[str] | None,
) -> None:
    stages: list[Callable[[pa.Table], pa.Table]] = []
    if text is not None:
        stages.append(TextStage(text, cfg.text.batch_size, cfg.threads, cfg.text.max_padding, in_actor=False))
    if image is not None:
        image_cfg = cfg.image
        stages.append(
            ImageStage(
                image,
                image_cfg.batch_size,
                cfg.threads,
                image_cfg.fetch_urls,
                image_cfg.url_timeout,
                in_actor=False,
                max_bytes=image_cfg.max_image_bytes,
                roots=roots,
            )
        )
    for unit in units:
        for stage in stages:
            unit = stage(unit)
        collector.add_table(unit)


def image_roots(dataset: Any, folder: str | Path) -> list[str]:
    """The folders whose files ``image_path`` may name: the dataset folder and what ``prepare`` read images from.

    ``prepare`` stores image paths relative to the dataset folder, or absolute: under the table
    source's ``--root`` (recorded as ``source.root``) or from an image template (recorded in
    ``prepare.image_template`` or the table spec); the fixed directory part of an absolute template
    counts as a root; so does the folder of each file items were added from (``grown_from``, by
    ``prepare add-items``). Roots are returned as recorded (a relative dataset folder stays relative, so
    that it resolves in a Ray job's working directory as the image paths do).
    """
    roots = [str(folder)]
    meta = dataset.meta if isinstance(getattr(dataset, "meta", None), dict) else {}
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    if isinstance(source.get("root"), str) and source["root"].strip():
        roots.append(source["root"])
    spec = source.get("spec") if isinstance(source.get("spec"), dict) else {}
    items = spec.get("items") if isinstance(spec.get("items"), dict) else {}
    prepared = meta.get("prepare") if isinstance(meta.get("prepare"), dict) else {}
    for template in (prepared.get("image_template"), items.get("image_template")):
        if isinstance(template, str) and "{" in template:
            fixed = template.split("{", 1)[0]
            base = fixed if fixed.endswith(os.sep) else os.path.dirname(fixed)
            if os.path.isabs(base):
                roots.append(base)
    grown = meta.get("grown_from") if isinstance(meta.get("grown_from"), list) else []
    roots += [g["image_root"] for g in grown if isinstance(g, dict) and isinstance(g.get("image_root"), str)]
    return list(dict.fromkeys(roots))


def _writable(folder: Path) -> bool:
    """New entries can be made in ``folder``: the OS allows it and its mode grants write (refused also for root)."""
    try:
        return os.access(folder, os.W_OK | os.X_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def check_out_folder(out: str | Path, dataset_folder: str | Path | None = None) -> Path:
    """The feature folder ``out``, refused with a message when it cannot be one (a file, read-only, the dataset)."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ExtractError(f"--out {out}: exists and is not a folder; name a feature folder (data_shards/<name>/<set>)")
    nearest = folder if folder.exists() else next((p for p in folder.absolute().parents if p.exists()), None)
    if nearest is not None and not nearest.is_dir():
        raise ExtractError(f"--out {out}: cannot create the folder, {nearest} is a file")
    if nearest is not None and not _writable(nearest):
        raise ExtractError(f"--out {out}: cannot write there, {nearest} is read-only; choose another --out")
    if dataset_folder is not None and os.path.realpath(folder) == os.path.realpath(dataset_folder):
        raise ExtractError(f"--out {out}: is the dataset folder itself; write features to a folder of their own")
    return folder


def check_nonfinite(counts: dict[str, int], n_items: int, share: float, modalities: list[str], out: str) -> None:
    """An ExtractError when more than ``share`` of the ``n_items`` items have a non-finite vector of a modality."""
    for m in modalities:
        kinds = {k: counts[k] for k in (f"{m}_nonfinite", f"{m}_overflow") if counts.get(k)}
        bad = sum(kinds.values())
        if bad and bad > share * n_items:
            hints = []
            if f"{m}_nonfinite" in kinds:
                hints.append(f"the {m} model gives NaN/inf (a broken model, or its dtype: try --{m}-dtype float32)")
            if f"{m}_overflow" in kinds:
                hints.append("the values overflow --store-dtype float16 (use --store-dtype float32)")
            shown = ", ".join(f"{k} {n}" for k, n in kinds.items())
            raise ExtractError(
                f"{m}: {bad} of {n_items} items ({bad / max(n_items, 1):.1%}) have non-finite vectors ({shown}), "
                f"more than --max-nonfinite-share {share:g}: {'; '.join(hints)}. {out} is left incomplete"
            )


def run_extract(
    cfg: ExtractConfig, on_shard: Callable[[dict[str, Any]], None] | None = None, dataset: Any = None
) -> RunSummary:
    """Extract features of ``cfg.dataset`` into ``cfg.out``; resumes a compatible folder. Returns the summary.

    ``on_shard`` is called with each new manifest entry as its shard lands. ``dataset`` (an
    in-memory :class:`~dprec.data.dataset.Dataset`) replaces loading ``cfg.dataset``. The output
    folder is locked for the whole run (:func:`~dprec.features.shards.folder_lock`).
    """
    t0 = time.perf_counter()
    dataset = dataset if dataset is not None else load_dataset(cfg.dataset)
    dataset_folder = dataset.folder if dataset.folder is not None else cfg.dataset
    with folder_lock(check_out_folder(cfg.out, dataset_folder)):
        started_ray = False
        try:
            if cfg.executor == "ray":
                started_ray = _init_ray(cfg)
                import ray

                device = "cuda" if _gpus_per_actor(cfg, ray.cluster_resources().get("GPU", 0.0), 1) > 0 else "cpu"
            else:
                device = None
            names = cfg.text.extra_fields() if cfg.text else []
            if names:
                counts = check_extra_fields(dataset, names)
                log.info(
                    "[extract] prompt template attributes from items.extra: %s",
                    ", ".join(f"{n} ({c} of {dataset.n_items} items)" for n, c in counts.items()),
                )
            text = resolve_text_model(cfg.text, device) if cfg.text else None
            image = resolve_image_model(cfg.image, device) if cfg.image else None
            spec, provenance = _spec(dataset, cfg, text, image)
            spec = with_growth(spec, cfg.out, dataset)
            roots = None
            if cfg.image is not None:
                roots = None if cfg.image.allow_outside_paths else image_roots(dataset, dataset_folder)
                provenance["image"]["input"] = {
                    "max_image_bytes": cfg.image.max_image_bytes,
                    "fetch_urls": cfg.image.fetch_urls,
                    "path_roots": roots if roots is not None else "any (--allow-outside-paths)",
                }
            writer = FeatureSetWriter(cfg.out, spec, provenance, overwrite=cfg.overwrite)
            atomic_write_text(
                Path(cfg.out) / "extract_config.json", json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n"
            )
            pending = writer.pending()
            log.info(
                "[extract] dataset %r: %d items in %d shards of %d; %d already complete, %d to compute",
                dataset.name,
                dataset.n_items,
                len(writer.ranges),
                cfg.items_per_shard,
                len(writer.skipped),
                len(pending),
            )
            if roots is not None:
                log.info("[extract] image files are read from within: %s", ", ".join(roots))
            modalities = [m for m, r in (("text", text), ("image", image)) if r is not None]

            def check() -> None:
                check_nonfinite(writer.counts(), dataset.n_items, cfg.max_nonfinite_share, modalities, str(cfg.out))

            check()  # shards kept from an earlier run count too
            collector = _Collector(
                writer, modalities, sum(writer.ranges[s][1] - writer.ranges[s][0] for s in pending), on_shard, check
            )
            if pending:
                max_chars = cfg.text.max_chars if cfg.text else None
                units = build_work_units(dataset, pending, cfg.items_per_shard, max_chars, names, writer.ranges)
                (_run_ray if cfg.executor == "ray" else _run_local)(cfg, units, text, image, collector, roots)
            check()
            manifest = writer.finish()
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    seconds = time.perf_counter() - t0
    return RunSummary(
        items=dataset.n_items,
        shards_total=len(writer.ranges),
        shards_written=collector.shards,
        shards_skipped=len(writer.skipped),
        items_computed=collector.items,
        failures=manifest["counts"],
        seconds=round(seconds, 3),
        items_per_second=round(collector.items / seconds, 3) if seconds > 0 else 0.0,
        nodes=len(collector.nodes),
        out=str(cfg.out),
    )


def import_mmrec(cfg: MMRecImportConfig) -> RunSummary:
    """MMRec's item-ordered ``text_feat.npy`` / ``image_feat.npy`` -> shards of the same format.

    Row i is item index i. A row with NaN or inf becomes a zero vector flagged ``<m>_nonfinite``
    (``<m>_overflow``: finite, but not as ``store_dtype``).
    """
    t0 = time.perf_counter()
    dataset = load_dataset(cfg.dataset)
    files = {m: path for m, path in (("text", cfg.text_feat), ("image", cfg.image_feat)) if path is not None}
    arrays, modalities = {}, {}
    for m, path in files.items():
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise ExtractError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        if not stat.S_ISREG(mode):  # a FIFO would block np.load forever, a device feed it without end
            raise ExtractError(f"{path}: not a regular file (a folder, FIFO or device); give a .npy file")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ExtractError(f"{path}: cannot read as a plain .npy array ({exc})") from exc
        if arr.ndim != 2 or arr.shape[0] != dataset.n_items:
            raise ExtractError(
                f"{path}: shape {arr.shape}, expected ({dataset.n_items}, dim) for dataset {dataset.name!r}"
            )
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, flagged by the writer
            arrays[m] = arr.astype(np.float32)
        modalities[m] = {
            "name": "mmrec-import",
            "source_file": Path(path).name,
            "revision": {"sha256": sha256_file(Path(path))},
            "pooling": "precomputed",
            "source_dtype": str(arr.dtype),
        }
    spec = {
        "dataset": dataset_spec(dataset),
        "items_per_shard": cfg.items_per_shard,
        "store_dtype": cfg.store_dtype,
        "modalities": modalities,
    }
    provenance = {
        "executor": "import-mmrec",
        "dataset_content_hash": dataset.meta["content_hash"],
        **{m: {"load_path": str(Path(p).resolve())} for m, p in files.items()},
    }

    def shard_vectors(first: int, stop: int) -> tuple[dict[str, np.ndarray], list[list[str]]]:
        # NaN/inf rows: zeroed and flagged by the writer
        return {m: arr[first:stop] for m, arr in arrays.items()}, [[] for _ in range(stop - first)]

    return write_precomputed(cfg.out, cfg.overwrite, dataset, spec, provenance, shard_vectors, t0)


def write_precomputed(
    out: str | Path,
    overwrite: bool,
    dataset: Dataset,
    spec: dict[str, Any],
    provenance: dict[str, Any],
    shard_vectors: Callable[[int, int], tuple[dict[str, np.ndarray], list[list[str]]]],
    t0: float,
    extra_failures: dict[str, int] | None = None,
) -> RunSummary:
    """Write the shards still missing of a feature set whose vectors are already known (``import-mmrec``,
    ``import-codes``): ``shard_vectors(first, stop)`` gives the items' vectors per modality and their flags."""
    with folder_lock(check_out_folder(out, dataset.folder)):
        writer = FeatureSetWriter(out, with_growth(spec, out, dataset), provenance, overwrite=overwrite)
        items = written = 0
        for shard in writer.pending():
            first, stop = writer.ranges[shard]
            vectors, flags = shard_vectors(first, stop)
            ids = dataset.items["item_id"].iloc[first:stop].astype(str).tolist()
            entry = writer.add(shard, ids, vectors, flags)
            items += stop - first
            written += 1
            log.info("[extract] wrote %s (%d items)", entry["name"], stop - first)
        manifest = writer.finish()
    seconds = time.perf_counter() - t0
    return RunSummary(
        items=dataset.n_items,
        shards_total=len(writer.ranges),
        shards_written=written,
        shards_skipped=len(writer.skipped),
        items_computed=items,
        failures={**manifest["counts"], **(extra_failures or {})},
        seconds=round(seconds, 3),
        items_per_second=round(items / seconds, 3) if seconds else 0.0,
        nodes=1,
        out=str(out),
    )
