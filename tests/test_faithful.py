"""The llama.cpp-faithful forward: tiny random models, and the real ggml library where installed."""

from __future__ import annotations

import ctypes
import importlib.util

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.models.llama.modeling_llama import eager_attention_forward

from qatkit.formats import q8_0
from qatkit.runtime import faithful
from qatkit.runtime.faithful import llamacpp_faithful
from qatkit.runtime.ggml import library

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _model(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16))
    else:
        config = Gemma3TextConfig(**{**COMMON, "num_key_value_heads": 1}, head_dim=16,
                                  query_pre_attn_scalar=16, sliding_window=4,
                                  layer_types=["sliding_attention", "full_attention"])
        model = Gemma3ForCausalLM(config)
    return model.eval()


def _weight_types(model: nn.Module, wtype: str = "q4_0") -> dict[str, str]:
    types = {n: wtype for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    types["lm_head"] = "q8_0"
    return types


def _ids(seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(1))


def _assert_restored(model: nn.Module, attn: str, acts: dict) -> None:
    assert model.config._attn_implementation == attn
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(m.act_fn is act for m, act in acts.items())


# --- the context on whole models ---------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_rounds_inside_and_restores_exactly(family):
    model = _model(family)
    ids = _ids()
    attn = model.config._attn_implementation
    acts = {m: m.act_fn for m in model.modules() if hasattr(m, "act_fn")}
    with torch.no_grad():
        plain = model(ids).logits
        with llamacpp_faithful(model, _weight_types(model)):
            inside = model(ids).logits
        after = model(ids).logits
    diff = (inside - plain).abs().max().item()
    assert 0 < diff < 0.1 * plain.abs().max().item()
    assert torch.equal(after, plain)
    _assert_restored(model, attn, acts)


def test_restores_after_an_exception():
    model = _model("gemma3")
    attn = model.config._attn_implementation
    acts = {m: m.act_fn for m in model.modules() if hasattr(m, "act_fn")}
    with pytest.raises(RuntimeError, match="boom"):
        with llamacpp_faithful(model, _weight_types(model)):
            assert isinstance(model.model.layers[0].mlp.act_fn, faithful.TableGELU)
            raise RuntimeError("boom")
    _assert_restored(model, attn, acts)


@pytest.mark.parametrize("wtype, expected", [
    ("q4_0", q8_0.activation_fake_quant),
    ("q8_0", q8_0.activation_fake_quant),
    ("q6_k", faithful.q8_k_activation_fake_quant),
    ("f16", lambda x: x.half().float()),
    ("f32", lambda x: x),
])
def test_linear_input_is_rounded_as_its_weight_type_says(wtype, expected):
    model = _model("llama")
    name = "model.layers.1.mlp.down_proj"  # 256 inputs: a whole Q8_K block
    seen = {}
    target = model.get_submodule(name)
    # registered before the context's hook, so it sees the input before rounding
    raw = target.register_forward_pre_hook(lambda m, args: seen.__setitem__("raw", args[0]))
    used = target.register_forward_hook(lambda m, args, out: seen.__setitem__("used", args[0]))
    with torch.no_grad(), llamacpp_faithful(model, {**_weight_types(model), name: wtype}):
        model(_ids())
    raw.remove(), used.remove()
    assert torch.equal(seen["used"], expected(seen["raw"]))
    if wtype != "f32":
        assert not torch.equal(seen["used"], seen["raw"])


def test_bad_weight_types_name_the_module():
    model = _model("llama")
    with pytest.raises(ValueError, match="q5_0"):
        with llamacpp_faithful(model, {"lm_head": "q5_0"}):
            pass
    with pytest.raises(ValueError, match="model.nope"):
        with llamacpp_faithful(model, {"model.nope": "q8_0"}):
            pass
    with pytest.raises(ValueError, match="q_proj.*multiple of 256"):
        with llamacpp_faithful(model, {"model.layers.0.self_attn.q_proj": "q6_k"}):
            pass
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_gradients_pass_through_the_roundings():
    model = _model("gemma3")
    with llamacpp_faithful(model, _weight_types(model)):
        model(_ids(), labels=_ids()).loss.backward()
    for p in (model.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].mlp.gate_proj.weight,
              model.model.embed_tokens.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# --- attention ---------------------------------------------------------------------------

def _qkv_mask(seq: int = 12, heads: int = 4, kv_heads: int = 2, dim: int = 16):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, seq, dim, generator=g) for h in (heads, kv_heads, kv_heads))
    mask = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)[None, None]
    return q, k, v, mask


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_attention_is_eager_up_to_f16_rounding(family):
    module = _model(family).model.layers[0].self_attn
    q, k, v, mask = _qkv_mask(kv_heads=module.config.num_key_value_heads)
    ref, ref_probs = eager_attention_forward(module, q, k, v, mask, scaling=0.3)
    out, probs = faithful.faithful_attention(module, q, k, v, mask, scaling=0.3)
    assert 0 < (out - ref).abs().max() < 2e-3
    assert torch.equal(probs, probs.half().float())  # the probabilities sit on the f16 grid
    assert torch.equal(probs == 0, ref_probs == 0)  # the causal mask is kept


