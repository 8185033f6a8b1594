"""Run a qatkit .pte in the real ExecuTorch runtime: logits, perplexity, generation speed.

Perplexity, KL and same-top go through `qatkit/metrics.py`, the implementation the llama.cpp scorer
uses: the same chunks and the same scored positions, so the numbers of a GGUF in llama.cpp and of
a .pte in ExecuTorch are comparable.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import QatkitError, metrics, quiet_import_noise

MOBILE_INSTALL = "pip install 'qatkit[mobile]' (ExecuTorch and torchao)"


def require_executorch() -> None:
    quiet_import_noise()  # torchao talks at import
    try:
        import executorch  # noqa: F401
        import torchao  # noqa: F401
    except ImportError as e:
        raise QatkitError(f"the mobile format needs ExecuTorch and torchao ({e.name} is missing): {MOBILE_INSTALL}") from None


def tokenizer_path(pte: Path) -> Path:
    """Where the tokenizer for the LLM runner lies beside a .pte."""
    return pte.with_name(pte.stem + ".tokenizer.json")


PROVENANCE = "qatkit_provenance"  # a program's constant method: what made it (JSON bytes; export/provenance.py)
SHARED_FLAG = "qatkit_shared_table_file"  # a program's constant method: 1 where its tied table lies in the .ptd


def data_path(pte: Path) -> Path:
    """Where a .pte's named data (the table its lookup and its head share) lies beside it."""
    return Path(pte).with_suffix(".ptd")


def program_bytes(pte) -> int:
    """The bytes a device needs for a .pte: the program and its named data beside it."""
    return os.path.getsize(pte) + (os.path.getsize(d) if (d := _data_file(pte)) else 0)


def weight_bytes(pte) -> int:
    """The data bytes of a program's constants and named data and of its .ptd's segments: what
    the planner's byte rule predicts, without the program around them and its padding."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.extension.flat_tensor.serialize.serialize import _deserialize_to_flat_tensor

    f = deserialize_pte_binary(Path(pte).read_bytes())
    n = sum(len(b.storage) for b in f.program.constant_buffer or []) + sum(len(b) for b in (f.named_data.buffers if f.named_data else []))
    data = _data_file(pte)
    return n + (sum(s.size for s in _deserialize_to_flat_tensor(Path(data).read_bytes()).segments) if data else 0)


def _data_file(pte) -> str | None:
    p = data_path(Path(pte))
    return os.fspath(p) if p.exists() else None


@contextlib.contextmanager
def native_stderr(captured: list[str], fds: tuple[int, ...] = (2,)):
    """Hold the runtime's own C++ log lines (written straight to file descriptor 2; the LLM
    runner also prints its text to 1) and hand them back in `captured`, so that a failure can say
    why in one line and a success prints nothing."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in fds}
    with tempfile.TemporaryFile(mode="w+b") as f:
        for fd in fds:
            os.dup2(f.fileno(), fd)
        try:
            yield
        finally:
            for stream in {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__}:  # what Python buffered lands in the file too
                if stream is not None:
                    stream.flush()
            for fd, old in saved.items():
                os.dup2(old, fd)
                os.close(old)
            f.seek(0)
            captured.extend(f.read().decode("utf-8", "replace").splitlines())


