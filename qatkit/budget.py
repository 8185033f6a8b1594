"""The memory-budget planner: which format each tensor gets so that the file fits a size.

For every tensor of a model (from its config alone: a skeleton on the meta device, no weights),
the exact bytes it takes in each format the target can store it in:
- q4_0 GGUF: decoder Linears (and MoE experts) Q4_0 or Q8_0 (what qatkit trains), token
  tables (the embedding, tied to the head; Gemma 4's per-layer table) Q4_0, Q6_K (rows of
  whole 256-blocks) or Q8_0; the rest stays as llama-quantize keeps it (F32). ggml's block
  sizes, so the bytes are exact; with the model's metadata the GGUF header is exact too, and
  so the whole file.
- mobile (.pte): decoder Linears int4 per channel (4-bit codes + a float32 scale per row, the
  qc4w kernel) or int8 (+ float32 scale per row); a tied embedding int4 or int8 per row, stored
  once (named data in the .ptd beside the program, codes and scales, which the lookup and
  XNNPACK's head share; twice when its rows have an odd width); untied lookup tables int2, int4
  or int8. int2 saves nothing on a Linear: XNNPACK has no 2-bit kernel and stores int2 in int4
  codes. These are the weights' bytes; the program around them (its instructions, XNNPACK's
  graphs, RoPE and norm constants, the .ptd's header) is measured by `qatkit.planner` when the
  model's weights are at hand, and left out when planning from shapes alone.

With weights, the loss of each choice is measured (`qatkit.planner`). Losses are taken as additive,
and the mix is the greedy multiple-choice knapsack: start from every tensor at its lowest
format, then repeatedly upgrade the tensor whose next format removes the most loss per added
byte while the budget holds. Without weights (sizes only), the loss of a tensor at b bits is
taken as its element count times 4^-b (quantization noise power), a prior, said as such.

A plan is saved as JSON ({"format", "tensors": {name: format}, ...}) that `qatkit train`,
`export` and `run` take with --plan.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from . import QatkitError
from .formats import FORMATS, fits
from .plan import TOKEN_EMBEDDINGS, gguf_shapes, kept_as_is

GGUF_LINEAR = ("q4_0", "q8_0")
GGUF_TABLE = ("q4_0", "q6_k", "q8_0")
MOBILE_LINEAR = ("int4", "int8")
MOBILE_TABLE = ("int4", "int8")  # the token embedding (and a tied head: XNNPACK has no 2-bit kernel)
MOBILE_OTHER_TABLE = ("int2", "int4", "int8")  # other lookup tables (Gemma 4's per-layer embeddings)
BITS = {"int2": 2, "q4_0": 4.5, "q6_k": 6.5625, "q8_0": 8.5, "int4": 4, "int8": 8, "f32": 32, "f16": 16}
UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'1GB', '800MB', '1.5 GiB', '241000000' -> bytes (decimal units unless ...iB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].lower() not in UNITS:
        raise QatkitError(f"budget {text!r}: give a size such as 1GB, 800MB or 1.5GiB")
    return int(float(m[1]) * UNITS[m[2].lower()])


def human(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@dataclass
class Entry:
    """One tensor: its shape and {format: bytes} of the formats it may take, lowest first."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "linear", "table" (token lookup, maybe tied to the head), "kept"
    options: dict[str, int]
    numel: int = 0
    loss: dict[str, float] = field(default_factory=dict)

    @property
    def levels(self) -> list[str]:
        return list(self.options)


# ------------------------------------------------------------------------------- inventories
GGUF_ALIGN = 32  # gguf's default general.alignment: every tensor's data is padded to it


def _pad(n: int) -> int:
    return -(-n // GGUF_ALIGN) * GGUF_ALIGN


def _rows(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1])


def gguf_inventory(model: nn.Module, arch) -> list[Entry]:
    """Every tensor the GGUF exporter writes, with its bytes in each format it may take."""
    out = []
    for name, shape in gguf_shapes(model, arch).items():
        n, width = math.prod(shape), shape[-1]
        if kept_as_is(name, shape):
            out.append(Entry(name, shape, "kept", {"f32": _pad(4 * n)}, n))
            continue
        levels = GGUF_TABLE if name in TOKEN_EMBEDDINGS or name == "output.weight" else GGUF_LINEAR
        opts = {f: _pad(_rows(shape) * FORMATS[f].row_bytes(width)) for f in levels if fits(f, width)}
        if not opts:
            opts = {"f16": _pad(2 * n)}
        out.append(Entry(name, shape, "table" if name in TOKEN_EMBEDDINGS else "linear", opts, n))
    return out


