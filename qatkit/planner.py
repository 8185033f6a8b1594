"""The budget planner's measurements and driver: `qatkit plan` (the sizes, the knapsack and the
plan files are `qatkit.budget`'s).

The loss of each choice is the KL (teacher || model) rise on the second half of a 256-token
sequence of the default training text (not the user's evaluation text) when that tensor alone is
stored at the lower format and every other one at the highest (torch, through qatkit's exact
fake-quant of the format; mobile: weights only). Without weights, `budget.prior_losses`.

The whole file's bytes: a GGUF's header is built from the model's metadata (exact). A mobile
program's bytes around its weights (its instructions, XNNPACK's serialized graphs, the exporter's
constants, the .ptd's header, alignment) are not a sum the planner can do: they are measured, by
exporting the untrained program of a plan with the same lookup-table formats (`mobile_program_bytes`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from . import QatkitError
from .budget import Entry, check_reachable, fit, human, inventory, predicted_loss, prior_losses
from .formats import FORMATS
from .plan import skeleton

log = logging.getLogger(__name__)


def _weights(model: nn.Module, arch, fmt: str) -> dict[str, torch.Tensor]:
    """{entry name: the Parameter's data} for the entries the planner chooses formats for."""
    from .models.arch import gguf_name

    out = {}
    for hf, p in model.named_parameters():  # a tied head is the embedding's Parameter, listed once
        if fmt == "mobile":
            name = hf.removesuffix(".weight")
        else:
            name = gguf_name(arch, hf)
        if name is not None and p.dim() >= 2:
            out[name] = p.data
    return out


def fake_quant(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """What format `fmt` leaves of w (qatkit's exact numerics; mobile: weights only)."""
    if fmt in FORMATS:
        return FORMATS[fmt].fake_quant(w.reshape(-1, w.shape[-1])).reshape(w.shape)
    from .formats import mobile

    spec = mobile.parse_spec(fmt)
    return mobile.dequantize_weight(*mobile.quantize_weight(w.reshape(-1, w.shape[-1]), spec), spec).reshape(w.shape)


@torch.no_grad()
def measure_losses(entries: list[Entry], model: nn.Module, arch, fmt: str, ids: torch.Tensor, progress: bool = True) -> str:
    """KL rise of each lower choice, one tensor at a time (see the module text). `ids`: [1, T]
    held-out token ids. Restores the model's weights."""
    from .progress import bar

    weights = _weights(model, arch, fmt)
    chosen = [e for e in entries if len(e.levels) > 1]
    missing = [e.name for e in chosen if e.name not in weights]
    if missing:
        raise QatkitError(f"no weight found for {missing[0]} (and {len(missing) - 1} more)")
    model.eval()
    keep = max(1, ids.shape[1] // 2)  # KL on the second half of the sequence: the head (262k rows on Gemma) runs on those only
    ref = torch.log_softmax(model(ids, logits_to_keep=keep).logits.float(), -1)
    originals = {e.name: weights[e.name].clone() for e in chosen}

    def kl() -> float:
        lp = torch.log_softmax(model(ids, logits_to_keep=keep).logits.float(), -1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    try:
        for e in chosen:
            weights[e.name].copy_(fake_quant(originals[e.name], e.levels[-1]))
        base = kl()
        for e in bar(chosen, desc="sensitivity", unit="tensor", disable=not progress):
            e.loss = {e.levels[-1]: 0.0}
            for f in e.levels[:-1]:
                weights[e.name].copy_(fake_quant(originals[e.name], f))
                e.loss[f] = max(kl() - base, 0.0)
            weights[e.name].copy_(fake_quant(originals[e.name], e.levels[-1]))
    finally:
        for name, w in originals.items():
            weights[name].copy_(w)
    for e in entries:
        if len(e.levels) == 1:
            e.loss = {e.levels[0]: 0.0}
    return (f"measured: KL rise on the last {keep} of {ids.shape[1]} tokens, one tensor lowered at a time, the others at their "
            f"highest format (base KL {base:.4f})")


# ----------------------------------------------------------------------- the mobile program
def mobile_program_bytes(source, model: nn.Module, tokenizer, entries: list[Entry], choice: dict[str, str], measured: dict) -> int:
    """Bytes a mobile program of the plan `choice` holds besides its planned weights, measured: the
    untrained program of a plan with the same lookup-table formats and every Linear at its lowest
    is exported (what `qatkit export MODEL --format mobile --plan` writes) and the weights' bytes
    subtracted. They depend on the tables' formats (which lookup operators the program calls, the
    nibble flip of an int4 tied table, how many pieces the tied head is cut into), not on the
    Linears' (int4 and int8 are the same XNNPACK operator, its types fixed-width fields): one
    export per combination of table formats, kept in `measured` and in the model's cache folder
    (keyed by qatkit's and ExecuTorch's versions and the exporter's source). The programs'
    provenance holds the plan's digest, of fixed length; a trained program adds its training
    record."""
    import hashlib
    import json
    import tempfile
    from importlib.metadata import version

    from . import __version__
    from .atomic import atomic_path
    from .budget import save_plan
    from .config import QATConfig
    from .export import executorch as exporter
    from .targets.executorch import ptq_program

    tables = sorted((e.name, choice[e.name]) for e in entries if e.kind == "table")
    code = hashlib.sha256(Path(exporter.__file__).read_bytes()).hexdigest()[:12]  # a changed exporter is measured again
    key = f"qatkit {__version__} (exporter {code}), executorch {version('executorch')}: " + ", ".join(f"{n}={f}" for n, f in tables)
    kept = source.cache_dir / "mobile-program-bytes.json"
    if not measured and kept.exists():
        try:
            measured.update(json.loads(kept.read_text()))
        except ValueError:
            pass  # a damaged cache is measured again
    if key not in measured:
        log.info("measuring the program around the weights: exporting the untrained program with tables %s", ", ".join(f for _, f in tables))
        plan = {e.name: choice[e.name] if e.kind == "table" else e.levels[0] for e in entries}
        with tempfile.TemporaryDirectory(prefix="qatkit-plan-") as d:
            save_plan(Path(d) / "plan.json", "mobile", plan, {})
            info = ptq_program(source, model, tokenizer, QATConfig(fmt="mobile", plan=str(Path(d) / "plan.json")), Path(d) / "program.pte")
        measured[key] = info["file_bytes"] - sum(e.options[plan[e.name]] for e in entries)
        with atomic_path(kept) as tmp:
            Path(tmp).write_text(json.dumps(measured, indent=1) + "\n")
    return measured[key]


def fit_mobile_program(entries: list[Entry], budget: int, program) -> tuple[dict[str, str], int, int]:
    """The knapsack with the program's measured bytes (`program(choice)`) in the budget: fit with
    the largest program measured so far, measure the chosen plan's, and fit again while the file
    would exceed the budget (each round raises the assumed program, so it ends). Returns the
    choice, the whole file's bytes and the program's."""
    lowest = {e.name: e.levels[0] for e in entries}
    overhead = program(lowest)
    check_reachable(entries, budget, overhead)
    while True:
        try:
            choice, _ = fit(entries, budget, overhead)
        except QatkitError:  # a larger program than the lowest plan's leaves only the lowest plan
            choice = lowest
        own = program(choice)
        total = own + sum(e.options[choice[e.name]] for e in entries)
        if total <= budget:
            return choice, total, own
        overhead = own


# ------------------------------------------------------------------------------------ driver
SENSITIVITY_TOKENS = 256


def plan_budget(spec: str, budget: int, fmt: str = "q4_0", text_only: bool = False, sizes_only: bool = False, progress: bool = True) -> dict:
    """Plan MODEL (a name, GGUF, model directory, or a config.json alone) into `budget` bytes.
    Returns the entries, the choice, the bytes and how the losses were got."""
    from .models import load as loading
    from .models.arch import arch_for_config

    path = Path(spec)
    config_only = path.suffix == ".json" or (path.is_dir() and not any(path.glob("*.safetensors")) and (path / "config.json").exists())
    model = tokenizer = source = None
    if config_only:
        config = loading.read_config(path)
        text = config.get_text_config()
        if text is not config and not text_only:
            raise QatkitError(f"{spec}: a multimodal {config.model_type} config; qatkit plans its language model: add --text-only")
        model, arch = skeleton(text), arch_for_config(text)
        sizes_only = True
    else:
        source = loading.resolve(spec)
        arch = source.arch
        if sizes_only:
            model = skeleton(loading.read_config(source.hf_dir / "config.json"))
        else:
            model, tokenizer = loading.load(source)
    entries = inventory(model, arch, fmt)
    overhead, overhead_note = 0, "weights only"
    if fmt == "q4_0" and tokenizer is not None:
        from .export.gguf import file_bytes, file_metadata

        lowest = {e.name: e.levels[0] for e in entries}
        overhead = file_bytes(file_metadata(source, model, tokenizer, lowest), lowest, {e.name: e.shape for e in entries}, "q4_0") - sum(e.options[e.levels[0]] for e in entries)
        overhead_note = "the whole file: header, metadata and tensor table included (exact)"
    elif fmt == "q4_0":
        overhead_note = "tensor data only (the header needs the tokenizer: load the model, not its config, for the whole file)"
    elif fmt == "mobile":
        overhead_note = "weights only: the program and its tokenizer file come on top"
    program = None
    if fmt != "mobile" or tokenizer is None:
        check_reachable(entries, budget, overhead)  # an impossible budget is refused before any measuring
    else:  # the smallest file a refusal names includes its program
        from .runtime.executorch import require_executorch

        require_executorch()
        measured: dict = {}

        def program(choice: dict[str, str]) -> int:
            return mobile_program_bytes(source, model, tokenizer, entries, choice, measured)

        check_reachable(entries, budget, program({e.name: e.levels[0] for e in entries}))  # before the losses are measured
        overhead_note = ("the whole .pte and .ptd of `qatkit export --format mobile --plan` (exact: the program around the weights measured "
                         "by exporting it; a trained program adds its training record; the tokenizer file comes on top)")
    if sizes_only:
        how = prior_losses(entries)
    else:
        from .train.data import default_train_texts, pack

        ids = pack(tokenizer, default_train_texts(), SENSITIVITY_TOKENS, vocab_size=model.config.vocab_size)[-1:]
        how = measure_losses(entries, model, arch, fmt, ids, progress) + " (the last sequence of the default training text)"
    if program is not None:
        choice, total, overhead = fit_mobile_program(entries, budget, program)
    else:
        choice, total = fit(entries, budget, overhead)
    return {"entries": entries, "choice": choice, "bytes": total, "overhead": overhead, "overhead_note": overhead_note, "losses": how,
            "budget": budget, "format": fmt, "params": sum(e.numel for e in entries), "model": spec}


def describe(r: dict) -> str:
    """The plan as a table: per format, the tensors, elements and bytes; then totals."""
    entries, choice = r["entries"], r["choice"]
    lines = [f"{r['model']}: {r['format']} plan for a budget of {human(r['budget'])} ({r['overhead_note']})",
             f"losses: {r['losses']}", "",
             f"{'format':<8} {'tensors':>8} {'params':>14} {'bytes':>15} {'bits/param':>11}  examples"]
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(choice[e.name], []).append(e)
    for fmt, es in sorted(groups.items(), key=lambda kv: -sum(e.options[kv[0]] for e in kv[1])):
        n = sum(e.numel for e in es)
        b = sum(e.options[fmt] for e in es)
        ex = ", ".join(e.name for e in es[:3]) + (", ..." if len(es) > 3 else "")
        lines.append(f"{fmt:<8} {len(es):>8} {n:>14,} {b:>15,} {8 * b / max(n, 1):>11.3f}  {ex}")
    if r["format"] == "mobile" and r["overhead"]:
        lines.append(f"{'program':<8} {'':>8} {'':>14} {r['overhead']:>15,} {'':>11}  instructions, XNNPACK's graphs, RoPE and norm constants (measured)")
    lo = r["overhead"] + sum(e.options[e.levels[0]] for e in entries)
    hi = r["overhead"] + sum(e.options[e.levels[-1]] for e in entries)
    params = f"{r['params'] / 1e9:.3f}B" if r["params"] >= 1e8 else f"{r['params'] / 1e6:.3f}M"
    lines += ["", f"planned: {r['bytes']:,} bytes ({human(r['bytes'])}) = {8 * r['bytes'] / r['params']:.3f} bits per parameter "
              f"over {params} parameters; predicted loss {predicted_loss(entries, choice):.4g}",
              f"reachable in this format: {human(lo)} (every tensor at its lowest) to {human(hi)} (every tensor at its highest)"
              + (" with this plan's program (each table format's differs by a few kB)" if r["format"] == "mobile" and r["overhead"] else "")]
    return "\n".join(lines)
