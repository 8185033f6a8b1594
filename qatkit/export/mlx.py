"""A qatkit GGUF file -> an MLX (mlx-lm) model directory that carries the file's codes and scales.

What is written is what llama.cpp computes with: every Q4_0 / Q8_0 tensor of the GGUF becomes an
MLX affine-quantized weight with the same codes and scales, never re-quantized:

- ggml Q4_0 (fp16 d, codes 0..15, value (q - 8) * d) is MLX's 4-bit affine group of 32 with
  scale d and bias -8d; Q8_0 (int8 codes q, value q * d) is the 8-bit affine group of 32 with
  codes q + 128, scale d and bias -128d. An MLX weight is uint32 (out, in * bits / 32); element
  k of a word sits in bits [bits * k, bits * (k + 1)), lowest first.
- Scales and biases are float32: s * q + b is then exact (d has 11 significant bits, q at most
  8), so `mx.dequantize` gives the trained values bit for bit. float16 scales and biases would
  also hold them, but MLX then computes in float16. Unquantized tensors are float32 as well.
- Q6_K (16-element sub-blocks with their own 8-bit scales) does not fit an MLX group of 32: such
  tensors, and F16 / F32 ones, are written as float32 of the file's values (listed in the result).
- mlx-lm infers each layer's bits and group size from the tensor shapes, so a mixed 4/8-bit file
  needs only config.json's "quantization" (written as "quantization_config" too, as mlx-lm does).
- Llama's q/k rows are permuted in the GGUF; `from_gguf_tensor` moves whole rows back, so it is
  applied to codes and scales alike.
- A tied head is not written: mlx-lm's `QuantizedEmbedding.as_linear` computes it from the
  embedding, as llama.cpp does from token_embd.

mlx-lm 0.32 reads some settings where transformers 5 no longer writes them, so config.json gets:
- `rope_theta` / `rope_scaling` (and Gemma 3's `rope_local_base_freq`) from rope_parameters:
  without them mlx-lm's llama / qwen2 / gemma3_text take their own defaults (qwen2: 1e6);
- Gemma 3's `sliding_window_pattern` (transformers writes `_sliding_window_pattern`);
- Gemma 4's `global_head_dim` (and `num_global_key_value_heads`): transformers keeps them only in
  `per_layer_config`, and mlx-lm's default head size (512) fails to load a smaller model.

Refused (QatkitError, nothing written): MoE experts (3-D weights: mlx-lm's sanitize splits them
another way, untested), model types outside the verified table or without an mlx-lm module, and
layouts mlx-lm computes differently from transformers (Gemma 3 with fewer layers than its
sliding-window pattern or layer types off that pattern, sliding layers in llama/qwen).

Gemma 3's embedding scale: mlx-lm's gemma3_text multiplies the embeddings by sqrt(hidden) rounded
to bfloat16 (25.25 for Gemma 3 270M, where transformers and llama.cpp take float32's 25.30), so
its whole residual stream is k = 25.25/25.30 times the trained model's. Every norm but the two
after each sub-block reads the stream through an RMSNorm, which does not see a common factor; so
the exporter multiplies those two (post_attention_layernorm, post_feedforward_layernorm: (1 + w)
-> (1 + w) * k) and the stream stays k times the trained one throughout, which the final norm
removes: the logits are the trained model's to float rounding (measured on the default model:
without this, KL 2.5e-6 and logits off by up to 3.4% of their spread). Hidden sizes whose root
is a bfloat16 number (64: 8.0) have k = 1.

Exporting needs numpy and safetensors only; mlx is needed to load the result.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .. import QatkitError
from ..atomic import atomic_path
from ..formats import BY_GGML_TYPE, q4_0, q8_0
from ..models.arch import Arch, from_gguf_tensor, gguf_name, rope_base_and_factor
from ..progress import bar
from .gguf import read_gguf_tensors

log = logging.getLogger(__name__)

GROUP = 32  # ggml's Q4_0 / Q8_0 block = MLX's group
# ggml type -> (MLX bits, code offset added to the file's code, bias = -offset * d)
MLX_TYPES = {q4_0.GGML_TYPE: (4, 0, 8), q8_0.GGML_TYPE: (8, 128, 128)}
# transformers model_type -> the mlx-lm module it was verified with (mlx-lm 0.32.2): weight names,
# sanitize and the config keys this module writes
VERIFIED = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3_text", "gemma4_text": "gemma4_text"}
SHARD_BYTES = 5 << 30  # mlx-lm's own shard size (MAX_FILE_SIZE_GB)
SLIDING, FULL = "sliding_attention", "full_attention"
_WHY_FLOAT = {
    "q6_k": "q6_k: its 16-element sub-blocks do not fit an MLX group of 32",
    "f16": "f16 in the GGUF",
    "f32": "f32 in the GGUF",
}


def write_mlx(model, tokenizer, gguf_path, arch: Arch, out, provenance: dict | None = None, progress: bool = True) -> dict:
    """Write `model` as an mlx-lm directory at `out` (whole or not at all) whose quantized weights
    are the codes and scales of `gguf_path`.

    model: a transformers causal LM (float32) that already holds the GGUF file's values in HF
    layout (`load_gguf_weights(model, arch, gguf_path)` was called on it); gguf_path: the qatkit
    GGUF file (Q4_0 / Q8_0 / Q6_K / F32 / F16 tensors); provenance: written into config.json
    under "qatkit". Returns {"path", "bytes" (the directory's total), "quantized": {"4bit": n,
    "8bit": n}, "float": ["name (why)" of each matrix kept float32]}."""
    out = Path(out)
    config = _mlx_config(model)
    state = model.state_dict()
    stream_factor = gemma3_stream_factor(config)
    moe = [k for k, v in state.items() if v.dim() >= 3]
    if moe:
        raise QatkitError(f"mlx export: MoE experts ({moe[0]}, {len(moe)} 3-D tensors) are not supported; mlx-lm's MoE layout is untested with qatkit")
    files = read_gguf_tensors(gguf_path)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    modules = dict(model.named_modules())
    counts, floats, unfit = {4: 0, 8: 0}, [], []
    with atomic_path(out, folder=True) as tmp:
        shards = _Shards(tmp)
        for hf, p in bar(list(state.items()), desc=f"mlx -> {out.name}", unit="tensor", disable=not progress, leave=False):
            if hf == "lm_head.weight" and tied:
                continue  # mlx-lm computes a tied head from the embedding
            name = gguf_name(arch, hf)
            if name is None:
                continue  # not in the GGUF by design (as load_gguf_weights)
            if name not in files:
                raise QatkitError(f"{gguf_path}: tensor {name} missing")
            ggml_type, raw, shape = files[name]
            base, _, leaf = hf.rpartition(".")
            quantizable = leaf == "weight" and isinstance(modules.get(base), (torch.nn.Linear, torch.nn.Embedding)) and p.dim() == 2
            if quantizable and ggml_type in MLX_TYPES:
                bits = MLX_TYPES[ggml_type][0]
                w, s, b = _mlx_quantized(arch, model.config, name, ggml_type, raw, shape, p)
                shards.add({f"{base}.weight": w, f"{base}.scales": s, f"{base}.biases": b})
                counts[bits] += 1
                continue
            fmt = BY_GGML_TYPE[ggml_type].name if ggml_type in BY_GGML_TYPE else f"ggml type {ggml_type}"
            if p.dim() >= 2:
                why = _WHY_FLOAT.get(fmt) or (f"{fmt}: not a Linear or Embedding weight" if ggml_type in MLX_TYPES else f"{fmt}: no exact MLX layout")
                floats.append(f"{hf} ({why})")
                if fmt not in ("f16", "f32"):
                    unfit.append(f"{hf} ({fmt})")
            value = p.detach().cpu().float().numpy()
            if stream_factor != 1.0 and hf.endswith(GEMMA3_POST_NORMS):
                value = ((1.0 + value.astype(np.float64)) * stream_factor - 1.0).astype(np.float32)
            shards.add({hf: np.ascontiguousarray(value)})
        shards.close()
        if unfit:
            log.warning("mlx export: %d tensors are in formats MLX cannot hold exactly; writing them as float32 of the file's values: %s", len(unfit), ", ".join(unfit))
        bits = 4 if counts[4] or not counts[8] else 8
        config["quantization"] = {"group_size": GROUP, "bits": bits, "mode": "affine"}
        config["quantization_config"] = dict(config["quantization"])  # as mlx-lm's save_config writes it
        if provenance is not None:
            config["qatkit"] = provenance
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(str(tmp))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(tmp))
    return {"path": str(out), "bytes": directory_bytes(out), "quantized": {"4bit": counts[4], "8bit": counts[8]}, "float": floats}


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes uint (rows, n), each < 2**bits -> MLX's uint32 words (rows, n * bits / 32): element
    k of a word in bits [bits * k, bits * (k + 1)), lowest first."""
    per = 32 // bits
    c = codes.astype(np.uint32).reshape(codes.shape[0], -1, per)
    words = np.zeros(c.shape[:2], np.uint32)
    for k in range(per):
        words |= c[:, :, k] << np.uint32(bits * k)
    return words


