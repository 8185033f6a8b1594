"""The mobile format: channel-wise integer weights with bf16 scales, int8 activations per token.

What phone CPUs (XNNPACK's qd8 x qc4w / qc8w kernels, via ExecuTorch) compute with, defined
once here; fake-quant (training), convert and the ExecuTorch exporter all call these functions.

Weights, symmetric, b bits (b = 2, 4 or 8), codes q in [-2^(b-1), 2^(b-1) - 1], one scale per
output channel (row) or per group of `group` weights along the row:

    s     = bf16 scale (chosen by `weight_scale`, or learned)
    q     = clamp(round_half_even(w / float32(s)), qmin, qmax)     (one float32 division)
    value = q * float32(s)

XNNPACK stores the scale in bf16 and its kernels widen it exactly, so the scale is a bf16 number
from the start; a float32 scale would be rounded by the runtime after training (measured: the
.pte then drifts from the trained model by 1e-2). int2 weights are carried as int4 codes in
[-2, 1] where the runtime has no 2-bit kernel: the numbers are exact, the size is int4's.

The scale `weight_scale` picks minimises the squared error of each row (or group) over a grid
of candidates between 0.5 and 1.1 times amax / qmax (amax / 1.5 at 2 bits), plus torchao's own
choice amax / ((qmax - qmin) / 2), so it is never worse than torchao's PTQ; the search matters
most at 2 bits.

Activations, int8 asymmetric per token (each row of the input), dynamic, computed the way
XNNPACK computes them at run time (not torchao's reference formula): see `act_qparams`.

Embeddings: weight-only, b = 4 or 8 bits per row, the same rule as the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ._ste import straight_through

SCALE_DTYPE = torch.bfloat16
_EPS = torch.finfo(torch.float32).smallest_normal


@dataclass(frozen=True)
class WeightSpec:
    """How one tensor is stored: `bits` per weight, one scale per row (group=None) or per group."""

    bits: int
    group: int | None = None

    def __post_init__(self):
        if self.bits not in (2, 4, 8):
            raise ValueError(f"mobile weights are 2, 4 or 8 bits, not {self.bits}")
        if self.group is not None and self.group < 1:
            raise ValueError(f"group size must be >= 1, got {self.group}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f"g{self.group}" if self.group else "")

    def group_size(self, width: int) -> int:
        return width if self.group is None else self.group

    def fits(self, width: int) -> bool:
        return self.group is None or width % self.group == 0

    def storage_bits(self) -> int:
        """Bits per weight in the runtime's file (int2 rides in int4 codes)."""
        return 8 if self.bits == 8 else 4


def parse_spec(name: str) -> WeightSpec:
    """'int4' -> per channel, 'int4g32' -> groups of 32, 'int2', 'int8'."""
    m = re.fullmatch(r"int(\d)(?:g(\d+))?", name)
    if not m:
        raise ValueError(f"unknown mobile weight scheme {name!r} (examples: int4, int4g32, int2, int8)")
    return WeightSpec(int(m[1]), int(m[2]) if m[2] else None)


