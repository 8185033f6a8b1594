"""Score GGUF files in llama.cpp itself (through llama-cpp-python), the way `llama-perplexity` does.

The method and its sums live in `qatkit/metrics.py` (shared with the ExecuTorch scorer); this
module loads files, tokenizes as the tool does (BOS once in front when the vocab adds it) and
asks llama.cpp for logits only at the scored half of each chunk. Flash attention stays off
everywhere: it moves PPL in the third digit.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import re
import sys
import time

import llama_cpp
import numpy as np

from qatkit import QatkitError

from .. import metrics, progress
from ..atomic import atomic_path
from ..models import gguf_meta

log = logging.getLogger(__name__)
_native = logging.getLogger("qatkit.llama_cpp")

# llama.cpp writes its log from C; route it into `logging` at DEBUG instead of stderr, and keep
# the last error lines so a failed load can say why in one line.
_GGML_LOG_ERROR, _GGML_LOG_CONT = 4, 5
_line: list[str] = []
_errors: collections.deque[str] = collections.deque(maxlen=8)
_last_level = 0


@llama_cpp.llama_log_callback
def _on_native_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    try:
        if level != _GGML_LOG_CONT:
            _last_level = level
        _line.append(text.decode("utf-8", errors="replace"))
        if not _line[-1].endswith("\n"):
            return
        msg = "".join(_line).strip()
        _line.clear()
        if msg:
            _native.debug("%s", msg)
            if _last_level == _GGML_LOG_ERROR:
                _errors.append(msg.splitlines()[-1])
    except Exception:  # an exception must not cross back into C
        pass


llama_cpp.llama_log_set(_on_native_log, ctypes.c_void_p(0))


def _native_reason(default: str) -> str:
    """The first llama.cpp error line logged since `_errors` was cleared (the root cause comes
    first; later lines only say that loading failed), without its `function: ` prefixes."""
    if not _errors:
        return default
    return re.sub(r"^(\w+: )+(error loading model: )?", "", _errors[0])


def open_model(path, n_ctx: int = 512, n_threads: int | None = None,
               logits_all: bool = True) -> llama_cpp.Llama:
    """Load a GGUF file into llama.cpp for evaluation: n_batch = n_ctx, flash attention off."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QatkitError(f"{path}: no such file")
    gguf_meta.check_shapes(path)  # llama.cpp aborts the process (GGML_ASSERT) on some damaged headers
    n_threads = n_threads or os.cpu_count() or 1
    _errors.clear()
    try:
        return llama_cpp.Llama(
            model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads,
            n_threads_batch=n_threads, logits_all=logits_all, flash_attn=False, verbose=False)
    except (ValueError, RuntimeError) as e:
        reason = _native_reason(str(e))
        raise QatkitError(f"{path}: llama.cpp cannot load this file ({reason})") from e


