"""Text-only stripping: a multimodal checkpoint -> the causal language model inside it.

Gemma 3 from 4B up ships as `Gemma3ForConditionalGeneration`: a SigLIP vision tower and a
projector beside a `gemma3_text` decoder. Gemma 4 (`Gemma4ForConditionalGeneration`) adds an audio
tower: model.vision_tower / audio_tower / embed_vision / embed_audio beside model.language_model;
the 12B `Gemma4UnifiedForConditionalGeneration` has no towers, only embedders (model.vision_embedder,
embed_vision, embed_audio). A phone or laptop that only needs text pays for the
vision weights in every file it loads, so qatkit writes the decoder alone as a Hugging Face
directory (its `text_config` as config.json, the `language_model` tensors under the names the
text-only class expects, the tokenizer files) and works on that. The tensors are copied, not
recomputed: the text model computes exactly what the multimodal one computes on text.

Only safetensors checkpoints are read, and only the tensors that are kept are loaded.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .. import QatkitError
from ..atomic import atomic_path

log = logging.getLogger(__name__)

# multimodal model_type -> (the text-only class, its model_type)
TEXT_ONLY = {"gemma3": ("Gemma3ForCausalLM", "gemma3_text"), "gemma4": ("Gemma4ForCausalLM", "gemma4_text"),
             "gemma4_unified": ("Gemma4UnifiedForCausalLM", "gemma4_unified_text")}

# where the language model's tensors live in a multimodal checkpoint -> their text-only names
# (the first is what Google's checkpoints and transformers' save_pretrained write)
_RENAMES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")
_TOP_LEVEL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def is_multimodal(model_type: str) -> bool:
    return model_type in TEXT_ONLY


def text_name(name: str) -> str | None:
    """A multimodal checkpoint's tensor name -> its text-only name, None for other parts."""
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def strip_text_only(src: Path, dest: Path) -> dict:
    """Write the text-only model of the multimodal checkpoint `src` to `dest` (atomically).
    Returns counts and bytes of the tensors kept and dropped."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((src / "config.json").read_text())
    cls, text_type = TEXT_ONLY[config["model_type"]]
    text = dict(config.get("text_config") or {})
    if not text:
        raise QatkitError(f"{src}: a {config['model_type']} checkpoint without a text_config")
    text.update(model_type=text_type, architectures=[cls])
    for key in _TOP_LEVEL_IDS:
        if key in config and key not in text:
            text[key] = config[key]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise QatkitError(f"{src}: text-only stripping reads safetensors checkpoints; this directory has none")
    kept, stats = {}, {"kept": 0, "dropped": 0, "kept_bytes": 0, "dropped_bytes": 0}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    new = text_name(name)
                    if new is None:
                        sl = f.get_slice(name)
                        n = 1
                        for d in sl.get_shape():
                            n *= d
                        stats["dropped"] += 1
                        stats["dropped_bytes"] += n * _itemsize(sl.get_dtype())
                        continue
                    t = f.get_tensor(name)
                    kept[new] = t
                    stats["kept"] += 1
                    stats["kept_bytes"] += t.numel() * t.element_size()
        except Exception as e:  # safetensors raises its own error types for a cut or corrupt file
            raise QatkitError(f"{file}: unreadable safetensors file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from None
    if not any(k.startswith("model.layers.") for k in kept):
        raise QatkitError(f"{src}: no language-model tensors found (looked for {', '.join(o for o, _ in _RENAMES)})")
    with atomic_path(dest, folder=True, keep_existing=True) as tmp:  # runs at once: the first one's copy is kept
        (tmp / "config.json").write_text(json.dumps(text, indent=2))
        save_file(kept, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json" and not any(f.match(p) for p in _WEIGHT_FILES):
                shutil.copy2(f, tmp / f.name)  # tokenizer, generation config, chat template
    if not (dest / "config.json").exists():
        raise QatkitError(f"{dest}: an incomplete text-only copy is in the way; delete it")
    log.info("text-only: kept %d tensors (%.1f MB), dropped %d (%.1f MB: the vision / audio towers and projectors) -> %s",
             stats["kept"], stats["kept_bytes"] / 1e6, stats["dropped"], stats["dropped_bytes"] / 1e6, dest)
    return stats


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}.get(dtype, 1)
