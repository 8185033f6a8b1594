"""The held-out suite: real corpora installed by setup, disjoint from every default training text,
and the arithmetic of the per-domain report."""

import math
import re

import pytest

from qatkit import QatkitError
from qatkit.config import DEFAULT_TRAIN_DATA
from qatkit.eval import suite
from qatkit.train.data import _paragraphs, read_texts

HELD_OUT = [d.name for d in suite.SUITE if not d.train_source or d.train_source not in DEFAULT_TRAIN_DATA]


@pytest.fixture(scope="module")
def texts():
    return suite.load_suite()


def _norm(p: str) -> str:
    return re.sub(r"\s+", " ", p).strip().lower()


def test_suite_has_four_domains_unlike_the_training_text(texts):
    assert HELD_OUT == ["fiction", "drama", "speeches", "email"]
    assert [d for d in suite.DOMAINS if suite.in_domain(d, DEFAULT_TRAIN_DATA)] == ["docs"]
    assert not suite.in_domain("my-own-text", DEFAULT_TRAIN_DATA) and suite.in_domain("drama", ["shakespeare"])
    for name in HELD_OUT:
        t = texts[name]
        assert suite.EXCERPT_CHARS // 2 < len(t) <= suite.EXCERPT_CHARS, name
    assert texts["fiction"].startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael.")
    assert "Mr. Speaker" in texts["speeches"] and "**" not in texts["drama"] and "THESEUS" in texts["drama"]
    assert "Received: from" not in texts["email"] and "\n>" not in texts["email"]
    # every domain its own text: no long stretch of one recurs in another
    for a in texts:
        for b in texts:
            if a < b:
                assert not set(_windows(texts[a])) & set(_windows(texts[b])), (a, b)


def _windows(text: str, n: int = 120, step: int = 60) -> list[str]:
    t = _norm(text)
    return [t[i : i + n] for i in range(0, max(1, len(t) - n), step)]


def test_default_training_text_shares_no_paragraph_with_any_domain(texts):
    """No paragraph of the default training text (pydoc's training part and the stdlib code) occurs
    in any domain of the suite, the in-domain docs included; nor does any 120-character stretch of
    the out-of-domain ones."""
    train = read_texts(DEFAULT_TRAIN_DATA)
    train_pars = {_norm(p) for t in train for p in _paragraphs(t) if len(p) > 40}
    joined = _norm("\n".join(train))
    for name, text in texts.items():
        pars = {_norm(p) for p in _paragraphs(text) if len(p) > 40}
        assert pars, name  # (a State of the Union address is one paragraph: the stretches below cover it)
        assert not pars & train_pars, (name, sorted(pars & train_pars)[:3])
        if name in HELD_OUT:
            shared = [w for w in _windows(text) if w in joined]
            assert not shared, (name, shared[:3])


def test_missing_corpus_is_one_line_naming_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("QATKIT_CORPORA", str(tmp_path))
    for name in ("fiction", "speeches", "email"):
        with pytest.raises(QatkitError, match="not installed; run scripts/setup.sh") as e:
            suite.load_suite([name])
        assert "\n" not in str(e.value)
    with pytest.raises(QatkitError, match="unknown held-out domain poetry"):
        suite.load_suite(["poetry"])


def test_mail_body_and_plain_play():
    raw = "From: a@b\nSubject: hi\nReceived: x\n\nHello all,\n> quoted reply\n>> older\nThanks.\n-- \nsig line\n"
    assert suite._mail_body(raw) == "Hello all,\nThanks."
    md = "# Play\n\n## ACT I\n\n_Enter THESEUS_\n\n**THESEUS**  \nNow, fair Hippolyta,  \n"
    assert suite._plain_play(md) == "Play\n\nACT I\n\nEnter THESEUS\n\nTHESEUS\nNow, fair Hippolyta,"


def _file(ppl, kld, top=50.0, tokens=10):
    return {"ppl": ppl, "kld": kld, "same_top": top, "tokens": tokens}


def test_summary_means_are_over_held_out_domains_only():
    domains = {
        "a": suite.domain_row({"teacher": _file(10, 0), "ptq": _file(20, 0.4), "qat": _file(12, 0.1)}, False),
        "b": suite.domain_row({"teacher": _file(30, 0), "ptq": _file(40, 0.2), "qat": _file(38, 0.15)}, False),
        "c": suite.domain_row({"teacher": _file(5, 0), "ptq": _file(9, 0.5), "qat": _file(5.4, 0.05)}, True),
    }
    assert domains["a"]["gap_closure"] == pytest.approx(0.8) and domains["b"]["gap_closure"] == pytest.approx(0.2)
    assert domains["a"]["kld_ratio"] == pytest.approx(0.25)
    s = suite.summarize(domains)
    assert s["held_out_domains"] == ["a", "b"]
    assert s["gap_closure"] == pytest.approx(0.5) and s["gap_closure_min"] == pytest.approx(0.2)
    assert s["kld_ratio"] == pytest.approx((0.25 + 0.75) / 2)
    assert s["in_domain_gap_closure"] == pytest.approx(0.9)
    assert s["means"]["ptq"]["ppl"] == pytest.approx(math.sqrt(20 * 40)) and s["means"]["qat"]["tokens"] == 20
