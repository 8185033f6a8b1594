"""Speculative decoding with Gemma 4's MTP drafter in llama.cpp (qatkit/runtime/mtp.py), on a tiny
random E-style target and a tiny random Gemma4AssistantForCausalLM that pairs with it
(tests/tiny_models.py), both written as F32 GGUFs by qatkit's exporter (llama.cpp's converter's
files, tensor for tensor: tests/test_gemma4.py, tests/test_drafter.py). The claims: speculation never changes the
target's greedy output, on the reject path and (with planted drafts) the accept path; the drafter
computes in llama.cpp what transformers computes from the same target state; bad input is one line.

Threads: 1. On a loaded 2-core machine ggml's spinning threads at n_threads=2 made a 24-token run
of these tiny models take 24 s instead of 5 ms."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

import torch  # noqa: E402

from qatkit import QatkitError  # noqa: E402
from qatkit.runtime import mtp  # noqa: E402
from qatkit.runtime.faithful import TableGELU  # noqa: E402
from tiny_models import assistant_dir, gemma4_dir  # noqa: E402

PROMPT = [2, 397, 337, 301, 297, 299, 293, 271, 268]  # 9 tokens: BOS and 8 random ids
LONG = [2, 397, 396, 369, 394, 384, 390, 353, 382, 388, 355, 260, 295, 393, 362, 373, 392, 349, 379, 375, 310, 270]
T = 1  # threads


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(target dir, target GGUF, assistant dir, assistant GGUF), the GGUFs qatkit's F32 files
    (the converter's, tensor for tensor: tests/test_gemma4.py, tests/test_drafter.py)."""
    from qatkit.cli import main

    d = tmp_path_factory.mktemp("mtp")
    tdir, adir = gemma4_dir(d / "target", seed=0), assistant_dir(d / "assistant")
    for src, out in ((tdir, d / "target.gguf"), (adir, d / "assistant.gguf")):
        assert main(["export", str(src), "--format", "f32", "--out", str(out)]) == 0
    return tdir, d / "target.gguf", adir, d / "assistant.gguf"


def check_counts(r: dict, n_tokens: int):
    # every target step after the prompt's makes its accepted drafts + 1 token
    assert r["n_tokens"] == len(r["tokens"]) == n_tokens
    assert 0 <= r["accepted"] <= r["drafted"]
    assert r["accepted"] + r["target_steps"] == n_tokens
    assert r["tokens_per_step"] == pytest.approx(n_tokens / r["target_steps"])


@pytest.mark.parametrize("prompt,n_draft,kv_f32", [(PROMPT, 4, True), (LONG, 3, True), ([2], 1, True), (LONG, 4, False)])
def test_speculation_never_changes_greedy_output(pair, prompt, n_draft, kv_f32, capfd):
    """The random drafter is almost always wrong (reject path, seq_rm of every draft); the output
    runs past the 16-token sliding window, so rolled-back cells near the window edge matter.

    Token for token with an F32 KV cache. With the default F16 cache, a row verified in a batch
    differs from a one-token decode by up to ~4e-2 x std(logits) on this random target (measured
    on 700-token prompts, where a near-tie then flipped), so there only the counts are checked."""
    _, target, _, drafter = pair
    ref = mtp.plain_greedy(target, prompt, 24, n_threads=T, kv_f32=kv_f32)
    got = mtp.speculative_greedy(target, drafter, prompt, 24, n_draft=n_draft, n_threads=T, kv_f32=kv_f32)
    assert got["tokens"] == ref["tokens"] or not kv_f32
    assert got["tokens"][0] == ref["tokens"][0]  # the same prompt decode
    check_counts(got, 24)
    assert ref["target_steps"] == 24 and ref["tokens_per_step"] == 1.0
    assert got["drafted"] > 0 and got["seconds"] > 0 and got["tokens_per_s"] > 0
    assert capfd.readouterr() == ("", "")  # llama.cpp's log goes to `logging`, not the terminal


