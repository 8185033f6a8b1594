"""report.md and PNG plots of a `qatkit run`, from report.json's figures and the metrics log, for
any target: the runtime, file kind, labels and plan are the target's own words in the report
(`Target.about`); what a target did not measure (a per-layer view, load memory) is left out.

- training.png: distillation loss and KL per step, held-out KL at each evaluation, and the PTQ
  level (the held-out KL of the untrained student, which quantizes exactly as PTQ does);
- layers.png (GGUF): per-layer relative output error of every quantized linear, PTQ vs QAT, on
  teacher activations of held-out text;
- size_ppl.png: file size vs the runtime's perplexity of the three files (geometric mean over the
  held-out domains);
- domains.png: per held-out domain, the share of PTQ's perplexity gap closed and the KLD of PTQ
  and QAT to the teacher; in-domain domains hatched and left out of the headline mean.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .atomic import atomic_path, write_text

log = logging.getLogger(__name__)

COLORS = {"teacher": "tab:gray", "ptq": "tab:red", "qat": "tab:blue"}


def plot_training(rows: list[dict], path: Path) -> None:
    steps = [r for r in rows if r["step"] >= 0]
    evals = [r for r in rows if "held_out_kl" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot([r["step"] + 1 for r in steps], [r["kl"] for r in steps], color="tab:blue", alpha=0.35, lw=1, label="training KL (sampled positions)")
    ax.plot([max(r["step"] + 1, 0) for r in evals], [r["held_out_kl"] for r in evals], "o-", color="tab:blue", lw=2, label="held-out KL (training text's kind)")
    if evals and evals[0]["step"] == -1:
        ax.axhline(evals[0]["held_out_kl"], color="tab:red", ls="--", lw=1.5, label="PTQ level (held-out KL before training)")
    watched = [r for r in evals if "watch_kl" in r]
    for name in (watched[0]["watch_kl"] if watched else {}):
        ax.plot([max(r["step"] + 1, 0) for r in watched], [r["watch_kl"][name] for r in watched], ".--", lw=1, label=f"{name} (held-out domain, 1 sequence)")
    ax.set_ylim(bottom=0)
    _finish(fig, ax, path, "optimizer step", "KL(teacher || student), nats/token", "QAT distillation")


def plot_layers(errors: dict[str, dict[str, float]], path: Path, labels: dict[str, str]) -> None:
    names = list(errors)
    x = range(len(names))
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), dpi=110, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for key in ("ptq", "qat"):
        ax.plot(x, [100 * errors[n][key] for n in names], ".-", color=COLORS[key], lw=1, label=labels[key])
    ax.set_ylim(bottom=0)
    ax.set_ylabel("relative output error, %")
    ax.set_title("Per-layer quantization error on held-out activations")
    ax.grid(alpha=0.3)
    ax.legend()
    # QAT does not make each layer match its float twin; it makes the errors cancel downstream.
    ratio = [errors[n]["qat"] / errors[n]["ptq"] for n in names]
    ax2.plot(x, ratio, ".-", color=COLORS["qat"], lw=1, label="QAT error / PTQ error")
    ax2.axhline(1.0, color=COLORS["ptq"], ls="--", lw=1)
    ax2.set_ylabel("ratio")
    _finish(fig, ax2, path, "quantized linear layer (model order: attention q, k, v, o, then MLP gate, up, down, per block)", "QAT / PTQ", "")


def plot_size_ppl(files: dict[str, dict], path: Path, labels: dict[str, str], kind: str, runtime: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    for key, f in files.items():
        if "file_bytes" in f:
            ax.scatter(f["file_bytes"] / 1e6, f["ppl"], s=70, color=COLORS[key], label=f"{labels[key]}: PPL {f['ppl']:.2f}", zorder=3)
        else:  # no file: a level
            ax.axhline(f["ppl"], color=COLORS[key], ls="--", lw=1.5, label=f"{labels[key]}: PPL {f['ppl']:.2f}")
    ax.set_xscale("log")
    _finish(fig, ax, path, f"{kind} file size, MB (log scale)", f"perplexity in {runtime} (held-out text)", "Size vs quality", grid_which="both")


def plot_domains(domains: dict[str, dict], path: Path, mean: float | None, labels: dict[str, str]) -> None:
    names = list(domains)
    x = range(len(names))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    closures = [100 * (domains[n]["gap_closure"] or 0) for n in names]
    bars = ax.bar(x, closures, color=COLORS["qat"])
    for b, n in zip(bars, names):
        if domains[n]["in_domain"]:
            b.set_hatch("//")
            b.set_alpha(0.5)
    if mean is not None:
        ax.axhline(100 * mean, color="black", ls="--", lw=1.2, label=f"held-out mean {mean:.0%}")
    ax.axhline(70, color="tab:green", ls=":", lw=1.2, label="target 70%")
    ax.set_xticks(list(x), [n + (" (in-domain)" if domains[n]["in_domain"] else "") for n in names], rotation=15)
    _finish(fig, ax, None, "", "PTQ perplexity gap closed, %", "Gap closure per domain")
    w = 0.38
    for off, key in ((-w / 2, "ptq"), (w / 2, "qat")):
        ax2.bar([i + off for i in x], [domains[n][key]["kld"] for n in names], w, color=COLORS[key], label=labels[key])
    ax2.set_xticks(list(x), names, rotation=15)
    _finish(fig, ax2, path, "", "mean KLD to the teacher, nats/token", "KL divergence per domain")


def _finish(fig, ax, path: Path | None, xlabel: str, ylabel: str, title: str, grid_which: str = "major") -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which=grid_which)
    ax.legend()
    if path is None:  # more panels to come
        return
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip("."))
    plt.close(fig)


def _intro(report: dict, title: str, *about: str) -> list[str]:
    return [
        f"# qatkit run: {report['model']}, {title}",
        "",
        *about,
        f"Trained {report['steps']} steps ({report['tokens_seen']:,} tokens) in {report['train_seconds']:.0f} s; whole run {report['wall_s']:.0f} s, peak RSS {report['peak_rss_mb']:.0f} MB.",
    ]


def domain_lines(report: dict, plain: bool = False) -> list[str]:
    """The per-domain table and the headline: the mean gap closure over the held-out domains,
    the worst one, and the in-domain figure labelled as such. Markdown, or plain for a terminal."""
    doms = report["domains"]
    lines = []
    if plain:
        head = f"{'domain':<18} {'PPL teacher':>11} {'PTQ':>9} {'QAT':>9} {'gap closed':>10} {'KLD PTQ':>8} {'KLD QAT':>8} {'same top QAT':>12}"
        lines += [head, "-" * len(head)]
    else:
        lines += ["| domain | PPL teacher | PPL PTQ | PPL QAT | gap closed | KLD PTQ | KLD QAT | QAT/PTQ KLD | same top PTQ | same top QAT |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in doms.items():
        label = name + (" (in-domain)" if d["in_domain"] else "")
        closure = "-" if d["gap_closure"] is None else f"{d['gap_closure']:.1%}"
        t, p, q = d["teacher"], d["ptq"], d["qat"]
        if plain:
            lines.append(f"{label:<18} {t['ppl']:>11.3f} {p['ppl']:>9.3f} {q['ppl']:>9.3f} {closure:>10} {p['kld']:>8.4f} {q['kld']:>8.4f} {q['same_top']:>11.1f}%")
        else:
            ratio = "-" if d["kld_ratio"] is None else f"{d['kld_ratio']:.2f}"
            lines.append(f"| {label} | {t['ppl']:.3f} | {p['ppl']:.3f} | {q['ppl']:.3f} | {closure} | {p['kld']:.4f} | {q['kld']:.4f} | {ratio} | {p['same_top']:.1f}% | {q['same_top']:.1f}% |")
    lines.append("")
    mean, worst = report.get("gap_closure"), report.get("gap_closure_min")
    held = report.get("held_out_domains") or []
    if mean is not None:
        bold = "" if plain else "**"
        ratio = report.get("kld_ratio")
        lines.append(f"{bold}Gap closure on held-out domains{bold} (PPL_ptq - PPL_qat) / (PPL_ptq - PPL_teacher), mean of {len(held)} ({', '.join(held)}): {bold}{mean:.1%}{bold}, worst {worst:.1%}; QAT's KLD to the teacher is {ratio:.2f}x PTQ's on average.")
    inside = report.get("in_domain_gap_closure")
    if inside is not None:
        names = [n for n, d in doms.items() if d["in_domain"]]
        lines.append(f"In-domain (the training text's own source: {', '.join(names)}): {inside:.1%}. Not a held-out figure.")
    return lines


FILE_COLUMNS = (  # (report key, column title, format): a column shows when any file has the figure
    ("bits_per_weight", "bits/weight", "{:.2f}"),
    ("prefill_tps", "prefill tok/s", "{:.1f}"),
    ("decode_tps", "decode tok/s", "{:.1f}"),
    ("load_rss_mb", "load RSS MB", "{:.0f}"),
)


def file_table(files: dict[str, dict], labels: dict[str, str]) -> list[str]:
    """The files' table: quality, size, and whichever speed and memory figures the target measured."""
    cols = [c for c in FILE_COLUMNS if any(f.get(c[0]) for f in files.values())]
    lines = ["| file | PPL | KLD to teacher | same top token | size MB | " + " | ".join(c[1] for c in cols) + " |", "|---" * (5 + len(cols)) + "|"]
    for key, r in files.items():
        size = f"{r['file_bytes'] / 1e6:.1f}" if "file_bytes" in r else "-"
        extra = [fmt.format(r[k]) if r.get(k) else "-" for k, _, fmt in cols]
        lines.append(f"| {labels[key]} | {r['ppl']:.3f} | {r['kld']:.4f} | {r['same_top']:.1f}% | {size} | " + " | ".join(extra) + " |")
    return lines


