"""BitDropout (DPRec's feature dropout): the Bernoulli mask from packed random bits."""

from __future__ import annotations

import pytest
import torch

from dprec.models.layers import BitDropout


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_keeps_each_entry_with_probability_one_minus_p_and_preserves_the_mean(p):
    torch.manual_seed(0)
    layer = BitDropout(p).train()
    assert layer.threshold == round((1 - p) * 65536)
    x = torch.ones(1000, 1000)
    out = layer(x)
    kept = out != 0
    # 10^6 Bernoulli draws: the kept share within 5 standard deviations of 1 - p
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * ((p * (1 - p)) / 1e6) ** 0.5
    torch.testing.assert_close(out[kept], torch.full((int(kept.sum()),), 65536 / layer.threshold))
    assert abs(out.mean().item() - 1) < 5 * (p / (1 - p) / 1e6) ** 0.5  # unbiased: E[out] = x


def test_every_16_bit_chunk_is_used_and_uniform():
    torch.manual_seed(1)
    layer = BitDropout(0.5).train()
    keep = layer.keep(torch.Size((300_000,)), torch.device("cpu")).view(-1, 3)
    # the three uniforms taken from one random word are each kept half of the time, independently
    shares = keep.float().mean(0)
    assert torch.all((shares - 0.5).abs() < 5 * (0.25 / 100_000) ** 0.5), shares
    both = (keep[:, 0] & keep[:, 1]).float().mean().item()
    assert abs(both - 0.25) < 5 * (0.25 * 0.75 / 100_000) ** 0.5


def test_same_seed_same_mask_and_identity_in_evaluation():
    layer = BitDropout(0.3).train()
    x = torch.randn(7, 11)
    torch.manual_seed(5)
    first = layer(x)
    torch.manual_seed(5)
    torch.testing.assert_close(layer(x), first)
    assert not torch.equal(layer(x), first)  # the next draw differs
    assert layer.eval()(x) is x
    assert BitDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        BitDropout(1.0)


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    layer = BitDropout(0.25).train()
    x = torch.randn(50, 8, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    expected = (out.detach() != 0).float() * (65536 / layer.threshold)
    torch.testing.assert_close(x.grad, expected)