def test_accepted_drafts_keep_greedy_output(pair):
    """Planted drafts from the true continuation, cut after 0..k correct tokens in turn (all k
    accepted in every (k+1)-th round): the accept path, the hidden row at the accepted index and
    seq_rm of a partial tail all run, and the output is still the target's greedy one. (The random
    drafter itself is never right: 0 of 45 drafts in the research notes, so it cannot do this.)"""
    _, target, _, drafter = pair
    n, k = 30, 3
    ref = mtp.plain_greedy(target, LONG, n, n_threads=T, kv_f32=True)["tokens"]
    rounds, expected = [], 0

    def plant(n_done, drafts):
        good = len(rounds) % (k + 1)
        rounds.append(n_done)
        planted = ref[n_done:n_done + len(drafts)]
        if good < len(planted):
            planted[good] = (planted[good] + 1) % 400
        return planted

    got = mtp.speculative_greedy(target, drafter, LONG, n, n_draft=k, n_threads=T, kv_f32=True, _plant=plant)
    assert got["tokens"] == ref
    check_counts(got, n)
    for r, n_done in enumerate(rounds):  # what each round should have accepted
        expected += min(r % (k + 1), min(k, n - n_done - 1))
    assert got["accepted"] == expected > 0
    assert got["tokens_per_step"] > 1.5


