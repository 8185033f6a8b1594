"""The mobile student -> an ExecuTorch program (.pte) lowered to XNNPACK, with a KV cache.

What is written is what was trained: every Linear's int8 codes and bf16 scales come from
`qatkit.formats.mobile.quantize_weight` (the function the student's fake-quant calls) and are
handed to torchao's `IntxUnpackedToInt8Tensor` as they are, never re-derived; XNNPACK's dynamic
int8 activation quantization is the one the student simulated (`mobile.act_qparams`). With
static activations each Linear becomes a `StaticInt8Linear` carrying the student's learned
scales as constants (`mobile.static_linear` is what XNNPACK computes from it).

Runtime facts this module is built on (measured with executorch 1.5.1, torchao 0.18, x86):
- int4 (and int2, carried in int4 codes: XNNPACK has no 2-bit kernel) takes bf16 scales; int8
  per channel needs float32 scale tensors (a bf16 one fails to load), which hold the bf16
  values exactly. Groups must be multiples of 32 and are for 4 bits only.
- The quantized embedding needs `do_quant_fusion_and_const_prop` and the quantized kernels
  library (`executorch.kernels.quantized`), and float32 scales.
- XNNPACK computes gelu(approximate="tanh") as the exact erf GELU (5e-4 apart); Gemma's tanh
  GELU is spelled out with elementwise ops so that the program computes what the student does.
- torch.export must be strict, or the cache is captured as constants and lowering fails.
- Lookup tables other than the embedding (Gemma 4's per-layer embeddings) keep their own width:
  ExecuTorch's embedding_2bit stores int2 at 2 bits (measured: an int2 table's program is
  rows x width / 4 bytes smaller than the int4 one's, to the byte).

Gemma 4 (E-style): layers that reuse an earlier layer's keys and values hold that layer's cache
buffers and only read them; only the kept (last) position goes through them, as in transformers;
each layer's cache has its own KV-head count and head size. MoE layers are refused.

The program follows ExecuTorch's LLM runner conventions: forward(tokens int64 [1, T],
input_pos int64 [1] = start position) -> logits float32 [1, 1, vocab] of the last position, T dynamic up to
max_seq_len, and constant methods get_max_seq_len, get_max_context_len, get_vocab_size,
get_bos_id, get_eos_ids, use_kv_cache, enable_dynamic_shape.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import QatkitError, __version__, patched
from ..atomic import atomic_path
from ..runtime.executorch import PROVENANCE, SHARED_FLAG, data_path, program_bytes, require_executorch, tokenizer_path

log = logging.getLogger(__name__)

MUST_BE_DELEGATED = ("aten.mm", "aten.addmm", "aten.bmm", "aten.linear", "dequantize_per_channel", "quantize_per_tensor")


class TanhGelu(nn.Module):
    """gelu(x, approximate='tanh') in elementwise ops, which XNNPACK computes as written."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def _spell_out_tanh_gelu(model: nn.Module) -> int:
    n = 0
    for mod in model.modules():
        act = getattr(mod, "act_fn", None)
        name = type(act).__name__.lower()
        if isinstance(act, nn.Module) and "gelu" in name and ("tanh" in name or getattr(act, "approximate", None) == "tanh"):
            mod.act_fn = TanhGelu()
            n += 1
    return n


def _quantized_tensor(codes: torch.Tensor, scale: torch.Tensor, spec, activations: bool):
    """A Linear's weight (`activations`: dynamic int8 inputs) or a lookup table's, as torchao's
    tensor. A table keeps its own bit width (ExecuTorch's embedding_2bit / _4bit / _byte); a
    Linear's int2 rides in int4 codes."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    bits = spec.storage_bits() if activations else spec.bits
    # int4 keeps bf16 scales; int8 (and the embedding) need float32 tensors of the same values
    s = scale.to(torch.bfloat16) if bits == 4 and activations else scale.float()
    return IntxUnpackedToInt8Tensor(
        qdata=codes.to(torch.int8).contiguous(),
        scale=s.contiguous(),
        zero_point=torch.zeros(s.shape, dtype=torch.int8),
        target_dtype={2: torch.int2, 4: torch.int4, 8: torch.int8}[bits],
        block_size=(1, spec.group_size(codes.shape[1])),
        dtype=torch.float32,
        activation_quantization="int8_asym_per_token" if activations else None,
    )


class ChannelInt4Linear(nn.Module):
    """A per-channel int4 (or int2-in-int4) Linear with dynamic int8 activations, in the graph
    pattern XNNPACK lowers to its qd8 x qc4w kernel: per-token quantize/dequantize of the input
    and dequantize_per_channel of int8 codes declared -8..7 with float32 scales (the student's
    bf16 scales, held exactly). torchao's tensor with one block per row lowers to the blockwise
    qb4w kernel instead, which computes the same numbers ~15-35% slower on the 262k-row head
    (measured on this x86 CPU); XNNPACK quantizes the activations at run time either way."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("w_scale", scale.float().reshape(-1).contiguous())
        self.register_buffer("w_zero", torch.zeros(codes.shape[0], dtype=torch.int64))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        s, z = qd.choose_qparams_per_token_asymmetric.default(x, torch.int8)
        x = qd.dequantize_per_token.default(qd.quantize_per_token.default(x, s, z, -128, 127, torch.int8), s, z, -128, 127, torch.int8, torch.float32)
        w = qd.dequantize_per_channel.default(self.codes, self.w_scale, self.w_zero, 0, -8, 7, torch.int8)
        return nn.functional.linear(x, w, self.bias)


