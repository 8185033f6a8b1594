"""Every setting of a QAT run, defined once.

    QATConfig    what the student is trained for: the file format and its plan
    TrainConfig  how it trains: steps, batch, learning rates, loss, checkpoints
    RunConfig    a whole run: the model, the training text, and the two above

Each field carries its command-line flag and help text as metadata (`setting`); `qatkit.cli`
generates its options from them (`add_options`) and reads them back (`from_args`), so a name,
its default and its help exist in one place. Rules that tie fields together live in the
`__post_init__`s here, and hold whatever builds a config: the CLI, the Python API, or a run
directory's config.json being resumed. A rule's message names the command-line flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from . import QatkitError
from .formats import TRAINABLE
from .plan import MOBILE_EMBEDDINGS, MOBILE_TABLES, MOBILE_WEIGHTS

QAT_FORMATS = (*TRAINABLE, "mobile")
# The default training text: technical prose and code. The held-out suite (eval/suite.py) scores
# fiction, drama, speeches and email, none of which any of these contains.
DEFAULT_TRAIN_DATA = ["pydoc", "code"]
# The default recipe's share of training sequences sampled from the teacher itself (chosen by
# benchmarks/generalize.py, see RESULTS.md); the rest is DEFAULT_TRAIN_DATA's text.
DEFAULT_DATA_FREE = 2 / 3
MOBILE_GROUP = "mobile format (ExecuTorch/XNNPACK: channel-wise weights, int8 activations)"


def setting(default=MISSING, help: str = "", *, flag: str | None = None, cli: bool = True, group: str | None = None, choices=None,
            metavar: str | None = None, default_factory=MISSING, type=None):
    """A dataclass field with its command line: `help` (the default is added to it), `flag` (by
    default --the-field-name), `cli=False` for settings only the API sets, `group` to gather
    options under a heading, `choices`, `metavar`, `type` (for an Optional field)."""
    meta = {"help": help, "flag": flag, "cli": cli, "group": group, "choices": choices, "metavar": metavar, "type": type}
    return field(default=default, default_factory=default_factory, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _flag(cls, name: str) -> str:
    return flag_of(next(f for f in fields(cls) if f.name == name))


# ------------------------------------------------------------------------------------------ QAT
@dataclass
class QATConfig:
    fmt: str = setting("q4_0", "file format the student trains for: q4_0 / q8_0 (GGUF with llama.cpp's per-tensor mix, run by llama.cpp) "
                       "or mobile (an ExecuTorch .pte; the mobile options choose its plan)", flag="--format", choices=QAT_FORMATS)
    pure: bool = setting(False, "every 2-D tensor in --format, like llama-quantize --pure (GGUF formats)")
    learn_scales: bool = setting(False, "learn the Q4_0 block scales or the mobile channel scales (LSQ-style; exported exactly)")
    freeze_embedding: bool = setting(True, "the token embedding (and a tied head) fixed at its file values", cli=False)
    settle_boundaries: bool = setting(True, "move weights off the format's rounding boundaries first (prepare.py)", cli=False)
    seed: int = setting(0, "seed of the boundary settling (the CLI passes --seed)", cli=False)
    plan: str | None = setting(None, "per-tensor plan JSON written by `qatkit plan --budget` (instead of the default mix, or of the mobile "
                               "options); for --format q4_0 or mobile", metavar="PLAN.json", type=str)
    # the mobile format's plan (qatkit.plan.mobile_plan); each is refused with a GGUF format
    mobile_weights: str = setting("int4", "Linear weights: int4 per channel, int4 in groups of 32, or int8 per channel", flag="--weights",
                                  group=MOBILE_GROUP, choices=MOBILE_WEIGHTS)
    int2: tuple[str, ...] = setting((), "Linears to store in int2 (carried in int4 codes by XNNPACK), by module-name pattern, "
                                    "e.g. '*.mlp.down_proj' 'model.layers.1[0-7].*'", group=MOBILE_GROUP, metavar="GLOB")
    int8: tuple[str, ...] = setting((), "Linears to store in int8 per channel (wins over --int2)", group=MOBILE_GROUP, metavar="GLOB")
    keep: tuple[str, ...] = setting((), "Linears to leave in float32 (wins over --int8 and --int2)", group=MOBILE_GROUP, metavar="GLOB")
    embedding: str = setting("int8", "token embedding per row, weight-only; a tied head uses the same codes", group=MOBILE_GROUP, choices=MOBILE_EMBEDDINGS)
    per_layer_embedding: str = setting("int4", "other token-lookup tables (Gemma 4's per-layer embeddings) per row, weight-only; int2 is "
                                       "stored at 2 bits (ExecuTorch's embedding_2bit)", group=MOBILE_GROUP, choices=MOBILE_TABLES)
    max_context: int = setting(512, "KV-cache length of the .pte", group=MOBILE_GROUP)
    activations: str = setting("dynamic", "int8 activations: dynamic per token (XNNPACK's qd8), or static per-tensor scales on each Linear's "
                               "input and output, calibrated on 8 training sequences and learned in QAT (the full-integer pattern NPUs "
                               "need; per-channel weights only)", group=MOBILE_GROUP, choices=("dynamic", "static"))

    def __post_init__(self):
        self.int2, self.int8, self.keep = tuple(self.int2), tuple(self.int8), tuple(self.keep)
        _choose(QATConfig, "fmt", self.fmt)
        _choose(QATConfig, "mobile_weights", self.mobile_weights)
        _choose(QATConfig, "embedding", self.embedding)
        _choose(QATConfig, "per_layer_embedding", self.per_layer_embedding)
        _choose(QATConfig, "activations", self.activations)
        if self.fmt != "mobile":
            check_gguf_fields(self.fmt, {f.name: getattr(self, f.name) for f in fields(self)})
        elif self.pure:
            raise QatkitError("--pure is llama-quantize's; the mobile plan is chosen by --weights, --int2, --int8, --keep")
        if self.learn_scales and self.fmt == "q8_0":
            raise QatkitError("--learn-scales is for --format q4_0 and mobile")
        if self.activations == "static" and "g" in self.mobile_weights:
            raise QatkitError(f"--activations static takes per-channel weights (int4, int8); XNNPACK cannot run {self.mobile_weights} with them")
        if self.max_context < 2:
            raise QatkitError(f"--max-context {self.max_context}: needs at least 2 positions")
        if self.plan is not None:
            if self.fmt not in ("q4_0", "mobile") or self.pure:
                raise QatkitError("--plan is for --format q4_0 (without --pure) or mobile")
            if not Path(self.plan).is_file():
                raise QatkitError(f"--plan {self.plan}: no such file")
            given = [flag_of(f) for f in mobile_fields() if f.name not in ("max_context", "activations") and getattr(self, f.name) != f.default]
            if given:
                raise QatkitError(f"{given[0]} and --plan both choose the plan; give one")


def mobile_fields() -> list[dataclasses.Field]:
    return [f for f in fields(QATConfig) if f.metadata.get("group") == MOBILE_GROUP]


def check_gguf_fields(fmt: str, values: dict) -> None:
    """A mobile plan's setting means nothing to a GGUF format: refuse it rather than ignore it.
    (max_context is let through: it is the KV length, harmless to a GGUF run.)"""
    for f in mobile_fields():
        if f.name != "max_context" and f.name in values and values[f.name] != f.default:
            raise QatkitError(f"{flag_of(f)} is a mobile-format option; add --format mobile (got --format {fmt})")


def _choose(cls, name: str, value) -> None:
    f = next(f for f in fields(cls) if f.name == name)
    if value not in f.metadata["choices"]:
        raise QatkitError(f"{flag_of(f)} {value!r}: choose from {', '.join(f.metadata['choices'])}")


# ------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    steps: int = setting(100, "optimizer steps")
    batch_size: int = setting(1, "sequences per micro-batch")
    seq_len: int = setting(256, "tokens per training sequence")
    grad_accum: int = setting(1, "micro-batches per step")
    lr: float = setting(1e-5, "peak learning rate of the weights (warm-up, then cosine)")
    scale_lr: float = setting(1e-5, "learning rate of the learned weight scales (with --learn-scales)")
    act_scale_lr: float = setting(1e-3, "learning rate of the static int8 activation scales' logarithms (mobile --activations static)")
    warmup_steps: int | None = setting(None, "steps of linear learning-rate warm-up (default: 5, or a tenth of --steps when that is fewer)", type=int)
    min_lr_ratio: float = setting(0.1, "the cosine ends at lr x this (1: constant lr)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    grad_clip: float = setting(1.0, "gradient norm clip")
    temperature: float = setting(1.0, "distillation temperature")
    kl_positions: float = setting(0.25, "fraction of positions where the loss is computed (the head of a large vocabulary is most of a CPU step)")
    ce_weight: float = setting(0.0, "weight of cross-entropy on the data, mixed into the KL loss")
    fq_warmup: int = setting(0, "steps before fake-quant switches on (float fine-tuning first)")
    eval_every: int = setting(50, "held-out KL every N steps (each costs two forwards of the held-out and watched sequences)")
    ckpt_every: int = setting(50, "checkpoint every N steps (the trainable tensors and AdamW state; also on Ctrl-C)")
    seed: int = setting(0, "seed of the data order, sampled positions and weight settling")
    grad_checkpointing: bool = setting(False, "recompute decoder activations in backward: less memory, one more forward pass of time")
    teacher_dtype: str = setting("float32", "the frozen teacher's weights and arithmetic: bfloat16 halves its memory and moves the distillation "
                                 "target by KL ~1e-3 on Gemma 3 270M (benchmarks/RESULTS.md); the student always trains in float32, as the file "
                                 "holds its numbers", choices=("float32", "bfloat16"))
    teacher_topk: int = setting(0, "read the teacher's top-K next-token log-probs from a disk cache filled on first use, instead of running the "
                                "teacher every step (0: off); pays off from the second pass over the same data (more epochs, resumed runs, "
                                "sweeps); the logged kl is then that top-K + rest KL at --temperature", metavar="K")
    teacher_cache_dir: str = setting("", "root of that cache (default ~/.cache/qatkit/teacher-topk; keyed by teacher, data, K and temperature)",
                                     flag="--teacher-cache", metavar="DIR")
    faithful: bool = setting(False, "the student rounds activations where llama.cpp's CPU backend does (Q8_0 inputs, f16 KV, ggml's GELU "
                             "table), straight-through in backward (GGUF formats only)")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise QatkitError(f"{_flag(TrainConfig, name)} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps is None:
            self.warmup_steps = min(5, max(1, self.steps // 10))
        if self.warmup_steps < 0:
            raise QatkitError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not 0 < self.kl_positions <= 1:
            raise QatkitError(f"--kl-positions is a fraction in (0, 1], got {self.kl_positions}")
        if self.temperature <= 0 or self.lr <= 0:
            raise QatkitError("--temperature and --lr must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise QatkitError(f"--min-lr-ratio is a fraction in [0, 1], got {self.min_lr_ratio}")
        if self.teacher_topk < 0:
            raise QatkitError(f"--teacher-topk must be >= 0 (0: no cache), got {self.teacher_topk}")
        if self.faithful and self.grad_checkpointing:
            raise QatkitError("the llama.cpp-faithful student cannot recompute its forward in backward: drop --grad-checkpointing or --faithful")


# ------------------------------------------------------------------------------------------ run
@dataclass
class RunConfig:
    model: str = setting(MISSING, "a GGUF file, a Hugging Face model directory, or the default model's name", cli=False)
    data: list[str] = setting(help="training text: files, folders, .jsonl with a 'text' field, or the named corpora 'pydoc' (CPython's reference "
                              "prose, the part never scored), 'code' (CPython's standard library source), 'shakespeare' (default: pydoc code, "
                              "mixed with sequences sampled from the teacher: see --data-free)", metavar="TEXT", default_factory=list)
    data_free: float | None = setting(None, "share of the training sequences sampled from the teacher itself (LLM-QAT; 1: no text at all), "
                                      f"sampled once and cached under ~/.cache/qatkit/teacher-samples (default: {DEFAULT_DATA_FREE:.2f} with "
                                      "the default text, 0 with --data)", metavar="SHARE", type=float)
    held_out: int = setting(4, "sequences of the training text kept aside for the held-out KL logged during training")
    qat: QATConfig = setting(cli=False, default_factory=QATConfig)
    train: TrainConfig = setting(cli=False, default_factory=TrainConfig)

    def __post_init__(self):
        self.data = [str(d) for d in self.data]
        if self.data_free is None:
            self.data_free = 0.0 if self.data else DEFAULT_DATA_FREE
        if not 0 <= self.data_free <= 1:
            raise QatkitError(f"--data-free {self.data_free}: a share of the training sequences, between 0 and 1")
        if self.held_out < 1:
            raise QatkitError(f"--held-out must be >= 1, got {self.held_out}")
        if self.train.faithful and self.qat.fmt == "mobile":
            raise QatkitError("--faithful rounds as llama.cpp does; the mobile student already rounds as XNNPACK does")

    @property
    def train_sources(self) -> list[str]:
        """The training text's sources as given (named corpora, paths); none when only sampled."""
        return [] if self.data_free >= 1 else (self.data or list(DEFAULT_TRAIN_DATA))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        d = json.loads(text)
        free = d.get("data_free", 0)
        if isinstance(free, int) and free > 1:  # earlier runs stored a count of sampled sequences (and no text)
            free = 1.0
        return cls(model=d["model"], data=d["data"], data_free=float(free), held_out=d["held_out"], qat=QATConfig(**d["qat"]), train=TrainConfig(**d["train"]))


