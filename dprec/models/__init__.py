"""Recommenders, one module each; ``MODELS`` maps a config name to (model class, config class)."""

from dprec.models.base import ModelContext, Recommender
from dprec.models.lightgcn import LightGCN, LightGCNConfig
from dprec.models.popularity import Popularity, PopularityConfig

MODELS: dict[str, tuple[type[Recommender], type]] = {
    "popularity": (Popularity, PopularityConfig),
    "lightgcn": (LightGCN, LightGCNConfig),
}

__all__ = ["MODELS", "ModelContext", "Recommender", "LightGCN", "LightGCNConfig", "Popularity", "PopularityConfig"]
