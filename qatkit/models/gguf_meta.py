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

GEMMA4_ARCHS = ("gemma4", "gemma4-assistant")  # Gemma 4's files, the target's and its MTP drafter's: two head sizes, Gemma 4's tokenizer

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


_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


def scan_header(path) -> tuple[dict, dict[str, list[int]]]:
    """A GGUF's scalar key-values (strings included; arrays as their element count) and its
    tensor table {name: ne}, read from the header alone: every count and length is checked
    against the bytes that remain, so a damaged file costs no more than its size, and nothing is
    handed to a native loader that could abort on it."""
    import mmap
    import struct

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise QatkitError(f"{path}: not a readable GGUF file ({size} bytes)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    at = 0

    def take(n: int) -> int:
        nonlocal at
        if n < 0 or n > size - at:
            raise QatkitError(f"{path}: not a readable GGUF file, truncated or corrupt (a length of {n} bytes at offset {at} runs past its end)")
        at += n
        return at - n

    def unpack(fmt: str):
        return struct.unpack_from(fmt, buf, take(struct.calcsize(fmt)))[0]

    def string() -> str:
        n = unpack("<Q")
        return bytes(buf[take(n) : at]).decode("utf-8", "surrogateescape")

    def value(t: int, depth: int = 0):
        if t in _SCALAR:
            return unpack(_SCALAR[t])
        if t == STRING:
            return string()
        if t == ARRAY and depth < 2:
            sub, count = unpack("<I"), unpack("<Q")
            if sub in _FIXED:
                take(count * _FIXED[sub])
            else:
                if count > (size - at) // 8:  # each element takes at least 8 bytes
                    raise QatkitError(f"{path}: not a readable GGUF file, truncated or corrupt (an array of {count} elements in {size - at} bytes)")
                for _ in range(count):
                    value(sub, depth + 1)
            return ["ARRAY", count]
        raise QatkitError(f"{path}: not a readable GGUF file, truncated or corrupt (value type {t} at offset {at})")

    try:
        if bytes(buf[:4]) != b"GGUF":
            raise QatkitError(f"{path}: not a GGUF file (bad magic)")
        take(4)
        version = unpack("<I")
        if version not in (2, 3):
            raise QatkitError(f"{path}: GGUF version {version} is not one qatkit reads (2 or 3)")
        n_tensors, n_kv = unpack("<Q"), unpack("<Q")
        if n_kv > size // 13 or n_tensors > size // 24:  # the least a key-value and a tensor entry take
            raise QatkitError(f"{path}: not a readable GGUF file, truncated or corrupt ({n_tensors} tensors, {n_kv} keys in {size} bytes)")
        fields = {}
        for _ in range(n_kv):
            key = string()
            fields[key] = value(unpack("<I"))
        ne = {}
        for _ in range(n_tensors):
            name = string()
            n_dims = unpack("<I")
            if n_dims > 8:
                raise QatkitError(f"{path}: tensor {name!r} has {n_dims} dimensions")
            ne[name] = [unpack("<Q") for _ in range(n_dims)]
            take(12)  # type u32, offset u64
        return fields, ne
    finally:
        buf.close()


def check_shapes(path) -> None:
    """The hyper-parameters a model is built from agree with the tensors the file holds, so that
    one damaged number (block_count 536870913 was met by the fuzz test, or a width of 10^9) is
    refused in one line before transformers allocates a model of that size, or llama.cpp aborts
    on it. Shapes are ggml's: ne[0] is a weight's input width."""
    fields, ne = scan_header(path)
    a = fields.get("general.architecture")
    if not isinstance(a, str):
        raise QatkitError(f"{path}: no general.architecture in this GGUF")

    def value(key: str):
        v = fields.get(f"{a}.{key}")
        return v if isinstance(v, int) and not isinstance(v, bool) else None  # (per-layer arrays are checked by their own readers)

    blocks = {int(n.split(".")[1]) for n in ne if n.startswith("blk.") and n.split(".")[1].isdigit()}
    n = value("block_count")
    if n is None or len(blocks) != n or (blocks and (min(blocks) != 0 or max(blocks) != n - 1)):
        raise QatkitError(f"{path}: {a}.block_count says {n} layers, but its tensors are those of {len(blocks)}: damaged or inconsistent")
    emb, tok = value("embedding_length"), ne.get("token_embd.weight")
    if tok is None or emb != tok[0]:
        raise QatkitError(f"{path}: {a}.embedding_length says {emb}, but token_embd.weight is {tok}: damaged or inconsistent")
    checks = [("feed_forward_length", "blk.0.ffn_up.weight", 1, 1), ("expert_count", "blk.0.ffn_up_exps.weight", 2, 1),
              ("expert_count", "blk.0.ffn_gate_up_exps.weight", 2, 1)]
    heads = value("attention.head_count")
    if a not in GEMMA4_ARCHS and heads is not None:  # (gemma4's sliding and full layers differ in head size)
        if heads < 1:
            raise QatkitError(f"{path}: {a}.attention.head_count is {heads}")
        head_dim = value("attention.key_length") or emb // heads
        checks += [("attention.head_count", "blk.0.attn_q.weight", 1, head_dim), ("attention.head_count_kv", "blk.0.attn_k.weight", 1, head_dim)]
    for key, tensor, dim, unit in checks:
        v = value(key)
        if v is not None and tensor in ne and (len(ne[tensor]) <= dim or v * unit != ne[tensor][dim]):
            raise QatkitError(f"{path}: {a}.{key} says {v}, but {tensor} is {ne[tensor]}: damaged or inconsistent")
