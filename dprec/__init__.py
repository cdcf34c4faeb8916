"""DPRec: dual-perspective multi-level cross-modal recommendation.

Stages, each ``python -m dprec.<stage>``: prepare -> extract -> train -> (registry) ; ``dprec.demo``
runs them all on the embedded default dataset.
"""

__version__ = "0.1.0"
