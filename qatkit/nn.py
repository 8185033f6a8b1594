"""Fake-quantized modules: a Linear whose weight passes through a format's exact quantizer.

`FakeQuantLinear.from_linear(linear, fmt)` reuses the Linear's own weight Parameter (the
optimizer keeps training the float "latent" weight); the forward multiplies by
dequantize(quantize(weight)) from qatkit.formats, the very function the exporter calls, so the
trained numbers are the exported numbers. `to_linear()` goes back.

Mobile schemes ('int4', 'int4g32', 'int2', 'int8'; qatkit.formats.mobile) also quantize the
Linear's input to int8 per token, as the phone runtime does, and always carry their bf16 scales
(a buffer, or a Parameter when learned), chosen once at prepare time by a squared-error search.
With static activations (`act="static"`) the input and the output instead take fixed int8
scales per tensor, learned (as logarithms, so that Adam's steps are relative) after a
calibration pass sets them (`observe`); the forward's value is the runtime's integer formula
(`mobile.static_linear`), its gradients those of the float fake-quant path.

Learned scales (LSQ-style, Q4_0 only): Q4_0 stores any fp16 d per block of 32, so a learned d
exports exactly. The scale starts at ggml's own choice (max / -8) and trains with the gradient

    d out / d d = (q - 8) - w / d     inside the grid  (the rounding error, as in LSQ)
                = (q - 8)             where w is clipped to the grid's end

while the weight's gradient passes straight through inside the grid and stops where clipped
(`formats/q4_0.learned_fake_quant`; every format question goes to the registry in formats/).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import QatkitError
from .formats import TRAINABLE, get, mobile
from .formats._ste import straight_through
from .models.gemma4 import EXPERT_WEIGHTS

WEIGHT_FORMATS = TRAINABLE  # the GGUF formats with a training-time fake-quant (formats registry)
OBSERVE_PER_CALL = 1 << 15  # values of each input and output a calibrating forward keeps


def _sample(t: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    flat = t.detach().flatten()
    if flat.numel() > n:
        flat = flat[torch.randint(flat.numel(), (n,), generator=gen).to(flat.device)]
    return flat.float().cpu()


def is_mobile(fmt: str) -> bool:
    """True for a mobile weight scheme name such as 'int4', 'int4g32', 'int2', 'int8'."""
    try:
        mobile.parse_spec(fmt)
    except ValueError:
        return False
    return True


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose forward uses the quantized weight of `fmt` ('q4_0', 'q8_0', or a mobile
    scheme, which also quantizes the input to int8 per token).

    `enabled` False makes it a plain Linear (fake-quant switched on after warm-up steps)."""

    fmt: str
    enabled: bool
    spec: mobile.WeightSpec | None = None
    act: str = "dynamic"  # mobile schemes: "dynamic" int8 per token, or "static" per tensor
    observed: list | None = None  # a list while calibrating: (input, output) samples are appended

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, learn_scales: bool = False, scale: torch.Tensor | None = None, act: str = "dynamic") -> "FakeQuantLinear":
        """`scale`: a mobile scheme's starting scales (rows, groups), instead of searching them.
        act: a mobile scheme's activations, "dynamic" or "static" (scales set by calibration)."""
        if fmt not in WEIGHT_FORMATS and not is_mobile(fmt):
            raise ValueError(f"fake-quant format {fmt!r} is not one of {WEIGHT_FORMATS} or a mobile scheme (int4, int4g32, int2, int8)")
        if learn_scales and not is_mobile(fmt) and not get(fmt).learnable_scales:
            raise ValueError(f"learned scales are for q4_0 and the mobile schemes, not {fmt!r}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight  # the same Parameter: optimizers and ties keep working
        new.bias = linear.bias
        new.fmt, new.enabled = fmt, True
        if act not in ("dynamic", "static") or (act == "static" and not is_mobile(fmt)):
            raise ValueError(f"activations {act!r}: dynamic or static, static for the mobile schemes only")
        if is_mobile(fmt):
            new.spec = mobile.parse_spec(fmt)
            if not new.spec.fits(new.in_features):
                raise ValueError(f"{fmt} needs rows whose length is a multiple of {new.spec.group}, got {new.in_features}")
            if act == "static":
                if new.spec.group is not None:
                    raise ValueError(f"static int8 activations take per-channel weights; XNNPACK cannot run {fmt} with them")
                new.act = "static"
                new.act_log_scale = nn.Parameter(torch.full((2,), float("nan")))  # (input, output): calibrate first
            with torch.no_grad():
                s = (mobile.weight_scale(linear.weight, new.spec) if scale is None else scale.detach()).float().clone()
            if learn_scales:
                new.scale = nn.Parameter(s)
            else:
                new.register_buffer("scale", s)
        elif learn_scales:
            with torch.no_grad():
                d = get(fmt).initial_scales(linear.weight)
            new.scale = nn.Parameter(d)
        else:
            new.scale = None
        return new

    def quantized_weight(self) -> torch.Tensor:
        if self.spec is not None:
            if self.weight.requires_grad or isinstance(self.scale, nn.Parameter):
                return mobile.learned_fake_quant_weight(self.weight, self.scale, self.spec)
            # frozen weight and scales (a tied head over a 262k vocabulary): quantize once
            key = (self.weight.data_ptr(), self.weight._version, self.scale._version, self.weight.device)
            if getattr(self, "_frozen_key", None) != key:
                with torch.no_grad():
                    self._frozen = mobile.learned_fake_quant_weight(self.weight, self.scale, self.spec)
                self._frozen_key = key
            return self._frozen
        if self.scale is not None:
            return get(self.fmt).learned_fake_quant(self.weight, self.scale)
        return get(self.fmt).fake_quant(self.weight)

    @torch.no_grad()
    def follow_scale_cut_(self) -> int:
        """Learned Q4_0 scales: write the cut the quantizer applies (formats/q4_0.py,
        "Re-quantization") into the parameter, so that it does not drift above the value that
        acts; returns the number of blocks cut. Under FSDP2 both tensors are split by rows
        alike, so each process cuts its own rows."""
        if self.spec is not None or not isinstance(self.scale, nn.Parameter):
            return 0
        w, d = (getattr(t, "_local_tensor", t) for t in (self.weight, self.scale))
        settled, cut = get(self.fmt).requantizable_scales(w, d)
        d.copy_(settled)
        return int(cut.sum())

    def act_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The static (input, output) int8 scales, float32: the numbers the .pte is given."""
        if not torch.isfinite(self.act_log_scale).all():
            raise QatkitError("static activation scales are not calibrated: run qatkit.prepare.calibrate_static first")
        s = self.act_log_scale.float().exp()
        return s[0], s[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        if self.act == "static":
            return self._static_forward(x)
        if self.spec is not None:
            x = mobile.fake_quant_act(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def _static_forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        if self.observed is not None:  # calibrating: float activations, a sample of them recorded
            y = F.linear(x, w, self.bias)
            gen = torch.Generator().manual_seed(len(self.observed))
            self.observed.append(tuple(_sample(t, OBSERVE_PER_CALL, gen) for t in (x, y)))
            return y
        s_in, s_out = self.act_scales()
        plain = mobile.learned_fake_quant_static(F.linear(mobile.learned_fake_quant_static(x, s_in), w, self.bias), s_out)
        with torch.no_grad():
            sw = self.scale.detach().to(mobile.SCALE_DTYPE).float()  # (rows, 1)
            codes = torch.round(w.detach().float() / sw)  # exact: w = codes * sw
            exact = mobile.static_linear(x, codes, sw[:, 0], self.bias, s_in, s_out)
        return straight_through(plain, exact.to(plain.dtype))

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        learned = ", learned scales" if isinstance(self.scale, nn.Parameter) else ""
        if self.spec is not None:
            learned += ", static int8 activations" if self.act == "static" else ", int8 activations per token"
        return f"{super().extra_repr()}, fmt={self.fmt}{learned}, enabled={self.enabled}"


# ------------------------------------------------------------------------------- MoE experts


class FakeQuantExperts:
    """Fake-quant for a module of MoE experts held as 3-D Parameters (Gemma 4's
    Gemma4TextExperts: gate_up_proj (E, 2I, H), down_proj (E, H, I)), installed on the module
    itself: its forward runs with every expert's weight through the file format's quantizer,
    row by row along the last dimension, which is the block layout ggml stores a 3-D tensor in.
    Each weight is fake-quantized once per forward (the experts' loop then indexes it), the
    Parameters keep their names (checkpoints and the exporter see nothing new), and the gradient
    reaches them straight through. `remove()` takes it off again."""

    def __init__(self, module: nn.Module, fmt: str):
        self.module, self.fmt, self.enabled = module, fmt, True
        self._inside = False
        self._original = module.forward
        module.forward = self.forward  # an instance attribute: the class's forward stays as it is
        module.qat = self

    def forward(self, *args, **kwargs):
        if self._inside or not self.enabled:
            return self._original(*args, **kwargs)
        weights = {n: get(self.fmt).fake_quant(getattr(self.module, n)) for n in EXPERT_WEIGHTS}
        self._inside = True
        try:  # functional_call runs the module's own forward (back here: the flag sends it on) with these weights
            return torch.func.functional_call(self.module, weights, args, kwargs, strict=False)
        finally:
            self._inside = False

    def remove(self) -> None:
        del self.module.forward
        del self.module.qat
