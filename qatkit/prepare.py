"""prepare: a float model -> a QAT student; convert: the trained student -> what the exporter writes.

prepare swaps, by the per-tensor plan (the same plan the exporter uses), every Linear whose
weight the file stores as Q4_0/Q8_0 for a FakeQuantLinear of that format, in place. The token
embedding (and the head tied to it), and any other token-embedding table (Gemma 4's per-layer
embeddings), are frozen by default at the file's values: dequantize(quantize(w)) is computed
once, and the exporter re-quantizes those values to the same bytes. A frozen table has no
gradient and no optimizer state, which matters when it is half the model (Gemma 4 E2B).

Trap (FACTS.md): a teacher dequantized from a coarser GGUF sits on a grid, and up to a third of
its weights can lie *exactly* on a Q4_0 rounding boundary (x * (1/d) + 8.5 an integer). The
first optimizer step, however small, moves them all a full level: KL to the teacher jumps from
0.36 to 13 after one Adam step at lr 1e-6. `settle_boundaries` moves each such weight a random
fraction of the way toward the value it quantizes to, which keeps every code and scale PTQ would
produce (checked) while putting the weight inside its level.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import QatkitError
from .config import QATConfig
from .formats import FORMATS, decode, encode, get
from .models.arch import Arch, gguf_name, to_gguf_tensor
from .nn import EXPERT_WEIGHTS, FakeQuantExperts, FakeQuantLinear
from .plan import TOKEN_EMBEDDINGS, default_plan, gguf_shapes

log = logging.getLogger(__name__)


def model_plan(model: nn.Module, arch: Arch, fmt: str, pure: bool = False, plan_file: str | None = None) -> dict[str, str]:
    """The exporter's per-tensor plan {GGUF name: format} for this model: llama.cpp's default
    mix, or a planner's file (checked to name every tensor, each in a format qatkit trains)."""
    shapes = gguf_shapes(model, arch)
    if plan_file is None:
        return default_plan(shapes, fmt, pure)
    from .budget import gguf_inventory, load_plan

    plan = load_plan(plan_file, fmt)
    allowed = {e.name: e.options for e in gguf_inventory(model, arch)}
    if set(plan) != set(allowed):
        odd = sorted(set(plan) ^ set(allowed))
        raise QatkitError(f"{plan_file}: its tensors are not this model's ({len(odd)} differ, e.g. {odd[0]}); plan this model with qatkit plan")
    bad = [n for n, f in plan.items() if f not in allowed[n]]
    if bad:
        raise QatkitError(f"{plan_file}: {bad[0]} cannot be {plan[bad[0]]} (choose from {', '.join(allowed[bad[0]])})")
    return plan


