"""The GGUF exporter against the real llama.cpp, on tiny models of every supported family.

- qatkit's Q4_0 file equals llama.cpp's own quantizer output tensor for tensor (type and bytes),
  Q6_K head included;
- llama.cpp's logits on qatkit's file match the torch model carrying the same dequantized weights;
  in the runtime-faithful mode (llama.cpp's activation roundings) to float noise.
"""

import copy

import numpy as np
import pytest
import torch

from qatkit.export.gguf import load_gguf_weights, read_gguf_tensors
from qatkit.models.arch import arch_for_config
from qatkit.runtime.faithful import llamacpp_faithful
from qatkit.runtime.llamacpp import chunk_logits, llama_quantize, open_model
from tiny_models import TEXT, tiny_model
from tiny_models import export_gguf as export
from tiny_models import kld_np as kld
from tiny_models import logits_np as torch_logits

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]


HEAD_TYPE = {("q4_0", False): "q6_k", ("q4_0", True): "q4_0", ("q8_0", False): "q8_0", ("f16", False): "f16"}


@pytest.mark.parametrize("fmt,pure", list(HEAD_TYPE))
@pytest.mark.parametrize("family", FAMILIES)
def test_bytes_equal_llama_quantize(family, fmt, pure, tokenizer, tmp_path):
    """Same per-tensor policy as llama.cpp's quantizer, same bytes. hidden 256: in the Q4_0 mix
    the head (output, or the tied embedding) goes to Q6_K."""
    model = tiny_model(family, hidden=256, layers=1)
    export(model, tokenizer, tmp_path / "f32.gguf", "f32")
    plan = export(model, tokenizer, tmp_path / "qatkit.gguf", fmt, pure)
    llama_quantize(str(tmp_path / "f32.gguf"), str(tmp_path / "llama.gguf"), ftype=fmt, pure=pure)
    ours, theirs = read_gguf_tensors(tmp_path / "qatkit.gguf"), read_gguf_tensors(tmp_path / "llama.gguf")
    assert set(ours) == set(theirs)
    head = "output.weight" if "output.weight" in ours else "token_embd.weight"
    assert plan[head] == HEAD_TYPE[fmt, pure]
    for name, (t, data, shape) in theirs.items():
        assert ours[name][0] == t, f"{name}: type {ours[name][0]} vs llama.cpp {t}"
        assert ours[name][2] == shape
        np.testing.assert_array_equal(ours[name][1], data, err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_gap_is_float_noise_in_faithful_mode(family, tokenizer, tmp_path):
    model = tiny_model(family)
    path = tmp_path / "q4_0.gguf"
    export(model, tokenizer, path, "q4_0")
    ids = tokenizer(TEXT)["input_ids"][:200]
    llm = open_model(path, n_ctx=256)
    ref = chunk_logits(llm, ids)

    twin = copy.deepcopy(model)
    types = load_gguf_weights(twin, arch_for_config(model.config), path)
    plain = torch_logits(twin, ids)
    with llamacpp_faithful(twin, types):
        faithful = torch_logits(twin, ids)
    gap_plain, gap_faithful = kld(ref, plain), kld(ref, faithful)
    err_faithful = np.abs(ref - faithful).max()
    print(f"{family}: KLD plain {gap_plain:.3e} faithful {gap_faithful:.3e}; max |dlogit| plain {np.abs(ref - plain).max():.2e} faithful {err_faithful:.2e}")
    assert (ref.argmax(-1) == faithful.argmax(-1)).mean() == 1.0
    assert err_faithful < 2e-6 * max(1.0, np.abs(ref).max())  # all but the head bit-exact (runtime/faithful/)
    assert gap_faithful < gap_plain / 10  # modelling llama.cpp's roundings is what closes the gap


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_export_matches_torch(family, tokenizer, tmp_path):
    model = tiny_model(family)
    export(model, tokenizer, tmp_path / "f32.gguf", "f32")
    ids = tokenizer(TEXT)["input_ids"][:100]
    ref = chunk_logits(open_model(tmp_path / "f32.gguf", n_ctx=128), ids)
    types = {n: "f32" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with llamacpp_faithful(model, types):
        faithful = torch_logits(model, ids)
    assert np.abs(ref - faithful).max() < 2e-6 * max(1.0, np.abs(ref).max())
