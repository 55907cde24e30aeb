"""ion_d2's dropout (ion_d2/modeling/dropout.py): its masks against the rule written out by hand
(tests/model_utils.py ``ref_dropout_mask``), their statistics, gradients and errors."""

import pytest
import torch
from model_utils import ref_dropout_mask

from ion_d2.modeling.dropout import (
    IONDropout,
    drop_probability,
    dropout_keep_mask,
    ion_dropout,
    memory_order,
)


@pytest.mark.parametrize("shape", [(7,), (3, 5, 2, 3), (2, 16, 4, 4), (0, 3)])
@pytest.mark.parametrize("p", [0.25, 0.5, 0.1])
def test_mask_is_the_rule_written_out(shape, p):
    torch.manual_seed(3)
    got = dropout_keep_mask(shape, p, dtype=torch.float32, device=torch.device("cpu"))
    torch.manual_seed(3)
    want = ref_dropout_mask(shape, p)
    assert got.shape == shape and got.dtype == torch.float32
    assert torch.equal(got, want)


@pytest.mark.parametrize("p", [0.25, 0.5, 0.1, 0.9])
def test_drop_rate_and_expectation(p):
    """Over 2**20 elements each of the four 16-bit lanes of a 64-bit draw drops its share (a
    lane stuck to one sign, as a generator's non-negative int64 draws would leave the top
    lane, fails this), and the output's mean is the input's."""
    torch.manual_seed(0)
    n = 1 << 20
    x = torch.rand(n, dtype=torch.float64) + 0.5
    out = ion_dropout(x, p, training=True)
    dropped = out == 0
    sd = (p * (1 - p) / (n / 4)) ** 0.5
    for lane in range(4):
        assert abs(dropped[lane::4].double().mean().item() - p) < 5 * sd
    kept = ~dropped
    torch.testing.assert_close(out[kept], x[kept] / (1 - drop_probability(p)))
    assert abs(out.mean().item() / x.mean().item() - 1) < 10 * (p / (1 - p) / n) ** 0.5


def test_drop_probability_is_within_2_to_the_minus_17():
    for p in (0.0, 0.1, 0.25, 1 / 3, 0.5, 0.99):
        assert abs(drop_probability(p) - p) <= 2**-17
    assert drop_probability(0.25) == 0.25 and drop_probability(0.5) == 0.5


def test_gradient_is_the_mask():
    torch.manual_seed(5)
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    torch.manual_seed(9)
    ion_dropout(x, 0.25).backward(g)
    torch.manual_seed(9)
    mask = ref_dropout_mask(x.shape, 0.25, dtype=torch.float64)
    assert torch.equal(x.grad, g * mask)
    assert 0 < int((mask == 0).sum()) < mask.numel()


def test_channels_last_input_gets_its_memory_order_mask():
    """The mask is drawn in the input's memory order: on a channels_last map, the rule's mask
    of the (N, H, W, C) layout; the product and its gradient keep that layout."""
    torch.manual_seed(1)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(2)
    out = ion_dropout(x, 0.5)
    torch.manual_seed(2)
    mask = ref_dropout_mask((2, 5, 5, 8), 0.5).permute(0, 3, 1, 2)
    assert torch.equal(out, x * mask)
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 8, 5, 5)
    out.backward(g)
    assert torch.equal(x.grad, g * mask)


@pytest.mark.parametrize(
    "make, order",
    [
        (lambda: torch.zeros(2, 3, 4, 5), [0, 1, 2, 3]),
        (
            lambda: torch.zeros(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
            [0, 2, 3, 1],
        ),
        (lambda: torch.zeros(5, 4).t(), [1, 0]),
        (
            lambda: torch.zeros(1, 6, 1, 7).contiguous(memory_format=torch.channels_last),
            [0, 2, 3, 1],
        ),
        (lambda: torch.zeros(4, 6)[:, ::2], None),
        (lambda: torch.zeros(3).expand(4, 3), None),
    ],
)
def test_memory_order(make, order):
    x = make()
    got = memory_order(x)
    assert got == order
    if got is not None:
        assert x.permute(got).is_contiguous()


def test_view_with_gaps_gets_the_contiguous_order_mask():
    x = torch.randn(6, 10)[:, ::2]
    torch.manual_seed(4)
    out = ion_dropout(x, 0.25)
    torch.manual_seed(4)
    assert torch.equal(out, x * ref_dropout_mask(x.shape, 0.25))


def test_eval_and_zero_p_return_the_input():
    x = torch.randn(10)
    assert ion_dropout(x, 0.25, training=False) is x
    assert ion_dropout(x, 0.0, training=True) is x
    module = IONDropout(0.25).eval()
    assert module(x) is x and "p=0.25" in repr(module)
    state = torch.random.get_rng_state()
    module.train()(x)
    assert not torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_bad_probability_raises(p):
    for call in (
        lambda: IONDropout(p),
        lambda: ion_dropout(torch.ones(3), p),
        lambda: dropout_keep_mask((3,), p, dtype=torch.float32, device=torch.device("cpu")),
    ):
        with pytest.raises(ValueError, match=rf"\[0, 1\); got {p}"):
            call()
