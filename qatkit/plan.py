"""Which tensor gets which format: the per-tensor plan.

The default follows llama.cpp's own choice for a Q4_0 (or Q8_0) file, so that qatkit's file and
`llama-quantize`'s can be compared tensor for tensor:
- tensors llama-quantize never quantizes keep their type, f32 (`kept_as_is`: 1-D tensors such as
  norms, biases and layer scalars; 2-D norms; MoE routers; Gemma 4's per_layer_model_proj);
- the output head, or when the head is tied, every token-embedding table (token_embd, and Gemma
  4's per_layer_token_embd, which llama.cpp files in the same category): Q6_K where the row width
  is a multiple of 256, else Q8_0 (Q8_0 in a Q8_0 file);
- every other 2-D or 3-D (MoE experts) weight: the file's format.
`pure` puts every quantizable tensor in the file's format, like `llama-quantize --pure`.

A row width the format cannot take (not whole blocks) falls back to f16 with a warning, or is
refused under `pure`. A plan is a plain dict {GGUF tensor name: format name}, saved as JSON.
"""

from __future__ import annotations

import logging

from . import QatkitError
from .formats import FORMATS, fits
from .formats.mobile import WeightSpec, parse_spec
from .models.arch import generated_tensors, gguf_name

log = logging.getLogger(__name__)

FILE_FORMATS = ("q4_0", "q8_0", "f16", "f32")
# llama.cpp's LLAMA_FTYPE_* for general.file_type
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}


def gguf_shapes(model, arch) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape of every tensor the exporter writes for `model` (llama.cpp's
    converter transforms keep shapes; a tied head is written once, as token_embd)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    shapes = {name: tuple(t.shape) for name, t in generated_tensors(arch, model.config).items()}
    for hf, w in model.state_dict().items():
        name = None if hf == "lm_head.weight" and tied else gguf_name(arch, hf)
        if name is not None:  # (None: a part the file does not hold)
            shapes[name] = tuple(w.shape)
    return shapes


TOKEN_EMBEDDINGS = ("token_embd.weight", "per_layer_token_embd.weight")  # llama-quantize's TOKEN_EMBD category