# ---------------------------------------------------------------------------- the command line
def add_options(parser: argparse.ArgumentParser, cls, heading: str | None = None, skip: tuple[str, ...] = ()) -> None:
    """Add an option for every command-line field of `cls` (a config dataclass) to `parser`,
    under `heading` if given; fields with a `group` go under that heading instead."""
    groups: dict = {}
    main = parser.add_argument_group(heading) if heading else parser
    for f in fields(cls):
        m = f.metadata
        if not m.get("cli") or f.name in skip:
            continue
        where = main
        if m.get("group"):
            where = groups.get(m["group"]) or groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        # a default decided later (None: from other fields) stays out of the namespace, and the help says it
        kw = {"dest": f.name, "help": m["help"], "default": argparse.SUPPRESS if default is None else default}
        if isinstance(default, bool):
            kw["action"] = "store_true"
        elif isinstance(default, (tuple, list)):
            kw.update(nargs="+" if isinstance(default, tuple) else "*", metavar=m.get("metavar"))
        else:
            kw.update(type=m.get("type") or type(default), metavar=m.get("metavar"), choices=m.get("choices"))
        where.add_argument(flag_of(f), **{k: v for k, v in kw.items() if v is not None or k == "default"})


def from_args(cls, args: argparse.Namespace, **given):
    """`cls` built from the parsed options of its command-line fields (those the parser has),
    plus `given` (the fields the command sets itself)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.metadata.get("cli") and hasattr(args, f.name)}
    return cls(**{**values, **given})