def linear_weight_types(model: nn.Module, arch: Arch, plan: dict[str, str]) -> dict[str, str]:
    """{HF module name: GGUF format} of every Linear under a GGUF plan (a tied head takes the
    embedding's): what the runtime-faithful mode needs to round each product's input."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return {name: plan["token_embd.weight" if name == "lm_head" and tied else gguf_name(arch, f"{name}.weight")]
            for name in _linears(model) if (name == "lm_head" and tied) or gguf_name(arch, f"{name}.weight") is not None}


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def prepare(model: nn.Module, arch: Arch, config: QATConfig) -> dict[str, str]:
    """Turn `model` into a QAT student in place; returns the plan it follows."""
    if config.fmt == "mobile":
        return _prepare_mobile(model, config)
    plan = model_plan(model, arch, config.fmt, config.pure, config.plan)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    gen = torch.Generator().manual_seed(config.seed)
    swapped = settled = 0
    for name, lin in _linears(model).items():
        if name == "lm_head" and tied:
            continue  # shares the embedding's weight: handled with it below
        gguf = gguf_name(arch, f"{name}.weight")
        if gguf is None:  # not in the file (a drafter's centroid head): frozen as it is
            lin.requires_grad_(False)
            continue
        fmt = plan[gguf]
        if fmt not in ("q4_0", "q8_0"):
            continue
        if config.settle_boundaries:
            settled += settle_boundaries(lin.weight, fmt, gen)
        parent, child = _parent(model, name)
        setattr(parent, child, FakeQuantLinear.from_linear(lin, fmt, config.learn_scales and fmt == "q4_0"))
        swapped += 1
    for mod_name, mod in model.named_modules():  # MoE experts: 3-D Parameters, not Linears
        if all(isinstance(getattr(mod, n, None), nn.Parameter) and getattr(mod, n).dim() == 3 for n in EXPERT_WEIGHTS):
            fmts = {plan[gguf_name(arch, f"{mod_name}.{n}")] for n in EXPERT_WEIGHTS}
            if len(fmts) != 1 or not fmts <= {"q4_0", "q8_0"}:
                continue
            fmt = fmts.pop()
            if config.settle_boundaries:
                for n in EXPERT_WEIGHTS:
                    w = getattr(mod, n)
                    settled += settle_boundaries(w.data.view(-1, w.shape[-1]), fmt, gen)
            FakeQuantExperts(mod, fmt)
            swapped += 1
    if config.freeze_embedding:
        emb = model.get_input_embeddings()
        freeze_at_file_values(emb, plan["token_embd.weight"])
        if not tied and "output.weight" in plan:
            head = model.get_output_embeddings()
            if isinstance(head, nn.Linear) and not isinstance(head, FakeQuantLinear):
                freeze_at_file_values(head, plan["output.weight"])
        for mod_name, mod in model.named_modules():  # other tables of the token-embedding kind (Gemma 4's per-layer embeddings)
            name = gguf_name(arch, f"{mod_name}.weight") if isinstance(mod, nn.Embedding) and mod is not emb else None
            if name in TOKEN_EMBEDDINGS:
                freeze_at_file_values(mod, plan[name])
    elif tied and plan["token_embd.weight"] not in ("f32", "f16"):
        raise QatkitError("training a tied embedding through its quantizer is not supported yet; keep it frozen")
    log.info("prepared %d linears (and expert blocks) for %s fake-quant%s; %d weights moved off rounding boundaries", swapped, config.fmt, " with learned scales" if config.learn_scales else "", settled)
    return plan


def _mobile_plan_file(path: str, linears: dict[str, tuple[int, int]], tables: dict[str, int]) -> dict[str, str]:
    """A planner's mobile plan: every Linear int4 or int8, the embedding int4 or int8, other
    lookup tables int2, int4 or int8."""
    from .budget import MOBILE_LINEAR, MOBILE_TABLE, load_plan
    from .plan import MOBILE_TABLES

    plan = {k: v for k, v in load_plan(path, "mobile").items() if not k.startswith("1-D")}
    want = set(linears) | {"model.embed_tokens"} | set(tables)
    if set(plan) != want:
        odd = sorted(set(plan) ^ want)
        raise QatkitError(f"{path}: its tensors are not this model's ({len(odd)} differ, e.g. {odd[0]}); plan this model with qatkit plan")
    for name, scheme in plan.items():
        allowed = MOBILE_TABLE if name == "model.embed_tokens" else MOBILE_TABLES if name in tables else MOBILE_LINEAR
        if scheme not in allowed:
            raise QatkitError(f"{path}: {name} cannot be {scheme}")
    return plan


def other_tables(model: nn.Module) -> dict[str, nn.Embedding]:
    """The token-lookup tables besides the input embedding (Gemma 4's per-layer embeddings)."""
    emb = model.get_input_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding) and m is not emb}


def _freeze_mobile_table(table: nn.Embedding, scheme: str) -> torch.Tensor:
    """Freeze a lookup table at its mobile per-row values; the exporter writes its codes with
    the scales kept here. Returns the scales."""
    from .formats import mobile

    spec = mobile.parse_spec(scheme)
    with torch.no_grad():
        codes, scale = mobile.quantize_weight(table.weight, spec)
        table.weight.copy_(mobile.dequantize_weight(codes, scale, spec))
    table.weight.requires_grad_(False)
    table.register_buffer("mobile_scale", scale.float())  # what the exporter writes with
    table.mobile_spec = spec
    return scale


