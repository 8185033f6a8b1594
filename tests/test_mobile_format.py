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


# ------------------------------------------------------------------------------ static int8
def static_layer(bits="int4", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(96, 24, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(weights(seed))
        if bias:
            lin.bias.copy_(torch.randn(24, generator=g))
    m = FakeQuantLinear.from_linear(lin, bits, act="static")
    x = torch.randn(5, 96, generator=g) * 2
    return m, x


def test_static_linear_is_the_integer_formula():
    m, x = static_layer()
    s_in, s_out = torch.tensor(0.03125), torch.tensor(0.23)  # a power of two: exact ties below
    codes, sw = mobile.quantize_weight(m.weight, m.spec, m.scale)
    x[0, :8] = (torch.arange(8) - 3.5) * s_in  # exact ties of the input grid
    got = mobile.static_linear(x, codes, sw.float()[:, 0], m.bias, s_in, s_out)
    # the same arithmetic written out element by element, in float64 where it is exact
    xq = torch.clamp(torch.round(x * (torch.tensor(1.0) / s_in)), -128, 127)
    assert xq[0, :8].tolist() == [-4.0, -2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 4.0]  # half to even
    acc = xq.double() @ codes.double().T + torch.round(m.bias.detach() * (torch.tensor(1.0) / (sw.float()[:, 0] * s_in))).double()
    r = (s_in * sw.float()[:, 0]) / s_out
    want = torch.clamp(torch.round(acc.float() * r), -128, 127) * s_out
    assert torch.equal(got, want)
    assert (got / s_out).abs().max() <= 128 and len(set((got / s_out).round().flatten().tolist())) > 20


def test_static_fake_quant_needs_calibration_then_is_exact_with_lsq_gradients():
    from qatkit import QatkitError

    m, x = static_layer("int2", bias=False)
    with pytest.raises(QatkitError, match="not calibrated"):
        m(x)
    with torch.no_grad():
        m.act_log_scale.copy_(torch.tensor([0.04, 0.3]).log())
    x.requires_grad_(True)
    y = m(x)
    s_in, s_out = m.act_scales()
    codes, sw = mobile.quantize_weight(m.weight, m.spec, m.scale)
    assert torch.equal(y.detach(), mobile.static_linear(x, codes, sw.float()[:, 0], None, s_in, s_out))
    y.pow(2).sum().backward()
    assert m.act_log_scale.grad is not None and bool((m.act_log_scale.grad != 0).all())
    assert m.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    # d/ds of the straight-through fake-quant: q - v inside the grid, the clipped code outside
    v = torch.tensor([0.5, 1.26, -7.0, 300.0])
    s = torch.tensor(0.5, requires_grad=True)
    mobile.learned_fake_quant_static(v, s).sum().backward()
    q = torch.clamp(torch.round(v / 0.5), -128, 127)
    assert torch.allclose(s.grad, (q - v / 0.5)[:3].sum() + q[3], atol=1e-6)


def test_static_scale_search_and_refusals():
    from qatkit import QatkitError
    from qatkit.prepare import QATConfig

    v = torch.cat([torch.randn(10000), torch.tensor([60.0])])  # one outlier: clipping it pays
    s = mobile.static_scale(v)
    err = lambda s: float(((mobile.static_codes(v, s) * s - v) ** 2).sum())  # noqa: E731
    assert err(s) < err(torch.tensor(60.0 / 127)) and s < 60.0 / 127
    assert float(mobile.static_scale(torch.zeros(4))) == 1.0
    with pytest.raises(QatkitError, match="per-channel"):
        QATConfig(fmt="mobile", mobile_weights="int4g32", activations="static")
    with pytest.raises(QatkitError, match="mobile"):
        QATConfig(fmt="q4_0", activations="static")
    with pytest.raises(ValueError, match="per-channel"):
        FakeQuantLinear.from_linear(torch.nn.Linear(64, 8), "int4g32", act="static")


def test_plan_per_tensor_choices():
    from qatkit import QatkitError
    from qatkit.plan import mobile_plan

    lins = {f"model.layers.{i}.{n}": (64, 64) for i in range(2) for n in ("self_attn.q_proj", "mlp.down_proj")}
    lins["lm_head"] = (320, 64)
    plan = mobile_plan(lins, int2=("*.down_proj",), int8=("model.layers.1.*",), keep=("model.layers.1.mlp.*", "lm_head"))
    assert plan == {"model.embed_tokens": "int8", "model.layers.0.self_attn.q_proj": "int4", "model.layers.0.mlp.down_proj": "int2",
                    "model.layers.1.self_attn.q_proj": "int8", "model.layers.1.mlp.down_proj": "keep", "lm_head": "keep"}
    both = mobile_plan(lins, weights="int8", int2=("*.down_proj",), int8=("model.layers.1.*",))  # int8 wins under int8 too
    assert both["model.layers.1.mlp.down_proj"] == "int8" and both["model.layers.0.mlp.down_proj"] == "int2"
    for kw in (dict(keep=("*.nothing",)), dict(int8=("lm_head",))):  # the head is int8 already: only keep moves it
        with pytest.raises(QatkitError, match="matches no Linear"):
            mobile_plan(lins, **kw)
    # other lookup tables (Gemma 4's per-layer embeddings) take their own scheme; int2 packs four a byte
    tabled = mobile_plan(lins, tables={"model.embed_tokens_per_layer": 128}, table="int2")
    assert tabled["model.embed_tokens_per_layer"] == "int2" and tabled["model.embed_tokens"] == "int8"
    with pytest.raises(QatkitError, match="four to a byte"):
        mobile_plan(lins, tables={"model.embed_tokens_per_layer": 130}, table="int2")


@pytest.mark.parametrize("scheme", ["int4", "int8", "int2", "int4g32"])
def test_blocks_of_rows_give_the_whole_tensors_numbers(monkeypatch, scheme):
    """Large tensors are quantized in blocks of rows (their float temporaries stay small): scales,
    codes and values equal those of the whole tensor at once, blocks of uneven size included."""
    spec = mobile.parse_spec(scheme)
    w = torch.randn(23, 64, generator=torch.Generator().manual_seed(1)) * torch.rand(23, 1) * 3
    whole_s = mobile.weight_scale(w, spec)
    whole = mobile.quantize_weight(w, spec, whole_s)
    whole_v = mobile.dequantize_weight(*whole, spec)
    monkeypatch.setattr(mobile, "BLOCK_ROWS", 5)
    s = mobile.weight_scale(w, spec)
    codes, scale = mobile.quantize_weight(w, spec, s)
    assert torch.equal(s, whole_s) and torch.equal(codes, whole[0]) and torch.equal(scale, whole[1])
    assert torch.equal(mobile.dequantize_weight(codes, scale, spec), whole_v)
    assert mobile.holds(codes, scale, spec, whole_v) and not mobile.holds(codes, scale, spec, whole_v + 1e-3 * (torch.arange(23) == 21)[:, None])
