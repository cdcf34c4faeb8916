"""The configurations of feature extraction: one dataclass each, read from YAML or generated CLI flags.

``ExtractConfig`` is one ``python -m dprec.extract`` run (saved as ``extract_config.json`` beside
the shards), with a ``TextConfig`` and an ``ImageConfig`` (either ``None``: no such modality);
``MMRecImportConfig`` is one ``import-mmrec`` run and ``CodesImportConfig`` one ``import-codes``
run. All share ``FeatureSetConfig``: where the features go and how they are stored. Allowed values are ``Literal`` annotations, checked by
:func:`dprec.config.from_dict`; ranges and cross-field rules are checked in ``__post_init__``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from dprec.config import check_types
from dprec.data.schema import ITEM_TEXT_FIELDS
from dprec.features.prompt import extra_fields, template_fields

Device = Literal["auto", "cpu", "cuda"]
ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]
StoreDtype = Literal["float32", "float16"]
MAX_IMAGE_BYTES = 32 * 1024 * 1024


@dataclass
class TextConfig:
    """How item text becomes a vector. ``None`` fields take the model's preset or family default."""

    model: str = "smollm2"
    """``smollm2``, ``minilm``, a Hugging Face model id or a local model folder (``none``: no text)."""
    revision: str | None = None
    """Hub branch, tag or commit (hub ids only)."""
    pooling: Literal["auto", "last", "mean"] = field(default="auto", metadata={"flag": "--pooling"})
    """``auto`` (decoder LLM -> ``last``, encoder -> ``mean``), ``last`` or ``mean``."""
    prompt_template: str | None = field(default=None, metadata={"flag": "--prompt-template"})
    """Template with ``{item}``, single fields or ``extra`` attributes (dprec.features.prompt); default by family."""
    max_length: int | None = field(default=None, metadata={"flag": "--max-length"})
    """Token limit per item (preset default: 256 for minilm, 512 otherwise)."""
    max_chars: int = field(default=20_000, metadata={"flag": "--max-chars"})
    """Characters kept per field before tokenising."""
    normalize: bool | None = field(default=None, metadata={"flag": "--normalize"})
    """L2-normalise the pooled vector (preset default: True for minilm, False otherwise)."""
    batch_size: int = 16
    """Most items per forward pass."""
    max_padding: float = 0.1
    """Close a batch early when padding would exceed this fraction of its tokens (1.0: fixed-size batches)."""
    dtype: ModelDtype = "auto"
    """``auto``: bfloat16 on CUDA, float32 on CPU."""
    device: Device = "auto"
    """``auto``: CUDA when available. Local executor only: on Ray the actors' GPU share decides."""
    trust_remote_code: bool = False
    """Let transformers run the model repository's own code."""
    cache_dir: str | None = field(default=None, metadata={"flag": "--model-cache"})
    """Where converted models (the SmolLM2 GGUF -> safetensors copy) are kept; default ~/.cache/dprec/models."""

    def __post_init__(self) -> None:
        check_types(self)
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
                    f"prompt template {self.prompt_template!r} must use {{item}}, the fields {list(ITEM_TEXT_FIELDS)} "
                    "or attributes of the items' extra object"
                )

    def extra_fields(self) -> list[str]:
        """Attributes of the items' ``extra`` object that the prompt template names (sorted)."""
        return extra_fields(self.prompt_template) if self.prompt_template else []


@dataclass
class ImageConfig:
    """How item images become vectors."""

    model: str = "mobilenet_v2"
    """``mobilenet_v2``, a torchvision MobileNetV2 ``.pth`` file, a Hugging Face id or a folder (``none``: no image)."""
    revision: str | None = None
    """Hub branch, tag or commit (hub ids only)."""
    batch_size: int = 16
    """Images per forward pass."""
    dtype: ModelDtype = "auto"
    """``auto``: bfloat16 on CUDA for Hugging Face models, float32 otherwise."""
    device: Device = "auto"
    """``auto``: CUDA when available. Local executor only: on Ray the actors' GPU share decides."""
    trust_remote_code: bool = False
    """Let transformers run the model repository's own code."""
    fetch_urls: bool = field(default=False, metadata={"flag": "--fetch-urls"})
    """Fetch ``image_url`` when there are no bytes and no local file (off: counted as image_url_not_fetched)."""
    url_timeout: float = field(default=5.0, metadata={"flag": "--url-timeout"})
    """Seconds one image URL may take, connecting and downloading together; never retried. Only http(s) URLs."""
    max_image_bytes: int = field(default=MAX_IMAGE_BYTES, metadata={"flag": "--max-image-bytes"})
    """Largest image file or URL download read, in bytes; a larger one is not read (counted as image_too_large)."""
    allow_outside_paths: bool = field(default=False, metadata={"flag": "--allow-outside-paths"})
    """Read image_path files outside the dataset folder and the source root prepare recorded (off: image_outside_dataset)."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.batch_size < 1:
            raise ValueError("image batch_size must be >= 1")
        if self.url_timeout <= 0:
            raise ValueError("url_timeout must be > 0 seconds")
        if self.max_image_bytes < 1:
            raise ValueError("max_image_bytes must be >= 1")


@dataclass
class FeatureSetConfig:
    """Where a feature set is written and how its vectors are stored."""

    dataset: str
    """Canonical dataset folder (``python -m dprec.prepare``)."""
    out: str
    """Feature folder, e.g. ``data_shards/<dataset>/<feature-set>``."""
    items_per_shard: int = 256
    """Items per shard; shard s holds items s * items_per_shard onwards."""
    store_dtype: StoreDtype = "float32"
    """dtype of the vectors in the shards."""
    overwrite: bool = False
    """Replace a feature folder written with another configuration."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.items_per_shard < 1:
            raise ValueError("items_per_shard must be >= 1")
        for name in ("dataset", "out"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name} must name a folder, got {getattr(self, name)!r}")