def _prepare_mobile(model: nn.Module, config: QATConfig) -> dict[str, str]:
    """The mobile format's student: every Linear fake-quantizes its weight (int4/int2/int8 per
    channel) and its input (int8 per token); the embedding is frozen at its int8/int4 per-row
    values, and a tied head computes with those same codes and scales."""
    from .plan import mobile_plan

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    lins = {n: (m.out_features, m.in_features) for n, m in _linears(model).items() if not (n == "lm_head" and tied)}
    tables = {n: m.embedding_dim for n, m in other_tables(model).items()}
    if config.plan is not None:
        plan = _mobile_plan_file(config.plan, lins, tables)
    else:
        plan = mobile_plan(lins, config.mobile_weights, config.int2, config.embedding, config.int8, config.keep, tables, config.per_layer_embedding)
    if not config.freeze_embedding:
        raise QatkitError("the mobile format keeps the embedding frozen at its per-row values")
    emb_scale = _freeze_mobile_table(model.get_input_embeddings(), plan["model.embed_tokens"])
    for name in other_tables(model):
        _freeze_mobile_table(model.get_submodule(name), plan[name])
    for name, lin in _linears(model).items():
        if plan.get(name) == "keep":
            continue  # float32: XNNPACK's f32 kernels
        parent, child = _parent(model, name)
        if name == "lm_head" and tied:  # the embedding's own codes and scales
            setattr(parent, child, FakeQuantLinear.from_linear(lin, plan["model.embed_tokens"], scale=emb_scale))
            plan["lm_head"] = plan["model.embed_tokens"]
            continue
        act = config.activations if name != "lm_head" else "dynamic"  # the head's output is the logits
        setattr(parent, child, FakeQuantLinear.from_linear(lin, plan[name], config.learn_scales and name != "lm_head", act=act))
        if name == "lm_head":
            lin.weight.requires_grad_(False)
    decoder = [v for n, v in plan.items() if n not in ("model.embed_tokens", "lm_head", *tables)]
    count = {k: sum(v.startswith(k) for v in decoder) for k in ("int2", "int8", "keep")}
    other = "".join(f", {n} {plan[n]}" for n in tables)
    log.info("prepared the mobile format: %d decoder linears (%s; %d int2, %d int8, %d kept float), embedding %s%s, %s int8 activations%s", len(decoder), config.mobile_weights, count["int2"], count["int8"], count["keep"], plan["model.embed_tokens"], other, config.activations, ", learned scales" if config.learn_scales else "")
    return plan


@torch.no_grad()
def calibrate_static(model: nn.Module, seqs: torch.Tensor) -> int:
    """Set the static int8 activation scales of a mobile student from its float activations on
    `seqs` (n, L): each Linear's input and output scale minimises the squared int8 error of a
    sample of the values it saw. Returns the number of Linears calibrated (0: none is static)."""
    from .formats import mobile

    static = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear) and m.act == "static"}
    if not static:
        return 0
    if len(seqs) == 0:
        raise QatkitError("calibrating static activation scales needs at least one sequence")
    for m in static.values():
        m.observed = []
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        for x in seqs:
            model(x[None].to(device))
        for name, m in static.items():
            if not m.observed:
                raise QatkitError(f"{name}: saw no activations while calibrating (is its fake-quant switched off?)")
            s_in = mobile.static_scale(torch.cat([a for a, _ in m.observed]))
            s_out = mobile.static_scale(torch.cat([b for _, b in m.observed]))
            # XNNPACK refuses a requantization scale s_in * s_w / s_out >= 256: keep s_out above it
            sw = m.scale.detach().to(mobile.SCALE_DTYPE).float().max()
            s_out = torch.maximum(s_out, s_in * sw / (mobile.STATIC_MAX_REQUANT / 2))
            m.act_log_scale.copy_(torch.stack([s_in, s_out]).log())
    finally:
        for m in static.values():
            m.observed = None
        model.train(was_training)
    log.info("calibrated the static int8 scales of %d linears on %d sequences", len(static), len(seqs))
    return len(static)


def mobile_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, "object"]]:
    """The mobile student's exported numbers: {module name: (codes int8, scales bf16, spec)} for
    every fake-quant Linear, computed by the format's one quantizer."""
    from .formats import mobile

    out = {}
    for name, mod in _linears(model).items():
        if isinstance(mod, FakeQuantLinear) and mod.spec is not None:
            codes, scale = mobile.quantize_weight(mod.weight, mod.spec, mod.scale)
            out[name] = (codes, scale, mod.spec)
    return out