def _mlx_quantized(arch: Arch, config, name: str, ggml_type: int, raw: np.ndarray, shape, p: torch.Tensor):
    """One Q4_0 / Q8_0 GGUF tensor -> (uint32 weight, float32 scales, float32 biases) in HF row
    order; raises when they do not dequantize to the model's values (the model does not hold the
    file's values)."""
    bits, add, off = MLX_TYPES[ggml_type]
    rows = int(np.prod(shape[:-1]))
    raw = np.asarray(raw, np.uint8).reshape(rows, -1)
    codes, d = q4_0.unpack(raw) if ggml_type == q4_0.GGML_TYPE else q8_0.unpack(raw)
    codes = (codes.astype(np.int16) + add).astype(np.uint8)  # Q8_0: int8 -> 0..255
    d = d.astype(np.float32)
    # GGUF row order -> HF's (Llama's q/k permutation moves whole rows: codes and scales alike)
    codes = from_gguf_tensor(arch, config, name, torch.from_numpy(codes.astype(np.float32))).numpy().astype(np.uint8)
    d = from_gguf_tensor(arch, config, name, torch.from_numpy(d)).numpy()
    values = ((codes.reshape(rows, -1, GROUP).astype(np.float32) - off) * d[:, :, None]).reshape(rows, -1)
    if not np.array_equal(values, p.detach().cpu().float().numpy().reshape(rows, -1)):
        raise QatkitError(f"mlx export: the model's {name} is not the GGUF file's values (load_gguf_weights first, from the same file)")
    return pack_codes(codes, bits), d, np.ascontiguousarray(-off * d, dtype=np.float32)


