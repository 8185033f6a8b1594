"""Q4_0 and Q8_0 are bit-exact with ggml's reference quantizers (gguf.quants is bit-identical to
them), and the torch fake-quant equals what unpack(pack(...)) dequantizes to, with atol=0."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from qatkit.formats import FORMATS, decode, encode, q4_0, q8_0

MODULES = {"q4_0": (q4_0, T.Q4_0), "q8_0": (q8_0, T.Q8_0)}


@pytest.fixture(params=["numba", "torch"], autouse=True)
def path(request, monkeypatch):
    """Every test runs on both implementations of each format: the fused CPU kernel and the torch
    code (the definition, and the GPU path)."""
    from qatkit.formats import _cpu

    if request.param == "numba" and not _cpu.available():
        pytest.skip("numba not installed")
    if request.param == "torch":
        monkeypatch.setattr(_cpu, "available", lambda: False)
    return request.param


def edge_cases() -> list[np.ndarray]:
    """Rows of 64 (two blocks) that stress the rounding rules."""
    rng = np.random.default_rng(0)
    z = np.zeros((1, 64), np.float32)
    ties = np.tile(np.array([1.0, -1.0, 0.5, -0.5], np.float32), 16)[None]  # |max| tied, signs differ
    neg_first = ties * -1
    tiny = (rng.standard_normal((2, 64)) * 1e-30).astype(np.float32)  # fp16 d underflows to 0 / subnormal
    sub = (rng.standard_normal((2, 64)) * 1e-5).astype(np.float32)  # fp16 subnormal scales
    huge = (rng.standard_normal((2, 64)) * 1e6).astype(np.float32)  # fp16 d overflows to inf
    halves = (np.arange(64, dtype=np.float32) - 32) / 16  # many exact .5 ties after scaling
    one_outlier = np.full((1, 64), 0.01, np.float32)
    one_outlier[0, 5] = -3.0
    neg_zero = np.full((1, 64), -0.0, np.float32)
    mixed = np.concatenate([z[:, :32], rng.standard_normal((1, 32)).astype(np.float32)], axis=1)
    return [z, ties, neg_first, tiny, sub, huge, halves[None], one_outlier, neg_zero, mixed]


def random_cases() -> list[np.ndarray]:
    out = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        rows, blocks = rng.integers(1, 9), rng.integers(1, 9)
        scale = 10.0 ** rng.uniform(-4, 2)
        x = rng.standard_normal((rows, blocks * 32)) * scale
        if seed % 3 == 0:  # heavy tails, like real weights
            x = rng.standard_t(3, (rows, blocks * 32)) * scale
        if seed % 5 == 0:  # values on a coarse grid: codes hit exact ties
            x = np.round(x / scale * 4) * scale / 4
        out.append(x.astype(np.float32))
    return out


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
@pytest.mark.parametrize("case", range(50))
def test_bytes_equal_gguf_reference(fmt, case):
    x = (edge_cases() + random_cases())[case]
    mod, qtype = MODULES[fmt]
    with np.errstate(all="ignore"):
        want = gq.quantize(x, qtype)
    if fmt == "q4_0" and not np.any(x) and np.signbit(x).all():
        # gguf-py keeps the sign of a -0.0 maximum; ggml starts from +0.0 and stores d = -0.0.
        want[:, ::18] = 0
        want[:, 1::18] = 0x80
    got = mod.pack(*mod.quantize(torch.from_numpy(x)))
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    # And encode (the exporter's entry point) gives the same bytes.
    np.testing.assert_array_equal(encode(torch.from_numpy(x), fmt), want)


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
@pytest.mark.parametrize("seed", range(10))
def test_fake_quant_equals_unpacked_bytes(fmt, seed):
    mod, qtype = MODULES[fmt]
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(seed)) * 0.05
    fq = mod.fake_quant(x)
    codes, d = mod.unpack(mod.pack(*mod.quantize(x)))
    from_bytes = mod.dequantize(torch.from_numpy(codes), torch.from_numpy(d))
    assert torch.equal(fq, from_bytes)
    # gguf's own dequantizer (what llama.cpp computes) agrees bit for bit too.
    ref = decode(mod.pack(*mod.quantize(x)), qtype, tuple(x.shape))
    np.testing.assert_array_equal(fq.numpy(), ref)


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_unpack_inverts_pack(fmt):
    mod, _ = MODULES[fmt]
    x = torch.randn(3, 96)
    codes, d = mod.quantize(x)
    c2, d2 = mod.unpack(mod.pack(codes, d))
    np.testing.assert_array_equal(c2, codes.numpy())
    np.testing.assert_array_equal(d2.view(np.uint16), d.numpy().view(np.uint16))


def test_straight_through_gradient():
    w = torch.randn(4, 64, requires_grad=True)
    g = torch.randn(4, 64)
    (q4_0.fake_quant(w) * g).sum().backward()
    assert torch.equal(w.grad, g)
    assert not torch.equal(q4_0.fake_quant(w), w)  # the forward really quantizes


def test_q4_0_given_scales_pack_exactly():
    """Learned scales: an fp16 d is stored as is where its block keeps a code 0 (else it is cut:
    test_hf_export.py), codes clamp to 0..15, and the bytes decode (with gguf's dequantizer,
    i.e. llama.cpp's math) to exactly the fake-quant values."""
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    d = q4_0.absmax_scale(w) * torch.empty(8, 4).uniform_(0.5, 1.5)  # some weights out of range
    codes, d16 = q4_0.quantize(w, d)
    assert codes.max() == 15 and codes.min() == 0
    had_zero = (torch.trunc(w.reshape(8, 4, 32) / d.half().float().unsqueeze(-1) + 8.5) <= 0).any(-1)
    assert 0 < int(had_zero.sum()) < 32 and torch.equal(d16[had_zero], d.half()[had_zero]) and not torch.equal(d16, d.half())
    assert (codes.reshape(8, 4, 32) == 0).any(-1).all()
    raw = q4_0.pack(codes, d16)
    np.testing.assert_array_equal(decode(raw, T.Q4_0, (8, 128)), q4_0.fake_quant(w, d).numpy())
    # With ggml's own scales passed in explicitly, the dequantized values agree with the
    # reference wherever no weight sits on a rounding tie (codes derive from fp16 d here).
    assert torch.allclose(q4_0.fake_quant(w, q4_0.absmax_scale(w)), q4_0.fake_quant(w), atol=1e-2)


def test_rows_not_multiple_of_block_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        q4_0.quantize(torch.randn(2, 40))


def test_format_table_sizes_match_gguf():
    from gguf.constants import GGML_QUANT_SIZES

    for f in FORMATS.values():
        block, nbytes = GGML_QUANT_SIZES[T(f.ggml_type)]
        assert (f.block, f.block_bytes) == (block, nbytes), f.name


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_bytes_equal_ggml_library(fmt):
    """The same cases through the real ggml library shipped with llama-cpp-python (the code
    llama-quantize runs), not only through gguf-py's reimplementation."""
    from qatkit.runtime.ggml import ggml_quantize

    mod, qtype = MODULES[fmt]
    for x in edge_cases() + random_cases():
        got = mod.pack(*mod.quantize(torch.from_numpy(x)))
        np.testing.assert_array_equal(got, ggml_quantize(x, int(qtype)))


def test_registry_answers_every_format_question():
    """One table: each format's bytes decode to values that encode back to the same bytes, a
    trainable format's fake-quant is those values, and the activation rounding in front of a
    product is registered with the weight's format."""
    from qatkit.formats import FORMATS, TRAINABLE, get

    assert set(FORMATS) == {"f32", "f16", "q4_0", "q8_0", "q6_k"} and TRAINABLE == ("q4_0", "q8_0")
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    for name in ("f32", "f16", "q4_0", "q8_0"):
        f = get(name)
        data = f.encode(w)
        values = torch.from_numpy(f.decode(data, (4, 256)).copy())
        assert (f.encode(values) == data).all(), name
        if f.trainable:
            assert torch.equal(f.fake_quant(w), values), name
    assert [get(n).act_block for n in ("q4_0", "q8_0", "q6_k", "f16")] == [32, 32, 256, 1]
    assert not get("f32").rounds_activations and get("f16").rounds_activations
    x = torch.randn(2, 256)
    assert torch.equal(get("q6_k").activation_rounding(x), get("q6_k").activation_rounding(get("q6_k").activation_rounding(x)))
    with pytest.raises(ValueError, match="unknown format 'q5_0'"):
        get("q5_0")
    with pytest.raises(ValueError, match="learned scales are for q4_0"):
        get("q8_0").learned_fake_quant(w, torch.ones(4, 8))


def test_boundary_mask_marks_the_weights_an_ulp_flips():
    """In a Q4_0 block whose largest |x| is -8 (d = 1), x + 8.5 is an integer exactly for
    x = k + 0.5: those weights are marked, and a step of 1e-5 either way changes their code
    while the other weights keep theirs."""
    from qatkit.formats import get

    f = get("q4_0")
    row = torch.tensor([-8.0, 0.5, 1.5, 0.3, -2.5, 3.0] + [0.1] * 26)
    mask = f.boundary_mask(row[None])[0]
    assert mask.nonzero().flatten().tolist() == [1, 2, 4]
    for i in range(1, 32):  # not the block's largest |x|: moving it moves d
        up, down = row.clone(), row.clone()
        up[i], down[i] = row[i] + 1e-5, row[i] - 1e-5
        flips = f.quantize_codes(up[None])[0][0, i] != f.quantize_codes(down[None])[0][0, i]
        assert bool(flips) == bool(mask[i]), i
