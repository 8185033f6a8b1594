"""Gemma 4's MoE block as llama.cpp computes it (src/models/gemma4.cpp, MoE branch, and
llama-graph.cpp build_moe_ffn), in place of transformers' router and experts inside the context.

Router (on the pre-MLP residual): t = rms_norm(x) (no weight), then t * (1/sqrtf(n_embd)) and then
* ffn_gate_inp.scale, in that order (transformers multiplies by the scale first); logits = the
F32 router product; softmax; the top k by value; their weights divided by their sum (clamped at
6.1e-5). The per-expert scale is not folded into the weights as transformers does: llama.cpp
multiplies each expert's down-projection output by it (ffn_down_exps.scale) and then by the
weight.

Experts: the input is rounded once as the expert weights' type requires (Q8_0 blocks for Q4_0
and Q8_0 experts), gate|up = the fused product, geglu with ggml's GELU table, the down product's
input rounded the same way, then * scale * weight, and the k experts summed in the order they
were selected. Products keep torch's summation order (an ulp from ggml's now and then).

Used for measuring (the export gap); a training forward keeps transformers' MoE.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...formats import get
from ...models.gemma4 import EXPERT_WEIGHTS
from .ops import ACTIVATION_ROUNDING, gelu_table, ggml_rms_norm, ggml_softmax

WEIGHT_SUM_MIN = 6.103515625e-5  # build_moe_ffn's clamp of the weights' sum


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """Decoder layers with a Gemma 4 MoE block (a `router` and 3-D `experts`)."""
    return [m for m in model.modules() if hasattr(m, "router") and hasattr(m, "experts")
            and all(getattr(m.experts, n, None) is not None and getattr(m.experts, n).dim() == 3 for n in EXPERT_WEIGHTS)]


def _round(x: torch.Tensor, wtype: str) -> torch.Tensor:
    rounding = ACTIVATION_ROUNDING[wtype]
    return x if rounding is None else rounding(x)


def install(layer: nn.Module, prefix: str, weight_types: dict[str, str], eps: float) -> list[tuple[nn.Module, str, object]]:
    """Give `layer.router` and `layer.experts` llama.cpp's forward; returns what to undo:
    (module, attribute, the instance's own value before, or None). A QAT student's experts keep
    computing with their fake-quantized weights (nn.FakeQuantExperts)."""
    router, experts = layer.router, layer.experts
    types = {n: weight_types.get(f"{prefix}.experts.{n}", "f32") for n in EXPERT_WEIGHTS}
    route: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def router_forward(hidden_states):
        h = hidden_states.shape[-1]
        t = ggml_rms_norm(hidden_states, None, eps)
        t = t * torch.tensor(np.float32(1.0) / np.sqrt(np.float32(h)), dtype=t.dtype)  # ggml_scale(1.0f/sqrtf(n_embd))
        t = t * router.scale
        logits = router.proj(t).float()
        probs = ggml_softmax(logits)
        if probs is None:
            probs = torch.softmax(logits, dim=-1)
        k = router.config.top_k_experts
        weights, index = torch.topk(probs, k, dim=-1)
        total = weights[..., :1].clone()
        for j in range(1, k):  # ggml_sum_rows: one float32 sum, left to right
            total = total + weights[..., j : j + 1]
        weights = weights / total.clamp_min(WEIGHT_SUM_MIN)
        route["weights"], route["scale"] = weights, router.per_expert_scale[index]
        return probs, weights * route["scale"], index

    @torch.no_grad()
    def experts_forward(hidden_states, top_k_index, top_k_weights):
        gate_up, down = experts.gate_up_proj, experts.down_proj
        qat = getattr(experts, "qat", None)
        if qat is not None and qat.enabled:
            gate_up, down = (get(qat.fmt).fake_quant(w) for w in (gate_up, down))
        x = _round(hidden_states.float(), types["gate_up_proj"])
        out = None
        for j in range(top_k_index.shape[-1]):
            e = top_k_index[:, j]
            gu = torch.einsum("th,toh->to", x, gate_up[e].float())
            gate, up = gu.chunk(2, dim=-1)
            act = _round(gelu_table(gate) * up, types["down_proj"])
            y = torch.einsum("ti,thi->th", act, down[e].float())
            y = (y * route["scale"][:, j : j + 1]) * route["weights"][:, j : j + 1]
            out = y if out is None else out + y
        return out.to(hidden_states.dtype)

    undo = [(m, "forward", m.__dict__.get("forward")) for m in (router, experts)]
    router.forward, experts.forward = router_forward, experts_forward
    return undo
