"""Per-user item sets in CSR form: a user's training items (the mask) or evaluation items (the truth).

``indptr`` (n_users + 1) and ``indices`` (sorted item indices per user) as in scipy's CSR;
``contains(users, items)`` answers "is items[j] among users[j]'s items" by binary search over
the keys ``user * n_items + item``, built once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UserItemSets:
    """A CSR table user -> sorted item indices (training mask or evaluation truth)."""

    indptr: np.ndarray
    indices: np.ndarray
    n_items: int

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> UserItemSets:
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        order = np.lexsort((items, users))
        counts = np.bincount(users, minlength=n_users)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(indptr, items[order], n_items)

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    def sizes(self) -> np.ndarray:
        return np.diff(self.indptr)

    def users_with_items(self) -> np.ndarray:
        return np.flatnonzero(self.sizes() > 0)

    def rows_cols(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row position in ``users``, item) pairs of the given users, for scatter into a chunk."""
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lengths = ends - starts
        rows = np.repeat(np.arange(len(users)), lengths)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        cols = self.indices[np.repeat(starts, lengths) + offsets]
        return rows, cols

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Boolean array: is items[j] in the set of users[j]."""
        keys = self._keys()
        query = np.asarray(users, np.int64) * self.n_items + np.asarray(items, np.int64)
        pos = np.searchsorted(keys, query)
        pos = np.minimum(pos, len(keys) - 1)
        return keys[pos] == query if len(keys) else np.zeros(len(query), bool)

    def _keys(self) -> np.ndarray:
        cached = self.__dict__.get("_key_cache")
        if cached is None:
            users = np.repeat(np.arange(self.n_users, dtype=np.int64), self.sizes())
            cached = users * self.n_items + self.indices
            object.__setattr__(self, "_key_cache", cached)
        return cached
