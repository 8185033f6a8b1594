"""The quality metrics, implemented once: perplexity the way `llama-perplexity` computes it, mean
KL(reference || model) and the same-top-token rate, all in float64. Every runtime scores through
here (llama.cpp in `runtime/llamacpp.py`, ExecuTorch in `runtime/executorch.py`, torch models through
`torch_logits`), and so do the export gap and the held-out KL logged during training, so a GGUF's
and a .pte's figures are taken on the same positions of the same tokens. `layer_errors` is the
per-layer view of a quantization (relative output error of each Linear).

llama-perplexity's method (llama.cpp tools/perplexity/perplexity.cpp, default mode, no stride):
- the text is tokenized once, BOS in front when the model's vocab adds BOS;
- the tokens are cut into consecutive chunks of n_ctx (the remainder is dropped); each chunk is
  evaluated from an empty KV cache with its first token overwritten by BOS (only when the vocab
  adds BOS: chunk 0 already starts with it, later chunks lose one unscored text token);
- positions n_ctx//2 .. n_ctx-2 are scored, each predicting the next token: n_ctx - 1 - n_ctx//2
  tokens per chunk; PPL = exp(mean NLL), and its "+/-" is the standard error of the mean NLL
  carried to PPL.
Two deliberate differences from the tool: one full chunk is enough (it asks for two), and the
reference's log-probabilities are exact float64 rather than its 16-bit compressed file.

A logits function here is `fn(chunk, first) -> (len(chunk) - first, vocab)`: the logits at
positions first .. len(chunk)-1 of one chunk evaluated from an empty cache (numpy or torch).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from . import QatkitError

LogitsFn = Callable[[list[int], int], "np.ndarray | torch.Tensor"]

_BLOCK_VALUES = 1 << 22  # float64 values per work block (32 MB), whatever the vocabulary


def first_scored(n_ctx: int) -> int:
    """The first scored position of a chunk; positions first .. n_ctx-2 are scored."""
    return n_ctx // 2


def chunks(tokens: Sequence[int], n_ctx: int, bos: int | None, max_chunks: int | None = None, label: str = "text") -> list[list[int]]:
    """llama-perplexity's chunks of `tokens` (the whole text's tokens, BOS already in front when
    the model adds one): consecutive slices of n_ctx with the first token set to `bos`."""
    if n_ctx < 4:
        raise QatkitError(f"{label}: n_ctx={n_ctx} is too small to score (needs at least 4)")
    n = len(tokens) // n_ctx
    if n < 1:
        raise QatkitError(f"{label}: the text has {len(tokens)} tokens{' (BOS included)' if bos is not None else ''}, scoring with n_ctx={n_ctx} needs at least {n_ctx}")
    if max_chunks is not None:
        n = min(n, max_chunks)
    out = []
    for c in range(n):
        chunk = [int(t) for t in tokens[c * n_ctx : (c + 1) * n_ctx]]
        if bos is not None:
            chunk[0] = int(bos)
        out.append(chunk)
    return out


def log_softmax64(logits) -> torch.Tensor:
    """Rows of logits (numpy or torch, any float type) -> float64 log-probabilities."""
    x = torch.as_tensor(logits)
    return torch.log_softmax(x.double(), -1)


def kl_rows(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || model) of each row, from float64 log-probabilities."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


class Scores:
    """Running sums over scored positions: NLL and NLL^2 of the targets, KL to a reference and
    same-top counts. `add` takes rows of logits (numpy or torch) and their target token ids."""

    def __init__(self) -> None:
        self.nll = self.nll2 = self.kld = 0.0
        self.same = self.count = 0
        self.with_ref = False

    def add(self, logits, targets, ref_logp: torch.Tensor | None = None) -> None:
        lp = log_softmax64(logits)
        t = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        nll = -lp.gather(1, t[:, None]).squeeze(1)
        self.nll += float(nll.sum())
        self.nll2 += float((nll * nll).sum())
        self.count += len(t)
        if ref_logp is not None:
            self.with_ref = True
            self.kld += float(kl_rows(ref_logp, lp).sum())
            self.same += int((ref_logp.argmax(-1) == lp.argmax(-1)).sum())

    def result(self) -> dict:
        if self.count == 0:
            raise QatkitError("no positions were scored")
        mean = self.nll / self.count
        ppl = perplexity(mean)
        var = self.nll2 / self.count - mean * mean
        return {
            "ppl": ppl,
            "ppl_err": ppl * math.sqrt(var / (self.count - 1)) if self.count > 1 and var > 0 else None,
            "nll": mean,
            "kld": self.kld / self.count if self.with_ref else None,
            "same_top": 100.0 * self.same / self.count if self.with_ref else None,
            "tokens": self.count,
        }


def score_chunks(fns: list[LogitsFn], chunk_list: list[list[int]], ref_fn: LogitsFn | None = None, ref_index: int | None = None,
                 progress: Callable[[int, list[Scores]], None] | None = None) -> list[Scores]:
    """Score every model of `fns` on the scored positions of each chunk. The reference is
    `ref_fn`, or model `ref_index` of `fns` (evaluated once). Each function's result is read
    before the next chunk is asked for (llama.cpp hands back a view of its own buffer)."""
    n_ctx = len(chunk_list[0])
    first = first_scored(n_ctx)
    n_rows = n_ctx - 1 - first
    scores = [Scores() for _ in fns]
    for c, chunk in enumerate(chunk_list):
        targets = chunk[first + 1 :]
        rows = [fn(chunk, first) for fn in fns]
        ref_rows = rows[ref_index] if ref_index is not None else (ref_fn(chunk, first) if ref_fn is not None else None)
        block = max(1, _BLOCK_VALUES // rows[0].shape[-1])
        for r0 in range(0, n_rows, block):
            r1 = min(r0 + block, n_rows)
            ref_lp = None if ref_rows is None else log_softmax64(ref_rows[r0:r1])
            for lg, s in zip(rows, scores):
                s.add(lg[r0:r1], targets[r0:r1], ref_lp)
        if progress is not None:
            progress(c, scores)
    return scores


def score_tokens(logits_fn: LogitsFn, tokens: Sequence[int], bos: int | None, n_ctx: int = 512, max_chunks: int | None = None,
                 ref_fn: LogitsFn | None = None, label: str = "text") -> dict:
    """One model on a text's tokens (BOS in front when the model adds one): PPL, and with
    `ref_fn` the KL and same-top rate, over llama-perplexity's positions."""
    cl = chunks(tokens, n_ctx, bos, max_chunks, label)
    return {**score_chunks([logits_fn], cl, ref_fn)[0].result(), "chunks": len(cl), "n_ctx": n_ctx}