def test_attention_rounds_q_where_llamacpp_does():
    # gemma3 rounds q*scale to f16 (Q is scaled before the K*Q product), llama rounds q itself
    q, k, v, mask = _qkv_mask(kv_heads=1)
    module = _model("gemma3").model.layers[0].self_attn
    out, _ = faithful.faithful_attention(module, q, k, v, mask, scaling=0.3)
    q16, k16, v16 = (q * 0.3).half().float(), k.half().float(), v.half().float()
    w = q16 @ k16.repeat_interleave(4, dim=1).transpose(2, 3) + mask
    p = torch.softmax(w, dim=-1).half().float()
    assert torch.allclose(out, (p @ v16.repeat_interleave(4, dim=1)).transpose(1, 2), atol=1e-6, rtol=0)


def test_sliding_window_mask_is_kept():
    model = _model("gemma3")
    ids = _ids(seq=16)
    with torch.no_grad():
        windowed = model(ids).logits
        model.config.sliding_window = 512
        unwindowed = model(ids).logits
        model.config.sliding_window = 4
        with llamacpp_faithful(model, _weight_types(model, "f32")):
            inside = model(ids).logits
    window_effect = (windowed - unwindowed).abs().max()
    assert window_effect > 0.05
    assert (inside - windowed).abs().max() < 0.1 * window_effect


# --- GELU and Q8_K without the library -----------------------------------------------------

def test_table_gelu_is_close_to_tanh_gelu_and_clamps():
    x = torch.linspace(-12, 12, 10001)
    y = faithful.TableGELU()(x)
    ref = torch.nn.functional.gelu(x, approximate="tanh")
    assert 0 < (y - ref).abs().max() < 1e-2
    assert torch.equal(y[x <= -10], torch.zeros_like(y[x <= -10]))
    assert torch.equal(y[x >= 10], x[x >= 10])


def test_q8_k_zero_block_and_sign():
    x = torch.zeros(2, 512)
    x[0, 256:] = torch.linspace(-3, 2, 256)
    y = faithful.q8_k_activation_fake_quant(x)
    assert torch.equal(y[1], x[1]) and torch.equal(y[0, :256], x[0, :256])
    assert y[0, 256] == -3.0  # the max element maps to exactly -127 * (1/iscale)
    assert torch.equal(faithful.q8_k_activation_fake_quant(-x), -y)


# --- against the real ggml CPU library (llama-cpp-python) -----------------------------------

