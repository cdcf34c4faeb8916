"""Recommenders, one module each; ``MODELS`` maps a config name to (model class, config class).

The contract every model follows is in ``dprec.models.base``; the building blocks the multimodal models share
(modality selection, graphs from the training pairs, attention gate, InfoNCE) are in ``dprec.models.layers``.
"""

from dprec.models.base import ModelContext, Recommender
from dprec.models.content_knn import ContentKNN, ContentKNNConfig
from dprec.models.dprec import EVERY_PART, DPRec, DPRecConfig
from dprec.models.freedom import FREEDOM, FREEDOMConfig
from dprec.models.lgmrec import LGMRec, LGMRecConfig
from dprec.models.lightgcn import LightGCN, LightGCNConfig
from dprec.models.mgcn import MGCN, MGCNConfig
from dprec.models.popularity import Popularity, PopularityConfig

MODELS: dict[str, tuple[type[Recommender], type]] = {
    "popularity": (Popularity, PopularityConfig),
    "lightgcn": (LightGCN, LightGCNConfig),
    "dprec": (DPRec, DPRecConfig),
    "mgcn": (MGCN, MGCNConfig),
    "lgmrec": (LGMRec, LGMRecConfig),
    "freedom": (FREEDOM, FREEDOMConfig),
    "content_knn": (ContentKNN, ContentKNNConfig),
}


def every_part(name: str) -> dict[str, object]:
    """The model section of ``name`` with every part on (DPRec: ``dprec.EVERY_PART``; the others have no parts
    off by default): what the speed and scale benchmarks time."""
    return {"name": name, **(EVERY_PART if name == "dprec" else {})}


__all__ = [
    "MODELS",
    "every_part",
    "ModelContext",
    "ContentKNN",
    "ContentKNNConfig",
    "Recommender",
    "DPRec",
    "DPRecConfig",
    "FREEDOM",
    "FREEDOMConfig",
    "LGMRec",
    "LGMRecConfig",
    "LightGCN",
    "LightGCNConfig",
    "MGCN",
    "MGCNConfig",
    "Popularity",
    "PopularityConfig",
]