SHARED = "qatkit_shared"  # the name of the tied table's buffers, and of its named-data tag


def pack_like_xnnpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The bytes XNNPACK stores for a per-channel weight of int4 (qc4w: two codes a byte, +8, the
    odd column in the high nibble) or int8 (the codes as they are) codes."""
    if bits == 8:  # a copy: a buffer aliasing the head's codes would be exported under the head's name
        return codes.to(torch.int8).clone().contiguous()
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return ((u[:, 1::2] << 4) | u[:, 0::2]).contiguous()


HEAD_CHUNK_BYTES = 16 << 20  # the tied head's weight per XNNPACK delegate (see SharedTableHead)


def table_chunks(rows: int, row_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(start, end) row ranges of a table cut into as few pieces of at most `chunk_bytes` as can
    be (one row at least), of equal rows but for a shorter last one."""
    most = max(1, chunk_bytes // max(1, row_bytes))
    step = -(-rows // -(-rows // most))  # the fewest pieces, evened out
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


class SharedTableEmbedding(nn.Module):
    """The embedding lookup of a table tied to the head, reading the very bytes XNNPACK keeps for
    the head, so that the program stores the table once. ExecuTorch's embedding_4bit reads the
    even column from the high nibble, XNNPACK's qc4w from the low one: looked up in XNNPACK's
    bytes, each row comes out with its column pairs swapped, and one flip puts them back (a
    permutation: the numbers are the trained ones). int8 tables are the same bytes to both. The
    bytes and the scales are named data with one tag, which ExecuTorch stores once by content.
    The table is in the head's row ranges (`chunks`): each id is looked up in the piece that holds
    it (a selection, so the numbers are unchanged)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bits: int, multiplier: torch.Tensor | None, chunks: list[tuple[int, int]]):
        super().__init__()
        import executorch.kernels.quantized  # noqa: F401  (registers quantized_decomposed.embedding_*)

        self.bits, self.chunks = bits, chunks
        scale = scale.float().reshape(-1)
        for k, (a, b) in enumerate(chunks):
            self.register_buffer(f"{SHARED}_table_{k}", pack_like_xnnpack(codes[a:b], bits))
            self.register_buffer(f"{SHARED}_scale_{k}", scale[a:b].clone().contiguous())
        self.multiplier = None if multiplier is None else multiplier.detach().float().clone()

    def _lookup(self, k: int, ids: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        table, scale = getattr(self, f"{SHARED}_table_{k}"), getattr(self, f"{SHARED}_scale_{k}")
        if self.bits == 4:
            x = qd.embedding_4bit.default(table, scale, None, -8, 7, ids)
            return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return qd.embedding_byte.default(table, scale, None, -128, 127, ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self._lookup(0, ids if len(self.chunks) == 1 else ids.clamp(max=self.chunks[0][1] - 1))
        for k, (a, b) in enumerate(self.chunks[1:], 1):
            rows = self._lookup(k, (ids - a).clamp(0, b - a - 1))
            x = torch.where((ids >= a).unsqueeze(-1), rows, x)  # pieces in order: the last one holding the id wins
        return x if self.multiplier is None else x * self.multiplier


HEAD_CODES = "qatkit_head_codes_"  # the head pieces' weight buffers (their placeholders name the delegates)


class SharedTableHead(nn.Module):
    """The head of a shared table: per-channel int4 or int8 Linears with dynamic int8 inputs
    (qd8 x qc4w / qc8w in XNNPACK) whose weights and scales are tagged as named data of the shared
    table, so that XNNPACK's bytes and the lookup's are one entry. The rows come in pieces of
    `chunks`, each lowered as its own XNNPACK delegate (`HeadSplittingPartitioner`): XNNPACK packs a
    delegate's weights at load while their bytes from the file are still mapped, so one delegate
    holding the whole 262k-row head of Gemma put a second table's worth on the load's peak; in
    pieces, one piece's worth. Each piece quantizes its input itself (the same per-token codes)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bits: int, chunks: list[tuple[int, int]]):
        super().__init__()
        import torch.ao.quantization.fx._decomposed  # noqa: F401

        self.chunks = chunks
        scale = scale.float().reshape(-1)
        for k, (a, b) in enumerate(chunks):
            self.register_buffer(f"{HEAD_CODES}{k}", codes[a:b].to(torch.int8).clone())  # its own storage: XNNPACK serializes the whole storage
            self.register_buffer(f"w_scale_{k}", scale[a:b].clone().contiguous())
            self.register_buffer(f"w_zero_{k}", torch.zeros(b - a, dtype=torch.int64))
        self.qmin, self.qmax = (-8, 7) if bits == 4 else (-128, 127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.fx.traceback as fx_traceback

        qd = torch.ops.quantized_decomposed
        outs = []
        for k in range(len(self.chunks)):
            s, z = qd.choose_qparams_per_token_asymmetric.default(x, torch.int8)
            xq = qd.dequantize_per_token.default(qd.quantize_per_token.default(x, s, z, -128, 127, torch.int8), s, z, -128, 127, torch.int8, torch.float32)
            with fx_traceback.annotate({"delegate_constant_tag": SHARED}):
                w = qd.dequantize_per_channel.default(getattr(self, f"{HEAD_CODES}{k}"), getattr(self, f"w_scale_{k}"), getattr(self, f"w_zero_{k}"),
                                                      0, self.qmin, self.qmax, torch.int8)
            outs.append(nn.functional.linear(xq, w))
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


def head_splitting_partitioner(lean: bool = True):
    """XNNPACK's partitioner, with each piece of a `SharedTableHead` taken out of the partition it
    was merged into and made a delegate of its own: the piece's Linear and the nodes that feed
    only it (its activation quantization, its weight); what consumes the pieces (their
    concatenation) runs outside XNNPACK, so that no partition feeds another that feeds it back.

    `lean`: when every node of an op XNNPACK asks to keep whole (a Linear) passes XNNPACK's own
    check, the partitioner says so up front (no per-node check), and ExecuTorch decomposes the
    program once instead of three times (each a re-trace of the whole graph over the symbolic
    length: 14% of a 4-layer export). A node that fails the check keeps ExecuTorch's three-pass
    path. The programs are byte-identical (tested)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from torch.fx.passes.infra.partitioner import Partition

    class HeadSplittingPartitioner(XnnpackPartitioner):
        def ops_to_not_decompose(self, ep):
            ops, check = super().ops_to_not_decompose(ep)
            if lean and check is not None:
                kept = set(ops)
                if all(check(n) for n in ep.graph.nodes if n.op == "call_function" and n.target in kept):
                    return ops, None
            return ops, check

        def generate_partitions(self, ep):
            partitions = super().generate_partitions(ep)
            next_id = max((p.id for p in partitions), default=-1) + 1
            out = []
            for p in partitions:
                pieces = [n for n in p.nodes if n.op == "call_function" and "linear" in str(n.target) and _feeds_from(n, HEAD_CODES, p.nodes)]
                if len(pieces) < 2:
                    out.append(p)
                    continue
                taken: set = set()
                for lin in pieces:
                    own, stack = {lin}, list(lin.all_input_nodes)
                    while stack:  # the nodes of the partition whose every user is in the piece
                        n = stack.pop()
                        if n in p.nodes and n not in own and all(u in own for u in n.users):
                            own.add(n)
                            stack.extend(n.all_input_nodes)
                    taken |= own
                    out.append(Partition(id=next_id, nodes=own))
                    next_id += 1
                after: set = set()  # what reads the pieces leaves XNNPACK (the concatenation)
                stack = [u for n in taken for u in n.users]
                while stack:
                    n = stack.pop()
                    if n in p.nodes and n not in taken and n not in after:
                        after.add(n)
                        stack.extend(n.users)
                rest = [n for n in p.nodes if n not in taken and n not in after]
                if any(n.op == "call_function" for n in rest):
                    out.append(Partition(id=p.id, nodes=rest))
            return out

    return HeadSplittingPartitioner()


# XNNPACK's preprocess runs every pass of its pipeline on every partition, each a re-trace of the
# partition's graph; these rewrite ops that qatkit's programs do not put in a partition, and were
# a sixth of the lowering's time. Each runs where its partition holds one of the ops named.
_XNNPACK_PASSES_BY_OP = {  # (a pass that an earlier pass could feed names that pass's ops too)
    "XNNPACKRemoveCloneOpsTransform": ("clone",),
    "DimOrderOpsRevertPass": ("dim_order",),
    "ConvertToUpsampleBilinear2d": ("upsample",),
    "ConvertToSDPAPass": ("softmax",),
    "FuseBatchNormPass": ("batch_norm",),
    "DecomposeBatchNorm": ("batch_norm",),
    "Conv1dUnsqueezePass": ("convolution", "batch_norm"),  # DecomposeBatchNorm writes convolutions
    "PReLUReshapePass": ("prelu",),
    "FuseActivationPass": ("aten.relu", "aten.hardtanh"),
    "DecomposeConcatenate": ("aten.cat",),
    "InsertPadQDQPass": ("constant_pad_nd",),
    "ConvertToLinearPass": ("aten.mm", "aten.addmm", "aten.bmm"),
}


def _xnnpack_passes_in_use():
    """A context: XNNPACK's preprocess runs only the passes that find something to rewrite (the
    programs are byte-identical to those of the whole pipeline: tested)."""
    from executorch.backends.xnnpack import xnnpack_preprocess

    full = xnnpack_preprocess.XNNPACKPassManager

    def manager(ep, passes=None):
        if passes is None:
            ops = " ".join(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
            passes = [p for p in full(ep).passes if any(op in ops for op in _XNNPACK_PASSES_BY_OP.get(p.__name__, ("",)))]
        return full(ep, passes=passes)

    return patched([xnnpack_preprocess], "XNNPACKPassManager", manager)


def _feeds_from(node, prefix: str, within) -> bool:
    """Whether a placeholder whose name holds `prefix` feeds `node` through nodes of `within`."""
    stack, seen = list(node.all_input_nodes), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and prefix in n.name:
            return True
        if n in within and n.op == "call_function":
            stack.extend(n.all_input_nodes)
    return False


class StaticInt8Linear(nn.Module):
    """A Linear with static int8 input and output (`mobile.static_linear`), in the graph pattern
    XNNPACK lowers to one qs8 fully-connected operator: quantize/dequantize_per_tensor with
    constant scales around the input and the output, the weight as dequantize_per_channel of int8
    codes (declared -8..7 for int4 and int2 codes, which makes it 4-bit) with float32 scales.
    Without the output pair the Linear silently leaves the delegate (and computes wrongly)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bits: int, bias: torch.Tensor | None, s_in: float, s_out: float):
        super().__init__()
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("w_scale", scale.float().reshape(-1).contiguous())
        self.register_buffer("w_zero", torch.zeros(codes.shape[0], dtype=torch.int64))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.qmin, self.qmax = (-8, 7) if bits <= 4 else (-128, 127)
        self.s_in, self.s_out = float(s_in), float(s_out)  # Python floats: constants in the graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        x = qd.dequantize_per_tensor.default(qd.quantize_per_tensor.default(x, self.s_in, 0, -128, 127, torch.int8), self.s_in, 0, -128, 127, torch.int8)
        w = qd.dequantize_per_channel.default(self.codes, self.w_scale, self.w_zero, 0, self.qmin, self.qmax, torch.int8)
        y = nn.functional.linear(x, w, self.bias)
        return qd.dequantize_per_tensor.default(qd.quantize_per_tensor.default(y, self.s_out, 0, -128, 127, torch.int8), self.s_out, 0, -128, 127, torch.int8)


class DelegatedRMSNorm(nn.Module):
    """An RMSNorm whose mean of squares XNNPACK runs: its mean.dim takes only 4-D NCHW averages,
    so the plain mean(-1) stays a portable operator and splits the delegate at every norm (six
    per Gemma layer). Here the mean is a product with a constant row of 1/width, which XNNPACK
    runs in the same partition; the rest is the original formula ("gemma": x * rsqrt(ms + eps) *
    (1 + w); "llama": w * (x * rsqrt(ms + eps))). The sum is ordered differently from torch's
    mean: float noise, as every XNNPACK sum is."""

    def __init__(self, kind: str, weight: torch.Tensor, eps: float):
        super().__init__()
        self.kind, self.eps = kind, float(eps)
        w = weight.detach().float()
        self.register_buffer("scale", 1.0 + w if kind == "gemma" else w.clone())
        self.register_buffer("mean_row", torch.full((1, w.shape[0]), 1.0 / w.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        ms = nn.functional.linear(xf * xf, self.mean_row)
        return (xf * torch.rsqrt(ms + self.eps) * self.scale).type_as(x)


# Gemma 4's norm is llama's formula (x * (ms + eps)^-0.5 * w, no 1 + w); its v_norm has no weight
NORM_KINDS = {"Gemma3RMSNorm": "gemma", "LlamaRMSNorm": "llama", "Qwen2RMSNorm": "llama", "Qwen3RMSNorm": "llama", "Gemma4RMSNorm": "llama"}


def _delegated_norms(model: nn.Module) -> int:
    """Replace the RMSNorms of known formulas by `DelegatedRMSNorm` (others stay as they are). A
    norm without a weight (Gemma 4's v_norm) scales by ones over its attention's head size."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = NORM_KINDS.get(type(child).__name__)
            if kind is None:
                continue
            weight = getattr(child, "weight", None)
            if weight is None and getattr(parent, "head_dim", None) is None:
                continue
            weight = torch.ones(int(parent.head_dim)) if weight is None else weight
            eps = getattr(child, "eps", getattr(child, "variance_epsilon", None))
            setattr(parent, name, DelegatedRMSNorm(kind, weight, eps))
            n += 1
    return n


def _static_linear(name: str, old: nn.Module, codes: torch.Tensor, scale: torch.Tensor, spec) -> StaticInt8Linear:
    from ..formats import mobile

    s_in, s_out = (s.detach() for s in old.act_scales())
    r = float(mobile.requant_scale(s_in, scale.reshape(-1), s_out).max())
    if r >= mobile.STATIC_MAX_REQUANT:
        raise QatkitError(f"{name}: input scale x weight scale / output scale reaches {r:.0f}; XNNPACK needs < {mobile.STATIC_MAX_REQUANT:.0f} (output scale too small)")
    return StaticInt8Linear(codes, scale, spec.bits, old.bias, float(s_in), float(s_out))


def _shared_table(student: nn.Module, weights: dict):
    """(codes, scales, bits) of an embedding tied to the head at the same per-channel int4 or int8
    codes and scales, whose bytes the lookup and XNNPACK can share; None otherwise."""
    from ..formats import mobile

    if not getattr(student.config.get_text_config(), "tie_word_embeddings", False) or "lm_head" not in weights:
        return None
    codes, scale, spec = weights["lm_head"]
    emb = student.get_input_embeddings()
    if spec.group is not None or spec.bits not in (4, 8) or spec != getattr(emb, "mobile_spec", None) or codes.shape[1] % 2:
        return None
    e_codes, e_scale = mobile.quantize_weight(emb.weight, emb.mobile_spec, emb.mobile_scale)
    if not (torch.equal(codes, e_codes) and torch.equal(scale, e_scale)):
        return None
    if not mobile.holds(codes, scale, spec, emb.weight):
        raise QatkitError("the embedding is not at its mobile per-row values; prepare the model with --format mobile")
    return codes, scale, spec.bits


def runtime_model(student: nn.Module, share_table: bool = False, head_chunk_bytes: int = HEAD_CHUNK_BYTES) -> nn.Module:
    """A copy of the mobile student whose Linears and embedding hold the exported integer codes
    (torchao tensors), with the tied head untied and Gemma's tanh GELU spelled out. With
    `share_table`, a tied table is kept once, in the bytes of `SharedTableEmbedding`, and the
    head is cut into pieces of at most `head_chunk_bytes` of codes."""
    from ..formats import mobile
    from ..nn import FakeQuantLinear
    from ..prepare import mobile_weights, other_tables

    weights = mobile_weights(student)
    if not weights:
        raise QatkitError("the model was not prepared for the mobile format (no fake-quant Linears)")
    emb = student.get_input_embeddings()
    head = student.get_output_embeddings()
    if not isinstance(head, FakeQuantLinear) or head.spec is None or getattr(emb, "mobile_spec", None) is None:
        raise QatkitError("the mobile student's embedding or output head is not quantized; prepare it with --format mobile")
    # the copy takes the quantized modules and embedding in place of the float ones, so the float
    # weights (and a frozen head's cached fake-quant values) are never copied only to be dropped
    memo: dict[int, object] = {}
    shared = _shared_table(student, weights) if share_table else None
    for name, (codes, scale, spec) in weights.items():
        old = student.get_submodule(name)
        if old is head and shared is not None:
            continue  # below
        if getattr(old, "act", "dynamic") == "static":
            memo[id(old)] = _static_linear(name, old, codes, scale, spec)
            continue
        if spec.storage_bits() == 4 and spec.group is None:
            memo[id(old)] = ChannelInt4Linear(codes, scale, old.bias)
            continue
        lin = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        lin.weight = nn.Parameter(_quantized_tensor(codes, scale, spec, activations=True), requires_grad=False)
        if old.bias is not None:
            lin.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
        memo[id(old)] = lin
    # the lookup tables (the embedding, Gemma 4's per-layer embeddings): their frozen values
    # re-quantize to the same codes with their own scales
    if shared is not None:
        codes, scale, bits = shared
        multiplier = getattr(emb, "embed_scale", None)
        chunks = table_chunks(codes.shape[0], codes.shape[1] * bits // 8, head_chunk_bytes)
        memo[id(emb)] = SharedTableEmbedding(codes, scale, bits, None if multiplier is None else multiplier.to(torch.float32), chunks)
        memo[id(head)] = SharedTableHead(codes, scale, bits, chunks)
    tables = [*([] if shared is not None else [emb]), *other_tables(student).values()]
    for table in tables:
        spec = getattr(table, "mobile_spec", None)
        if spec is None:
            raise QatkitError("a token-lookup table of the student is not quantized; prepare it with --format mobile")
        codes, scale = mobile.quantize_weight(table.weight, spec, table.mobile_scale)
        if not mobile.holds(codes, scale, spec, table.weight):
            raise QatkitError("a token-lookup table is not at its mobile per-row values; prepare the model with --format mobile")
        memo[id(table.weight)] = nn.Parameter(_quantized_tensor(codes, scale, spec, activations=False), requires_grad=False)
    m = copy.deepcopy(student, memo).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    for table in [m.get_input_embeddings(), *other_tables(m).values()]:
        table.padding_idx = None  # only matters to gradients, and it keeps the quantized embedding op from matching
    m.config.tie_word_embeddings = False
    _spell_out_tanh_gelu(m)
    _delegated_norms(m)
    return m


@contextlib.contextmanager
def _rotate_half_as_product(model: nn.Module):
    """While exporting: transformers' rotate_half (x -> cat(-x[..., h:], x[..., :h])) as a
    product with a constant signed permutation matrix. XNNPACK does not take the slices and the
    concatenation over a dynamic-length tensor, so each RoPE split the delegate twice per layer;
    as a Linear it stays inside. Exact: every output is one input times +-1 plus zeros."""
    import sys

    modules = {sys.modules[type(m).__module__] for m in _attention_layers(model)}
    modules = [mod for mod in modules if callable(getattr(mod, "rotate_half", None))]
    for d in {int(m.head_dim) for m in _attention_layers(model)}:  # buffers of the model: constants of the program
        h, w = d // 2, torch.zeros(d, d)
        w[torch.arange(h), torch.arange(h) + h] = -1.0  # out[i] = -x[i + h] for i < h
        w[torch.arange(h) + h, torch.arange(h)] = 1.0  # out[i] = x[i - h] for i >= h
        model.register_buffer(f"qatkit_rotate_half_{d}", w, persistent=False)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, getattr(model, f"qatkit_rotate_half_{x.shape[-1]}"))

    with patched(modules, "rotate_half", rotate_half):
        yield


def _inferred_view_dims(program) -> int:
    """Rewrite every view whose target shape names the dynamic sequence length (a symbol, as in
    transformers' `.view(*input_shape, -1, head_dim)`) to give that one dimension as -1 and the
    others as the integers they are (an unsqueeze of such a tensor becomes that view too). The same
    values; XNNPACK lowers a reshape with one inferred dimension but none with a symbolic one, so
    each such view split the delegate (three per layer, and RoPE's cos/sin unsqueeze)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    aten = torch.ops.aten
    views = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
    n = 0
    gm = program.graph_module
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (*views, aten.unsqueeze.default) or "val" not in node.meta:
            continue
        dims = list(node.meta["val"].shape)
        symbolic = [i for i, d in enumerate(dims) if not is_concrete_int(d)]
        if len(symbolic) != 1 or (node.target in views and all(isinstance(d, int) for d in node.args[1])):
            continue
        if node.target is aten.unsqueeze.default and not node.args[0].meta["val"].is_contiguous():
            continue  # a view needs contiguous input; unsqueeze does not
        node.target = aten.view.default if node.target is aten.unsqueeze.default else node.target
        node.args = (node.args[0], [-1 if i in symbolic else int(d) for i, d in enumerate(dims)])
        n += 1
    if n:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return n


ATTENTION = "qatkit_executorch"  # the transformers attention implementation registered below


def _window_mask(start, length: int, cache_len: int, window: int) -> torch.Tensor:
    """Additive float mask [length, cache_len] of a sliding-window layer: query at position
    p = start + i sees keys j with p - window < j <= p (transformers' sliding_window_overlay)."""
    p = (torch.arange(length) + start).unsqueeze(1)
    j = torch.arange(cache_len).unsqueeze(0)
    seen = (j <= p) & (j > p - window)
    return torch.where(seen, torch.zeros((), dtype=torch.float32), torch.full((), float("-inf")))


def _cached_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, softcap=None, qatkit_start=None, **kwargs):
    """transformers attention function of the exported program: writes this call's keys and values
    into the layer's cache in place (ExecuTorch's llama::update_cache) and attends with
    llama::custom_sdpa over the cache. Grouped KV heads are read as they are, not copied per query
    head, and a causal call reads only positions < start + length (the static cache of the
    earlier export expanded and multiplied all of max_context for every layer and token).
    query [1, heads, Tq, D], key / value [1, kv_heads, T, D] -> [1, Tq, heads, D].

    A layer that reuses another's keys and values (Gemma 4's KV sharing) holds that layer's cache
    buffers and only reads them; its queries may be the last Tq of the call's T positions (see
    `_slice_before_shared_layers`), so they start at start + T - Tq."""
    if softcap is not None:
        raise QatkitError("attention logit soft-capping is not supported by the ExecuTorch export")
    k_cache, v_cache = module.qatkit_k_cache, module.qatkit_v_cache
    if not getattr(module, "is_kv_shared_layer", False):
        torch.ops.llama.update_cache(key.transpose(1, 2).contiguous(), k_cache, qatkit_start)
        torch.ops.llama.update_cache(value.transpose(1, 2).contiguous(), v_cache, qatkit_start)
    q = query.transpose(1, 2).contiguous()
    start = qatkit_start + key.shape[2] - query.shape[2]  # (no branch: the lengths are symbols in export)
    if sliding_window is not None and sliding_window < k_cache.shape[1]:
        mask = _window_mask(start, q.shape[1], k_cache.shape[1], sliding_window)
        return torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, mask, 0.0, False, scaling), None
    return torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True, scaling), None


def _slice_before_shared_layers(self, hidden_states, per_layer_inputs, position_embeddings, causal_mask_mapping, logits_to_keep, cache=None, **kwargs):
    """Gemma 4's layers that reuse earlier layers' keys and values write no cache, so only the
    positions whose logits are kept go through them; transformers skips this when the call has
    one position, a branch on the dynamic length that export cannot take: here the slice is
    taken always (of one position it is that position)."""
    keep = slice(-logits_to_keep, None)
    per_layer_inputs = None if per_layer_inputs is None else per_layer_inputs[:, keep]
    position_embeddings = {k: (cos[:, keep], sin[:, keep]) for k, (cos, sin) in position_embeddings.items()}
    masks = {k: None if v is None else v[:, :, keep] for k, v in causal_mask_mapping.items()}
    return hidden_states[:, keep], per_layer_inputs, position_embeddings, masks


def _shared_layer_slice(model: nn.Module):
    """While exporting: `_slice_before_shared_layers` in place of transformers' method."""
    owners = {type(m) for m in model.modules() if hasattr(type(m), "_maybe_slice_kv_shared_inputs")}
    return patched(owners, "_maybe_slice_kv_shared_inputs", _slice_before_shared_layers)


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim") and hasattr(m, "o_proj")]


class KVCacheLM(nn.Module):
    """forward(tokens [1, T], input_pos [1]) -> logits of the last position [1, 1, vocab], with one KV cache
    [1, max_context, kv_heads, head_dim] per attention layer, updated in place."""

    def __init__(self, model: nn.Module, max_context: int):
        super().__init__()
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama::update_cache, custom_sdpa)
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION, _cached_attention)
        self.model = model
        self.max_context = max_context
        cfg = model.config.get_text_config().to_dict()
        if cfg.get("attn_logit_softcapping"):
            raise QatkitError(f"{cfg.get('model_type')}: the ExecuTorch export does not support attention logit soft-capping")
        if cfg.get("enable_moe_block") or cfg.get("num_experts"):
            raise QatkitError(f"{cfg.get('model_type')}: the mobile format does not take mixture-of-experts layers yet")
        layers = _attention_layers(model)
        if not layers:
            raise QatkitError("no attention layers found to give a KV cache")
        # each layer's own KV-head count and head size (Gemma 4's full and sliding layers differ)
        own = [a for a in layers if not getattr(a, "is_kv_shared_layer", False)]
        for attn in own:
            n_kv = cfg["num_attention_heads"] // getattr(attn, "num_key_value_groups", 1)
            for name in ("qatkit_k_cache", "qatkit_v_cache"):
                attn.register_buffer(name, torch.zeros(1, max_context, n_kv, attn.head_dim), persistent=False)
        for attn in layers:  # KV sharing: the same buffers as the last storing layer of its kind
            if attn not in own:
                src = [a for a in own if getattr(a, "store_full_length_kv", False) and a.layer_type == attn.layer_type]
                if len(src) != 1:
                    raise QatkitError(f"layer {attn.layer_idx} reuses keys and values, but no single earlier {attn.layer_type} layer stores them")
                for name in ("qatkit_k_cache", "qatkit_v_cache"):
                    attn.register_buffer(name, getattr(src[0], name), persistent=False)
        for c in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            c._attn_implementation = ATTENTION

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + tokens.shape[1] <= self.max_context)
        position_ids = (torch.arange(tokens.shape[1], dtype=torch.long) + input_pos[0]).unsqueeze(0)
        # the head (a 262k-row product on Gemma) runs on the last position only, as ExecuTorch's
        # own LLM exports do: a prefill of T tokens does not pay T head products
        out = self.model(input_ids=tokens, position_ids=position_ids, use_cache=False, logits_to_keep=1, qatkit_start=start)
        return out.logits.float()


