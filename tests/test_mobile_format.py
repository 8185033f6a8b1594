"""The mobile format's numerics (qatkit/formats/mobile.py): one definition for fake-quant,
convert and export, with bf16 scales and int8 per-token activations."""

import pytest
import torch

from qatkit.formats import mobile
from qatkit.nn import FakeQuantLinear

SPECS = ["int4", "int4g32", "int2", "int2g32", "int8"]


def weights(seed=0, rows=24, cols=96):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)  # rows of different ranges
    w[3] = 0.0  # an all-zero row
    w[5, 7] = 40.0  # an outlier
    return w


@pytest.mark.parametrize("name", SPECS)
def test_codes_scales_and_values(name):
    spec = mobile.parse_spec(name)
    w = weights()
    codes, s = mobile.quantize_weight(w, spec)
    assert codes.dtype == torch.int8 and s.dtype == torch.bfloat16
    assert s.shape == (w.shape[0], w.shape[1] // spec.group_size(w.shape[1]))
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    assert bool((s.float() > 0).all())
    v = mobile.dequantize_weight(codes, s, spec)
    assert torch.equal(v[3], torch.zeros_like(v[3]))
    # every code is the nearest level to w / s inside the grid (ties to even)
    x = w.reshape(s.shape[0], s.shape[1], -1) / s.float().unsqueeze(-1)
    assert torch.equal(codes.reshape(x.shape).float(), torch.clamp(torch.round(x), spec.qmin, spec.qmax))
    # the stored values quantize to themselves with the stored scales: export is idempotent
    again, s2 = mobile.quantize_weight(v, spec, s)
    assert torch.equal(again, codes) and torch.equal(s2, s)


@pytest.mark.parametrize("name", SPECS)
def test_scale_search_beats_the_plain_absmax_rule(name):
    """The searched scale never does worse than torchao's amax / ((qmax - qmin) / 2) per group."""
    spec = mobile.parse_spec(name)
    w = weights(1)
    codes, s = mobile.quantize_weight(w, spec)
    g = spec.group_size(w.shape[1])
    wg = w.reshape(w.shape[0], -1, g)
    plain = torch.clamp(wg.abs().amax(-1) / ((spec.qmax - spec.qmin) / 2), min=1e-38).to(torch.bfloat16).float()
    plain_err = ((torch.clamp(torch.round(wg / plain.unsqueeze(-1)), spec.qmin, spec.qmax) * plain.unsqueeze(-1) - wg) ** 2).sum(-1)
    err = ((mobile.dequantize_weight(codes, s, spec).reshape(wg.shape) - wg) ** 2).sum(-1)
    assert bool((err <= plain_err * (1 + 1e-6)).all())
    if spec.bits == 2:  # where the search matters
        assert float(err.sum()) < 0.8 * float(plain_err.sum())


def test_bad_shapes_and_names():
    with pytest.raises(ValueError, match="multiple of 32"):
        mobile.quantize_weight(torch.randn(4, 48), mobile.parse_spec("int4g32"))
    for bad in ["int3", "int4g", "q4", "int4gx"]:
        with pytest.raises(ValueError):
            mobile.parse_spec(bad)
    with pytest.raises(ValueError, match="do not fit"):
        mobile.quantize_weight(torch.randn(4, 64), mobile.parse_spec("int4"), torch.ones(3, 1))


@pytest.mark.parametrize("name", ["int4", "int2g32"])
def test_learned_scale_forward_and_gradient(name):
    spec = mobile.parse_spec(name)
    w = weights(2).requires_grad_(True)
    s0 = mobile.weight_scale(w, spec).float() * 1.013  # not a bf16 number: the forward rounds it
    s = s0.clone().requires_grad_(True)
    out = mobile.learned_fake_quant_weight(w, s, spec)
    codes, s16 = mobile.quantize_weight(w, spec, s0)
    assert torch.equal(out, mobile.dequantize_weight(codes, s16, spec))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * g).sum().backward()
    # the LSQ formula, computed independently
    G = spec.group_size(w.shape[1])
    x = w.detach().reshape(w.shape[0], -1, G) / s16.float().unsqueeze(-1)
    q = torch.clamp(torch.round(x), spec.qmin, spec.qmax)
    inside = (x >= spec.qmin - 0.5) & (x <= spec.qmax + 0.5)
    gg = g.reshape(x.shape)
    assert torch.allclose(s.grad, (gg * torch.where(inside, q - x, q)).sum(-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(w.grad, torch.where(inside, gg, torch.zeros_like(gg)).reshape(w.shape))
    assert not bool(inside.all())  # the outlier row clips somewhere, so both branches are exercised


def test_activation_quantization():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 64, generator=g) * 3
    x[0, 0] = x[0, 0].abs() + 0.1  # all positive: the range is stretched down to 0
    x[0, 1] = 0.0
    q, m, zp = mobile.quantize_act(x)
    assert q.dtype == torch.int8 and m.shape == (3, 5, 1)
    deq = mobile.dequantize_act(q, m, zp)
    assert float(((deq - x).abs() * m).max()) <= 0.5 + 1e-3  # within half a step everywhere
    assert int(zp[0, 0]) == -128  # range [0, max]: 0 maps to the lowest code
    assert torch.equal(deq[0, 1], torch.zeros(64)) and float(m[0, 1]) == 1.0
    fq = mobile.fake_quant_act(x.requires_grad_(True))
    assert torch.equal(fq, deq)
    fq.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_activations_are_xnnpacks_not_torchaos():
    """The runtime's rounding, not torchao's graph: equal codes on generic data, different on
    exact ties, where the student must follow what runs (checked in the .pte tests)."""
    intx = pytest.importorskip("torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 640, generator=g)
    ours, ref = mobile.fake_quant_act(x), intx._apply_int8_act_asym_per_token_quant_dequant(x)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-7)
    ties = torch.randint(-40, 41, (64, 64), generator=g).float() * 0.125
    q, m, zp = mobile.quantize_act(ties)
    assert torch.equal(q.float(), torch.clamp(torch.round(ties * m) + zp, -128, 127))
    assert not torch.equal(mobile.fake_quant_act(ties), intx._apply_int8_act_asym_per_token_quant_dequant(ties))


@pytest.mark.parametrize("name", ["int4", "int2", "int8"])
def test_fake_quant_linear(name):
    lin = torch.nn.Linear(64, 16, bias=True)
    fq = FakeQuantLinear.from_linear(lin, name, learn_scales=True)
    assert fq.weight is lin.weight and isinstance(fq.scale, torch.nn.Parameter)
    x = torch.randn(2, 7, 64)
    spec = mobile.parse_spec(name)
    codes, s = mobile.quantize_weight(lin.weight, spec, fq.scale)
    want = torch.nn.functional.linear(mobile.fake_quant_act(x), mobile.dequantize_weight(codes, s, spec), lin.bias)
    assert torch.equal(fq(x), want)
    fixed = FakeQuantLinear.from_linear(lin, name)
    assert "scale" in dict(fixed.named_buffers()) and torch.equal(fixed(x), want)
    with pytest.raises(ValueError, match="multiple of 32"):
        FakeQuantLinear.from_linear(torch.nn.Linear(48, 4), "int4g32")
