"""Fixtures shared by the test files. Helpers that take arguments (tiny models, their
directories and GGUF files) live in tiny_models.py and tiny_gguf.py; test files import those,
never each other."""

import pytest

from tiny_models import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny byte-level BPE tokenizer (vocabulary 320)."""
    return tiny_tokenizer()


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A qatkit cache of the test's own ($QATKIT_CACHE), so no test sees another's files."""
    path = tmp_path / "cache"
    monkeypatch.setenv("QATKIT_CACHE", str(path))
    return path