def export_pte(student: nn.Module, tokenizer, out: Path, max_context: int = 512, dynamic: bool = True, share_table: bool = True,
               provenance: dict | None = None, head_chunk_bytes: int = HEAD_CHUNK_BYTES, lean: bool = True) -> dict:
    """Write the mobile student as an XNNPACK .pte (atomically) and its tokenizer.json beside it;
    `provenance` (export/provenance.py) goes into the program as its constant method
    `qatkit_provenance` (JSON bytes; runtime PteModel.provenance reads it).
    Returns facts about the file: sizes, delegated partitions, seconds. `dynamic=False` writes a
    one-token program (the runner then prefills token by token): it exports 1.8x faster at the
    default model's width (benchmarks/export_time.py), the dynamic length being what slows it.
    `head_chunk_bytes`: a shared head's piece per XNNPACK delegate (`SharedTableHead`);
    `lean=False` runs ExecuTorch's three decompositions and XNNPACK's whole pass pipeline on every
    partition (the same bytes, slower: `head_splitting_partitioner`, `_xnnpack_passes_in_use`)."""
    require_executorch()
    import executorch.kernels.quantized  # noqa: F401  (registers the quantized embedding ops)

    out = Path(out)
    if out.suffix != ".pte":
        raise QatkitError(f"{out}: an ExecuTorch program is written to a .pte file")
    if max_context < 2:
        raise QatkitError(f"max context {max_context}: needs at least 2 positions")
    with warnings.catch_warnings():
        # torch.export and ExecuTorch warn, by the thousand on a real model, about their own
        # deprecations and about the KV cache being a mutated buffer (it is meant to be)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*[Mm]utation on a buffer.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # transformers' output recorder is a global that dynamo reports as a side effect; unused here
        warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
        return _export_pte(student, tokenizer, out, max_context, dynamic, share_table, provenance, head_chunk_bytes, lean)