def _grouped(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"mobile weights are 2-D (out, in), got shape {tuple(w.shape)}")
    g = spec.group_size(w.shape[1])
    if w.shape[1] % g:
        raise ValueError(f"{spec.name} needs rows whose length is a multiple of {g}, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], w.shape[1] // g, g)


def _codes(wg: torch.Tensor, s: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Grouped float32 weights (rows, groups, g) and float32 scales (rows, groups) -> float codes."""
    return torch.clamp(torch.round(wg / s.unsqueeze(-1)), spec.qmin, spec.qmax)


_CANDIDATES = torch.linspace(0.5, 1.1, 25).tolist()


# Every op below is row by row: a large tensor goes through in blocks of rows, so that its float
# temporaries stay small (Gemma's 262k x 640 table at once took ~1.7 GB of them; E2B's is larger).
BLOCK_ROWS = 8192


def _blocks(rows: int):
    return [(a, min(a + BLOCK_ROWS, rows)) for a in range(0, rows, BLOCK_ROWS)]


def weight_scale(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """bf16 scales (rows, groups) that minimise the squared quantization error of each group."""
    if w.dim() == 2 and w.shape[0] > BLOCK_ROWS:
        return torch.cat([_weight_scale(w[a:b], spec) for a, b in _blocks(w.shape[0])])
    return _weight_scale(w, spec)


def _weight_scale(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    wg = _grouped(w.detach().float(), spec)
    amax = wg.abs().amax(-1)
    base = amax / spec.qmax if spec.bits > 2 else amax / 1.5  # int2: {-2,-1,0,1}, 1.5 centres the grid
    plain = amax / ((spec.qmax - spec.qmin) / 2)  # torchao's rule, a candidate too: never worse
    best_s = torch.clamp(plain, min=_EPS).to(SCALE_DTYPE)
    best_err = torch.full_like(amax, float("inf"))
    for cand in [plain] + [base * f for f in _CANDIDATES]:
        s = torch.clamp(cand, min=_EPS).to(SCALE_DTYPE)
        s32 = s.float()
        err = ((_codes(wg, s32, spec) * s32.unsqueeze(-1) - wg) ** 2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    return best_s


def quantize_weight(w: torch.Tensor, spec: WeightSpec, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) float -> (codes int8 (out, in), scales bf16 (out, groups)). `scale` passes
    given (learned) scales; they are rounded to bf16 first, as the runtime stores them."""
    if scale is None:
        scale = weight_scale(w, spec)
    s = scale.detach().to(SCALE_DTYPE)
    w = w.detach()
    if s.shape != _grouped(w, spec).shape[:2]:
        raise ValueError(f"scales of shape {tuple(s.shape)} do not fit weights {tuple(w.shape)} as {spec.name}")
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for a, b in _blocks(w.shape[0]):
        codes[a:b] = _codes(_grouped(w[a:b].float(), spec), s[a:b].float(), spec).reshape(b - a, -1).to(torch.int8)
    return codes, s


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """(codes int8 (out, in), scales bf16 (out, groups)) -> float32 values."""
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    for a, b in _blocks(codes.shape[0]):
        out[a:b] = (_grouped(codes[a:b].float(), spec) * scale[a:b].float().unsqueeze(-1)).reshape(b - a, -1)
    return out


def holds(codes: torch.Tensor, scale: torch.Tensor, spec: WeightSpec, w: torch.Tensor) -> bool:
    """Whether `w` is exactly the values of (codes, scale), compared block by block."""
    return all(torch.equal(dequantize_weight(codes[a:b], scale[a:b], spec), w[a:b].detach().float()) for a, b in _blocks(codes.shape[0]))


def learned_fake_quant_weight(w: torch.Tensor, s: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """dequantize(quantize(w, s)) with LSQ gradients for learned scales `s` (rows, groups):
    d/ds = q - w/s inside the grid and q where w is clipped; d/dw = 1 inside, 0 where clipped.
    The forward rounds s to bf16 first, exactly as `quantize_weight` does."""
    _grouped(w, spec)  # shape checks
    return _LearnedScale.apply(w, s, spec.qmin, spec.qmax, spec.group_size(w.shape[1]))


class _LearnedScale(torch.autograd.Function):
    @staticmethod
    def _grid(w, s16, qmin, qmax, g):
        x = w.float().reshape(w.shape[0], -1, g) / s16.unsqueeze(-1)
        return x, torch.clamp(torch.round(x), qmin, qmax)

    @staticmethod
    def forward(ctx, w, s, qmin: int, qmax: int, g: int):
        s16 = s.detach().to(SCALE_DTYPE).float()
        _, q = _LearnedScale._grid(w.detach(), s16, qmin, qmax, g)
        ctx.save_for_backward(w, s16)  # x and q are recomputed: they would cost 8 bytes a weight
        ctx.grid = (qmin, qmax, g)
        return (q * s16.unsqueeze(-1)).reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, s16 = ctx.saved_tensors
        qmin, qmax, g = ctx.grid
        x, q = _LearnedScale._grid(w.detach(), s16, qmin, qmax, g)
        inside = (x >= qmin - 0.5) & (x <= qmax + 0.5)
        gr = grad.float().reshape(x.shape)
        grad_w = torch.where(inside, gr, torch.zeros_like(gr)).reshape(grad.shape).to(grad.dtype)
        grad_s = (gr * torch.where(inside, q - x, q)).sum(-1)
        return grad_w, grad_s, None, None, None


# ------------------------------------------------------------------------------ activations
def act_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) asymmetric int8 parameters exactly as XNNPACK computes them at run
    time (its f32 -> qd8 conversion), all in float32:

        lo = min(min(x), 0), hi = max(max(x), 0)           (the range always holds 0)
        m  = 255 / (hi - lo), or 1 where hi == lo          (a multiplier; one IEEE division)
        zero point: from whichever end leaves the smaller error,
            z = -128 - lo*m  if (-128 + lo*m) + (127 + hi*m) > 0  else  127 - hi*m
            zp = round_half_even(clamp(z, -128, 127))
        the matrix kernel then scales the integer dot products by 1 / m.

    torchao's graph (scale = (hi - lo) / 255, zero point from the min side) is the same formula
    rounded differently: its codes differ on exact ties and its scale by an ulp in a fifth of
    rows, so the student follows the runtime. Returns (m, zp), each (..., 1)."""
    xf = x.detach().float()
    lo = torch.clamp(xf.amin(-1, keepdim=True), max=0.0)
    hi = torch.clamp(xf.amax(-1, keepdim=True), min=0.0)
    # torch computes `255.0 / t` as 255 * (1 / t), two roundings: divide a full tensor instead
    m = torch.where(lo == hi, torch.ones_like(lo), torch.full_like(lo, 255.0) / (hi - lo))
    dlo, dhi = lo * m, hi * m
    z = torch.where((-128.0 + dlo) + (127.0 + dhi) > 0, -128.0 - dlo, 127.0 - dhi)
    return m, torch.round(torch.clamp(z, -128, 127))


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., n) -> (codes int8, multiplier m float32 (..., 1), zero point float (..., 1)):
    q = clamp(round_half_even(x * m) + zp, -128, 127) (rounded before the zero point is added)."""
    m, zp = act_qparams(x)
    q = torch.clamp(torch.round(x.detach().float() * m) + zp, -128, 127)
    return q.to(torch.int8), m, zp


def dequantize_act(q: torch.Tensor, m: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """(q - zp) * (1 / m): the value the runtime's integer dot product stands for."""
    return (q.float() - zp) * (torch.ones_like(m) / m)


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """What the runtime's int8 dynamic quantization leaves of x, straight-through gradient."""
    return straight_through(x, dequantize_act(*quantize_act(x)).to(x.dtype))


# ----------------------------------------------------------------- static activations (int8)
# The second activation mode: a fixed, learned int8 scale per tensor on the input *and* the
# output of each Linear (zero point 0), the full-integer pattern NPUs need. XNNPACK runs it as one
# qs8 fully-connected operator (input qint8, weights qcint8 / qcint4 per channel, output qint8);
# it takes per-channel weights only, not groups. Measured against the .pte (executorch 1.5.1,
# x86), these are its numbers bit for bit, all float32:
#
#     x_q  = clamp(round_half_even(x * (1 / s_x)), -128, 127)          (times the reciprocal)
#     b_q  = round_half_even(b * (1 / (s_w[c] * s_x)))                 (int32 bias, at lowering)
#     acc  = sum_k x_q * w_q[c, k] + b_q[c]                            (exact integers)
#     r_c  = (s_x * s_w[c]) / s_y                                      (in this order)
#     y_q  = clamp(round_half_even(acc * r_c), -128, 127)
#     y    = y_q * s_y
#
# XNNPACK refuses r_c >= 256 when the program loads (`STATIC_MAX_REQUANT`).

STATIC_QMAX = 127
STATIC_MAX_REQUANT = 256.0


def _recip(s: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(s) / s  # one IEEE division (torch's 1.0 / t is two roundings)


def static_codes(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Float codes of x under a static int8 scale s (a float32 scalar tensor)."""
    return torch.clamp(torch.round(x.float() * _recip(s.float())), -128, STATIC_QMAX)


def requant_scale(s_in: torch.Tensor, w_scale: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """r_c = (s_x * s_w[c]) / s_y in float32, in the runtime's order (must stay < 256)."""
    return (s_in.float() * w_scale.float()) / s_out.float()


def static_linear(x: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  s_in: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """What the runtime's static int8 Linear returns (see above). codes: int (out, in);
    w_scale: float32 (out,) per channel; s_in, s_out: float32 scalars."""
    s_in, s_out, sw = s_in.detach().float(), s_out.detach().float(), w_scale.detach().float()
    xq = static_codes(x.detach(), s_in)
    wq = codes.float()
    # integer sums are exact in float32 below 2^24 whatever the order; int8 weights can pass it
    exact32 = 128 * float(wq.abs().max()) * wq.shape[1] < 2**24
    acc = torch.nn.functional.linear(xq, wq) if exact32 else torch.nn.functional.linear(xq.double(), wq.double()).float()
    if bias is not None:
        acc = acc + torch.round(bias.detach().float() * _recip(sw * s_in))
    return torch.clamp(torch.round(acc * requant_scale(s_in, sw, s_out)), -128, STATIC_QMAX) * s_out


def learned_fake_quant_static(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x_q * s with LSQ gradients for the learned scalar scale s (straight-through for x inside
    the grid): the float path whose gradients train a static Linear."""
    return _StaticLSQ.apply(x, s)


class _StaticLSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s):
        s32 = s.detach().float()
        q = static_codes(x.detach(), s32)
        ctx.save_for_backward(x, s32)
        return (q * s32).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, s32 = ctx.saved_tensors
        v = x.float() * _recip(s32)
        q = torch.clamp(torch.round(v), -128, STATIC_QMAX)
        inside = (v >= -128.5) & (v <= STATIC_QMAX + 0.5)
        g = grad.float()
        grad_x = torch.where(inside, g, torch.zeros_like(g)).to(grad.dtype)
        grad_s = (g * torch.where(inside, q - v, q)).sum().reshape(s32.shape)
        return grad_x, grad_s


def static_scale(samples: torch.Tensor) -> torch.Tensor:
    """The float32 scale that minimises the squared int8 error of `samples` (a 1-D sample of a
    tensor's values) over a grid of clipping ratios of its absolute maximum."""
    v = samples.detach().float().flatten()
    amax = float(v.abs().max()) if v.numel() else 0.0
    if amax == 0.0:
        return torch.tensor(1.0)
    best, best_err = None, float("inf")
    for f in torch.linspace(0.05, 1.0, 40).tolist():
        s = torch.tensor(amax * f / STATIC_QMAX, dtype=torch.float32)
        err = float(((static_codes(v, s) * s - v) ** 2).sum())
        if err < best_err:
            best, best_err = s, err
    return best