def tokenize(llm: llama_cpp.Llama, text: str) -> list[int]:
    """The text's tokens as llama.cpp splits them: UTF-8, no BOS, special tokens not parsed."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def _vocab(llm: llama_cpp.Llama):
    return llama_cpp.llama_model_get_vocab(llm.model)


def adds_bos(llm: llama_cpp.Llama) -> bool:
    """Whether the model's vocab puts BOS first (llama-perplexity's `add_bos`)."""
    return bool(llama_cpp.llama_vocab_get_add_bos(_vocab(llm)))


def _text_tokens(llm: llama_cpp.Llama, text: str) -> list[int]:
    # Same as llama-perplexity's common_tokenize(ctx, text, add_special=true): BOS once, in front.
    bos = [llm.token_bos()] if adds_bos(llm) else []
    return bos + tokenize(llm, text)


def _decode(llm: llama_cpp.Llama, tokens, first_output: int = 0) -> np.ndarray:
    """Evaluate one sequence from an empty KV cache, asking llama.cpp for logits only at
    positions >= first_output (as llama-perplexity does: the output head of a 262k vocab costs as
    much as the model body). Returns a view (n_tokens - first_output, n_vocab) of llama.cpp's
    own logits buffer, valid until the next decode on this llm."""
    n = len(tokens)
    if not 0 < n <= llm.n_batch or not 0 <= first_output < n:
        raise QatkitError(f"{llm.model_path}: cannot evaluate {n} tokens from position "
                          f"{first_output} with n_ctx={llm.n_batch}")
    llm.reset()  # keeps llama-cpp-python's own token count in step with the cleared cache
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        for i, t in enumerate(tokens):
            batch.token[i] = int(t)
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i >= first_output
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(llm.ctx, batch)
    finally:
        llama_cpp.llama_batch_free(batch)
    if rc != 0:
        raise QatkitError(f"{llm.model_path}: llama.cpp failed to evaluate {n} tokens "
                          f"({_native_reason(f'llama_decode returned {rc}')})")
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx),
                                 shape=(n - first_output, llm.n_vocab()))


def chunk_logits(llm: llama_cpp.Llama, tokens) -> np.ndarray:
    """Per-position logits (n_tokens, n_vocab) float32 of one sequence, from an empty cache."""
    return np.array(_decode(llm, tokens), dtype=np.float32)


def score(path, text: str, ref_path=None, n_ctx: int = 512, max_chunks: int | None = None,
          n_threads: int | None = None) -> dict:
    """Perplexity of `path` on `text` as llama-perplexity computes it; with `ref_path`, also mean
    KL(ref || model) and the same-top-token rate (%) over the same scored positions."""
    return score_files([path], text, ref_path, n_ctx, max_chunks, n_threads)[0]


def score_files(paths, text: str, ref_path=None, n_ctx: int = 512, max_chunks: int | None = None,
                n_threads: int | None = None) -> list[dict]:
    """`score` for several files on one text: the reference runs once per chunk for all of them
    (the numbers are the same as one `score` call per file). The reference may be one of the
    files (its own KLD is then 0 and same top 100%).

    All models stay loaded and run one chunk at a time. Memory beyond the weights: llama.cpp's
    logits for the scored half of one chunk per model (n_ctx/2 x n_vocab float32: 256 MB for a
    262k vocab), read in place, plus float64 work arrays of ~32 MB each.
    """
    paths = [os.fspath(p) for p in paths]
    t0 = time.perf_counter()
    # logits_all=False: _decode reads llama.cpp's buffer directly, so llama-cpp-python's own
    # n_ctx x n_vocab copy (512 MB for a 262k vocab) is not needed.
    llms: list[llama_cpp.Llama] = []
    ref = None
    try:
        for path in paths:
            llms.append(open_model(path, n_ctx=n_ctx, n_threads=n_threads, logits_all=False))
        tokens = _text_tokens(llms[0], text)
        bos = llms[0].token_bos() if adds_bos(llms[0]) else None
        chunk_list = metrics.chunks(tokens, n_ctx, bos, max_chunks, label=paths[0])
        others = list(zip(paths[1:], llms[1:]))
        if ref_path is not None:
            ref_path = os.fspath(ref_path)
            if ref_path in paths:  # one of the files is the reference: run it once
                ref = llms[paths.index(ref_path)]
            else:
                ref = open_model(ref_path, n_ctx=n_ctx, n_threads=n_threads, logits_all=False)
                others.append((ref_path, ref))
        for other_path, other in others:
            if other.n_vocab() != llms[0].n_vocab():
                raise QatkitError(f"{paths[0]}: vocabulary of {llms[0].n_vocab()} tokens differs from "
                                  f"{other.n_vocab()} in {other_path}")
            if _text_tokens(other, text) != tokens:
                raise QatkitError(f"{paths[0]}: tokenizes the text differently from {other_path}")
        label = os.path.basename(paths[0]) + (f" +{len(paths) - 1}" if len(paths) > 1 else "")
        bar = progress.bar(total=len(chunk_list), desc=f"score {label}", unit="chunk", leave=False)
        fns = [_logits_fn(llm) for llm in llms]
        ref_index = llms.index(ref) if ref in llms else None
        ref_fn = _logits_fn(ref) if ref is not None and ref_index is None else None
        try:
            scores = metrics.score_chunks(fns, chunk_list, ref_fn, ref_index,
                                          progress=lambda c, sc: (bar.update(1), bar.set_postfix(ppl=f"{metrics.perplexity(sc[0].nll / sc[0].count):.3f}")))
        finally:
            bar.close()
    finally:
        for llm in llms:
            llm.close()
        if ref is not None and ref not in llms:
            ref.close()
    seconds = time.perf_counter() - t0
    return [_result(path, ref_path, sc, len(chunk_list), n_ctx, seconds) for path, sc in zip(paths, scores)]


def _logits_fn(llm: llama_cpp.Llama) -> metrics.LogitsFn:
    """llama.cpp as a metrics logits function: logits only from position `first` on."""
    return lambda chunk, first: _decode(llm, chunk, first)


def _result(path, ref_path, scores: metrics.Scores, n_chunks, n_ctx, seconds) -> dict:
    r = scores.result()
    result = {"path": path, "ref_path": ref_path, **r, "chunks": n_chunks, "n_ctx": n_ctx,
              "file_bytes": os.path.getsize(path), "seconds": seconds}
    log.info("%s: PPL %.4f over %d tokens (%d chunks of %d)%s", path, r["ppl"], r["tokens"], n_chunks, n_ctx,
             f", KLD {r['kld']:.6f}, same top {r['same_top']:.2f}%" if ref_path is not None else "")
    return result


def generate(path, prompt: str, n_tokens: int = 32, n_ctx: int = 512,
             n_threads: int | None = None) -> str:
    """Greedy continuation of `prompt` (temperature 0): a quick look at whether the file talks sense."""
    llm = open_model(path, n_ctx=n_ctx, n_threads=n_threads)
    try:
        toks = _text_tokens(llm, prompt)
        if len(toks) + n_tokens > n_ctx:
            raise QatkitError(f"{path}: prompt of {len(toks)} tokens + {n_tokens} new ones "
                              f"exceed n_ctx={n_ctx}")
        llm.reset()
        llm.eval(toks)
        out: list[int] = []
        for _ in range(n_tokens):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if llama_cpp.llama_vocab_is_eog(_vocab(llm), nxt):
                break
            out.append(nxt)
            llm.eval([nxt])
        return llm.detokenize(out).decode("utf-8", errors="replace")
    finally:
        llm.close()


def decode_speed(path, n_tokens: int = 64, n_prompt: int = 128, n_threads: int | None = None,
                 seed: int = 0) -> dict:
    """Prompt-processing and decode speed in tokens/s (random token ids; speed does not depend
    on which). Logits only for the last position, like llama-bench."""
    n_ctx = n_prompt + n_tokens
    llm = open_model(path, n_ctx=n_ctx, n_threads=n_threads, logits_all=False)
    try:
        ids = np.random.default_rng(seed).integers(0, llm.n_vocab(), n_ctx).tolist()
        llm.reset()
        llm.eval(ids[:8])  # warm-up: first use allocates compute buffers
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[:n_prompt])
        llama_cpp.llama_synchronize(llm.ctx)
        t1 = time.perf_counter()
        for t in ids[n_prompt:]:
            llm.eval([t])
        llama_cpp.llama_synchronize(llm.ctx)
        t2 = time.perf_counter()
    finally:
        llm.close()
    return {"path": os.fspath(path), "prompt_tps": n_prompt / (t1 - t0),
            "decode_tps": n_tokens / (t2 - t1), "n_prompt": n_prompt, "n_tokens": n_tokens,
            "n_threads": n_threads or os.cpu_count()}


_RSS_PROBE = """
import sys
from qatkit.runtime.llamacpp import open_model
def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
before = rss_kb()
llm = open_model(sys.argv[1], n_ctx=int(sys.argv[2]), logits_all=False)
llm.eval([llm.token_bos()] * 8)
print((rss_kb() - before) / 1024)
"""


def load_rss_mb(path, n_ctx: int = 512) -> float:
    """Resident memory (MB) llama.cpp adds by loading `path` with an n_ctx context and evaluating
    a few tokens, measured in a fresh process (the file is mmapped: pages count once touched)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, os.fspath(path), str(n_ctx)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])