def _export_pte(student: nn.Module, tokenizer, out: Path, max_context: int, dynamic: bool, share_table: bool, provenance: dict | None,
                head_chunk_bytes: int, lean: bool) -> dict:
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    t0 = time.perf_counter()
    runtime = runtime_model(student, share_table, head_chunk_bytes)
    shared = isinstance(runtime.get_input_embeddings(), SharedTableEmbedding)
    wrapper = KVCacheLM(runtime, max_context).eval()
    max_seq = max_context - 1 if dynamic else 1  # export cannot take a dynamic length equal to the cache length
    example = (torch.zeros(1, 4 if dynamic else 1, dtype=torch.long), torch.tensor([0], dtype=torch.long))
    shapes = ({1: torch.export.Dim("seq_len", min=1, max=max_seq)}, {0: 1}) if dynamic else None
    with torch.no_grad(), _rotate_half_as_product(wrapper.model), _shared_layer_slice(wrapper.model):
        program = torch.export.export(wrapper, example, dynamic_shapes=shapes, strict=True)
    _inferred_view_dims(program)
    t1 = time.perf_counter()
    cfg = student.config
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    metadata = {
        "get_max_seq_len": max_seq,
        "get_max_context_len": max_context,
        "get_vocab_size": int(cfg.vocab_size),
        "get_bos_id": int(cfg.bos_token_id if cfg.bos_token_id is not None else -1),
        "get_eos_ids": [int(e) for e in eos if e is not None],
        "use_kv_cache": True,
        "enable_dynamic_shape": dynamic,
        "use_sdpa_with_kv_cache": False,
        SHARED_FLAG: shared,  # the program reads its tied table from the .ptd beside it
        PROVENANCE: torch.frombuffer(bytearray(json.dumps(provenance or {"tool": "qatkit", "version": __version__}).encode()), dtype=torch.uint8),
    }
    with _xnnpack_passes_in_use() if lean else contextlib.nullcontext():
        edge = to_edge_transform_and_lower(program, partitioner=[head_splitting_partitioner(lean)], constant_methods=metadata,
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
    t2 = time.perf_counter()
    # the shared table's bytes and scales go to named data under one tag (the .ptd beside the
    # .pte), where the lookup's constants and XNNPACK's head weights are one entry each
    tag = (lambda node: SHARED if SHARED in node.name else None) if shared else False
    et = edge.to_executorch(ExecutorchBackendConfig(extract_delegate_segments=True, do_quant_fusion_and_const_prop=True, external_constants=tag))
    graph = edge.exported_program().graph
    delegates = sum(1 for n in graph.nodes if n.op == "call_function" and "executorch_call_delegate" in str(n.target))
    outside = sorted({str(n.target) for n in graph.nodes if n.op == "call_function" and "executorch_call_delegate" not in str(n.target)})
    stray = [op for op in outside if any(k in op for k in MUST_BE_DELEGATED)]
    if stray:  # e.g. a static Linear without its output quantize pair: portable kernels, other numbers
        raise QatkitError(f"matrix products left outside the XNNPACK delegate ({', '.join(stray)}): the program would not compute what was trained")
    stale = data_path(out)
    with contextlib.ExitStack() as stack:  # exits in reverse: the tokenizer and the data land first, then the program
        tmp = stack.enter_context(atomic_path(out))
        ptd_tmp = stack.enter_context(atomic_path(stale)) if shared else None
        tok_tmp = stack.enter_context(atomic_path(tokenizer_path(out)))
        with open(tmp, "wb") as f:
            et.write_to_file(f)
        tokenizer.backend_tokenizer.save(str(tok_tmp))
        if shared:
            d = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=out.parent, prefix=".qatkit-ptd-")))
            et.write_tensor_data_to_file(d)
            written = sorted(p.name for p in d.iterdir())
            if written != [f"{SHARED}.ptd"]:
                raise QatkitError(f"ExecuTorch wrote data files {written}; expected {SHARED}.ptd")
            os.replace(d / written[0], ptd_tmp)
    if not shared and stale.exists():
        stale.unlink()  # an earlier program's shared table beside this name
    info = {"path": str(out), "data_path": str(data_path(out)) if shared else None, "shared_table": shared,
            "file_bytes": program_bytes(out), "pte_bytes": out.stat().st_size, "tokenizer": str(tokenizer_path(out)), "max_context": max_context,
            "xnnpack_partitions": delegates,
            "head_pieces": len(runtime.get_output_embeddings().chunks) if shared else 1, "outside_xnnpack": outside, "export_s": t1 - t0, "lower_s": t2 - t1, "seconds": time.perf_counter() - t0}
    log.info("wrote %s (%.1f MB, %d XNNPACK partitions) in %.0f s", out, info["file_bytes"] / 1e6, delegates, info["seconds"])
    return info