@dataclass
class ExtractConfig(FeatureSetConfig):
    """One extraction run. Saved as ``extract_config.json`` beside the shards."""

    text: TextConfig | None = field(default_factory=TextConfig)
    """None: no text modality."""
    image: ImageConfig | None = field(default_factory=ImageConfig)
    """None: no image modality."""
    executor: Literal["ray", "local"] = "ray"
    """``ray`` (Ray Data actors) or ``local`` (this process, no Ray; the same shards)."""
    address: str | None = None
    """Ray address (HOST:PORT of the head's GCS, or ray://HOST:PORT); default RAY_ADDRESS, else a new local Ray instance."""
    connect_timeout: float = 5.0
    """Seconds to reach the Ray cluster at the address; nothing listening fails at once, a non-Ray server within ~3x."""
    include_dashboard: bool = False
    """Start the dashboard with the local Ray instance (bound to 127.0.0.1)."""
    text_actors: int = 1
    """Text model actors (one model copy each)."""
    image_actors: int = 1
    """Image model actors (one model copy each)."""
    cpus_per_actor: float = 1.0
    """CPUs Ray reserves for each actor."""
    gpus_per_actor: float | None = None
    """None: share the cluster's GPUs among the actors (at most 1 each), 0 on a CPU cluster."""
    torch_threads: int | None = None
    """Threads per actor (or for the local executor); default max(1, int(cpus_per_actor))."""
    max_restarts: int = 3
    """Times Ray restarts an actor that died."""
    max_task_retries: int = 3
    """Times Ray retries a shard whose actor died."""
    spread: bool = True
    """Spread actors over nodes (Ray's SPREAD scheduling)."""
    max_nonfinite_share: float = 0.01
    """Most share of the items whose vector of a modality is NaN/inf (or overflows --store-dtype); above it the run fails."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text is None and self.image is None:
            raise ValueError("nothing to extract: both the text and the image model are 'none'")
        if self.text_actors < 1 or self.image_actors < 1 or self.cpus_per_actor <= 0:
            raise ValueError("text_actors and image_actors must be >= 1 and cpus_per_actor > 0")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError("gpus_per_actor must be >= 0")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError("torch_threads must be >= 1")
        if self.connect_timeout <= 0:
            raise ValueError("connect_timeout must be > 0 seconds")
        if not 0 <= self.max_nonfinite_share <= 1:
            raise ValueError(f"max_nonfinite_share must lie in [0, 1], got {self.max_nonfinite_share}")

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.cpus_per_actor))


@dataclass
class MMRecImportConfig(FeatureSetConfig):
    """MMRec's item-ordered ``text_feat.npy`` / ``image_feat.npy`` -> shards (row i = item index i)."""

    text_feat: str | None = None
    """MMRec text feature file (.npy)."""
    image_feat: str | None = None
    """MMRec image feature file (.npy)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text_feat is None and self.image_feat is None:
            raise ValueError("import-mmrec: give --text-feat and/or --image-feat")


MODALITY_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass
class CodesImportConfig(FeatureSetConfig):
    """Per-item discrete codes, ``{"<item>": ["<a_170>", "<b_224>", ...]}`` -> one-hot-per-level shards.

    Every item's code list (one code ``<level_value>`` per level) becomes ``levels x values`` numbers:
    a one per level at the code's value, zeros elsewhere (4 levels of 256 values: 1,024-d). The
    levels and the value range are inferred from the file and recorded in the manifest.
    """

    codes: list[str] = field(default_factory=list)
    """Code files (JSON), one per modality: ``--codes text.json image.json --modality text_codes image_codes``."""
    modality: list[str] = field(default_factory=list)
    """The modality name of each code file, in the same order (what ``features: {x: folder#name}`` reads)."""
    item_ids: str | None = None
    """``ASIN<TAB>index`` map from the files' keys to the dataset's item IDs; default: the item map prepare read
    (``source.item_ids`` in dataset.json), else none; ``none``: the keys are the dataset's item IDs."""
    values_per_level: int | None = None
    """Values a level can take (codes 0..N-1); default: the largest value in the file + 1."""
    max_missing_share: float = 0.01
    """Most share of the dataset's items without a well-formed code (absent from the file, or malformed) per
    modality; above it the import fails (a wrong file or a wrong key map)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.codes:
            raise ValueError("import-codes: give --codes FILE [FILE ...] and --modality NAME [NAME ...]")
        if len(self.modality) != len(self.codes):
            raise ValueError(
                f"import-codes: {len(self.codes)} --codes file(s) but {len(self.modality)} --modality name(s); "
                "give one name per file, in the same order"
            )
        for name in self.modality:
            if not MODALITY_NAME.fullmatch(str(name)) or name.endswith("_missing") or name == "item_id":
                raise ValueError(
                    f"--modality {name!r}: use lower-case letters, digits and _ (e.g. text_codes), "
                    "not ending in _missing"
                )
        if len(set(self.modality)) != len(self.modality):
            raise ValueError(f"--modality names must differ, got {self.modality}")
        if self.values_per_level is not None and self.values_per_level < 1:
            raise ValueError(f"values_per_level must be >= 1, got {self.values_per_level}")
        if not 0 <= self.max_missing_share <= 1:
            raise ValueError(f"max_missing_share must lie in [0, 1], got {self.max_missing_share}")
