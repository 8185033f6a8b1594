"""A torch causal LM -> a GGUF file llama.cpp loads, through the `gguf` package (`export_model`:
the model, its plan and metadata; `write_gguf`: the bytes).

Tensor bytes come from qatkit.formats (bit-identical to ggml's reference quantizers; learned
Q4_0 scales are written as they are). Metadata is the GGUF source's own (as llama-quantize keeps
it) or, for a Hugging Face source, what llama.cpp's converter writes for that family: its
hyper-parameters, the tokenizer, special tokens.

The file is written under a temporary name beside the destination and renamed when complete, so
an interrupted or failed export leaves nothing behind.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from .. import QatkitError
from ..atomic import atomic_path
from ..formats import BY_GGML_TYPE, FORMATS, decode, encode
from ..models import gguf_meta
from ..models.arch import Arch, from_gguf_tensor, generated_tensors, gguf_name, hparams, to_gguf_tensor
from ..models.gemma4 import EXPERT_WEIGHTS
from ..models.load import Source
from ..models.tokenizer_meta import tokenizer_metadata
from ..plan import FILE_TYPE, default_plan
from ..progress import bar
from . import provenance

log = logging.getLogger(__name__)


def gguf_tensors(model: torch.nn.Module, arch: Arch) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor in llama.cpp's layout (norm offset added, rotary rows reordered), the
    tensors the converter generates (Gemma 4's rope_freqs) first, as it writes them."""
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = dict(generated_tensors(arch, config))
    dropped = []
    for hf, w in model.state_dict().items():
        if hf == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd as the head when output.weight is absent
        name = gguf_name(arch, hf)
        if name is None:
            dropped.append(hf)  # a part llama.cpp's converter drops too (the drafter's centroid head)
            continue
        out[name] = to_gguf_tensor(arch, config, name, w.detach().float().cpu())
    if dropped:
        log.warning("not in the GGUF, as llama.cpp's converter leaves them out: %s (llama.cpp drafts from the whole vocabulary, "
                    "so its drafts can differ from transformers'; the target still verifies each)", ", ".join(dropped))
    return out


def hf_metadata(model: torch.nn.Module, tokenizer, arch: Arch, pre: str | None = None) -> gguf_meta.Metadata:
    """What llama.cpp's converter writes for a Hugging Face model of this family."""
    config = model.config
    meta: gguf_meta.Metadata = {"general.architecture": ["STRING", arch.name]}
    name = getattr(config, "name_or_path", "") or arch.name
    meta["general.name"] = ["STRING", Path(str(name)).name or arch.name]
    for key, value in hparams(arch, config).items():
        meta[key] = value if isinstance(value, list) else gguf_meta.typed(value)
    meta.update(tokenizer_metadata(tokenizer, config.get_text_config().vocab_size, arch.name, pre))
    suppress = getattr(getattr(model, "generation_config", None), "suppress_tokens", None)
    if config.model_type == "gemma4_unified_text" and suppress:  # the converter's Gemma4UnifiedModel writes them
        meta["tokenizer.ggml.suppress_tokens"] = ["ARRAY", "INT32", [int(t) for t in suppress]]
    return meta


def file_metadata(source: Source, model: torch.nn.Module, tokenizer, plan: dict[str, str] | None = None, training: dict | None = None) -> gguf_meta.Metadata:
    """The source GGUF's own metadata, or what the converter writes for an HF source; with
    `plan`, qatkit's provenance keys (export/provenance.py) on top."""
    meta = source.gguf_metadata
    if meta is None:
        meta = hf_metadata(model, tokenizer, source.arch)
    if plan is not None:
        meta = {**meta, **provenance.gguf_entries(plan, training)}
    return meta