def plan_line(plan: dict) -> str:
    """The mobile plan in words."""
    exceptions = ", ".join(f"{k} {' '.join(v)}" for k, v in plan.items() if k in ("int2", "int8", "keep") and v) or "no per-tensor exceptions"
    return f"Plan: {plan['mobile_weights']} Linears ({exceptions}), embedding {plan['embedding']} per row, {plan['activations']} int8 activations."


def write_markdown(report: dict, out: Path) -> None:
    f, g, labels = report["files"], report["export_gap"], report["labels"]
    gap = f"mean KLD {g['kld']:.2e}"
    if "plain" in g:
        gap += f" {report['gap_note']}, {g['plain']['kld']:.2e} with float activations"
    lines = [
        *_intro(report, report["title"], *([plan_line(report["plan"])] if "plan" in report else [])),
        f"{report['measured']}, on {len(report['domains'])} domains of text, {f['teacher']['tokens']} scored tokens in the held-out ones.",
        "",
        *domain_lines(report),
        "",
        "![gap closure and KLD per domain](domains.png)",
        "",
        "Files (PPL: geometric mean over the held-out domains; KLD and same top: their mean):",
        "",
        *file_table(f, labels),
        "",
        f"**Export gap** ({report['runtime']} on the QAT file vs the trained student, {g['tokens']} tokens): {gap}; same top token {g['same_top']:.2f}%.",
        "",
        "![training curves](training.png)",
        "",
        *(["![per-layer error](layers.png)", ""] if report.get("layer_errors") else []),
        "![size vs perplexity](size_ppl.png)",
        "",
    ]
    write_text(out / "report.md", "\n".join(lines))


def write_report(report: dict, rows: list[dict], out: Path) -> None:
    """report.md and the plots of one run, any target; `rows`: the training's metrics log."""
    plot_training(rows, out / "training.png")
    if report.get("layer_errors"):
        plot_layers(report["layer_errors"], out / "layers.png", report["labels"])
    plot_size_ppl(report["files"], out / "size_ppl.png", report["labels"], kind=report["file_kind"], runtime=report["runtime"])
    plot_domains(report["domains"], out / "domains.png", report.get("gap_closure"), report["labels"])
    write_markdown(report, out)
