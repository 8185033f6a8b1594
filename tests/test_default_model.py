"""The real default model (Gemma 3 270M): qatkit's Q4_0 file equals llama.cpp's quantizer output
tensor for tensor, and it loads in llama.cpp and says something sensible. Minutes, not seconds:
`-m "not slow"` skips it."""

import numpy as np
import pytest

from qatkit.export.gguf import export_model, read_gguf_tensors
from qatkit.models.load import load, resolve
from qatkit.runtime.llamacpp import generate, llama_quantize, score
from qatkit.targets.gguf import float_reference
from qatkit.train.data import default_eval_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma")
    source = resolve("gemma3-270m")
    model, tokenizer = load(source)
    teacher = float_reference(source, model, tokenizer)
    export_model(model, tokenizer, source, d / "qatkit.gguf", "q4_0", progress=False)
    llama_quantize(str(teacher), str(d / "llama.gguf"), ftype="q4_0")
    return {"teacher": str(teacher), "qatkit": str(d / "qatkit.gguf"), "llama": str(d / "llama.gguf")}


def test_q4_0_export_equals_llama_quantize(files):
    ours, theirs = read_gguf_tensors(files["qatkit"]), read_gguf_tensors(files["llama"])
    assert set(ours) == set(theirs) and len(ours) == 236
    types = {}
    for name, (t, data, shape) in theirs.items():
        assert (ours[name][0], ours[name][2]) == (t, shape), name
        assert np.array_equal(ours[name][1], data), name
        types[t] = types.get(t, 0) + 1
    assert types == {2: 126, 8: 1, 0: 109}  # Q4_0 linears, Q8_0 tied embedding (640 % 256 != 0), F32 norms


def test_q4_0_loads_and_is_sensible_in_llama_cpp(files):
    text = generate(files["qatkit"], "The capital of France is", n_tokens=16)
    words = text.split()
    assert len(words) >= 5 and sum(w.strip(".,;:'\"").isalpha() for w in words) >= 0.7 * len(words), text
    held_out = default_eval_text()
    t = score(files["teacher"], held_out, max_chunks=2)
    q = score(files["qatkit"], held_out, ref_path=files["teacher"], max_chunks=2)
    assert 5 < t["ppl"] < 40, t  # a working English model on English prose
    assert t["ppl"] < q["ppl"] < 2 * t["ppl"], (t, q)  # Q4_0 costs something, not everything
    assert 0 < q["kld"] < 1 and q["same_top"] > 50
