"""Feature shards (DESIGN §2): the contract between ``extract`` and ``train``, written and checked here.

A feature folder holds ``items-%06d.tar`` WebDataset shards and ``manifest.json``. Shard ``s``
holds exactly items ``s * items_per_shard`` up to the next shard's first, one sample per item in
item order, keyed by the item index as ``%09d``; members ``text.npy`` / ``image.npy`` (or ``<m>.npy``
for another modality, e.g. imported codes; one vector, float16 or float32, zero where the modality
is missing; read with ``allow_pickle=False``) and ``meta.json`` (``item_id``, ``item_idx``,
``<m>_missing`` per modality, ``flags``; :func:`missing_flags` says which flags mean missing).
Tars are written by webdataset's ``TarWriter`` and are byte-deterministic (members sorted, mtime
0, uid/gid 0, no owner names, mode 0644, ustar headers); each is written atomically. The manifest
(rewritten atomically after every shard, ``complete`` last) holds the ``spec`` (items hash,
models and revisions, pooling, prompt template, dtypes: all that decides the numbers), ``dims``,
and per shard its range, count, sha256 and missing counts. A shard is done exactly when the
manifest lists it with a matching sha256; a rerun with the same spec skips those, another spec
is refused; a manifest whose structure is broken is refused with what is wrong.

A vector that is not finite as stored (NaN or inf from the model: ``<m>_nonfinite``; finite in
float32 but beyond the range of ``store_dtype``, e.g. > 65504 for float16: ``<m>_overflow``) is
stored as zeros and its item flagged, so garbage never reaches a shard as numbers; the counts
are in the manifest (``counts``) like every other flag. A run holds ``folder_lock`` (an
exclusive, non-blocking ``flock`` on ``.extract.lock`` in the folder) while it writes, so a
second run into the same folder fails at once instead of interleaving shards and manifests.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import socket
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dprec.config import DPRecError
from dprec.io import atomic_write, remove_temporaries, sha256_bytes, sha256_file

MANIFEST = "manifest.json"
LOCK_FILE = ".extract.lock"
FORMAT = "dprec-item-features"
FORMAT_VERSION = 1
MISSING_FLAGS = {
    "text": ("text_empty", "text_error", "text_nonfinite", "text_overflow"),
    "image": (
        "image_none",
        "image_file_missing",
        "image_outside_dataset",
        "image_not_a_file",
        "image_too_large",
        "image_decode_error",
        "image_url_not_fetched",
        "image_url_refused",
        "image_url_error",
        "image_error",
        "image_nonfinite",
        "image_overflow",
    ),
}
CODE_FLAGS = ("code_missing", "code_malformed")
"""Per-item faults of imported codes (``dprec.features.codes``), ``<m>_code_missing`` / ``<m>_code_malformed``."""
MAX_LOGGED_NONFINITE = 5
log = logging.getLogger(__name__)


class ShardError(DPRecError, ValueError):
    """A feature folder breaks the shard contract; the message names the shard (or manifest) and the fault."""


def missing_flags(modality: str) -> tuple[str, ...]:
    """The flags that mark an item's ``modality`` vector as missing (a zero vector).

    ``text`` and ``image`` have their tables (``MISSING_FLAGS``); any other modality (imported
    codes, ``text_codes``) is missing when non-finite, overflowing or a code fault. A code fault
    marks any modality missing, so codes may also be imported under the name ``text`` or ``image``.
    """
    own = MISSING_FLAGS.get(modality, (f"{modality}_nonfinite", f"{modality}_overflow"))
    return (*own, *(f"{modality}_{kind}" for kind in CODE_FLAGS))


def shard_name(shard: int) -> str:
    return f"items-{shard:06d}.tar"


def item_key(item_idx: int) -> str:
    return f"{item_idx:09d}"


def shard_ranges(n_items: int, items_per_shard: int, grown_from: Sequence[int] = ()) -> list[tuple[int, int]]:
    """[(first, last_exclusive)] per shard: ``items_per_shard`` items at a time from item 0, and again from each
    size the catalogue had when it grew (``grown_from``), so a grown catalogue keeps its earlier shards."""
    bounds = [0, *sorted(g for g in grown_from if 0 < g < n_items), n_items]
    return [
        (s, min(s + items_per_shard, stop))
        for start, stop in zip(bounds, bounds[1:], strict=False)
        for s in range(start, stop, items_per_shard)
    ]


def growth_points(spec: dict[str, Any]) -> list[int]:
    """The catalogue sizes a feature folder grew from (``spec.dataset.grown_from``; empty if it never grew)."""
    return [int(g["n_items"]) for g in spec["dataset"].get("grown_from", [])]


def spec_ranges(spec: dict[str, Any]) -> list[tuple[int, int]]:
    """The shard ranges of a feature folder's ``spec``."""
    return shard_ranges(spec["dataset"]["n_items"], spec["items_per_shard"], growth_points(spec))