def file_values(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """What llama.cpp computes with for `w` stored as `fmt`, checked to re-quantize to the same
    bytes (so a frozen tensor exports exactly as trained)."""
    values, data = _file_values(w, fmt)
    if data is not None:
        raise QatkitError(f"{fmt} does not re-quantize its own values to the same bytes for a {tuple(w.shape)} tensor; cannot freeze it exactly")
    return values


def _file_values(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, "object"]:
    """(values llama.cpp computes with, None) when re-quantizing the values gives the same bytes;
    (values, the bytes) when it does not (Q6_K's scale search is not idempotent)."""
    if fmt == "f32":
        return w.detach().clone(), None
    data = encode(w, fmt)
    values = torch.from_numpy(decode(data, FORMATS[fmt].ggml_type, tuple(w.shape)).copy()).to(w.dtype)
    same = fmt == "f16" or (encode(values, fmt) == data).all()
    return values, None if same else data


def freeze_at_file_values(module: nn.Module, fmt: str) -> None:
    """Freeze `module.weight` (an embedding table or a head) at the values its `fmt` bytes decode
    to. Where re-quantizing those values would not give the bytes back (Q6_K), the bytes are kept
    on the module (`file_bytes`), and the exporter writes them as they are (`frozen_bytes`)."""
    values, data = _file_values(module.weight, fmt)
    with torch.no_grad():
        module.weight.copy_(values)
    module.weight.requires_grad_(False)
    if data is not None:
        module.file_bytes = data


def frozen_bytes(model: nn.Module, arch: Arch) -> dict[str, "object"]:
    """{GGUF name: bytes} of the frozen tensors whose bytes the exporter must write as kept."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out = {}
    for name, mod in model.named_modules():
        if getattr(mod, "file_bytes", None) is not None and not (name == "lm_head" and tied):
            out[gguf_name(arch, f"{name}.weight")] = mod.file_bytes
    return out


def settle_boundaries(w: torch.Tensor, fmt: str, gen: torch.Generator) -> int:
    """Move weights that sit exactly on a rounding boundary of `fmt` a random 5-50% of the way to
    the value they quantize to; codes and scales stay as PTQ makes them. Returns how many moved."""
    f = get(fmt)
    with torch.no_grad():
        codes, d = f.quantize_codes(w)
        dq = f.dequantize_codes(codes, d).to(w.dtype)
        on_edge = f.boundary_mask(w) & (w != dq)
        n = int(on_edge.sum())
        if n:
            r = (0.05 + 0.45 * torch.rand(w.shape, generator=gen)).to(w.dtype)
            moved = torch.where(on_edge, w + r * (dq - w), w)
            codes2, d2 = f.quantize_codes(moved)
            keep = torch.equal(codes2, codes) and torch.equal(d2.view(torch.int16), d.view(torch.int16))
            assert keep, "settling boundary weights changed the PTQ codes"
            w.copy_(moved)
    return n


def scale_cuts(model: nn.Module) -> int:
    """Q4_0 blocks whose learned scale the quantizer cuts to keep a code 0 (formats/q4_0.py,
    "Re-quantization"): 0 for a student trained by qatkit's loop, which follows the cut."""
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, FakeQuantLinear) and mod.spec is None and mod.scale is not None:
                n += int(get(mod.fmt).requantizable_scales(mod.weight, mod.scale)[1].sum())
    return n


def convert(model: nn.Module, arch: Arch) -> dict[str, torch.Tensor]:
    """Swap FakeQuantLinears back to nn.Linear (latent weights) and take fake-quant off MoE
    experts, in place; returns the learned Q4_0 scales by GGUF name for the exporter (empty
    without learned scales)."""
    scales: dict[str, torch.Tensor] = {}
    for mod in model.modules():
        if isinstance(getattr(mod, "qat", None), FakeQuantExperts):
            mod.qat.remove()
    for name, mod in _linears(model).items():
        if isinstance(mod, FakeQuantLinear):
            if mod.scale is not None:
                gguf = gguf_name(arch, f"{name}.weight")
                # scales follow their rows: the exporter reorders Llama's q/k rows for llama.cpp
                scales[gguf] = to_gguf_tensor(arch, model.config, gguf, mod.scale.detach()).to(torch.float16)
            parent, child = _parent(model, name)
            setattr(parent, child, mod.to_linear())
    return scales


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return (model.get_submodule(path) if path else model), child
