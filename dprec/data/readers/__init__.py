"""Readers of real inputs (MMRec folders, raw Amazon reviews, JSON sequences, generic tables) and the build into a dataset."""

from dprec.data.readers.amazon import read_amazon
from dprec.data.readers.build import BuildOptions, build_dataset
from dprec.data.readers.common import SKIP_KINDS, RawData, SkipLog
from dprec.data.readers.mmrec import read_mmrec
from dprec.data.readers.sequence import read_sequence
from dprec.data.readers.table import TableSpec, load_spec, read_table_source

__all__ = [
    "SKIP_KINDS",
    "BuildOptions",
    "RawData",
    "SkipLog",
    "TableSpec",
    "build_dataset",
    "load_spec",
    "read_amazon",
    "read_mmrec",
    "read_sequence",
    "read_table_source",
]
