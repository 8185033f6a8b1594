"""qatkit.formats.q6_k against the real ggml Q6_K reference quantizer, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qatkit.formats import q6_k
from qatkit.runtime import ggml as ggml_oracle

if not ggml_oracle.available():  # llama-cpp-python is a dependency; skip only if it truly can't load
    pytest.skip("ggml shared library (llama-cpp-python) not loadable", allow_module_level=True)


def _check(w: np.ndarray) -> np.ndarray:
    w = np.ascontiguousarray(w, dtype=np.float32)
    ours = q6_k.quantize_bytes(torch.from_numpy(w))
    ref = ggml_oracle.ggml_quantize(w, q6_k.GGML_TYPE)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == (w.shape[0], w.shape[1] // 256 * 210)
    if not np.array_equal(ours, ref):
        blocks = np.nonzero((ours.reshape(-1, 210) != ref.reshape(-1, 210)).any(axis=1))[0]
        raise AssertionError(f"{len(blocks)} of {ours.size // 210} super-blocks differ, first {blocks[:8]}")
    return ours


@pytest.mark.parametrize("shape", [(4, 256), (8, 512), (3, 1024), (1, 4096)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_normal(shape, seed):
    _check(np.random.default_rng(seed).standard_normal(shape))


@pytest.mark.parametrize("scale", [1e-6, 1e-4, 2e-3, 1e3, 1e9])
def test_scaled(scale):
    # 1e-6: the fp16 super-block scale underflows to 0, codes stay the searched ones.
    # 1e9: it overflows to inf.
    _check(np.random.default_rng(7).standard_normal((4, 512)) * scale)


def test_zero_blocks_and_sub_blocks():
    w = np.random.default_rng(3).standard_normal((4, 768)).astype(np.float32)
    w[0] = 0.0  # whole row
    w[1, 256:512] = 0.0  # one super-block
    w[2, 16:48] = 0.0  # two sub-blocks inside a live super-block
    w[3, ::16] = 0.0
    w[3, 512:768] = 1e-16  # below GROUP_MAX_EPS
    out = _check(w)
    assert not out[0].any() and not out[1, 210:420].any()


def test_outliers():
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((6, 512)) * 0.02).astype(np.float32)
    w[0, 3] = 5.0  # one outlier in a block
    w[1, 300] = -40.0
    # An outlier so large the other sub-blocks' int8 scales round to 0 (their codes are kept
    # from the search, unscaled).
    w[2, 0] = 1e4
    w[3, 17] = -1e5
    w[4, :16] = 1.0  # a flat sub-block
    w[5, 100:116] = -3.0
    _check(w)


def test_exact_ties():
    rng = np.random.default_rng(5)
    # Small integer grids put many products exactly on .5 (round half to even matters) and
    # make equal |x| common (first-maximum rules matter).
    a = rng.integers(-8, 9, size=(4, 512)).astype(np.float32) * 0.25
    b = rng.choice(np.float32([-1, 1, 0.5, -0.5, 0]), size=(4, 512))
    c = rng.integers(-63, 64, size=(4, 512)).astype(np.float32) / 64
    d = np.tile(np.float32([1, -1]), (2, 256))  # every |x| equal
    _check(np.concatenate([a, b, c, d]))


def test_ties_in_final_rounding():
    # Every sub-block: one -32, large integers, a few small half-integers. Its searched scale is
    # ~1, so fp16(d) * int8 scale is exactly 1.0 and the final x / dj lands on .5 exactly:
    # nearest_int rounds half to EVEN (2.5 -> 2), roundf would give 3.
    rng = np.random.default_rng(11)
    sub = rng.integers(18, 31, size=(32, 16)).astype(np.float32) * rng.choice([-1, 1], size=(32, 16))
    sub[:, 0] = -32.0
    sub[:, 5:9] = rng.choice(np.float32([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 3.5, -4.5]), size=(32, 4))
    out = _check(sub.reshape(2, 256))
    sc = out.reshape(-1, 210)[:, 192:208].view(np.int8)
    d = out.reshape(-1, 210)[:, 208:210].copy().view(np.float16).astype(np.float32)
    assert np.all(np.abs(d * sc) == 1.0)  # the setup really gives dj = 1


def test_ties_in_search_kept_codes():
    # Same sub-blocks, but each super-block also holds a sub-block 1000x larger: the small ones
    # get int8 scale 0, so their bytes keep the codes of the scale search, where iscale = 1 puts
    # the half-integers on exact ties.
    rng = np.random.default_rng(13)
    sub = rng.integers(18, 31, size=(32, 16)).astype(np.float32) * rng.choice([-1, 1], size=(32, 16))
    sub[:, 0] = -32.0
    sub[:, 5:9] = rng.choice(np.float32([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 3.5, -4.5]), size=(32, 4))
    sub[::16] *= 1000.0
    out = _check(sub.reshape(2, 256))
    assert (out.reshape(-1, 210)[:, 193:208] == 0).all()


def test_many_blocks():
    # Enough super-blocks that float32 summation order matters somewhere (a pairwise or SIMD
    # sum instead of ggml's sequential one changes ~3% of random super-blocks).
    _check(np.random.default_rng(12).standard_normal((64, 1024)))


def test_realistic_weights():
    rng = np.random.default_rng(6)
    # Heavy-tailed, row-scaled, like trained linear layers.
    w = rng.standard_t(df=4, size=(32, 1024)) * 0.02 * rng.uniform(0.3, 3.0, size=(32, 1))
    w[rng.random(w.shape) < 1e-3] *= 20
    _check(w)


def test_extremes():
    w = np.random.default_rng(8).standard_normal((3, 256)).astype(np.float32)
    w[0] *= 1e-14  # just above GROUP_MAX_EPS: w*x*l underflows into denormals
    w[1] = np.float32(3e-38) * np.sign(w[1])  # denormal territory everywhere
    w[2, :128] *= 1e-20  # half the block far below the other half
    _check(w)


def test_roundtrip_error():
    w = torch.randn(16, 2048, generator=torch.Generator().manual_seed(9)) * 0.05
    raw = q6_k.quantize_bytes(w)
    back = q6_k.dequantize_bytes(raw, w.shape[1])
    assert back.dtype == np.float32 and back.shape == tuple(w.shape)
    rel = np.linalg.norm(back - w.numpy()) / np.linalg.norm(w.numpy())
    assert rel < 0.02, rel
    assert np.abs(back - w.numpy()).max() <= 0.05 * np.abs(w.numpy()).max()


def test_bad_shape():
    with pytest.raises(ValueError, match=r"\(2, 300\)"):
        q6_k.quantize_bytes(torch.zeros(2, 300))


def test_oracle_matches_gguf_q8_0():
    # The oracle agrees with gguf's own (independent) Q8_0 quantizer, so the ctypes call is right.
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = np.random.default_rng(10).standard_normal((5, 256)).astype(np.float32)
    assert np.array_equal(ggml_oracle.ggml_quantize(w, 8), quantize(w, GGMLQuantizationType.Q8_0))
