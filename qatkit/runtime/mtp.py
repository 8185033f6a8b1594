"""Greedy speculative decoding with Gemma 4's MTP drafter (a `gemma4-assistant` GGUF) in llama.cpp.

This is llama.cpp's C++ `draft-mtp` driver (common/speculative.cpp,
common_speculative_impl_draft_mtp, in its shared-KV mode) written over llama-cpp-python 0.3.36's
low-level ctypes API, with greedy sampling on both sides:

1. The target decodes the prompt (positions 0..N-1). Its argmax at N-1 is the first new token;
   llama.cpp also hands back the target's post-norm hidden row h of every batch token
   (`llama_set_embeddings_nextn(ctx_tgt, True, masked=False)`).
2. Drafting: the drafter has no K/V of its own: its context is created with
   ctx_type=LLAMA_CONTEXT_TYPE_MTP and ctx_other=the target's context, and its two layers
   (sliding, full) attend to the K/V the target's last two layers read. Each step decodes one row
   (the last token, h) at the SAME position pos0 (the position the last token will take in the
   target, not yet decoded there); llama.cpp builds the input from the target's own token
   embedding. The step's argmax is the next draft and its projected hidden row the next h.
3. Verifying: the target decodes [last token, d1..dk] at pos0..pos0+k in one batch with every
   row's logits. It accepts the longest prefix of drafts equal to its own argmaxes, plus its own
   next token, so the output is the target's greedy output whatever the drafter proposes. Its
   KV cells past the accepted prefix are removed (`llama_memory_seq_rm`), and drafting goes on
   from the hidden row at the accepted index (the driver's `accept()`: verify_h[n_accepted]).

"The target's greedy output" holds up to batch numerics, as in llama.cpp's own speculative
decoding: a row verified in a batch of k+1 is not computed bit for bit as a one-token decode.
With an F32 KV cache the two differ by ~1e-6 to 7e-4 x std(logits) on a tiny random target; with
the default F16 cache by up to ~4e-2 x std (700-token prompt), so a near-tie can go the other
way (seen there: a top-2 margin of 3e-2 x std flipped). kv_f32=True for comparisons.

The sliding-window cache of the target needs no checkpoint for this rollback: llama.cpp reuses a
cell only once it is outside the window of the sequence's last position BEFORE a batch, so the
cells a rolled-back query can see are still there.

Two known differences from transformers' drafter (Gemma4AssistantForCausalLM with
SinglePositionMultiTokenCandidateGenerator), measured on tiny random models:
- Sliding window: transformers lets a drafting query at position N see the last W+1 sliding keys,
  llama.cpp the last W-1. They agree only while the target holds at most W-1 tokens (W = 512 for
  the real models); with the keys cut to W-1 the logits agree to float noise.
- Centroid head: llama.cpp's converter drops `masked_embedding.centroids`/`token_ordering`
  (use_ordered_embeddings=True), so llama.cpp takes the full-vocabulary argmax where transformers
  restricts it to the top clusters: its drafts can differ, never the verified output.
Not done here: the C++ driver's p_min cut-off (drafting stops at a low-confidence draft); this
driver always drafts n_draft tokens (fewer only at the end of the output).

llama.cpp ties the drafter's sliding/full layer to the target's layers n_layer-2 and n_layer-1:
the target's last two layers must be [sliding, full] (E2B, E4B and the 26B MoE are).
`llama_cpp.llama_cpp_ext` (llama.cpp's non-public MTP calls) is marked experimental by
llama-cpp-python; this module is written against 0.3.36.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time

import llama_cpp
import numpy as np

from qatkit import QatkitError

from ..models import gguf_meta

# Importing llamacpp routes llama.cpp's log into `logging` (nothing reaches the terminal) and
# keeps the last error lines for one-line reasons.
from .llamacpp import _errors, _native_reason

try:
    from llama_cpp import llama_cpp_ext
except (ImportError, AttributeError):  # a llama-cpp-python without MTP (before 0.3.36)
    llama_cpp_ext = None

TARGET_ARCH, DRAFTER_ARCH = "gemma4", "gemma4-assistant"
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


def _header(path, arch: str, role: str) -> dict:
    """The GGUF's key-values, read without llama.cpp (which aborts on some damaged headers);
    refuses a file of another architecture."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QatkitError(f"{path}: no such file")
    fields, _ = gguf_meta.scan_header(path)
    found = fields.get("general.architecture")
    if found != arch:
        raise QatkitError(f"{path}: not a {role} (general.architecture is {found!r}, not {arch!r})")
    gguf_meta.check_shapes(path)
    return fields


