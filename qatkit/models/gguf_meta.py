"""GGUF key-value metadata as plain data: read it from a file, keep it as JSON, write it back.

An exported file of a GGUF source carries the source's own metadata (tokenizer, special tokens,
hyper-parameters, chat template), as llama-quantize does. Opening a GGUF with a 262k-token
vocabulary takes ~26 s in gguf-py, so the metadata is read once and cached as JSON.

A value is kept as `[type, value]` (`[ARRAY, sub_type, values]` for arrays), type names as in
gguf.GGUFValueType. GGUF strings are bytes that need not be valid UTF-8 (a vocabulary can hold
partial characters), so they travel through JSON with surrogateescape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from .. import QatkitError
from ..atomic import write_json

Metadata = dict[str, list]  # key -> [type name, value] or ["ARRAY", sub type name, [values]]

# Keys a writer sets itself or that describe the source's tensors (quantize.imatrix.* names the
# importance matrix of a quantization qatkit did not make): never copied from a source.
_NOT_COPIED = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version", "general.alignment", "split.", "quantize.")


def _str(b: np.ndarray | bytes) -> str:
    return bytes(b).decode("utf-8", "surrogateescape")


def open_reader(path: str | os.PathLike) -> GGUFReader:
    """GGUFReader with a one-line QatkitError for a file that is not a readable GGUF."""
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, struct.error, IndexError... on bad files
        raise QatkitError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from None


def read(reader: GGUFReader) -> Metadata:
    meta: Metadata = {}
    for f in reader.fields.values():
        if f.name.startswith(_NOT_COPIED) or not f.types:
            continue
        t = f.types[0]
        if t == GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == GGUFValueType.STRING:
                vals: list[Any] = [_str(f.parts[i]) for i in f.data]
            elif sub == GGUFValueType.ARRAY:
                continue  # nested arrays: no llama.cpp key uses them
            else:
                vals = np.concatenate([f.parts[i] for i in f.data]).tolist() if f.data else []
            meta[f.name] = ["ARRAY", sub.name, vals]
        elif t == GGUFValueType.STRING:
            meta[f.name] = [t.name, _str(f.parts[f.data[0]])]
        else:
            meta[f.name] = [t.name, f.parts[f.data[0]][0].item()]
    return meta


def save(meta: Metadata, path: Path) -> None:
    write_json(path, meta)


def load(path: Path) -> Metadata:
    return json.loads(path.read_text())


def get(meta: Metadata, key: str, default: Any = None) -> Any:
    v = meta.get(key)
    return default if v is None else v[-1]


def apply(meta: Metadata, writer: GGUFWriter) -> None:
    """Add every key of `meta` to `writer` with its original GGUF type."""
    for key, v in meta.items():
        if key.startswith(_NOT_COPIED):
            continue
        if v[0] == "ARRAY":
            sub = GGUFValueType[v[1]]
            vals = v[2]
            if not vals:
                continue  # gguf-py refuses empty arrays; llama.cpp treats absent as empty
            if sub == GGUFValueType.STRING:
                vals = [s.encode("utf-8", "surrogateescape") for s in vals]
            writer.add_key_value(key, vals, GGUFValueType.ARRAY, sub_type=sub)
        else:
            t = GGUFValueType[v[0]]
            val = v[1].encode("utf-8", "surrogateescape") if t == GGUFValueType.STRING else v[1]
            writer.add_key_value(key, val, t)


def typed(value: int | float | str | bool) -> list:
    """A metadata entry for a Python scalar, typed the way llama.cpp's converter types it."""
    if isinstance(value, bool):
        return ["BOOL", value]
    if isinstance(value, int):
        return ["UINT32", value]
    if isinstance(value, float):
        return ["FLOAT32", value]
    return ["STRING", str(value)]
