"""GGUF metadata survives read -> JSON -> write unchanged, including strings that are not valid
UTF-8 (a vocabulary can hold partial characters) and typed arrays; tensor-describing keys are
not carried over."""

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from qatkit.models import gguf_meta


def write(path, kv):
    w = GGUFWriter(path, "llama")
    for key, (val, vtype, sub) in kv.items():
        w.add_key_value(key, val, vtype, sub_type=sub)
    w.add_tensor("x", np.zeros((2, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_round_trip(tmp_path):
    A = GGUFValueType.ARRAY
    kv = {
        "tokenizer.ggml.tokens": ([b"<s>", b"\xe2\x96\x81the", b"\xff\xfe", b"caf\xc3"], A, GGUFValueType.STRING),
        "tokenizer.ggml.scores": ([0.0, -1.5, -2.25, 3.0], A, GGUFValueType.FLOAT32),
        "tokenizer.ggml.token_type": ([3, 1, 6, 1], A, GGUFValueType.INT32),
        "llama.block_count": (7, GGUFValueType.UINT32, None),
        "llama.rope.freq_base": (10000.0, GGUFValueType.FLOAT32, None),
        "tokenizer.ggml.add_bos_token": (True, GGUFValueType.BOOL, None),
        "general.name": ("tiny", GGUFValueType.STRING, None),
        "general.file_type": (15, GGUFValueType.UINT32, None),  # describes the source's tensors
        "quantize.imatrix.file": ("x.dat", GGUFValueType.STRING, None),
    }
    write(tmp_path / "a.gguf", kv)
    meta = gguf_meta.read(gguf_meta.open_reader(tmp_path / "a.gguf"))
    assert "general.file_type" not in meta and "quantize.imatrix.file" not in meta
    gguf_meta.save(meta, tmp_path / "m.json")
    again = gguf_meta.load(tmp_path / "m.json")
    assert again == meta
    w = GGUFWriter(tmp_path / "b.gguf", "llama")
    gguf_meta.apply(again, w)
    w.add_tensor("x", np.zeros((2, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back = gguf_meta.read(gguf_meta.open_reader(tmp_path / "b.gguf"))
    assert back == meta
    tokens = [s.encode("utf-8", "surrogateescape") for s in back["tokenizer.ggml.tokens"][2]]
    assert tokens == kv["tokenizer.ggml.tokens"][0]
    assert back["llama.block_count"] == ["UINT32", 7] and back["tokenizer.ggml.scores"][1] == "FLOAT32"