def _width_out(fields: dict, arch: str):
    """Width of the hidden rows a model hands on (llama.cpp's n_embd_out: n_embd unless set)."""
    return fields.get(f"{arch}.embedding_length_out") or fields.get(f"{arch}.embedding_length")


class _Llama:
    """A target (and optionally its drafter) loaded in llama.cpp with contexts and batches of
    n_ctx tokens; everything is freed by close(), in reverse order of creation."""

    def __init__(self, target, drafter=None, n_ctx: int = 512, n_threads: int | None = None,
                 kv_f32: bool = False):
        if llama_cpp_ext is None:
            raise QatkitError(f"llama-cpp-python {llama_cpp.__version__} has no MTP support (it needs 0.3.36)")
        self.target = os.fspath(target)
        self.drafter = None if drafter is None else os.fspath(drafter)
        tf = _header(self.target, TARGET_ARCH, "Gemma 4 target model")
        if self.drafter is not None:
            df = _header(self.drafter, DRAFTER_ARCH, "Gemma 4 MTP drafter")
            a, b = _width_out(df, DRAFTER_ARCH), _width_out(tf, TARGET_ARCH)
            if a != b:  # the C++ driver asserts this; a mismatch would abort inside ggml
                raise QatkitError(f"{self.drafter}: the drafter takes hidden rows of {a} floats, but "
                                  f"{self.target} makes rows of {b}: not its target")
        self._stack = contextlib.ExitStack()
        try:
            self._open(n_ctx, n_threads or os.cpu_count() or 1, kv_f32)
        except BaseException:
            self._stack.close()
            raise

    def _open(self, n_ctx: int, n_threads: int, kv_f32: bool) -> None:
        L, push = llama_cpp, self._stack.callback
        L.llama_backend_init()
        self.m_tgt = self._load(self.target)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.m_tgt))
        if self.drafter is not None:
            self.m_dft = self._load(self.drafter)
            nv, nl = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.m_dft)), L.llama_model_n_layer_nextn(self.m_dft)
            if nv != self.n_vocab:
                raise QatkitError(f"{self.drafter}: vocabulary of {nv} tokens differs from {self.n_vocab} in {self.target}")
            if nl < 1:
                raise QatkitError(f"{self.drafter}: llama.cpp finds no MTP layers in this file")
        self.n_embd = L.llama_model_n_embd_out(self.m_tgt)
        if self.drafter is not None and L.llama_model_n_embd_out(self.m_dft) != self.n_embd:  # (as read by llama.cpp)
            raise QatkitError(f"{self.drafter}: the drafter takes hidden rows of {L.llama_model_n_embd_out(self.m_dft)} "
                              f"floats, but {self.target} makes rows of {self.n_embd}: not its target")

        p = L.llama_context_default_params()
        p.n_ctx = p.n_batch = n_ctx
        p.n_ubatch = min(n_ctx, 512)  # llama.cpp's default: a long prompt runs in pieces
        p.n_threads = p.n_threads_batch = n_threads
        p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as everywhere in qatkit
        p.type_k = p.type_v = GGML_TYPE_F32 if kv_f32 else GGML_TYPE_F16
        self.ctx_tgt = self._context(self.m_tgt, p, self.target)
        self.mem = L.llama_get_memory(self.ctx_tgt)
        self.batch = L.llama_batch_init(n_ctx, 0, 1)
        push(L.llama_batch_free, self.batch)
        if self.drafter is None:
            return
        p.ctx_type, p.ctx_other = L.LLAMA_CONTEXT_TYPE_MTP, self.ctx_tgt
        self.ctx_dft = self._context(self.m_dft, p, self.drafter)
        llama_cpp_ext.llama_set_embeddings_nextn(self.ctx_tgt, True, False)  # h for every batch row
        llama_cpp_ext.llama_set_embeddings_nextn(self.ctx_dft, True, True)  # h only for output rows
        self.batch_ext = L.llama_batch_ext_init(self.ctx_dft)
        if not self.batch_ext:
            raise QatkitError(f"{self.drafter}: llama.cpp could not make a batch for the drafter")
        push(L.llama_batch_ext_free, self.batch_ext)
        self._h = (ctypes.c_float * self.n_embd)()  # the drafter's input row, owned here
        self._h_view = np.ctypeslib.as_array(self._h)
        self._embd = L.llama_embd(ctypes.cast(self._h, ctypes.POINTER(ctypes.c_float)), 1, self.n_embd)
        self._pos = (L.llama_pos * 1)()

    def _load(self, path: str):
        _errors.clear()
        m = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
        if not m:
            raise QatkitError(f"{path}: llama.cpp cannot load this file ({_native_reason('no model')})")
        self._stack.callback(llama_cpp.llama_model_free, m)
        return m

    def _context(self, model, params, path: str):
        _errors.clear()
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise QatkitError(f"{path}: llama.cpp could not create a context for it "
                              f"({_native_reason('llama_init_from_model returned NULL')})")
        self._stack.callback(llama_cpp.llama_free, ctx)
        return ctx

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_tokens(self, ids) -> list[int]:
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise QatkitError(f"{self.target}: token id {bad[0]} is outside the vocabulary of {self.n_vocab}")
        return ids

    def decode(self, tokens: list[int], pos0: int, all_rows: bool) -> list[int]:
        """Target: decode `tokens` at pos0.. ; its argmax at every row (all_rows) or the last."""
        b, n = self.batch, len(tokens)
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = t, pos0 + i, 1, 0
            b.logits[i] = all_rows or i == n - 1
        b.n_tokens = n
        _errors.clear()
        self._run(llama_cpp.llama_decode(self.ctx_tgt, b), self.target, n, pos0)
        rows = range(n) if all_rows else [n - 1]
        return [int(self._logits(self.ctx_tgt, i).argmax()) for i in rows]

    def hrow(self, i: int) -> np.ndarray:
        """The target's hidden row of batch row i of its last decode (a copy)."""
        return self._row(self.ctx_tgt, i, self.target)

    def draft(self, token: int, pos0: int, h: np.ndarray, k: int, keep: bool = False):
        """k greedy drafter steps from (token, h), all at position pos0. Returns the drafts and,
        with keep, each step's logits and output hidden row (copies)."""
        L, be = llama_cpp, self.batch_ext
        self._h_view[:] = h
        self._pos[0] = pos0
        drafts, logits, hs = [], [], []
        for _ in range(k):
            L.llama_batch_ext_clear(be)
            idx = L.llama_batch_ext_add_token(be, 0, token)
            ok = (idx >= 0 and L.llama_batch_ext_set_pos(be, idx, self._pos)
                  and L.llama_batch_ext_set_embd_token(be, idx, self._embd)
                  and L.llama_batch_ext_set_output_logits(be, idx, True))
            if not ok:
                raise QatkitError(f"{self.drafter}: llama.cpp refused the drafter's batch row")
            _errors.clear()
            self._run(L.llama_process(self.ctx_dft, L.LLAMA_PROCESS_TYPE_DECODE, be), self.drafter, 1, pos0)
            lg = self._logits(self.ctx_dft, idx)
            token = int(lg.argmax())
            drafts.append(token)
            self._h_view[:] = self._row(self.ctx_dft, idx, self.drafter)  # the next step's input row
            if keep:
                logits.append(lg.copy())
                hs.append(self._h_view.copy())
        return (drafts, logits, hs) if keep else drafts

    def seq_rm(self, pos: int) -> None:
        """Drop the target's KV cells from position pos on."""
        if not llama_cpp.llama_memory_seq_rm(self.mem, 0, pos, -1):
            raise QatkitError(f"{self.target}: llama.cpp cannot remove KV cells from position {pos}")

    def _logits(self, ctx, i: int) -> np.ndarray:  # a view of llama.cpp's buffer
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,))

    def _row(self, ctx, i: int, path: str) -> np.ndarray:
        ptr = llama_cpp_ext.llama_get_embeddings_nextn_ith(ctx, i)
        if not ptr:
            raise QatkitError(f"{path}: llama.cpp has no hidden row {i} ({_native_reason('NULL')})")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()

    @staticmethod
    def _run(rc: int, path: str, n: int, pos0: int) -> None:
        if rc != 0:
            raise QatkitError(f"{path}: llama.cpp failed to evaluate {n} tokens at position {pos0} "
                              f"({_native_reason(f'return code {rc}')})")