F32, F16, Q4_0, Q8_0, Q6_K = 0, 1, 2, 8, 14


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class Ggml:
    """The few ggml functions these tests call, through ctypes."""

    def __init__(self):
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self.base = library("ggml-base", mode=ctypes.RTLD_GLOBAL)
        self.cpu = library("ggml-cpu", mode=ctypes.RTLD_GLOBAL)
        sigs = {
            "ggml_init": (p, [_InitParams]), "ggml_free": (None, [p]),
            "ggml_new_tensor_2d": (p, [p, ctypes.c_int, i64, i64]), "ggml_get_data": (p, [p]),
            "ggml_nbytes": (ctypes.c_size_t, [p]), "ggml_row_size": (ctypes.c_size_t, [ctypes.c_int, i64]),
            "ggml_mul_mat": (p, [p, p, p]), "ggml_gelu": (p, [p, p]), "ggml_geglu_split": (p, [p, p, p]),
            "ggml_new_graph": (p, [p]), "ggml_build_forward_expand": (None, [p, p]),
            "ggml_quantize_chunk": (ctypes.c_size_t, [ctypes.c_int, p, p, i64, i64, i64, p]),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(self.base, name)
            fn.restype, fn.argtypes = res, args
        for name in ("quantize_row_q8_0", "quantize_row_q8_K"):
            getattr(self.cpu, name).argtypes = [p, p, i64]
        self.cpu.ggml_graph_compute_with_ctx.argtypes = [p, p, ctypes.c_int]
        self.cpu.ggml_cpu_init()

    def quantize_row(self, name: str, x: np.ndarray, block: int, block_bytes: int) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], x.shape[1] // block, block_bytes), np.uint8)
        for r in range(x.shape[0]):
            getattr(self.cpu, name)(x[r].ctypes.data, out[r].ctypes.data, x.shape[1])
        return out

    def quantize_weight(self, gtype: int, w: np.ndarray) -> np.ndarray:
        w = np.ascontiguousarray(w, dtype=np.float32)
        out = np.zeros((w.shape[0], self.base.ggml_row_size(gtype, w.shape[1])), np.uint8)
        self.base.ggml_quantize_chunk(gtype, w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], None)
        return out

    def compute(self, build) -> np.ndarray:
        """build(new_tensor) -> output tensor; new_tensor(gtype, ne0, data) makes a filled 2-D tensor."""
        ctx = self.base.ggml_init(_InitParams(64 << 20, None, False))
        try:
            def new_tensor(gtype, ne0, data):
                data = np.ascontiguousarray(data)
                t = self.base.ggml_new_tensor_2d(ctx, gtype, ne0, data.shape[0])
                assert self.base.ggml_nbytes(t) == data.nbytes
                ctypes.memmove(self.base.ggml_get_data(t), data.ctypes.data, data.nbytes)
                return t

            out = build(ctx, new_tensor)
            graph = self.base.ggml_new_graph(ctx)
            self.base.ggml_build_forward_expand(graph, out)
            assert self.cpu.ggml_graph_compute_with_ctx(ctx, graph, 1) == 0
            n = self.base.ggml_nbytes(out) // 4
            values = (ctypes.c_float * n).from_address(self.base.ggml_get_data(out))
            return np.ctypeslib.as_array(values).copy()
        finally:
            self.base.ggml_free(ctx)


@pytest.fixture(scope="module")
def ggml() -> Ggml:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    try:
        return Ggml()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _activations(seed: int, rows: int = 16, n: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)) * rng.lognormal(0, 2, (rows, 1))
    x[0, :32] = 0.0  # an all-zero block
    x[1, 32:64] = np.arange(32) - 15.5  # many values that scale to near-ties
    return x.astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
def test_q8_0_activation_matches_library_quantize_row_q8_0(ggml, seed):
    x = _activations(seed)
    raw = ggml.quantize_row("quantize_row_q8_0", x, 32, 34)
    ref = raw[..., 2:].copy().view(np.int8) * raw[..., :2].copy().view(np.float16).astype(np.float32)
    assert np.array_equal(q8_0.activation_fake_quant(torch.from_numpy(x)).numpy(), ref.reshape(x.shape))