def compare(ref_logits, logits) -> dict:
    """Two models' logits on the same positions (rows): mean KL(ref || model) in float64,
    same-top-token %, and the largest |logit difference|; row blocks keep a 262k vocabulary
    within memory."""
    ref_logits, logits = torch.as_tensor(ref_logits), torch.as_tensor(logits)
    block = max(1, _BLOCK_VALUES // ref_logits.shape[-1])
    kl, same, maxd = 0.0, 0, 0.0
    for i in range(0, len(ref_logits), block):
        p, q = log_softmax64(ref_logits[i : i + block]), log_softmax64(logits[i : i + block])
        kl += float(kl_rows(p, q).sum())
        same += int((p.argmax(-1) == q.argmax(-1)).sum())
        maxd = max(maxd, float((ref_logits[i : i + block].double() - logits[i : i + block].double()).abs().max()))
    return {"kld": kl / len(ref_logits), "same_top": 100.0 * same / len(ref_logits), "max_dlogit": maxd}


def torch_logits(model: torch.nn.Module) -> LogitsFn:
    """A Hugging Face causal LM as a logits function (float32, on the model's device)."""

    @torch.no_grad()
    def fn(chunk, first=0):
        device = next(model.parameters()).device
        return model(torch.as_tensor([chunk], device=device)).logits[0, first:].float().cpu()

    return fn


@torch.no_grad()
def layer_errors(teacher, ptq_weights: dict[str, torch.Tensor], qat_weights: dict[str, torch.Tensor], ids: torch.Tensor) -> dict[str, dict[str, float]]:
    """Relative output error ||X Wq^T - X W^T|| / ||X W^T|| per linear (module name), X the
    teacher's own input to that layer on `ids` (1, L)."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0].detach())) for n, m in teacher.named_modules() if n in ptq_weights]
    try:
        teacher(ids)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, x in inputs.items():
        w = teacher.get_submodule(name).weight
        ref = x @ w.T
        norm = ref.norm()
        out[name] = {k: float((x @ ws[name].T - ref).norm() / norm) for k, ws in (("ptq", ptq_weights), ("qat", qat_weights))}
    return out


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL), infinite past float range (a broken model's NLL can reach 10^3 nats)."""
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf
