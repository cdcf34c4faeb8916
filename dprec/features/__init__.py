"""Item features: text and image encoders, the Ray extraction pipeline and the shard format.

Training reads features with :func:`dprec.features.shards.read_features`; it needs numpy only.
"""

from dprec.features.shards import ShardError, read_features

__all__ = ["ShardError", "read_features"]