def _request(target, prompt_ids, n_tokens: int, n_draft: int = 1) -> list[int]:
    prompt = list(prompt_ids)
    if not prompt:
        raise QatkitError(f"{os.fspath(target)}: the prompt is empty (give at least one token, BOS for example)")
    if n_tokens < 1 or n_draft < 1:
        raise QatkitError(f"{os.fspath(target)}: n_tokens ({n_tokens}) and n_draft ({n_draft}) must be at least 1")
    return prompt


def _speed(n_tokens: int, t0: float, t1: float, t2: float) -> dict:
    return {"prompt_seconds": t1 - t0, "seconds": t2 - t1,
            "tokens_per_s": (n_tokens - 1) / (t2 - t1) if n_tokens > 1 else 0.0}


def speculative_greedy(target_gguf, drafter_gguf, prompt_ids, n_tokens: int, n_draft: int = 4,
                       n_threads: int | None = None, kv_f32: bool = False, _plant=None) -> dict:
    """The target's greedy continuation of `prompt_ids` (exactly n_tokens tokens, end-of-generation
    tokens included), made with speculative decoding: the drafter proposes up to n_draft tokens
    per target step. kv_f32 stores the target's KV cache (which the drafter reads) in F32 instead
    of llama.cpp's default F16.

    Returns {"tokens", "n_tokens", "drafted", "accepted", "acceptance_rate" (accepted/drafted),
    "target_steps" (target decodes, the prompt's included), "tokens_per_step" (n_tokens /
    target_steps; plain greedy: 1.0), "prompt_seconds" (the prompt's decode), "seconds" (all the
    rest, drafting included), "tokens_per_s" (tokens after the first / seconds)}.
    `_plant(n_done, drafts) -> drafts` (testing only) replaces each round's drafts.
    """
    prompt = _request(target_gguf, prompt_ids, n_tokens, n_draft)
    with _Llama(target_gguf, drafter_gguf, len(prompt) + n_tokens, n_threads, kv_f32) as s:
        prompt = s.check_tokens(prompt)
        t0 = time.perf_counter()
        tokens = s.decode(prompt, 0, all_rows=False)
        h, pos0 = s.hrow(len(prompt) - 1), len(prompt)  # pos0: where tokens[-1] goes; not decoded yet
        t1 = time.perf_counter()
        steps, drafted, accepted = 1, 0, 0
        while len(tokens) < n_tokens:
            k = min(n_draft, n_tokens - len(tokens) - 1)  # no drafts past the end of the output
            drafts = s.draft(tokens[-1], pos0, h, k) if k else []
            if _plant is not None:
                drafts = s.check_tokens(_plant(len(tokens), drafts))[:k]
            verified = s.decode([tokens[-1]] + drafts, pos0, all_rows=True)
            acc = 0
            while acc < len(drafts) and drafts[acc] == verified[acc]:
                acc += 1
            tokens += drafts[:acc] + [verified[acc]]
            h = s.hrow(acc)  # the hidden row of the last accepted token
            s.seq_rm(pos0 + acc + 1)  # the rejected drafts' cells
            pos0 += acc + 1
            steps, drafted, accepted = steps + 1, drafted + len(drafts), accepted + acc
        t2 = time.perf_counter()
    return {"tokens": tokens, "n_tokens": len(tokens), "drafted": drafted, "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0, "target_steps": steps,
            "tokens_per_step": len(tokens) / steps, **_speed(len(tokens), t0, t1, t2)}


def plain_greedy(target_gguf, prompt_ids, n_tokens: int, n_threads: int | None = None,
                 kv_f32: bool = False) -> dict:
    """The baseline: the target's greedy continuation one token per decode, with the same API,
    context settings and timing as speculative_greedy. Returns {"tokens", "n_tokens",
    "target_steps", "tokens_per_step", "prompt_seconds", "seconds", "tokens_per_s"}."""
    prompt = _request(target_gguf, prompt_ids, n_tokens)
    with _Llama(target_gguf, None, len(prompt) + n_tokens, n_threads, kv_f32) as s:
        prompt = s.check_tokens(prompt)
        t0 = time.perf_counter()
        tokens = s.decode(prompt, 0, all_rows=False)
        t1 = time.perf_counter()
        while len(tokens) < n_tokens:
            tokens += s.decode(tokens[-1:], len(prompt) + len(tokens) - 1, all_rows=False)
        t2 = time.perf_counter()
    return {"tokens": tokens, "n_tokens": len(tokens), "target_steps": len(tokens),
            "tokens_per_step": 1.0, **_speed(len(tokens), t0, t1, t2)}
