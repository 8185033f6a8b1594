"""The export gap per family, against the real llama.cpp: with exact sums the faithful torch
forward computes llama.cpp's logits bit for bit, at every position.

Regression tests for the causes found in qwen2/qwen3/gemma3 (llama was only lucky):
- RoPE angles: ggml's running float32 product and the C library's cosf/sinf, not p * inv_freq;
  the error grew with the position;
- RMSNorm: ggml sums the squares in double; torch's float32 sum (and its float32 sqrt, which is
  not correctly rounded) move a row by an ulp;
- the summation order of every matrix product (tinyBLAS lanes, the repacked Q4_0 block order) and
  ggml's vectorised exp in softmax and SiLU: ulps that flip f16 (q, k, v, probabilities, the
  GELU table's index) and Q8_0 roundings downstream; sharp attention (q/k norms) amplifies them;
- Gemma 3's sliding-window layers take `rope.freq_base_swa`, 10000 when the file lacks it.
"""

import copy

import numpy as np
import pytest
import torch

from qatkit import QatkitError
from qatkit.export.gguf import load_gguf_weights
from qatkit.models.arch import arch_for_config, hparams
from qatkit.runtime import faithful
from qatkit.runtime.faithful import ggml_cpu_build, llamacpp_faithful
from qatkit.runtime.faithful import ops as faithful_ops
from qatkit.runtime.ggml import row_kernels
from qatkit.runtime.llamacpp import chunk_logits, open_model
from tiny_models import TEXT, tiny_model
from tiny_models import export_gguf as export
from tiny_models import kld_np as kld
from tiny_models import logits_np as torch_logits

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]

needs_modelled_build = pytest.mark.skipif(
    ggml_cpu_build() is None or row_kernels() is None,
    reason="summation orders are modelled for llama.cpp's x86 AVX2/AVX512 CPU build only")


def _gap(model, tokenizer, path, fmt, n_tokens=200):
    """(llama.cpp logits, plain torch, faithful, faithful with exact sums) on the file's weights."""
    export(model, tokenizer, path, fmt)
    ids = tokenizer(TEXT)["input_ids"][:n_tokens]
    ref = chunk_logits(open_model(path, n_ctx=256), ids)
    twin = copy.deepcopy(model)
    types = load_gguf_weights(twin, arch_for_config(model.config), path)
    plain = torch_logits(twin, ids)
    with llamacpp_faithful(twin, types, exact=False):
        rounded = torch_logits(twin, ids)
    with llamacpp_faithful(twin, types, exact_head=True):
        exact = torch_logits(twin, ids)
    with llamacpp_faithful(twin, types):  # the head in torch's order: float noise in the logits
        body = torch_logits(twin, ids)
    assert np.abs(body - ref).max() < 1e-6 * np.abs(ref).max() and kld(ref, body) < 1e-12
    return ref, plain, rounded, exact


@needs_modelled_build
@pytest.mark.parametrize("fmt", ["f32", "q4_0", "q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_faithful_forward_is_llamacpp_bit_for_bit(family, fmt, tokenizer, tmp_path):
    ref, plain, rounded, exact = _gap(tiny_model(family), tokenizer, tmp_path / "m.gguf", fmt)
    scale = np.abs(ref).max()
    print(f"{family} {fmt}: max |dlogit|/max|logit| plain {np.abs(ref - plain).max() / scale:.1e} "
          f"rounded {np.abs(ref - rounded).max() / scale:.1e} exact {np.abs(ref - exact).max() / scale:.1e}; "
          f"KLD plain {kld(ref, plain):.1e} rounded {kld(ref, rounded):.1e}")
    np.testing.assert_array_equal(exact, ref)
    assert kld(ref, rounded) < kld(ref, plain)


@needs_modelled_build
def test_gemma3_sliding_layers_rope_base_and_window(tokenizer, tmp_path):
    """7 layers (layer 5 global), a 16-token window over 200 tokens, a local base that is not
    llama.cpp's default and linear scaling on the global layers."""
    from transformers import AutoModelForCausalLM

    base = {k: v for k, v in tiny_model("gemma3").config.to_dict().items() if k != "layer_types"}
    config = type(tiny_model("gemma3").config)(**{
        **base, "num_hidden_layers": 7, "sliding_window": 16,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
                            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}}})
    assert config.layer_types[5] == "full_attention" and config.layer_types[6] == "sliding_attention"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    keys = hparams(arch_for_config(config), config)
    assert keys["gemma3.rope.freq_base_swa"] == 5000.0 and keys["gemma3.rope.scaling.factor"] == 8.0
    for fmt in ("f32", "q4_0"):
        ref, _, _, exact = _gap(model, tokenizer, tmp_path / f"{fmt}.gguf", fmt)
        np.testing.assert_array_equal(exact, ref, err_msg=fmt)


def test_gemma3_scaled_sliding_rope_is_refused():
    config = tiny_model("gemma3").config
    config.rope_parameters["sliding_attention"] = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(QatkitError, match="sliding-window"):
        hparams(arch_for_config(config), config)


def test_rope_angles_are_ggml_running_products():
    """Pair i's angle is ((p * s) * s) ... in float32, not p * base**(-2i/d): they part with the
    position (the gemma3 gap that grew along the sequence)."""
    pos = torch.arange(200)
    cos, sin = faithful.ggml_rope_cos_sin(pos, 32, 10000.0)
    s = np.float32(np.float64(10000.0) ** (-2 / 32))
    theta = np.arange(200, dtype=np.float32)
    for _ in range(5):
        theta = theta * s  # pair 5
    np.testing.assert_allclose(cos[:, 5].numpy(), np.cos(theta.astype(np.float64)), atol=1.2e-7)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float) / 32))
    hf = (pos[:, None].float() * inv_freq).cos()
    assert not torch.equal(hf, cos[:, :16])


def test_rms_norm_sums_in_double_and_roots_exactly():
    torch.manual_seed(0)
    x = torch.randn(512, 64) * 0.02
    w = torch.ones(64)
    y = faithful.ggml_rms_norm(x, w, 1e-6)
    sq = (x * x).numpy().astype(np.float64)
    mean = (sq.sum(-1, keepdims=True) / 64).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(1e-6))  # numpy's float32 sqrt is IEEE
    np.testing.assert_array_equal(y.numpy(), x.numpy() * scale)


def test_attention_scale_is_float32_of_sqrtf():
    for d in (16, 32, 96, 112, 128, 256):
        assert faithful_ops._scale_f32(d**-0.5) == float(np.float32(1.0) / np.sqrt(np.float32(d)))
