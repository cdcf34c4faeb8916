"""In-batch InfoNCE in groups (``info_nce(..., group_size=g)``, DPRec's ``align_group``, MGCN's ``cl_group``).

A batch of at most g anchors is the plain in-batch loss and draws no random numbers; a larger one is split at
random into near-equal groups of at most g, each anchor's negatives the positives of its group: the same as the
plain loss on each group, averaged over every anchor, values and gradients within 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from dprec.models.dprec import DPRecConfig
from dprec.models.layers import info_nce
from dprec.models.mgcn import MGCNConfig
from tests.models.test_speed_paths import TOL, old_info_nce


def leaves(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 5, generator=gen).requires_grad_() for _ in range(2)]


def loss_and_grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, tensors)
    return [loss.detach(), *grads]


@pytest.mark.parametrize("group", [0, 12, 100])
def test_a_batch_within_the_group_size_is_the_plain_loss_and_draws_nothing(group):
    a, p = leaves(12)
    state = torch.random.get_rng_state()
    got = loss_and_grads(info_nce(a, p, 0.2, group_size=group), [a, p])
    assert torch.equal(torch.random.get_rng_state(), state)
    want = loss_and_grads(old_info_nce(a, p, 0.2), [a, p])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize(("n", "group", "sizes"), [(10, 4, [3, 3, 4]), (9, 3, [3, 3, 3]), (7, 6, [3, 4])])
def test_a_larger_batch_is_the_mean_of_the_plain_loss_over_random_groups(n, group, sizes):
    a, p = leaves(n, seed=n)
    torch.manual_seed(5)
    got = loss_and_grads(info_nce(a, p, 0.2, group_size=group), [a, p])
    torch.manual_seed(5)
    order = torch.randperm(n)
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    assert max(sizes) <= group and bounds[-1] == n
    groups = [order[i:j] for i, j in zip(bounds, bounds[1:], strict=False)]
    # the plain per-group losses, weighted by group size: the mean over every anchor
    want_loss = sum(old_info_nce(a[g], p[g], 0.2) * len(g) for g in groups) / n
    want = loss_and_grads(want_loss, [a, p])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)
    # and it is not the whole-batch loss: the switch changes the arithmetic
    assert not torch.allclose(got[0], old_info_nce(a, p, 0.2))


def test_group_sizes_are_checked():
    assert DPRecConfig().align_group == 2048 and MGCNConfig().cl_group == 2048
    with pytest.raises(ValueError, match="align_group"):
        DPRecConfig(align_group=-1)
    with pytest.raises(ValueError, match="cl_group"):
        MGCNConfig(cl_group=-2)
