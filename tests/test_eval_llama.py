"""llama.cpp-side evaluation and the PTQ baseline, on a tiny random GGUF run by the real llama.cpp."""

import math
import os

import numpy as np
import pytest

from qatkit import QatkitError
from qatkit.runtime import llamacpp as L
from qatkit.runtime.llamacpp import llama_quantize
from tiny_gguf import TinyConfig, write_tiny_llama

N_CTX = 64
# 876 tokens with BOS (" the", "he" merge): 13 chunks of 64, the last 44 tokens dropped.
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness; the thing they had in hand was theirs. ") * 7


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf")


@pytest.fixture(scope="module")
def q8(f32):
    return llama_quantize(f32, f32.replace("f32", "q8_0"), "q8_0")


def test_text_tokens_match_llama_perplexity(f32):
    # llama-perplexity tokenizes with add_special=true: one BOS in front, then the text.
    llm = L.open_model(f32, n_ctx=N_CTX)
    try:
        assert L.adds_bos(llm)
        toks = L._text_tokens(llm, TEXT)
        assert toks == llm.tokenize(TEXT.encode(), add_bos=True, special=False)
        assert toks[0] == llm.token_bos() and toks[1:] == L.tokenize(llm, TEXT)
        assert len(toks) // N_CTX == 13
    finally:
        llm.close()


