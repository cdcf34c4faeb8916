"""Datasets: the canonical folder contract, readers of real inputs, splits, the embedded default."""