def hf_draft_step(tgt, dft, prefix: list[int], token: int, h: np.ndarray):
    """transformers' drafting step (SinglePositionMultiTokenCandidateGenerator): the target's
    shared K/V of `prefix`, the drafter at position len(prefix) on [target embedding(token), h].
    Returns the drafter's logits and the target's last hidden row of the prefix."""
    n = len(prefix)
    with torch.no_grad():
        out = tgt(input_ids=torch.tensor([prefix]), output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
        x = torch.cat([tgt.get_input_embeddings()(torch.tensor([[token]])), torch.from_numpy(h).view(1, 1, -1)], -1)
        o = dft(inputs_embeds=x, attention_mask=torch.ones(1, n + 1, dtype=torch.long), position_ids=torch.tensor([[n]]),
                shared_kv_states=out.shared_kv_states, use_cache=False)
    return o.logits[0, -1].numpy(), out.hidden_states[-1][0, -1].numpy()


def test_drafter_logits_match_transformers(pair):
    """The drafter's first logits in llama.cpp against transformers' from the same target state
    (the same token and llama.cpp's hidden row h; transformers' own target K/V), F32 KV, before
    any draft and after a round that accepted one draft. Prefixes stay under the sliding window
    minus one (11 <= 15 tokens), where llama.cpp and transformers see the same keys.

    Measured (max|d| / std(logits), prefix 9 / 11): 4.9e-4 / 1.9e-4 with ggml's GELU table in
    transformers (below), 2.4e-3 / 1.4e-2 without it (the target's f16 GELU moves its K/V, and
    the drafter's x3/x30 weights amplify it). Bound 5e-3: 10x the measured value, still 10x
    under what the sliding-window difference or a wrong hidden row costs (1e-1 and more)."""
    from transformers import AutoModelForCausalLM, Gemma4AssistantForCausalLM

    tdir, target, adir, drafter = pair
    tgt = AutoModelForCausalLM.from_pretrained(tdir, dtype=torch.float32).eval()
    dft = Gemma4AssistantForCausalLM.from_pretrained(adir, dtype=torch.float32).eval()
    for module in [*tgt.modules(), *dft.modules()]:  # ggml's f16 GELU table, as llama.cpp computes
        if hasattr(module, "act_fn") and (type(module).__name__.endswith("MLP") or hasattr(module, "per_layer_input_gate")):
            module.act_fn = TableGELU()
    ref = mtp.plain_greedy(target, PROMPT, 3, n_threads=T, kv_f32=True)["tokens"]
    n = len(PROMPT)
    with mtp._Llama(target, drafter, n_ctx=64, n_threads=T, kv_f32=True) as s:
        assert s.decode(PROMPT, 0, all_rows=False) == ref[:1]
        states = [(PROMPT, ref[0], s.hrow(n - 1))]
        first = s.draft(ref[0], n, states[0][2], 2, keep=True)
        # one round: [g0, g1 (accepted), wrong draft] -> the target's own g2 at row 1
        assert s.decode([ref[0], ref[1], (ref[2] + 1) % 400], n, all_rows=True)[:2] == ref[1:3]
        states.append((PROMPT + ref[:2], ref[2], s.hrow(1)))
        s.seq_rm(n + 2)
        second = s.draft(ref[2], n + 2, states[1][2], 2, keep=True)
    for (prefix, token, h), (drafts, logits, _) in zip(states, [first, second]):
        hf, hf_h = hf_draft_step(tgt, dft, prefix, token, h)
        # the row llama.cpp hands on is the prefix's last (measured 3.7e-3 / 5.5e-4 x its std)
        assert np.abs(h - hf_h).max() < 2e-2 * hf_h.std()
        assert int(hf.argmax()) == drafts[0]
        assert np.abs(logits[0] - hf).max() < 5e-3 * hf.std()
    # the same second round inside speculative_greedy proposes the same drafts (same h row)
    seen = {}

    def plant(n_done, drafts):
        seen[n_done] = drafts
        return [ref[1], (ref[2] + 1) % 400] if n_done == 1 else drafts

    mtp.speculative_greedy(target, drafter, PROMPT, 8, n_draft=2, n_threads=T, kv_f32=True, _plant=plant)
    assert seen[1] == first[0] and seen[3] == second[0]


def patched_width(src: Path, dst: Path, width: int) -> Path:
    """A copy of the assistant GGUF whose embedding_length_out (a u32 key) says `width`."""
    data = bytearray(src.read_bytes())
    key = b"gemma4-assistant.embedding_length_out"
    at = data.index(key) + len(key)
    assert int.from_bytes(data[at:at + 4], "little") == 4  # GGUF value type UINT32
    data[at + 4:at + 8] = width.to_bytes(4, "little")
    dst.write_bytes(bytes(data))
    return dst


def test_bad_input_is_one_line(pair, tmp_path, monkeypatch):
    _, target, _, drafter = pair
    wide = patched_width(drafter, tmp_path / "wide.gguf", 48)
    cases = [
        (target, target, PROMPT, r"target\.gguf: not a Gemma 4 MTP drafter \(general\.architecture is 'gemma4', not 'gemma4-assistant'\)"),
        (drafter, drafter, PROMPT, r"assistant\.gguf: not a Gemma 4 target model \(general\.architecture is 'gemma4-assistant'"),
        (target, tmp_path / "none.gguf", PROMPT, r"none\.gguf: no such file"),
        (target, drafter, [], r"target\.gguf: the prompt is empty"),
        (target, drafter, [2, 400], r"target\.gguf: token id 400 is outside the vocabulary of 400"),
        (target, wide, PROMPT, r"wide\.gguf: the drafter takes hidden rows of 48 floats, but .*target\.gguf makes rows of 64: not its target"),
    ]
    for t, d, prompt, words in cases:
        with pytest.raises(QatkitError, match=words) as e:
            mtp.speculative_greedy(t, d, prompt, 4, n_threads=T)
        assert "\n" not in str(e.value)
    with pytest.raises(QatkitError, match="n_draft"):
        mtp.speculative_greedy(target, drafter, PROMPT, 4, n_draft=0)
    with pytest.raises(QatkitError, match="not a Gemma 4 target"):
        mtp.plain_greedy(drafter, PROMPT, 4)

    real = mtp.llama_cpp.llama_init_from_model  # a drafter context llama.cpp will not make
    monkeypatch.setattr(mtp.llama_cpp, "llama_init_from_model",
                        lambda m, p: None if p.ctx_type == mtp.llama_cpp.LLAMA_CONTEXT_TYPE_MTP else real(m, p))
    with pytest.raises(QatkitError, match=r"assistant\.gguf: llama\.cpp could not create a context for it \(llama_init_from_model returned NULL\)"):
        mtp.speculative_greedy(target, drafter, PROMPT, 4, n_threads=T)
