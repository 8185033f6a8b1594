"""Distilling Gemma 4's MTP drafter to its target, every position of a sequence in one call.

A drafting step (llama.cpp's draft-mtp, transformers' single-position candidate generator) sits at
the position p of the token the target has just chosen, x_p, which is not in the target's cache
yet: the drafter reads [the target's scaled embedding of x_p, the target's post-norm hidden
state h_{p-1}], attends to the target's K/V of positions k < p (its own layers have no K/V), and
its logits propose x_{p+1}: they are trained toward the target's distribution at p (softmax z_p).
Step k of a draft stays at p, reads x_{p+k-1} (teacher forcing with the sequence's own tokens:
the drafts themselves when the sequence is the target's greedy output) and the hidden row step
k-1 handed back through `post_projection`, and is trained toward z_{p+k-1}.

Since nothing the drafter computes at one position feeds another position, every position is one
row of a single drafter call with a mask: query p sees key k when k < p, and on sliding layers
only the last W-1 keys (llama.cpp keeps positions p - k < W in the cache of a sequence whose next
position is p; transformers' own drafter mask lets it see W + 1). The drafter is called through
its parts (`pre_projection`, its decoder with a mask per layer type, `lm_head`,
`post_projection`): its `forward` always builds its own masks. Rows equal the sequential steps to
float rounding (float64: 4e-15).

The target is frozen: no gradient reaches it, its K/V or its hidden states. It is whatever model
the caller passes: the quantized file's twin (`targets.gguf.file_twin`), so that the drafter
learns the distribution of the target the user runs, under `runtime.faithful` for llama.cpp's
activation roundings when asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WINDOWS = ("llama.cpp", "transformers")


@dataclass
class TargetState:
    """The frozen target on one sequence ids [1, L]: what the drafter reads and is trained toward."""

    ids: torch.Tensor
    embeds: torch.Tensor  # [1, L, H_t] scaled token embeddings (the drafter's first input half)
    hidden: torch.Tensor  # [1, L, H_t] post-norm last hidden states
    kv: dict  # {layer type: (K, V)} of the layers the drafter reads
    logits: torch.Tensor  # [L, V]


@torch.no_grad()
def target_state(target: torch.nn.Module, ids: torch.Tensor) -> TargetState:
    ids = ids.reshape(1, -1)
    out = target(input_ids=ids, output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
    kv = {k: (v[0].detach(), v[1].detach()) for k, v in out.shared_kv_states.items()}
    embeds = target.get_input_embeddings()(ids).detach()  # Gemma's scaled embedding
    return TargetState(ids, embeds, out.hidden_states[-1].detach(), kv, out.logits[0].detach().float())


def draft_masks(length: int, queries: int, window: int, kind: str = "llama.cpp", dtype=torch.float32, device=None) -> dict:
    """Additive masks [1, 1, queries, length] for drafting queries at positions 1..queries: a
    key k is seen at p when k < p, and on sliding layers when also p - k <= W - 1 (llama.cpp) or
    W + 1 (transformers)."""
    if kind not in WINDOWS:
        raise ValueError(f"window kind {kind!r}: one of {WINDOWS}")
    d = torch.arange(1, queries + 1, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    span = window - 1 if kind == "llama.cpp" else window + 1
    neg = torch.finfo(dtype).min

    def additive(seen: torch.Tensor) -> torch.Tensor:
        return torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill(~seen, neg)[None, None]

    return {"full_attention": additive(d >= 1), "sliding_attention": additive((d >= 1) & (d <= span))}


def _drafter_rows(drafter, inputs: torch.Tensor, positions: torch.Tensor, masks: dict, kv: dict):
    x = drafter.pre_projection(inputs)
    h = drafter.model(input_ids=None, inputs_embeds=x, attention_mask=masks, position_ids=positions, shared_kv_states=kv, use_cache=False).last_hidden_state
    return drafter.lm_head(h), drafter.post_projection(h)


def draft_logits(drafter: torch.nn.Module, state: TargetState, steps: int = 1, window: str = "llama.cpp") -> list[torch.Tensor]:
    """The drafter's logits at every position, step by step: step k (1-based) is [L - k, V], row
    i for position p = i + 1, to be compared with the target's logits z_{p+k-1} (rows k..L-1 of
    `state.logits`)."""
    length = state.ids.shape[1]
    w = drafter.config.get_text_config().sliding_window
    out, h = [], state.hidden[:, :-1]  # h_{p-1} for p = 1..L-1
    for k in range(1, steps + 1):
        q = length - k
        if q < 1:
            break
        inputs = torch.cat([state.embeds[:, k : k + q], h[:, :q]], -1).to(next(drafter.parameters()).dtype)
        masks = draft_masks(length, q, w, window, inputs.dtype, inputs.device)
        logits, h = _drafter_rows(drafter, inputs, torch.arange(1, q + 1, device=inputs.device)[None], masks, state.kv)
        out.append(logits[0])
    return out


def draft_kl(drafter: torch.nn.Module, state: TargetState, steps: int = 1, window: str = "llama.cpp") -> tuple[torch.Tensor, list[float]]:
    """Mean over positions of KL(target || drafter), summed over steps, and each step's mean."""
    total, per_step = 0.0, []
    for k, logits in enumerate(draft_logits(drafter, state, steps, window), start=1):
        t = torch.log_softmax(state.logits[k:].double(), -1)
        d = torch.log_softmax(logits.double(), -1)
        kl = (t.exp() * (t - d)).sum(-1).mean()
        total = total + kl
        per_step.append(float(kl.detach()))
    return total, per_step


