"""Negative sampling for BPR: one uniform negative per positive among the items the user has not trained on.

Rejection sampling: draw uniformly from all items, redraw the pairs that hit a training item,
at most ``max_rounds`` times. The draws come from the caller's generator, so a (seed, epoch)
generator gives the same negatives on every rank and after a resume. Reference: Rendle et al.,
"BPR: Bayesian Personalized Ranking from Implicit Feedback" (UAI 2009).
"""

from __future__ import annotations

import numpy as np

from dprec.data.dataset import DatasetError
from dprec.data.interactions import UserItemSets


class NegativeSampler:
    """One uniform negative per positive, drawn among the items the user has not trained on."""

    def __init__(self, train: UserItemSets, max_rounds: int = 100) -> None:
        self.train = train
        self.max_rounds = max_rounds
        full = np.flatnonzero(train.sizes() >= train.n_items)
        if len(full):
            raise DatasetError(
                f"user index {full[0]} has trained on every item ({train.n_items}); no negative can be drawn "
                f"(give the dataset more items, or move some of this user's interactions out of training)"
            )

    def sample(self, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        neg = rng.integers(0, self.train.n_items, size=len(users))
        todo = np.flatnonzero(self.train.contains(users, neg))
        for _ in range(self.max_rounds):
            if not len(todo):
                return neg
            neg[todo] = rng.integers(0, self.train.n_items, size=len(todo))
            todo = todo[self.train.contains(users[todo], neg[todo])]
        raise RuntimeError(f"negative sampling did not converge for {len(todo)} pairs")