def extends(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Is ``new`` the spec of a catalogue grown from ``old``'s (new items appended, everything else the same)?"""
    rest_old = {k: v for k, v in old.items() if k != "dataset"}
    rest_new = {k: v for k, v in new.items() if k != "dataset"}
    earlier = {"n_items": old["dataset"]["n_items"], "items_hash": old["dataset"].get("items_hash")}
    return rest_old == rest_new and new["dataset"].get("grown_from") == [
        *old["dataset"].get("grown_from", []),
        earlier,
    ]


def _npy_bytes(vector: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(vector), allow_pickle=False)
    return buf.getvalue()


def shard_bytes(item_idx: np.ndarray, vectors: dict[str, np.ndarray], metas: list[dict[str, Any]], dtype: str) -> bytes:
    """The tar of one shard, byte-deterministic: same inputs, same bytes.

    ``TarWriter`` writes members in sorted order; the header fields that would vary (mtime,
    owner names, mode) are fixed, and the uid/gid it leaves at tarfile's default are 0. Its
    ``format`` argument does not reach ``tarfile.open``, so the archive is tarfile's default
    (pax), whose headers are plain ustar ones for ASCII names and sizes like these.
    """
    from webdataset import TarWriter  # imports torch: only writers pay for it, readers need numpy alone

    buf = io.BytesIO()
    with TarWriter(buf, user="", group="", mode=0o644, mtime=0, encoder=False) as sink:
        for row, idx in enumerate(item_idx):
            sample = {f"{m}.npy": _npy_bytes(vectors[m][row].astype(dtype)) for m in vectors}
            sample["meta.json"] = json.dumps(metas[row], sort_keys=True, ensure_ascii=False).encode()
            sink.write({"__key__": item_key(int(idx)), **sample})
    return buf.getvalue()


def write_shard(folder: Path, shard: int, data: bytes) -> dict[str, Any]:
    atomic_write(folder / shard_name(shard), data)
    return {"name": shard_name(shard), "sha256": sha256_bytes(data), "bytes": len(data)}


def _manifest_problem(manifest: Any) -> str | None:
    """What is structurally wrong with a parsed manifest (None: nothing), so that no reader meets a KeyError."""
    if not isinstance(manifest, dict):
        return f"expected a JSON object, got {type(manifest).__name__}"
    spec = manifest.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("dataset"), dict):
        return "no spec with a dataset"
    n_items, per_shard = spec["dataset"].get("n_items"), spec.get("items_per_shard")
    if not (isinstance(n_items, int) and n_items >= 0 and isinstance(per_shard, int) and per_shard >= 1):
        return "spec.dataset.n_items and spec.items_per_shard must be integers"
    grown = spec["dataset"].get("grown_from", [])
    if not isinstance(grown, list) or not all(
        isinstance(g, dict) and isinstance(g.get("n_items"), int) and isinstance(g.get("items_hash"), str)
        for g in grown
    ):
        return "spec.dataset.grown_from must be a list of {n_items, items_hash}"
    if spec.get("store_dtype") not in ("float16", "float32"):
        return f"spec.store_dtype {spec.get('store_dtype')!r} is not float16 or float32"
    dims = manifest.get("dims")
    if not isinstance(dims, dict) or not all(isinstance(d, int) and d >= 1 for d in dims.values()):
        return "dims must map modalities to positive integers"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "shards must be a list"
    for entry in shards:
        if not isinstance(entry, dict):
            return "a shards entry is not an object"
        shard = entry.get("shard")
        if not isinstance(shard, int) or entry.get("name") != shard_name(shard):
            return f"shards entry {entry.get('name')!r} does not name its shard number"
        for key in ("first_item", "count"):
            if not isinstance(entry.get(key), int):
                return f"shards entry {entry['name']}: {key} must be an integer"
        if not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("flags"), dict):
            return f"shards entry {entry['name']}: sha256 must be a string and flags an object"
    return None