# --------------------------------------------------------------------------------- training
def drafter_loss(target_types: dict[str, str] | None, draft_steps: int, window: str):
    """A loss for `train.loop.train` (distill_loss's arguments): the drafter (the student) against
    the frozen target (the teacher) on each sequence of the batch, `draft_steps` steps deep. With
    `target_types` the target rounds activations as llama.cpp's CPU backend does (runtime.faithful),
    so the drafter learns from the numbers llama.cpp hands it."""

    def loss(student, teacher, x, pos, cfg, cache=None, student_context=None):
        from contextlib import nullcontext

        from ..runtime.faithful import llamacpp_faithful

        total, steps = 0.0, [0.0] * draft_steps
        for row in x:
            with llamacpp_faithful(teacher, target_types, exact=False) if target_types else nullcontext():
                state = target_state(teacher, row)
            with student_context() if student_context is not None else nullcontext():
                kl, per = draft_kl(student, state, draft_steps, window)
            total = total + kl / len(x)
            steps = [a + b / len(x) for a, b in zip(steps, per)]
        return total, {"kl": steps[0], **{f"kl_step{k + 1}": v for k, v in enumerate(steps) if k}}

    return loss


def check_pair(drafter, target) -> None:
    """Refuse a drafter that cannot read this target, in one line (what llama.cpp asserts or
    transformers' validation would find later)."""
    from .. import QatkitError

    d, t = drafter.config.get_text_config(), target.config.get_text_config()
    if drafter.config.backbone_hidden_size != t.hidden_size:
        raise QatkitError(f"the drafter reads hidden states of {drafter.config.backbone_hidden_size} but the target's are {t.hidden_size}: not its target")
    if d.vocab_size != t.vocab_size:
        raise QatkitError(f"the drafter's vocabulary ({d.vocab_size}) is not the target's ({t.vocab_size})")
    types = list(t.layer_types)
    if types[-2:] != ["sliding_attention", "full_attention"]:
        raise QatkitError("llama.cpp's drafter reads the target's last two layers' K/V, which must be sliding then full; this target's are " + ", ".join(types[-2:]))
    td, dd = t.to_dict(), d.to_dict()
    for key in ("num_key_value_heads", "head_dim", "sliding_window"):
        if td.get(key) != dd.get(key):
            raise QatkitError(f"the drafter's {key} ({dd.get(key)}) is not the target's ({td.get(key)})")
