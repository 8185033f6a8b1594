"""Run a qatkit .pte in the real ExecuTorch runtime: logits, perplexity, generation speed.

Perplexity follows llama-perplexity's method, as `qatkit.eval.llama.score` does (chunks of
n_ctx tokens starting with BOS, the second half of each chunk scored), so the numbers of a GGUF
in llama.cpp and of a .pte in ExecuTorch are comparable.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import QatkitError


@contextlib.contextmanager
def native_stderr(captured: list[str]):
    """Hold the runtime's own C++ log lines (written straight to file descriptor 2) and hand
    them back in `captured`, so that a failure can say why in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            captured.extend(f.read().decode("utf-8", "replace").splitlines())


class PteModel:
    """A loaded .pte: `logits(ids)` runs a token sequence from position 0 through its KV cache."""

    def __init__(self, path):
        from ..export.executorch import require_executorch

        require_executorch()
        import executorch.kernels.quantized  # noqa: F401  (the quantized embedding's kernels)
        from executorch.runtime import Runtime

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise QatkitError(f"{self.path}: no such file")
        log: list[str] = []
        try:
            with native_stderr(log):
                self.program = Runtime.get().load_program(Path(self.path))
                self.forward = self.program.load_method("forward")
                self.max_seq_len = int(self._meta("get_max_seq_len"))
                self.max_context = int(self._meta("get_max_context_len"))
                self.vocab_size = int(self._meta("get_vocab_size"))
                bos = int(self._meta("get_bos_id"))
            self.bos = None if bos < 0 else bos
        except Exception as e:  # the runtime's own log line says why; the exception says little
            why = next((line.split("] ", 1)[-1] for line in reversed(log) if "] " in line), str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise QatkitError(f"{self.path}: not a loadable qatkit ExecuTorch program ({why})") from None

    def _meta(self, name: str):
        return self.program.load_method(name).execute([])[0]

    def logits(self, ids) -> torch.Tensor:
        """ids: a 1-D sequence of token ids (at most max_context) -> float32 (len, vocab)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        if ids.shape[1] > self.max_context:
            raise QatkitError(f"{self.path}: {ids.shape[1]} tokens exceed the program's context of {self.max_context}")
        out = []
        for start in range(0, ids.shape[1], self.max_seq_len):
            piece = ids[:, start : start + self.max_seq_len].contiguous()
            out.append(self.forward.execute([piece, torch.tensor([start], dtype=torch.long)])[0][0].clone())
        return torch.cat(out)


def text_tokens(path, text: str) -> list[int]:
    """The .pte's tokenizer (saved beside it) on `text`, without special tokens."""
    from tokenizers import Tokenizer

    from ..export.executorch import tokenizer_path

    tok = tokenizer_path(Path(path))
    if not tok.exists():
        raise QatkitError(f"{path}: its tokenizer {tok} is missing (qatkit writes it beside the .pte)")
    return Tokenizer.from_file(str(tok)).encode(text, add_special_tokens=False).ids


def score(path, text: str, ref_path=None, n_ctx: int = 512, max_chunks: int | None = None, ref_logits=None) -> dict:
    """Perplexity of the .pte on `text` (llama-perplexity's method); with `ref_path` (another
    .pte) or `ref_logits(ids) -> (len, vocab)`, also mean KL(ref || model) and the same-top-token
    rate over the same positions."""
    t0 = time.perf_counter()
    path = os.fspath(path)
    model = PteModel(path)
    if n_ctx > model.max_context or n_ctx < 4:
        raise QatkitError(f"{path}: n_ctx {n_ctx} must be in 4..{model.max_context} (the program's context)")
    ids = text_tokens(path, text)
    if ref_path is not None:
        ref = PteModel(ref_path)
        if text_tokens(ref_path, text) != ids:
            raise QatkitError(f"{path}: tokenizes the text differently from reference {ref_path}")
        ref_logits = ref.logits
    return {"path": path, "ref_path": None if ref_path is None else os.fspath(ref_path), "file_bytes": os.path.getsize(path),
            **score_ids(model.logits, ids, model.bos, n_ctx, max_chunks, ref_logits, label=path), "seconds": time.perf_counter() - t0}


def score_ids(logits, ids: list[int], bos: int | None, n_ctx: int = 512, max_chunks: int | None = None, ref_logits=None, label: str = "text") -> dict:
    """llama-perplexity's method over token ids with any `logits(chunk) -> (len, vocab)` (a
    .pte, or a torch model through `torch_logits`): chunks of n_ctx tokens with BOS first, the
    second half of each scored; with `ref_logits`, also mean KL(ref || model) and same top."""
    per = n_ctx - (bos is not None)
    n_chunks = len(ids) // per
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks < 1:
        raise QatkitError(f"{label}: the text has {len(ids)} tokens, scoring with n_ctx={n_ctx} needs at least {per}")
    nll = nll2 = kld = 0.0
    same = count = 0
    first = n_ctx // 2
    for c in range(n_chunks):
        chunk = ([bos] if bos is not None else []) + ids[c * per : (c + 1) * per]
        logp = torch.log_softmax(logits(chunk).double(), -1)[first - 1 : n_ctx - 1]
        target = torch.tensor(chunk[first:n_ctx])
        tok_nll = -logp.gather(1, target[:, None]).squeeze(1)
        nll += float(tok_nll.sum())
        nll2 += float((tok_nll**2).sum())
        count += len(target)
        if ref_logits is not None:
            ref_lp = torch.log_softmax(ref_logits(chunk).double(), -1)[first - 1 : n_ctx - 1]
            kld += float((ref_lp.exp() * (ref_lp - logp)).sum())
            same += int((ref_lp.argmax(-1) == logp.argmax(-1)).sum())
    mean = nll / count
    ppl = math.exp(mean)
    var = nll2 / count - mean * mean
    return {
        "ppl": ppl,
        "ppl_err": ppl * math.sqrt(var / (count - 1)) if count > 1 and var > 0 else None,
        "nll": mean,
        "kld": kld / count if ref_logits is not None else None,
        "same_top": 100.0 * same / count if ref_logits is not None else None,
        "tokens": count,
        "chunks": n_chunks,
        "n_ctx": n_ctx,
    }


def generate(path, prompt: str, n_tokens: int = 32, tokenizer_file=None) -> dict:
    """Greedy generation through ExecuTorch's own LLM runner; returns the text and its timing
    (prefill and decode tokens/s as the runner measures them)."""
    from ..export.executorch import require_executorch, tokenizer_path

    require_executorch()
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    tok = os.fspath(tokenizer_file or tokenizer_path(Path(path)))
    if not os.path.exists(tok):
        raise QatkitError(f"{path}: its tokenizer {tok} is missing")
    bos = PteModel(path).bos  # the runner adds no BOS unless told; Gemma and Llama need theirs
    runner = TextLLMRunner(os.fspath(path), tok)
    pieces: list[str] = []
    stats: list = []
    cfg = GenerationConfig(max_new_tokens=n_tokens, temperature=0.0, echo=False, num_bos=int(bos is not None))
    try:
        runner.generate(prompt, cfg, token_callback=pieces.append, stats_callback=stats.append)
    except UnicodeDecodeError:
        pass  # the runner hands a partial UTF-8 character to Python as str: what came before stands
    result = {"text": "".join(pieces), "tokens": len(pieces)}
    if stats:
        s = json.loads(stats[-1].to_json_string())
        result.update({k: s[k] for k in ("prefill_token_per_sec", "decode_token_per_sec") if k in s})
    return result


def torch_logits(model: torch.nn.Module):
    """A torch model as a `logits` / `ref_logits` function for `score_ids`."""

    @torch.no_grad()
    def fn(ids):
        return model(torch.as_tensor([ids])).logits[0].float()

    return fn