class _Shards:
    """safetensors files of at most SHARD_BYTES each, written as tensors arrive (so that at most
    one shard is held in memory); one file is model.safetensors, several are
    model-0000i-of-0000n.safetensors with an index, as mlx-lm writes them."""

    def __init__(self, folder: Path):
        self.folder, self.pending, self.size, self.written = folder, {}, 0, []

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        nbytes = sum(a.nbytes for a in arrays.values())
        if self.pending and self.size + nbytes > SHARD_BYTES:
            self._flush()
        self.pending.update(arrays)
        self.size += nbytes

    def _flush(self) -> None:
        from safetensors.numpy import save_file

        path = self.folder / f"model-part{len(self.written)}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "mlx"})
        self.written.append((path, list(self.pending), self.size))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        if self.pending or not self.written:
            self._flush()
        n = len(self.written)
        if n == 1:
            self.written[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map, total = {}, 0
        for i, (path, names, size) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({k: final for k in names})
            total += size
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------------------ config.json
def _mlx_config(model) -> dict:
    """The model's config as transformers writes it, plus the keys mlx-lm reads; raises for a model
    mlx-lm cannot load or would compute differently."""
    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("_name_or_path", None)
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    kind = config.get("model_type")
    _check_runtime(kind)
    if config.get("enable_moe_block") or config.get("num_experts") or config.get("num_local_experts"):
        raise QatkitError(f"mlx export: {kind} with MoE experts is not supported; mlx-lm's MoE layout is untested with qatkit")
    types = config.get("layer_types") or []
    if kind in ("llama", "qwen2", "qwen3"):
        if SLIDING in types:
            raise QatkitError(f"mlx export: {kind} with sliding-window layers is not supported (mlx-lm's {kind} attends to every position)")
        _legacy_rope(model.config, config)
    elif kind == "gemma3_text":
        _gemma3(model.config, config, types)
    elif kind == "gemma4_text":
        _gemma4(config, types)
    return config


def _check_runtime(kind: str | None) -> None:
    if kind not in VERIFIED:
        raise QatkitError(f"mlx export: model type {kind!r} is not supported (supported: {', '.join(VERIFIED)})")
    try:  # mlx-lm need not be installed to export; where it is, it must have the model's module
        missing = importlib.util.find_spec("mlx_lm") is not None and importlib.util.find_spec(f"mlx_lm.models.{VERIFIED[kind]}") is None
    except ImportError:  # installed but not importable (no MLX backend): the verified table decides
        missing = False
    if missing:
        raise QatkitError(f"mlx export: the installed mlx-lm has no module for {kind!r} (mlx_lm.models.{VERIFIED[kind]})")


def _legacy_rope(hf_config, config: dict, sliding: bool = False) -> None:
    """rope_theta / rope_scaling as top-level keys: mlx-lm's llama, qwen2 and gemma3_text read
    them there (transformers 5 nests them in rope_parameters)."""
    base, factor = rope_base_and_factor(hf_config, FULL)
    config["rope_theta"] = base
    config["rope_scaling"] = None if factor == 1.0 else {"rope_type": "linear", "type": "linear", "factor": factor}
    if sliding:
        local, local_factor = rope_base_and_factor(hf_config, SLIDING)
        if local_factor != 1.0:
            raise QatkitError("mlx export: gemma3 with rope scaling on its sliding layers is not supported (mlx-lm's gemma3_text scales only the full layers)")
        config["rope_local_base_freq"] = local


GEMMA3_POST_NORMS = (".post_attention_layernorm.weight", ".post_feedforward_layernorm.weight")


def gemma3_stream_factor(config: dict) -> float:
    """mlx-lm's Gemma 3 embedding scale over the trained one (module docstring), 1.0 elsewhere."""
    if config.get("model_type") != "gemma3_text":
        return 1.0
    trained = np.float32(config["hidden_size"] ** 0.5)
    mlx = np.float32(torch.tensor(config["hidden_size"] ** 0.5, dtype=torch.bfloat16).item())
    return float(np.float64(mlx) / np.float64(trained))


def _gemma3(hf_config, config: dict, types: list[str]) -> None:
    """mlx-lm's gemma3_text takes layer i as full iff (i + 1) % sliding_window_pattern == 0, and
    reads layer pattern - 1's cache to build the full layers' mask (IndexError with fewer layers)."""
    n = config["num_hidden_layers"]
    pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6)
    expected = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
    if types and list(types) != expected:
        raise QatkitError(f"mlx export: gemma3 layer_types {types} are not every {pattern}th layer full, the only layout mlx-lm's gemma3_text computes")
    if n < pattern:
        raise QatkitError(f"mlx export: gemma3 with {n} layers, fewer than its sliding-window pattern ({pattern}): mlx-lm's gemma3_text fails on such a model (it reads layer {pattern - 1}'s cache)")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if config.get(key) is not None:
            raise QatkitError(f"mlx export: gemma3 with {key} is not supported (mlx-lm's gemma3_text does not apply it)")
    if config.get("use_bidirectional_attention"):
        raise QatkitError("mlx export: gemma3 with bidirectional attention is not supported (mlx-lm's gemma3_text is causal)")
    config["sliding_window_pattern"] = pattern
    _legacy_rope(hf_config, config, sliding=True)


