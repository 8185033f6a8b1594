"""The one metrics implementation (qatkit/metrics.py): llama-perplexity's chunks and positions,
checked against a hand computation, and shared by the llama.cpp and ExecuTorch scorers."""

import math

import numpy as np
import pytest
import torch

from qatkit import QatkitError, metrics

VOCAB = 300  # above the tiny GGUF's vocabulary


def fake_logits(chunk, first):
    """Deterministic logits that depend on the whole prefix (like a causal model)."""
    out = []
    for pos in range(first, len(chunk)):
        g = torch.Generator().manual_seed(hash(tuple(chunk[: pos + 1])) % (2**31))
        out.append(torch.randn(VOCAB, generator=g) * 3)
    return torch.stack(out)


def other_logits(chunk, first):
    return fake_logits(chunk, first) * 0.7 + 0.1 * torch.arange(VOCAB)


def test_chunks_follow_llama_perplexity():
    toks = [1] + list(range(10, 40))  # BOS + 30 text tokens = 31: three chunks of 8, 7 dropped
    cl = metrics.chunks(toks, 8, bos=1)
    assert cl == [[1, 10, 11, 12, 13, 14, 15, 16], [1, 18, 19, 20, 21, 22, 23, 24], [1, 26, 27, 28, 29, 30, 31, 32]]
    assert metrics.chunks(list(range(20)), 8, bos=None) == [list(range(8)), list(range(8, 16))]
    assert len(metrics.chunks(toks, 8, 1, max_chunks=2)) == 2
    with pytest.raises(QatkitError, match="needs at least 8"):
        metrics.chunks(toks[:7], 8, 1)


def test_score_equals_a_hand_computation():
    toks = [1] + [(7 * i) % VOCAB for i in range(60)]
    n_ctx = 16
    r = metrics.score_tokens(fake_logits, toks, 1, n_ctx, ref_fn=other_logits)
    nll, kl, same, n = 0.0, 0.0, 0, 0
    for c in range(len(toks) // n_ctx):
        chunk = toks[c * n_ctx : (c + 1) * n_ctx]
        chunk[0] = 1
        for pos in range(n_ctx // 2, n_ctx - 1):  # each predicts chunk[pos + 1]
            lp = np.log(np.exp(fake_logits(chunk, pos)[0].double().numpy()) / np.exp(fake_logits(chunk, pos)[0].double().numpy()).sum())
            lq = np.log(np.exp(other_logits(chunk, pos)[0].double().numpy()) / np.exp(other_logits(chunk, pos)[0].double().numpy()).sum())
            nll -= lp[chunk[pos + 1]]
            kl += float((np.exp(lq) * (lq - lp)).sum())
            same += int(lq.argmax() == lp.argmax())
            n += 1
    assert r["tokens"] == n == 3 * 7 and r["chunks"] == 3
    assert math.isclose(r["nll"], nll / n, rel_tol=1e-12) and math.isclose(r["ppl"], math.exp(nll / n), rel_tol=1e-12)
    assert math.isclose(r["kld"], kl / n, rel_tol=1e-9) and r["same_top"] == pytest.approx(100 * same / n)
    assert metrics.score_tokens(fake_logits, toks, 1, n_ctx, ref_fn=fake_logits)["kld"] == 0.0


def test_llama_cpp_and_executorch_scorers_share_one_implementation(monkeypatch, tmp_path):
    """The same logits function fed through the llama.cpp scorer (its text and chunks from the
    real llama.cpp tokenizer) and through the ExecuTorch scorer gives the same numbers."""
    from qatkit.runtime import executorch as E
    from qatkit.runtime import llamacpp as L
    from tiny_gguf import write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny-f32.gguf")
    text = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 6
    llm = L.open_model(path, n_ctx=32)
    try:
        bos, ids = llm.token_bos(), L.tokenize(llm, text)
    finally:
        llm.close()
    monkeypatch.setattr(L, "_logits_fn", lambda llm: fake_logits)
    a = L.score(path, text, ref_path=path, n_ctx=32)
    monkeypatch.undo()
    b = E.score_ids(fake_logits, ids, bos, n_ctx=32, ref_logits=fake_logits)
    for k in ("ppl", "nll", "kld", "same_top", "tokens", "chunks", "ppl_err"):
        assert a[k] == b[k], k
    assert a["tokens"] == a["chunks"] * (32 - 1 - 16)


def test_progress_in_a_log_is_a_few_plain_lines(caplog, monkeypatch):
    """Where stderr is not a terminal (a log file, a pipe, here pytest's capture), a bar is a log
    line at most every tenth of the way and one at the end, postfix figures included."""
    import logging
    import sys

    from qatkit import progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setattr(progress, "QUIET_S", 0.0)  # (a job shorter than QUIET_S logs nothing)
    with caplog.at_level(logging.INFO, logger="qatkit.progress"):
        b = progress.bar(range(1000), desc="QAT", unit="step")
        for i in b:
            b.set_postfix(kl=f"{1 / (i + 1):.4f}")
    lines = [r.getMessage() for r in caplog.records if r.name == "qatkit.progress"]
    assert 10 <= len(lines) <= 11 and lines[-1].startswith("QAT: 1000/1000 step") and "kl=0.0010" in lines[-1]
    assert "\r" not in "".join(lines)
    monkeypatch.setattr(progress, "QUIET_S", 60.0)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qatkit.progress"):
        for _ in progress.bar(range(1000), desc="quick"):
            pass
    assert not [r for r in caplog.records if r.name == "qatkit.progress"]