# ----------------------------------------------------------------------------- quantizing
# The post-training-quantization baseline: llama.cpp's own quantizer (what `llama-quantize` runs),
# so the baseline is the file a llama.cpp user would make. By default llama.cpp mixes types (for
# Q4_0 a tied token_embd/output may go to Q6_K or Q8_0); `pure=True` gives every quantizable
# tensor the one type, like `llama-quantize --pure`.

# "q4_0" -> LLAMA_FTYPE_MOSTLY_Q4_0, ... from what this llama_cpp build exposes, plus f32.
FTYPES: dict[str, int] = {
    name[len("LLAMA_FTYPE_MOSTLY_"):].lower(): value
    for name, value in vars(llama_cpp).items() if name.startswith("LLAMA_FTYPE_MOSTLY_")
}
FTYPES["f32"] = llama_cpp.LLAMA_FTYPE_ALL_F32


def llama_quantize(src_path, dst_path, ftype: str = "q4_0", pure: bool = False,
                   n_threads: int | None = None) -> str:
    """Quantize GGUF `src_path` to `dst_path` with llama.cpp; returns dst_path.

    Writes a temporary file beside the destination and renames it on success, so a failed or
    interrupted run never leaves a partial file under the destination name.
    """
    src, dst = os.fspath(src_path), os.fspath(dst_path)
    key = ftype.lower()
    if key not in FTYPES:
        raise QatkitError(f"{dst}: unknown ftype {ftype!r}; choose from {', '.join(sorted(FTYPES))}")
    if not os.path.isfile(src):
        raise QatkitError(f"{src}: no such file")
    dst_dir = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(dst_dir):
        raise QatkitError(f"{dst}: directory {dst_dir} does not exist")

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[key]
    params.allow_requantize = True  # the teacher may itself be quantized (Q4_K_M for the default)
    params.pure = pure
    params.nthread = n_threads or os.cpu_count() or 1

    _errors.clear()
    t0 = time.perf_counter()
    with atomic_path(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(src.encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            reason = _native_reason(f"return code {rc}")
            raise QatkitError(f"{src}: llama.cpp failed to quantize it to {key} ({reason})")
    log.info("%s -> %s (%s%s, %.1f MB, %.1f s)", src, dst, key, ", pure" if pure else "",
             os.path.getsize(dst) / 1e6, time.perf_counter() - t0)
    return dst