def mobile_bytes(shape: tuple[int, ...], scheme: str) -> int:
    """Bytes of one weight in the program: codes (int4 two to a byte, rows padded to an even
    width; int2, lookup tables only, four to a byte) and a float32 scale per row."""
    rows, width = _rows(shape), shape[-1]
    if scheme == "int2":
        return rows * ((width + 3) // 4) + 4 * rows
    if scheme == "int4":
        return rows * ((width + 1) // 2) + 4 * rows
    if scheme == "int8":
        return rows * width + 4 * rows
    if scheme == "f32":
        return 4 * rows * width
    raise QatkitError(f"mobile scheme {scheme!r} has no size rule")


def mobile_inventory(model: nn.Module) -> list[Entry]:
    """Every weight of the mobile program: Linears, the token embedding (once when tied to the
    head: see `export.executorch.SharedTableEmbedding`; twice at an odd width, where XNNPACK's
    packing pads the rows) and other lookup tables; 1-D tensors (norms) stay float32."""
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    emb = model.get_input_embeddings()
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not (name == "lm_head" and tied):
            shape = tuple(mod.weight.shape)
            out.append(Entry(name, shape, "linear", {s: mobile_bytes(shape, s) for s in MOBILE_LINEAR}, math.prod(shape)))
        elif isinstance(mod, nn.Embedding):
            shape = tuple(mod.weight.shape)
            copies = 2 if mod is emb and tied and shape[-1] % 2 else 1
            schemes = MOBILE_TABLE if mod is emb else MOBILE_OTHER_TABLE
            out.append(Entry(name, shape, "table", {s: copies * mobile_bytes(shape, s) for s in schemes}, math.prod(shape)))
    small = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    out.append(Entry("1-D tensors (norms, scalars)", (small,), "kept", {"f32": 4 * small}, small))
    return out


def inventory(model: nn.Module, arch, fmt: str) -> list[Entry]:
    if fmt == "mobile":
        return mobile_inventory(model)
    if fmt != "q4_0":
        raise QatkitError(f"the planner plans q4_0 GGUF files and the mobile format, not {fmt!r}")
    return gguf_inventory(model, arch)


# ------------------------------------------------------------------------------------ losses
def prior_losses(entries: list[Entry]) -> str:
    """No weights: noise power numel * 4^-bits per choice (a prior, not a measurement)."""
    for e in entries:
        e.loss = {f: e.numel * 4.0 ** (-BITS[f]) for f in e.levels}
    return "prior (element count x 4^-bits; no weights were read)"


def check_reachable(entries: list[Entry], budget: int, overhead: int = 0) -> int:
    """The smallest size (every tensor at its lowest format); raises with it when over `budget`."""
    total = overhead + sum(e.options[e.levels[0]] for e in entries)
    if total > budget:
        raise QatkitError(f"budget {human(budget)} cannot be met: the smallest this model reaches in this format is {human(total)} "
                          f"({total} bytes, every tensor at its lowest format)")
    return total


def fit(entries: list[Entry], budget: int, overhead: int = 0) -> tuple[dict[str, str], int]:
    """The greedy multiple-choice knapsack (see the module text): {name: format} and the bytes
    of the file. Raises with the smallest reachable size when even the lowest choices exceed it."""
    total = check_reachable(entries, budget, overhead)
    choice = {e.name: e.levels[0] for e in entries}
    while True:
        best, best_rate = None, -1.0
        for e in entries:
            now = choice[e.name]
            for nxt in e.levels[e.levels.index(now) + 1 :]:  # any higher format: losses need not be convex
                cost = e.options[nxt] - e.options[now]
                gain = e.loss[now] - e.loss[nxt]  # a gain measured as 0 is still taken, last, while bytes are left
                if cost > 0 and total + cost <= budget and gain >= 0 and gain / cost > best_rate:
                    best, best_rate = (e.name, nxt, cost), gain / cost
        if best is None:
            return choice, total
        name, nxt, cost = best
        choice[name] = nxt
        total += cost


def predicted_loss(entries: list[Entry], choice: dict[str, str]) -> float:
    return sum(e.loss.get(choice[e.name], 0.0) for e in entries)


# ----------------------------------------------------------------------------- plan files
def save_plan(path: Path, fmt: str, choice: dict[str, str], info: dict) -> None:
    from .atomic import atomic_path

    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_text(json.dumps({"format": fmt, "tensors": choice, **info}, indent=1) + "\n")


def load_plan(path, fmt: str) -> dict[str, str]:
    """A plan file's {name: format}, for a student of format `fmt` (checked against it)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise QatkitError(f"{path}: not a readable plan file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("tensors"), dict):
        raise QatkitError(f"{path}: not a qatkit plan (no 'tensors' table); write one with qatkit plan")
    if data.get("format") != fmt:
        raise QatkitError(f"{path}: a plan for the {data.get('format')} format, not {fmt}")
    return {str(k): str(v) for k, v in data["tensors"].items()}


def plan_key(path) -> str:
    """A short key of a plan file's contents (for caching what was made under it)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
