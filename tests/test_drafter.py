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


def test_qat_drafter_learns_the_q4_0_target_and_runs_as_trained(tmp_path, capsys):
    """QAT of the drafter against a Q4_0 target file (train.drafter): the KL to the target's
    next-token distribution falls at both draft steps; the drafter's Q4_0 file holds the very
    numbers the student trained with, and llama.cpp drafts from it what the student computes
    from llama.cpp's target (runtime-faithful: the target's activation roundings and F16 K/V,
    the drafter's Q8_0 inputs): float noise. A run cut at step 20 and resumed ends in the same
    file as one run straight through."""
    import numpy as np
    import torch

    from qatkit.config import TrainConfig
    from qatkit.drafter import train_drafter
    from qatkit.export.gguf import load_gguf_weights
    from qatkit.models.load import load, resolve
    from qatkit.nn import FakeQuantLinear
    from qatkit.runtime import mtp
    from qatkit.runtime.faithful import llamacpp_faithful
    from qatkit.train.drafter import draft_logits, target_state
    from tiny_models import TEXT, gemma_tokenizer, tiny_gemma4

    target = tiny_gemma4(0)
    with torch.no_grad():
        target.model.embed_tokens.weight.mul_(30)  # a target whose next token is not a coin toss
    target.save_pretrained(tmp_path / "t")
    gemma_tokenizer().save_pretrained(tmp_path / "t")
    tgguf = tmp_path / "t-q4_0.gguf"
    assert main(["export", str(tmp_path / "t"), "--format", "q4_0", "--out", str(tgguf)]) == 0
    adir = assistant_dir(tmp_path / "a")
    cfg = dict(seq_len=48, lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, ckpt_every=10)
    r = train_drafter(str(adir), str(tgguf), tmp_path / "run", TrainConfig(steps=30, **cfg), texts=[TEXT * 6], progress=False)
    first, last = r["rows"][0], r["rows"][-1]
    assert last["kl"] < 0.5 * first["kl"] and last["kl_step2"] < 0.5 * first["kl_step2"], (first, last)

    # the student's numbers are the file's
    dsrc = resolve(str(adir))
    twin, _ = load(dsrc)
    types = load_gguf_weights(twin, dsrc.arch, r["gguf"])
    fq = {n: m for n, m in r["student"].named_modules() if isinstance(m, FakeQuantLinear)}
    assert len(fq) == 12 and all(types[n] == "q4_0" for n in fq)
    assert all(torch.equal(m.quantized_weight(), twin.get_submodule(n).weight) for n, m in fq.items())

    # llama.cpp drafts what the student computes, on a prompt longer than the sliding window
    prompt = [2] + gemma_tokenizer()(TEXT, add_special_tokens=False)["input_ids"][:30]
    with mtp._Llama(tgguf, r["gguf"], 64, 1) as s:
        token = s.decode(prompt, 0, all_rows=False)[0]
        _, (ref, *_), _ = s.draft(token, len(prompt), s.hrow(len(prompt) - 1), 1, keep=True)
    with torch.no_grad(), llamacpp_faithful(r["target"], r["target_types"]):
        state = target_state(r["target"], torch.tensor(prompt + [token]))
    with torch.no_grad(), llamacpp_faithful(twin, types):
        got = draft_logits(twin, state)[0][-1].numpy()
    gap = float(np.abs(got - ref).max() / ref.std())
    assert gap < 1e-4 and got.argmax() == ref.argmax(), gap  # measured 5e-7

    # cut at 20 steps, resumed to 30: the same file
    cut = tmp_path / "cut"
    train_drafter(str(adir), str(tgguf), cut, TrainConfig(steps=20, **cfg), texts=[TEXT * 6], progress=False)
    train_drafter(str(adir), str(tgguf), cut, TrainConfig(steps=30, **cfg), texts=[TEXT * 6], resume=True, progress=False)
    assert (cut / "qat-drafter-q4_0.gguf").read_bytes() == (tmp_path / "run" / "qat-drafter-q4_0.gguf").read_bytes()


def test_cli_drafter(tmp_path, capsys):
    """qatkit drafter: a short run writes the drafter's file; a target that is not a Gemma 4
    GGUF, a directory that is not a drafter, or a drafter of another target's width is one line
    and exit 2."""
    from tiny_models import gemma4_dir

    tdir = gemma4_dir(tmp_path / "t")
    tgguf = tmp_path / "t.gguf"
    assert main(["export", str(tdir), "--format", "q4_0", "--out", str(tgguf)]) == 0
    adir = assistant_dir(tmp_path / "a", use_ordered_embeddings=True)  # as E2B's and E4B's drafters: a centroid head (not in the file, left untrained)
    capsys.readouterr()
    assert main(["drafter", str(adir), "--target", str(tgguf), "--steps", "2", "--seq-len", "32", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "KL to the target per draft step" in out and (tmp_path / "run" / "qat-drafter-q4_0.gguf").exists()
    narrow = assistant_dir(tmp_path / "narrow", backbone_hidden_size=32)  # a drafter for another target
    for args, words in (([str(adir), "--target", str(tdir)], "must be a Gemma 4 GGUF"), ([str(tdir), "--target", str(tgguf)], "not a Gemma 4 MTP drafter"),
                        ([str(narrow), "--target", str(tgguf)], "not its target")):
        assert main(["drafter", *args, "--steps", "2", "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
        assert not (tmp_path / "bad").exists()