def test_q8_0_activation_on_a_scale_tie(ggml):
    # amax where fl(fl(1/amax) * 127) != fl(127 / amax), and x one code's tie away from the difference
    x = np.zeros((1, 32), np.float32)
    x[0, :2] = np.array([1081376603, 1027133734], np.uint32).view(np.float32)  # 3.8202732, 0.045121334
    raw = ggml.quantize_row("quantize_row_q8_0", x, 32, 34)
    assert raw[0, 0, 2:4].view(np.int8).tolist() == [127, 1]  # the library's codes
    ref = raw[..., 2:].copy().view(np.int8) * raw[..., :2].copy().view(np.float16).astype(np.float32)
    assert np.array_equal(q8_0.activation_fake_quant(torch.from_numpy(x)).numpy(), ref.reshape(x.shape))


@pytest.mark.parametrize("seed", range(4))
def test_q8_k_activation_matches_library_quantize_row_q8_K(ggml, seed):
    x = _activations(seed)
    x[2, :256] = 0.0  # an all-zero Q8_K block
    raw = ggml.quantize_row("quantize_row_q8_K", x, 256, 4 + 256 + 32)  # float d, 256 codes, 16 bsums
    ref = raw[..., 4:260].copy().view(np.int8) * raw[..., :4].copy().view(np.float32)
    mine = faithful.q8_k_activation_fake_quant(torch.from_numpy(x)).numpy()
    assert np.array_equal(mine, ref.reshape(x.shape))


def test_gelu_table_matches_library_bit_for_bit(ggml):
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    x = np.concatenate([halves[np.isfinite(halves)], [10, -10, 9.9999, -9.9999, 10.0001, -10.0001, 1 / 3]])
    x = x.astype(np.float32)[None]
    g = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    n = x.shape[1]
    gelu = ggml.compute(lambda ctx, t: ggml.base.ggml_gelu(ctx, t(F32, n, x)))
    geglu = ggml.compute(lambda ctx, t: ggml.base.ggml_geglu_split(ctx, t(F32, n, x), t(F32, n, g)))
    mine = faithful.gelu_table(torch.from_numpy(x[0])).numpy()
    assert np.array_equal(gelu, mine)
    assert np.array_equal(geglu, mine * g[0])


@pytest.mark.parametrize("gtype, wtype", [(Q8_0, "q8_0"), (Q4_0, "q4_0"), (Q6_K, "q6_k"), (F16, "f16")])
def test_library_matmul_rounds_activations_as_emulated(ggml, gtype, wtype):
    """ggml_mul_mat(W, x) with float x: the emulation explains the library's result to float32
    accumulation noise, far below the effect of the rounding. The F16 case is also the K*Q and
    V*softmax products of attention (an f16 cache times f32 activations)."""
    import gguf

    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 512)).astype(np.float32)
    x = _activations(4, rows=9, n=512)  # 9 rows: Q6_K takes ggml's tiled path from 8
    if gtype == F16:
        raw, w_deq = w.astype(np.float16), w.astype(np.float16).astype(np.float64)
    else:
        raw = ggml.quantize_weight(gtype, w)
        w_deq = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(gtype)).astype(np.float64)
    lib = ggml.compute(lambda ctx, t: ggml.base.ggml_mul_mat(ctx, t(gtype, 512, raw), t(F32, 512, x)))
    lib = lib.reshape(9, 48).astype(np.float64)
    rounded = faithful.ACTIVATION_ROUNDING[wtype](torch.from_numpy(x)).double().numpy()
    emulated_err = np.abs(lib - rounded @ w_deq.T).max()
    float_err = np.abs(lib - x.astype(np.float64) @ w_deq.T).max()
    assert float_err > 0
    assert emulated_err < 0.01 * float_err
