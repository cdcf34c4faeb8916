"""Width reduction of frozen feature views at load: uncentred truncated SVD, F -> F V_r.

F (items x d) = U S V^T; the reduced view is F V_r = U_r S_r (items x r), the coordinates of each item in the
top-r right-singular directions. Dot products and cosines between items change only by the energy of the
dropped directions (F V_r V_r^T is the best rank-r approximation of F), and a linear first layer W on F equals
the layer V_r^T W on F V_r when r >= rank(F): then the reduction is exact. The cost it saves: every training
step pushes all items' features through the models' first layer (items x d x hidden, forward and backward).

``torch.svd_lowrank`` (randomised, 4 power iterations) with a fixed generator seed, under ``fork_rng`` so the
caller's random state is untouched; each direction's sign is fixed (its largest entry positive), so the result is
a deterministic function of F on a machine and reloading a run reduces its features the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

OVERSAMPLE = 16
"""Extra random directions of the randomised SVD beyond r (its accuracy on the r-th direction)."""
POWER_ITERATIONS = 4


@dataclass(frozen=True)
class Reduction:
    """What ``reduce_width`` did to one view."""

    dim_in: int
    dim_out: int
    energy: float
    """Share of ||F||_F^2 kept by the r directions (1.0 when nothing was dropped)."""
    basis: np.ndarray | None = field(default=None, compare=False, repr=False)
    """V_r (d x r float32), so that rows not in F (new items) reduce the same way: x V_r; None = not reduced."""

    def apply(self, matrix: np.ndarray) -> np.ndarray:
        """Other rows of the same view reduced as F was (float32)."""
        matrix = np.asarray(matrix, dtype=np.float32)
        return matrix if self.basis is None else matrix @ self.basis


def reduce_width(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, Reduction]:
    """(F V_r as float32, what was done); F itself when its width is already <= ``rank``."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    f = torch.as_tensor(np.asarray(matrix), dtype=torch.float32)
    if f.dim() != 2:
        raise ValueError(f"expected an (items x d) matrix, got shape {tuple(f.shape)}")
    n, d = f.shape
    if d <= rank:
        return np.asarray(matrix, dtype=np.float32), Reduction(d, d, 1.0)
    total = float(f.double().pow(2).sum())
    if min(n, d) <= rank + OVERSAMPLE:  # small enough for the exact SVD
        _, s, vh = torch.linalg.svd(f, full_matrices=False)
        v = vh.T
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _, s, v = torch.svd_lowrank(f, q=rank + OVERSAMPLE, niter=POWER_ITERATIONS)
    r = min(rank, v.shape[1])
    v = v[:, :r]
    sign = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
    v = v * torch.where(sign == 0, 1.0, sign)
    kept = float(s[:r].double().pow(2).sum())
    energy = 1.0 if total == 0 else min(1.0, kept / total)
    return (f @ v).numpy(), Reduction(d, r, energy, basis=v.numpy())