def export_model(
    model: torch.nn.Module,
    tokenizer,
    source: Source,
    out: str | os.PathLike,
    fmt: str,
    pure: bool = False,
    q4_0_scales: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    plan: dict[str, str] | None = None,
    raw: dict[str, np.ndarray] | None = None,
    training: dict | None = None,
) -> dict:
    """Write `model` (the float model or a trained student's float weights) as a GGUF file.
    `plan`: the per-tensor plan the student was prepared with (computed here when absent);
    `raw`: {GGUF name: bytes} of frozen tensors to write as they are (prepare.frozen_bytes);
    `training`: the run's summary for the provenance keys (provenance.training_summary)."""
    tensors = gguf_tensors(model, source.arch)
    if plan is None:
        plan = default_plan({k: tuple(v.shape) for k, v in tensors.items()}, fmt, pure)
    sizes = write_gguf(out, tensors, plan, file_metadata(source, model, tokenizer, plan, training), fmt, q4_0_scales, progress, raw)
    return {"path": str(out), "format": fmt, "pure": pure, "plan": plan, "training": training, "tensor_bytes": sum(sizes.values()),
            "file_bytes": os.path.getsize(out)}


def write_gguf(
    out: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    plan: dict[str, str],
    metadata: gguf_meta.Metadata,
    file_format: str,
    q4_0_scales: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    raw: dict[str, np.ndarray] | None = None,
) -> dict[str, int]:
    """Write `tensors` (GGUF names, llama.cpp layout) in the formats `plan` gives; a tensor in
    `raw` is written as those bytes, after checking that they decode to the tensor's values.

    Returns {tensor name: bytes}. Nothing is left at `out` unless the whole file was written."""
    out = Path(out)
    missing = sorted(set(tensors) - set(plan))
    if missing:
        raise QatkitError(f"plan has no format for {len(missing)} tensors, e.g. {missing[0]}")
    sizes: dict[str, int] = {}
    with atomic_path(out) as tmp:
        writer = _writer(tmp, metadata, plan, file_format)
        for name, w in bar(tensors.items(), desc=f"quantize -> {out.name}", unit="tensor", disable=not progress, leave=False):
            fmt = plan[name]
            if not torch.isfinite(w).all():
                raise QatkitError(f"tensor {name} {tuple(w.shape)} has NaN/Inf values; refusing to write it")
            scales = (q4_0_scales or {}).get(name) if fmt == "q4_0" else None
            data = (raw or {}).get(name)
            if data is not None:
                if not np.array_equal(decode(data, FORMATS[fmt].ggml_type, tuple(w.shape)), w.numpy()):
                    raise QatkitError(f"tensor {name}: its kept {fmt} bytes do not decode to the values the model holds")
            else:
                data = encode(w, fmt, scales)
            _check_scales(name, w, fmt, data)
            raw_dtype = GGMLQuantizationType(FORMATS[fmt].ggml_type) if FORMATS[fmt].block > 1 else None
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
            sizes[name] = int(data.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    return sizes


def _writer(path, metadata: gguf_meta.Metadata, plan: dict[str, str], file_format: str) -> GGUFWriter:
    writer = GGUFWriter(path, gguf_meta.get(metadata, "general.architecture"))
    gguf_meta.apply(metadata, writer)
    writer.add_file_type(FILE_TYPE[file_format])
    if any(FORMATS[f].block > 1 for f in plan.values()):
        writer.add_quantization_version(2)
    return writer


def file_bytes(metadata: gguf_meta.Metadata, plan: dict[str, str], shapes: dict[str, tuple[int, ...]], file_format: str) -> int:
    """The exact size of the GGUF file `write_gguf` writes for this plan, without its tensors:
    the header, metadata and tensor table as the writer packs them, padded to the alignment,
    then each tensor's bytes padded to it."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        writer = _writer(Path(d) / "h.gguf", metadata, plan, file_format)
        data = 0
        for name, shape in shapes.items():
            f = FORMATS[plan[name]]
            nbytes = math.prod(shape[:-1]) * f.row_bytes(shape[-1])
            raw = GGMLQuantizationType(f.ggml_type) if f.block > 1 else None
            # the writer's tensor table takes numpy-order shapes, bytes-shaped for block formats
            writer.add_tensor_info(name, (*shape[:-1], f.row_bytes(shape[-1])) if raw is not None else shape,
                                   np.dtype(np.uint8 if raw is not None else np.float32 if f.name == "f32" else np.float16), nbytes, raw_dtype=raw)
            data += GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        header = (Path(d) / "h.gguf").stat().st_size
        return GGUFWriter.ggml_pad(header, writer.data_alignment) + data


def _check_scales(name: str, w: torch.Tensor, fmt: str, data: np.ndarray) -> None:
    """fp16 scales overflow for weights beyond ~5e5 (Q4_0) / ~8e6 (Q8_0): refuse such a tensor
    rather than write infinities llama.cpp would compute with."""
    f = FORMATS[fmt]
    if f.block == 1 or fmt == "q6_k":
        if fmt == "f16" and not np.isfinite(data).all():
            raise QatkitError(f"tensor {name} {tuple(w.shape)}: values exceed the f16 range")
        return
    d = data.reshape(-1, f.block_bytes)[:, :2].copy().view(np.float16)
    if not np.isfinite(d).all():
        raise QatkitError(f"tensor {name} {tuple(w.shape)}: a block scale overflows fp16 (|w| up to {float(w.abs().max()):.3g}); {fmt} cannot store it")


def read_gguf_tensors(path: str | os.PathLike) -> dict[str, tuple[int, np.ndarray, tuple[int, ...]]]:
    """GGUF name -> (ggml type, raw data, numpy-order shape), for tests and verification."""
    reader = gguf_meta.open_reader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out[t.name] = (int(t.tensor_type), np.array(t.data), shape)
    return out


def load_gguf_weights(model: torch.nn.Module, arch: Arch, path: str | os.PathLike) -> dict[str, str]:
    """Put the dequantized weights of a GGUF file (one of qatkit's exports of this model) into
    `model`, in place: the torch twin of what llama.cpp computes with. Returns {HF module name:
    format} for the model's Linear layers and {parameter name: format} for 3-D MoE expert weights
    (for the runtime-faithful mode)."""
    tensors = read_gguf_tensors(path)
    with torch.no_grad():
        for hf, name, p in _file_tensors(model, arch, tensors, path):
            ggml_type, data, shape = tensors[name]
            w = torch.from_numpy(decode(data, ggml_type, shape).copy())
            p.copy_(from_gguf_tensor(arch, model.config, name, w).reshape(p.shape))
    return _weight_types(model, arch, {name: t for name, (t, _, _) in tensors.items()}, path)


def gguf_weight_types(model: torch.nn.Module, arch: Arch, path: str | os.PathLike) -> dict[str, str]:
    """What `load_gguf_weights` returns, from the file's tensor table alone (no data read): for a
    model that already holds the file's values."""
    return _weight_types(model, arch, {t.name: int(t.tensor_type) for t in gguf_meta.open_reader(path).tensors}, path)


def _file_tensors(model: torch.nn.Module, arch: Arch, in_file, path):
    """(HF name, GGUF name, parameter) of every tensor of `model` the file holds (parts it does
    not hold by design, a drafter's centroid head, are skipped); a missing one is an error."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for hf, p in model.state_dict().items():
        name = "token_embd.weight" if hf == "lm_head.weight" and tied else gguf_name(arch, hf)
        if name is None:
            continue
        if name not in in_file:
            raise QatkitError(f"{path}: tensor {name} missing")
        yield hf, name, p


def _weight_types(model: torch.nn.Module, arch: Arch, ggml_types: dict[str, int], path) -> dict[str, str]:
    """{Linear module name: format} and {3-D MoE expert parameter: format} of the file."""
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    types: dict[str, str] = {}
    for hf, name, p in _file_tensors(model, arch, ggml_types, path):
        f = BY_GGML_TYPE.get(ggml_types[name])
        fmt = f.name if f else f"ggml{ggml_types[name]}"
        if hf.endswith(".weight") and hf[: -len(".weight")] in linears:
            types[hf[: -len(".weight")]] = fmt
        elif hf.rsplit(".", 1)[-1] in EXPERT_WEIGHTS and p.dim() == 3:  # MoE experts
            types[hf] = fmt
    return types