def load_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: unreadable manifest ({exc})") from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or manifest.get("format_version") != FORMAT_VERSION
    ):
        raise ShardError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    problem = _manifest_problem(manifest)
    if problem:
        raise ShardError(
            f"{path}: broken manifest ({problem}); rerun extract with --overwrite, or choose another --out"
        )
    return manifest


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on feature folder ``folder`` (created if missing) for the ``with`` block.

    The lock is ``flock`` on ``LOCK_FILE`` in the folder, taken without waiting: when another run
    holds it this raises :class:`ShardError` at once, naming the folder and the holder. The OS drops
    the lock when its holder exits, however it ends, so a killed run leaves nothing to clean up.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        raise ShardError(
            f"{folder}: another extraction is writing to this folder ({holder or 'its lock ' + str(path)}); "
            "wait for it to finish, or choose another --out"
        ) from exc
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"held by pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield folder
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    manifest = dict(manifest, shards=sorted(manifest["shards"], key=lambda s: s["shard"]))
    atomic_write(
        folder / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    )


def _spec_diff(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted paths of the keys where two specs differ (the deepest differing mappings), at most 5."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [where or "spec"]
    out: list[str] = []
    for key in sorted(set(old) | set(new), key=str):
        if old.get(key) != new.get(key):
            out += _spec_diff(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
    return out[:5]


class FeatureSetWriter:
    """Writes the shards of one feature folder and keeps its manifest current; resumes a compatible folder.

    ``spec`` is everything that decides the numbers. An existing manifest with the same spec
    keeps the shards it lists whose files still match their sha256; one with another spec is
    refused unless ``overwrite`` (then its shards and manifest are deleted first). A spec that
    :func:`extends` the existing one (the catalogue grew: new items appended) keeps the existing
    shards as they are; the new items get shards of their own (:func:`shard_ranges`).
    """

    def __init__(self, folder: str | Path, spec: dict[str, Any], provenance: dict[str, Any], overwrite: bool = False):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.ranges = spec_ranges(spec)
        old = load_manifest(self.folder)
        if old is not None and old["spec"] != spec and not extends(old["spec"], spec):
            if not overwrite:
                diff = _spec_diff(old["spec"], spec)
                raise ShardError(
                    f"{self.folder / MANIFEST}: this folder holds features of another configuration "
                    f"(differs in {diff}); choose another --out or pass --overwrite"
                )
            for path in self.folder.glob("items-*.tar"):
                path.unlink()
            (self.folder / MANIFEST).unlink()
            old = None
        remove_temporaries(self.folder)
        self.dims: dict[str, int] = dict(old["dims"]) if old else {}
        self.entries: dict[int, dict[str, Any]] = {}
        for entry in old["shards"] if old else []:
            path = self.folder / entry["name"]
            if path.is_file() and sha256_file(path) == entry["sha256"]:
                self.entries[entry["shard"]] = entry
        self.skipped = sorted(self.entries)
        self._logged_nonfinite = 0
        self.manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec, "provenance": provenance}
        self._write_manifest()

    def pending(self) -> list[int]:
        return [s for s in range(len(self.ranges)) if s not in self.entries]

    def add(
        self,
        shard: int,
        item_ids: list[str],
        vectors: dict[str, np.ndarray],
        flags: list[list[str]],
    ) -> dict[str, Any]:
        """Write one shard (vectors per modality in item order, flags per item) and list it in the manifest."""
        first, stop = self.ranges[shard]
        count = stop - first
        if len(item_ids) != count or len(flags) != count:
            raise ShardError(f"shard {shard_name(shard)}: got {len(item_ids)} items, expected {count}")
        for m, vec in vectors.items():
            if vec.shape[0] != count:
                raise ShardError(f"shard {shard_name(shard)}: {vec.shape[0]} {m} vectors for {count} items")
            dim = self.dims.setdefault(m, int(vec.shape[1]))
            if vec.shape[1] != dim:
                raise ShardError(f"shard {shard_name(shard)}: {m} dim {vec.shape[1]}, earlier shards have {dim}")
        vectors, flags = self._zero_nonfinite(first, vectors, flags)
        metas, kinds, n_missing = [], {}, dict.fromkeys(vectors, 0)
        missing = {m: missing_flags(m) for m in vectors}
        for row in range(count):
            item_flags = sorted(set(flags[row]))
            meta = {"item_id": item_ids[row], "item_idx": first + row, "flags": item_flags}
            for m in vectors:
                meta[f"{m}_missing"] = any(f in missing[m] for f in item_flags)
                n_missing[m] += meta[f"{m}_missing"]
            for f in item_flags:
                kinds[f] = kinds.get(f, 0) + 1
            metas.append(meta)
        data = shard_bytes(np.arange(first, stop), vectors, metas, self.spec["store_dtype"])
        entry = write_shard(self.folder, shard, data)
        entry.update(shard=shard, first_item=first, last_item=stop - 1, count=count, missing=n_missing, flags=kinds)
        self.entries[shard] = entry
        self._write_manifest()
        return entry

    def _zero_nonfinite(
        self, first: int, vectors: dict[str, np.ndarray], flags: list[list[str]]
    ) -> tuple[dict[str, np.ndarray], list[list[str]]]:
        """Vectors with every row that is not finite once stored as ``store_dtype`` zeroed, and those items flagged."""
        dtype = self.spec["store_dtype"]
        vectors, flags = dict(vectors), [list(f) for f in flags]
        for m, vec in vectors.items():
            vec = np.asarray(vec)
            with np.errstate(over="ignore", invalid="ignore"):
                stored_ok = np.isfinite(vec.astype(dtype)).all(axis=1)
            if stored_ok.all():
                continue
            source_ok = np.isfinite(vec).all(axis=1)
            for row in np.flatnonzero(~stored_ok):
                kind = f"{m}_nonfinite" if not source_ok[row] else f"{m}_overflow"
                flags[row].append(kind)
                self._logged_nonfinite += 1
                if self._logged_nonfinite <= MAX_LOGGED_NONFINITE:
                    what = "has NaN or inf values" if kind.endswith("nonfinite") else f"overflows {dtype}"
                    log.info("[extract] item %d: %s vector %s; stored as zeros, flagged %s", first + row, m, what, kind)
            vec = vec.copy()
            vec[~stored_ok] = 0
            vectors[m] = vec
        return vectors, flags

    def counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for entry in self.entries.values():
            for k, n in entry["flags"].items():
                total[k] = total.get(k, 0) + n
        return dict(sorted(total.items()))

    def _write_manifest(self, complete: bool = False) -> None:
        self.manifest.update(
            dims=self.dims,
            shards=list(self.entries.values()),
            complete=complete,
            n_shards=len(self.ranges),
            counts=self.counts(),
        )
        write_manifest(self.folder, self.manifest)

    def finish(self) -> dict[str, Any]:
        if self.pending():
            raise ShardError(f"{self.folder}: shards {self.pending()[:10]} were not written; rerun to finish")
        self._write_manifest(complete=True)
        return self.manifest


def _items_hash(dataset: Any) -> tuple[str, int]:
    """(items hash, item count) of a Dataset or a dataset folder."""
    from dprec.data.dataset import items_hash, load_dataset  # pandas: only when a dataset is checked

    if isinstance(dataset, (str, Path)):
        dataset = load_dataset(dataset)
    return items_hash(dataset), dataset.n_items


def read_shard(path: Path, entry: dict[str, Any], dims: dict[str, int]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Vectors per modality (count x dim, float32) and the metas of one shard, checked against its manifest entry."""
    name = entry["name"]
    first, count = entry["first_item"], entry["count"]
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    raise ShardError(f"shard {name}: member {member.name!r} is not a regular file")
                key, _, suffix = member.name.partition(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardError(f"shard {name}: not a readable tar ({exc}); rerun extract to rewrite it") from exc
    expected_keys = [item_key(i) for i in range(first, first + count)]
    if len(samples) != count:
        raise ShardError(f"shard {name}: {len(samples)} samples, manifest says {count}")
    if list(samples) != expected_keys:
        raise ShardError(f"shard {name}: sample keys are not items {first}..{first + count - 1} in order")
    vectors = {m: np.zeros((count, d), np.float32) for m, d in dims.items()}
    metas = []
    for row, key in enumerate(expected_keys):
        members = samples[key]
        for m, d in dims.items():
            if f"{m}.npy" not in members:
                raise ShardError(f"shard {name}: sample {key} has no {m}.npy")
            try:
                vec = np.load(io.BytesIO(members[f"{m}.npy"]), allow_pickle=False)
            except ValueError as exc:
                raise ShardError(f"shard {name}: sample {key} {m}.npy is not a plain array ({exc})") from exc
            if vec.shape != (d,):
                raise ShardError(f"shard {name}: sample {key} {m}.npy has shape {vec.shape}, manifest dim is {d}")
            vectors[m][row] = vec
        if "meta.json" not in members:
            raise ShardError(f"shard {name}: sample {key} has no meta.json")
        metas.append(json.loads(members["meta.json"]))
    return vectors, metas


def read_features(folder: str | Path, dataset: Any = None, verify: bool = True) -> dict[str, np.ndarray]:
    """Item-ordered features of a complete feature folder.

    Returns ``{"text": (n, d) float32, "text_missing": (n,) bool, "image": ..., "image_missing": ...,
    "item_id": (n,) str}`` for the modalities the folder has. ``dataset`` (a Dataset or a
    dataset folder) is checked by content hash and item count; a dataset of a catalogue the folder
    grew from (``spec.dataset.grown_from``) reads its own items, the first ones. With ``verify``
    every shard's sha256 is checked against the manifest (a truncated or altered shard is refused).
    """
    folder = Path(folder)
    manifest = load_manifest(folder)
    if manifest is None:
        raise ShardError(f"{folder}: no {MANIFEST}; run `python -m dprec.extract` to write features here")
    if not manifest.get("complete"):
        raise ShardError(f"{folder / MANIFEST}: extraction is incomplete (interrupted?); rerun extract to finish it")
    spec = manifest["spec"]
    n_items = spec["dataset"]["n_items"]
    n_read = n_items
    if dataset is not None:  # features depend on the items alone: any split of the same catalogue reads them
        got, got_items = _items_hash(dataset)
        earlier = {(g.get("items_hash"), g.get("n_items")) for g in spec["dataset"].get("grown_from", [])}
        if (got, got_items) in earlier:
            n_read = got_items
        elif got_items != n_items:
            raise ShardError(f"{folder / MANIFEST}: {n_items} items in the features, {got_items} in the dataset")
        elif got != spec["dataset"]["items_hash"]:
            raise ShardError(
                f"{folder / MANIFEST}: features were extracted from dataset items hash "
                f"{spec['dataset']['items_hash'][:12]}..., this dataset's is {got[:12]}...; "
                "re-extract features for this dataset"
            )
    dims = {m: int(d) for m, d in manifest["dims"].items()}
    entries = sorted(manifest["shards"], key=lambda e: e["shard"])
    ranges = spec_ranges(spec)
    if [e["shard"] for e in entries] != list(range(len(ranges))):
        raise ShardError(
            f"{folder / MANIFEST}: lists shards {[e['shard'] for e in entries]}, expected 0..{len(ranges) - 1}"
        )
    out = {m: np.zeros((n_read, d), np.float32) for m, d in dims.items()}
    missing = {m: np.zeros(n_read, bool) for m in dims}
    item_ids = np.empty(n_read, dtype=object)
    for entry, (first, stop) in zip(entries, ranges, strict=True):
        if first >= n_read:  # a grown catalogue's later items: not the dataset's
            break
        name = entry["name"]
        if (entry["first_item"], entry["count"]) != (first, stop - first):
            raise ShardError(
                f"shard {name}: manifest range {entry['first_item']}+{entry['count']} != items {first}..{stop - 1}"
            )
        path = folder / name
        if not path.is_file():
            raise ShardError(f"shard {name}: listed in the manifest but missing from {folder}; rerun extract")
        if verify and sha256_file(path) != entry["sha256"]:
            raise ShardError(f"shard {name}: sha256 differs from the manifest (truncated or altered); rerun extract")
        vectors, metas = read_shard(path, entry, dims)
        for m in dims:
            out[m][first:stop] = vectors[m]
            missing[m][first:stop] = [bool(meta.get(f"{m}_missing")) for meta in metas]
        item_ids[first:stop] = [meta["item_id"] for meta in metas]
    result: dict[str, np.ndarray] = {"item_id": item_ids}
    for m in dims:
        result[m] = out[m]
        result[f"{m}_missing"] = missing[m]
    return result
