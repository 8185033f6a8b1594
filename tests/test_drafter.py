"""Gemma 4's MTP drafter ("assistant") as a GGUF file: qatkit writes the file llama.cpp's own
converter writes from the same directory (its decoder without K/V of its own, the two
projections to the target, the target's tokenizer), drops the centroid head as the converter
does, quantizes to Q4_0 byte for byte as llama-quantize does, and refuses a drafter llama.cpp
cannot run in one line."""

import pytest
from test_gemma4 import fields, llama_convert, tensors

from qatkit.cli import main
from qatkit.runtime.llamacpp import llama_quantize
from tiny_models import assistant_dir

PREFIXES = ("gemma4-assistant.", "tokenizer.ggml.")


@pytest.fixture(autouse=True)
def _cache(private_cache):
    return private_cache


@pytest.mark.parametrize("centroids", [False, True])
def test_f32_export_is_the_converters_file(tmp_path, capsys, centroids):
    src = assistant_dir(tmp_path / "a", use_ordered_embeddings=centroids)
    ref = llama_convert(src, tmp_path / "converter-f32.gguf")
    ours = tmp_path / "qatkit-f32.gguf"
    assert main(["export", str(src), "--format", "f32", "--out", str(ours)]) == 0
    a, b = tensors(ours), tensors(ref)
    assert sorted(a) == sorted(b) and len(a) == 27 and [n for n in a if a[n] != b[n]] == []
    assert {"nextn.pre_projection.weight", "nextn.post_projection.weight", "rope_freqs.weight"} <= set(a)
    assert a["nextn.pre_projection.weight"][1] == [128, 32] and not any("attn_k" in n or "attn_v" in n or "centroid" in n for n in a)
    fa, fb = fields(ours, PREFIXES), fields(ref, PREFIXES)
    assert fa.pop("tokenizer.ggml.add_eos_token") is False and fa == fb
    assert fa["gemma4-assistant.embedding_length_out"] == 64 and fa["gemma4-assistant.nextn_predict_layers"] == 2
    if not centroids:
        q, theirs = tmp_path / "qatkit-q4_0.gguf", tmp_path / "llama-q4_0.gguf"
        assert main(["export", str(src), "--format", "q4_0", "--out", str(q)]) == 0
        llama_quantize(str(ref), str(theirs), ftype="q4_0")
        a, b = tensors(q), tensors(theirs)
        assert sorted(a) == sorted(b) and [n for n in a if a[n] != b[n]] == []
        assert a["blk.0.attn_q.weight"][0] == "Q4_0" and a["nextn.pre_projection.weight"][0] == "Q4_0"


def test_a_drafter_llama_cpp_cannot_run_is_refused(tmp_path, capsys):
    """A drafter transformers builds but llama.cpp's gemma4-assistant cannot run (full layers
    with plain RoPE): one line, exit 2, no file. (transformers itself refuses per-layer
    embeddings, MoE and the double-wide MLP in a drafter.)"""
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    src = assistant_dir(tmp_path / "a", rope_parameters=rope)
    out = tmp_path / "x.gguf"
    assert main(["export", str(src), "--format", "f32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qatkit: error: gemma4: ") and "proportional / default" in err, err
    assert not out.exists()