class PteModel:
    """A loaded .pte: `logits(ids)` runs a token sequence from position 0 through its KV cache."""

    def __init__(self, path):
        require_executorch()
        import executorch.kernels.quantized  # noqa: F401  (the quantized embedding's kernels)
        from executorch.runtime import Runtime

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise QatkitError(f"{self.path}: no such file")
        log: list[str] = []
        try:
            with native_stderr(log):
                self.program = Runtime.get().load_program(Path(self.path), data_path=_data_file(self.path))
                self.forward = self.program.load_method("forward")
                self.max_seq_len = int(self._meta("get_max_seq_len"))
                self.max_context = int(self._meta("get_max_context_len"))
                self.vocab_size = int(self._meta("get_vocab_size"))
                bos = int(self._meta("get_bos_id"))
            self.bos = None if bos < 0 else bos
        except Exception as e:  # the runtime's own log line says why; the exception says little
            why = next((line.split("] ", 1)[-1] for line in reversed(log) if "] " in line), str(e).splitlines()[0] if str(e) else type(e).__name__)
            if _data_file(self.path) is None and self._needs_data():
                why = f"its shared table {data_path(Path(self.path)).name} is missing beside it; copy the .pte with its .ptd"
            raise QatkitError(f"{self.path}: not a loadable qatkit ExecuTorch program ({why})") from None

    def _needs_data(self) -> bool:
        try:
            return SHARED_FLAG in self.program.method_names and bool(self._meta(SHARED_FLAG))
        except Exception:
            return False

    @property
    def provenance(self) -> dict | None:
        """What made the program (export/provenance.py), or None for a program without it."""
        if PROVENANCE not in self.program.method_names:
            return None
        return json.loads(bytes(self._meta(PROVENANCE).numpy().tobytes()).decode())

    def _meta(self, name: str):
        return self.program.load_method(name).execute([])[0]

    def logits(self, ids) -> torch.Tensor:
        """ids: a 1-D sequence of token ids (at most max_context) -> float32 (len, vocab). The
        program returns the last position's logits (its head runs once per call), so every
        position is one call through the KV cache."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.shape[0] > self.max_context:
            raise QatkitError(f"{self.path}: {ids.shape[0]} tokens exceed the program's context of {self.max_context}")
        out = [self.forward.execute([ids[i : i + 1].reshape(1, 1), torch.tensor([i], dtype=torch.long)])[0][0, -1].clone() for i in range(ids.shape[0])]
        return torch.stack(out) if out else torch.zeros(0, self.vocab_size)

    def scored_logits(self, chunk, first: int) -> torch.Tensor:
        """A metrics logits function: the logits of `chunk` from position `first` on."""
        return self.logits(chunk)[first:]


def text_tokens(path, text: str) -> list[int]:
    """The .pte's tokenizer (saved beside it) on `text`, without special tokens."""
    from tokenizers import Tokenizer

    tok = tokenizer_path(Path(path))
    if not tok.exists():
        raise QatkitError(f"{path}: its tokenizer {tok} is missing (qatkit writes it beside the .pte)")
    return Tokenizer.from_file(str(tok)).encode(text, add_special_tokens=False).ids


def score(path, text: str, ref_path=None, n_ctx: int = 512, max_chunks: int | None = None, ref_logits=None) -> dict:
    """Perplexity of the .pte on `text` (llama-perplexity's method); with `ref_path` (another
    .pte) or `ref_logits` (a metrics logits function, e.g. `metrics.torch_logits(model)`), also
    mean KL(ref || model) and the same-top-token rate over the same positions."""
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
        ref_logits = ref.scored_logits
    return {"path": path, "ref_path": None if ref_path is None else os.fspath(ref_path), "file_bytes": program_bytes(path),
            **score_ids(model.scored_logits, ids, model.bos, n_ctx, max_chunks, ref_logits, label=path), "seconds": time.perf_counter() - t0}


def score_ids(logits, ids: list[int], bos: int | None, n_ctx: int = 512, max_chunks: int | None = None, ref_logits=None, label: str = "text") -> dict:
    """llama-perplexity's method over a text's token ids (no BOS: it is put in front here when
    the model has one) with metrics logits functions: a .pte's `scored_logits`, or a torch model
    through `metrics.torch_logits`."""
    tokens = ([bos] if bos is not None else []) + list(ids)
    return metrics.score_tokens(logits, tokens, bos, n_ctx, max_chunks, ref_logits, label)


def generate(path, prompt: str, n_tokens: int = 32, tokenizer_file=None) -> dict:
    """Greedy generation through ExecuTorch's own LLM runner; returns the text and its timing
    (prefill and decode tokens/s as the runner measures them)."""
    require_executorch()
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    tok = os.fspath(tokenizer_file or tokenizer_path(Path(path)))
    if not os.path.exists(tok):
        raise QatkitError(f"{path}: its tokenizer {tok} is missing")
    bos = PteModel(path).bos  # the runner adds no BOS unless told; Gemma and Llama need theirs
    pieces: list[str] = []
    stats: list = []
    cfg = GenerationConfig(max_new_tokens=n_tokens, temperature=0.0, echo=False, num_bos=int(bos is not None))
    log: list[str] = []
    failed = None
    with native_stderr(log, fds=(1, 2)):  # the runner narrates each load and prints its text
        try:
            runner = TextLLMRunner(os.fspath(path), tok, _data_file(path))
            runner.generate(prompt, cfg, token_callback=pieces.append, stats_callback=stats.append)
        except UnicodeDecodeError:
            pass  # the runner hands a partial UTF-8 character to Python as str: what came before stands
        except RuntimeError as e:
            failed = str(e)
    if failed is not None:
        why = next((line.split("] ", 1)[-1] for line in reversed(log) if "] " in line), failed)
        raise QatkitError(f"{path}: ExecuTorch's LLM runner failed ({why})")
    result = {"text": "".join(pieces), "tokens": len(pieces)}
    if stats:
        s = json.loads(stats[-1].to_json_string())
        result.update({k: s[k] for k in ("prefill_token_per_sec", "decode_token_per_sec") if k in s})
    return result