def test_ppl_is_exp_of_independently_computed_nll(f32):
    r = L.score(f32, TEXT, n_ctx=N_CTX, max_chunks=3)
    assert r["chunks"] == 3 and r["tokens"] == 3 * (N_CTX - 1 - N_CTX // 2)
    assert r["kld"] is None and r["same_top"] is None
    assert r["file_bytes"] == os.path.getsize(f32)

    llm = L.open_model(f32, n_ctx=N_CTX)
    try:
        toks = [llm.token_bos()] + L.tokenize(llm, TEXT)
        nlls = []
        for c in range(3):
            chunk = toks[c * N_CTX:(c + 1) * N_CTX]
            chunk[0] = llm.token_bos()
            logits = L.chunk_logits(llm, chunk).astype(np.float64)
            assert logits.shape == (N_CTX, llm.n_vocab())
            for pos in range(N_CTX // 2, N_CTX - 1):
                row = logits[pos]
                lse = row.max() + math.log(np.exp(row - row.max()).sum())
                nlls.append(lse - row[chunk[pos + 1]])
    finally:
        llm.close()
    assert len(nlls) == r["tokens"]
    assert r["ppl"] == pytest.approx(math.exp(np.mean(nlls)), rel=1e-9)


def test_bos_replaces_first_token_of_each_chunk(f32):
    # Without the overwrite chunk 1 would start with a text token and score differently.
    r = L.score(f32, TEXT, n_ctx=N_CTX, max_chunks=2)
    llm = L.open_model(f32, n_ctx=N_CTX)
    try:
        toks = [llm.token_bos()] + L.tokenize(llm, TEXT)
        chunk = toks[N_CTX:2 * N_CTX]
        assert chunk[0] != llm.token_bos()
        raw = L.chunk_logits(llm, chunk)
        chunk[0] = llm.token_bos()
        bos = L.chunk_logits(llm, chunk)
    finally:
        llm.close()
    assert not np.allclose(raw[N_CTX // 2:], bos[N_CTX // 2:])
    assert r["chunks"] == 2


def test_self_reference_has_zero_kld(f32):
    r = L.score(f32, TEXT, ref_path=f32, n_ctx=N_CTX, max_chunks=4)
    assert r["kld"] < 1e-6 and r["kld"] >= -1e-12
    assert r["same_top"] == 100.0
    assert r["tokens"] == 4 * (N_CTX - 1 - N_CTX // 2)


def test_q8_0_is_close_to_f32_but_not_equal(f32, q8):
    assert os.path.getsize(q8) < 0.5 * os.path.getsize(f32)
    base = L.score(f32, TEXT, n_ctx=N_CTX)
    r = L.score(q8, TEXT, ref_path=f32, n_ctx=N_CTX)
    assert r["chunks"] == base["chunks"] == 13
    assert r["ppl"] == pytest.approx(base["ppl"], rel=0.02)
    assert 0 < r["kld"] < 0.01
    assert 90.0 <= r["same_top"] <= 100.0


def test_q4_0_pure_is_further_from_f32_than_q8_0(f32, q8, tmp_path):
    q4 = llama_quantize(f32, tmp_path / "tiny-q4_0.gguf", "q4_0", pure=True)
    assert os.path.getsize(q4) < os.path.getsize(q8)
    k8 = L.score(q8, TEXT, ref_path=f32, n_ctx=N_CTX, max_chunks=4)["kld"]
    k4 = L.score(q4, TEXT, ref_path=f32, n_ctx=N_CTX, max_chunks=4)["kld"]
    assert k4 > 3 * k8


def test_truncated_gguf_is_a_qatkit_error(f32, tmp_path):
    bad = tmp_path / "half.gguf"
    data = open(f32, "rb").read()
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(QatkitError, match="half.gguf.*not within the file bounds"):
        L.open_model(bad)
    with pytest.raises(QatkitError, match="half.gguf"):
        L.score(bad, TEXT, n_ctx=N_CTX)
    with pytest.raises(QatkitError, match="no such file"):
        L.open_model(tmp_path / "missing.gguf")


def test_short_text_is_a_qatkit_error(f32):
    with pytest.raises(QatkitError, match=r"has 11 tokens .*needs at least 64"):
        L.score(f32, "0123456789", n_ctx=N_CTX)


def test_reference_with_another_vocab_is_a_qatkit_error(f32, tmp_path):
    other = tmp_path / "other.gguf"
    llm = L.open_model(f32, n_ctx=N_CTX)
    n_vocab = llm.n_vocab()
    llm.close()
    # Same architecture, one merge (and its token) fewer: 260 tokens instead of 261.
    write_tiny_llama(other, TinyConfig(n_merges=2))
    with pytest.raises(QatkitError, match=rf"vocabulary of 260 tokens differs from {n_vocab}"):
        L.score(other, TEXT, ref_path=f32, n_ctx=N_CTX)


def test_failed_quantize_leaves_no_file(f32, tmp_path):
    bad = tmp_path / "half.gguf"
    data = open(f32, "rb").read()
    bad.write_bytes(data[:len(data) // 2])
    dst = tmp_path / "out" / "q.gguf"
    dst.parent.mkdir()
    with pytest.raises(QatkitError, match="half.gguf.*failed to quantize"):
        llama_quantize(bad, dst, "q8_0")
    assert os.listdir(dst.parent) == []
    with pytest.raises(QatkitError, match="unknown ftype 'q9_9'"):
        llama_quantize(f32, dst, "q9_9")
    assert os.listdir(dst.parent) == []


def test_generate_and_speed_run(f32):
    out = L.generate(f32, "It was the", n_tokens=8)
    assert isinstance(out, str)
    s = L.decode_speed(f32, n_tokens=8, n_prompt=16)
    assert s["prompt_tps"] > 0 and s["decode_tps"] > 0


def test_score_files_equals_one_score_per_file(f32, q8, tmp_path):
    """Several files on one text share the reference's forward per chunk; every number is what a
    separate `score` call gives, and the reference listed among the files scores KLD 0."""
    q4 = llama_quantize(f32, tmp_path / "tiny-q4_0.gguf", "q4_0", pure=True)
    together = L.score_files([f32, q8, q4], TEXT, ref_path=f32, n_ctx=N_CTX, max_chunks=3)
    for path, row in zip((q8, q4), together[1:]):
        alone = L.score(path, TEXT, ref_path=f32, n_ctx=N_CTX, max_chunks=3)
        for key in ("ppl", "nll", "kld", "same_top", "tokens", "chunks", "file_bytes"):
            assert row[key] == alone[key], (path, key)
    assert together[0]["kld"] == 0.0 and together[0]["same_top"] == 100.0
    assert together[0]["ppl"] == L.score(f32, TEXT, n_ctx=N_CTX, max_chunks=3)["ppl"]
    assert together[2]["kld"] > together[1]["kld"] > 0