def kept_as_is(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors llama-quantize leaves in their input type whatever the file type (its
    tensor_allows_quantization, src/llama-quant.cpp): under 2-D, names not ending in 'weight'
    (e.g. Gemma 4's ffn_gate_inp.scale), norms, MoE routers, per_layer_model_proj."""
    return (len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name
            or "ffn_gate_inp.weight" in name or "per_layer_model_proj" in name)


def default_plan(shapes: dict[str, tuple[int, ...]], fmt: str, pure: bool = False) -> dict[str, str]:
    """shapes: GGUF tensor name -> numpy-order shape (rows, width) or (experts, rows, width)."""
    if fmt not in FILE_FORMATS:
        raise QatkitError(f"format {fmt!r} is not one qatkit writes (choose from: {', '.join(FILE_FORMATS)})")
    heads = {"output.weight"} if "output.weight" in shapes else set(TOKEN_EMBEDDINGS)
    plan: dict[str, str] = {}
    fallbacks: list[str] = []
    for name, shape in shapes.items():
        width = shape[-1]
        if kept_as_is(name, shape) or fmt == "f32":
            plan[name] = "f32"
            continue
        want = fmt
        if name in heads and not pure and fmt in ("q4_0", "q8_0"):
            want = "q6_k" if fmt == "q4_0" and fits("q6_k", width) else "q8_0"
        if not fits(want, width):
            if pure:
                raise QatkitError(f"{name} {tuple(shape)}: row width {width} is not a multiple of {FORMATS[want].block}, so {want} cannot store it (drop --pure to let it fall back to f16)")
            fallbacks.append(f"{name} {tuple(shape)}")
            want = "f16"
        plan[name] = want
    if fallbacks:
        log.warning("%d tensors have rows that are not whole %s blocks; writing them as f16: %s", len(fallbacks), fmt, ", ".join(fallbacks))
    return plan


# ------------------------------------------------------------------------------ mobile plan
MOBILE_WEIGHTS = ("int4", "int4g32", "int8")
MOBILE_EMBEDDINGS = ("int8", "int4")
MOBILE_TABLES = ("int8", "int4", "int2")  # other lookup tables: ExecuTorch's embedding_byte / _4bit / _2bit store 8, 4, 2 bits


def mobile_plan(linears: dict[str, tuple[int, int]], weights: str = "int4", int2: tuple[str, ...] = (), embedding: str = "int8",
                int8: tuple[str, ...] = (), keep: tuple[str, ...] = (), tables: dict[str, int] | None = None, table: str = "int4") -> dict[str, str]:
    """The mobile format's per-module plan {transformers module name: scheme}.

    linears: module name -> (out, in) of every nn.Linear except a head tied to the embedding.
    - every decoder Linear: `weights` (int4 per channel by default; int4g32; int8);
    - Linears matching one of the glob patterns (e.g. '*.mlp.down_proj', 'model.layers.1[0-7].*')
      of `keep`: left in float32 ("keep"); else of `int8`: int8 per channel; else of `int2`: int2
      per channel (int2g32 under int4g32) -- the first list that matches wins;
    - 'model.embed_tokens' (weight-only, per row) and a tied head: `embedding` (int8 or int4),
      sharing one set of codes; an untied 'lm_head' gets int8 (or "keep");
    - `tables` (module name -> row width) of the other token-lookup tables (Gemma 4's per-layer
      embeddings): `table` per row, weight-only (int2 needs rows of a multiple of 4 values).
    A pattern that matches nothing, or a row width the scheme cannot take, is refused."""
    from fnmatch import fnmatchcase

    if weights not in MOBILE_WEIGHTS:
        raise QatkitError(f"mobile weights {weights!r}: choose from {', '.join(MOBILE_WEIGHTS)}")
    if embedding not in MOBILE_EMBEDDINGS:
        raise QatkitError(f"mobile embedding {embedding!r}: choose from {', '.join(MOBILE_EMBEDDINGS)}")
    base = parse_spec(weights)  # the one parser of scheme names (formats/mobile.py)
    if table not in MOBILE_TABLES:
        raise QatkitError(f"mobile lookup table {table!r}: choose from {', '.join(MOBILE_TABLES)}")
    plan: dict[str, str] = {"model.embed_tokens": embedding}
    for name, width in (tables or {}).items():
        if table == "int2" and width % 4:
            raise QatkitError(f"{name}: rows of {width} values; ExecuTorch's 2-bit lookup packs four to a byte (use int4)")
        plan[name] = table
    for flag, patterns in (("--keep", keep), ("--int8", int8), ("--int2", int2)):
        for pattern in patterns:
            if not any(fnmatchcase(n, pattern) for n in linears if n != "lm_head" or flag == "--keep"):
                raise QatkitError(f"{flag} {pattern!r} matches no Linear (names look like {next(iter(linears))!r})")
    for name, (_, width) in linears.items():
        def matches(patterns):
            return any(fnmatchcase(name, p) for p in patterns)

        if matches(keep):
            plan[name] = "keep"
            continue
        if name == "lm_head" or matches(int8):
            scheme = "int8"
        elif matches(int2):
            scheme = WeightSpec(2, base.group).name  # int2, or int2g32 under int4g32
        else:
            scheme = weights
        if not parse_spec(scheme).fits(width):
            raise QatkitError(f"{name}: row width {width} is not a multiple of {base.group}, so {scheme} cannot store it (use per-channel int4)")
        plan[name] = scheme
    return plan


# ---------------------------------------------------------------------------- memory budget
GB = 1e9


def skeleton(config):
    """The model of `config` on the meta device: shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def training_memory(config, batch_size: int, seq_len: int, kl_positions: float = 1.0, grad_checkpointing: bool = False, world: int = 1,
                    teacher_dtype: str = "float32", qat: bool = True, device: str = "cuda") -> dict[str, float]:
    """Bytes one device holds at the peak of a training step, estimated from the config alone (a
    skeleton on the meta device; nothing is loaded). The student trains in float32; `world`
    devices share it under FSDP2 (train/distributed.py) with `batch_size` the global micro-batch.
    `qat` False: plain fine-tuning of the same weights (no teacher, no fake-quant).

    - weights: the student's (4 bytes) and the teacher's (4, or 2 in bfloat16), 1/world each
      (on a CPU also the file bytes of each frozen table, which a GPU run keeps in host memory);
    - grads_and_adamw: a gradient and AdamW's two moments (12 bytes) for what trains, which is
      all but the embedding tables and an untied head (frozen under QAT: no gradient, no optimizer state), 1/world each;
    - gathered (FSDP2 only): the layers whose whole weights are held at once, two of student
      and teacher (the one computing, the one prefetched) and the root (token embedding, head);
    - fake_quant: the quantized copy of each Linear weight that its product saves for backward,
      4 bytes per trained Linear weight, of every layer (one layer with grad checkpointing);
      FSDP does not shard it: it is made from the gathered weight;
    - activations kept for backward, ~(16 hidden + 4 feed-forward) floats per token and layer
      (one layer's worth with grad checkpointing) on this device's share of the batch;
    - logits at the scored positions: student, teacher, their log-softmax and its gradient (4
      float copies; 3 for fine-tuning's cross-entropy);
    - optimizer_step: AdamW's temporaries while it updates, after the step's activations are
      gone (so the peak is the larger of the two): on CUDA torch's multi-tensor AdamW makes one
      float copy of all the device's trainable weights; on a CPU the per-tensor one makes two of
      the largest tensor.
    Lookup tables not tied to the head (Gemma 4's per-layer table) are split by rows over the
    devices and never gathered: they are in `weights` at 1/world.
    An estimate, not a measurement: benchmarks/memory.py measures and prints the ratio."""
    from torch import nn

    model = skeleton(config.get_text_config())  # the language model: what qatkit trains of a multimodal checkpoint
    total = sum(p.numel() for p in model.parameters())
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    head = getattr(model.get_output_embeddings(), "weight", None)
    fixed = {id(w): w for w in tables}  # what gets no gradient: the embedding tables, and under QAT an untied head
    if qat and head is not None:  # (frozen at its file type, Q6_K/Q8_0, as prepare leaves it; a tied one is a table already)
        fixed[id(head)] = head
    frozen = sum(w.numel() for w in fixed.values())
    untied = [w.numel() for w in tables if w is not head]
    layers_mod = model.model.layers
    layer_sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers_mod]
    linear_sizes = [sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
                    + sum(getattr(m, n).numel() for m in layer.modules() for n in ("gate_up_proj", "down_proj") if isinstance(getattr(m, n, None), nn.Parameter))
                    for layer in layers_mod]
    d = config.get_text_config().to_dict()
    hidden, layers, vocab = d["hidden_size"], d["num_hidden_layers"], d["vocab_size"]
    ffn = 2 * d["intermediate_size"] if d.get("use_double_wide_mlp") else d["intermediate_size"]
    if d.get("enable_moe_block"):
        ffn += d["top_k_experts"] * d["moe_intermediate_size"]
    teacher_b = {"float32": 4, "bfloat16": 2}[teacher_dtype] if qat else 0
    per_weight = 4 + teacher_b
    tokens = batch_size * seq_len / world
    act_layers = 1 if grad_checkpointing else layers
    root = total - sum(layer_sizes) - sum(untied)
    out = {
        "weights": per_weight * total / world,
        "grads_and_adamw": 12.0 * (total - frozen) / world,
        "gathered": per_weight * (2 * max(layer_sizes) + root) if world > 1 else 0.0,
        "fake_quant": 4.0 * (max(linear_sizes) if grad_checkpointing else sum(linear_sizes)) if qat else 0.0,
        "activations": 4.0 * tokens * (act_layers * (16 * hidden + 4 * ffn) + layers * hidden),
        "logits": (16.0 if qat else 12.0) * max(1, round(tokens * kl_positions)) * vocab,
    }
    if qat and device == "cpu":  # host memory, where a GPU run keeps it too: each frozen table's file bytes (Q6_K/Q8_0, <= 1.06 a value)
        out["weights"] += 1.0625 * sum(w.numel() for w in tables)
    trained = [p.numel() for p in model.parameters() if id(p) not in fixed]
    out["optimizer_step"] = 4.0 * (total - frozen) / world if device == "cuda" else 8.0 * max(trained) / world
    working = out["gathered"] + out["fake_quant"] + out["activations"] + out["logits"]
    out["total"] = out["weights"] + out["grads_and_adamw"] + max(working, out["optimizer_step"])
    out["params"], out["trainable"], out["world"] = float(total), float(total - frozen), float(world)
    return out


MEMORY_PARTS = ("weights", "grads_and_adamw", "gathered", "fake_quant", "activations", "logits", "optimizer_step")


def describe_memory(m: dict[str, float]) -> str:
    per = f" per device of {int(m['world'])}" if m.get("world", 1) > 1 else ""
    parts = [f"weights of teacher and student {m['weights'] / GB:.1f} GB", f"gradients and AdamW of {m['trainable'] / 1e9:.2f}B trainable weights "
             f"{m['grads_and_adamw'] / GB:.1f} GB"]
    if m.get("gathered"):
        parts.append(f"layers gathered by FSDP {m['gathered'] / GB:.1f} GB")
    if m.get("fake_quant"):
        parts.append(f"fake-quant weight copies {m['fake_quant'] / GB:.1f} GB")
    parts += [f"activations {m['activations'] / GB:.1f} GB", f"logits {m['logits'] / GB:.1f} GB"]
    parts[-1] += f" (or AdamW's step, {m['optimizer_step'] / GB:.1f} GB, whichever is larger)"
    return f"~{m['total'] / GB:.1f} GB{per}: " + " + ".join(parts)