def _gemma4(config: dict, types: list[str]) -> None:
    """transformers 5 keeps the full-attention layers' head size (and K = V models' KV-head count)
    only in per_layer_config; mlx-lm reads global_head_dim (default 512) and
    num_global_key_value_heads."""
    over = config.get("per_layer_config") or {}
    full = {i for i, t in enumerate(types) if t == FULL}
    if {int(i) for i in over} - full:
        raise QatkitError("mlx export: gemma4 per_layer_config overrides sliding layers; mlx-lm's gemma4_text takes one shape per layer type")
    keys = {"head_dim": "global_head_dim", "num_key_value_heads": "num_global_key_value_heads"}
    for key in sorted({k for v in over.values() for k in v}):
        if key not in keys or (key == "num_key_value_heads" and not config.get("attention_k_eq_v")):
            raise QatkitError(f"mlx export: gemma4 per_layer_config sets {key!r}, which mlx-lm's gemma4_text has no setting for"
                              + (" without attention_k_eq_v" if key in keys else ""))
        values = {v.get(key) for i, v in over.items()} | ({None} if len(over) < len(full) else set())
        if len(values) != 1 or None in values:
            raise QatkitError(f"mlx export: gemma4 full-attention layers with different {key} ({sorted(map(str, values))}); mlx-lm's gemma4_text takes one")
        config[keys[key]] = values.pop()
    if full and not config.get("global_head_dim"):
        config["global_head_dim"] = config["head_dim"]  # full layers without an override keep head_dim


def directory_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
