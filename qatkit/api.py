"""The pipeline as an import surface: the README's steps, one function each.

    from qatkit.api import QATConfig, TrainConfig, convert, export, load, prepare, resolve, score, train

    source = resolve("gemma3-270m")                        # a GGUF, an HF directory, or the default
    teacher, tokenizer = load(source)                      # float weights and the tokenizer
    student = copy.deepcopy(teacher)
    prepare(student, source.arch, QATConfig(fmt="q4_0"))   # fake-quant in place; returns the plan
    train(student, teacher, train_seqs, held_seqs, TrainConfig(steps=150), run_dir)
    scales = convert(student, source.arch)                 # the trained numbers, as the file holds them
    export(student, tokenizer, source, "qat-q4_0.gguf", "q4_0", q4_0_scales=scales)
    score("qat-q4_0.gguf", text, ref_path="teacher-f32.gguf")   # in llama.cpp: PPL, KLD, same top

`plan(model, arch, fmt)` gives the per-tensor plan alone; `qat_run` + `export_trained` do what
`qatkit train` does (data, sampling, checkpoints, resume, then the file); `for_format(fmt)` is the
target (GGUF / ExecuTorch) that writes, scores and verifies files of a format.
"""

from .config import QATConfig, RunConfig, TrainConfig
from .export.gguf import export_model as export
from .models.load import load, resolve
from .prepare import convert, prepare
from .prepare import model_plan as plan
from .runtime.llamacpp import score, score_files
from .targets import export_trained, for_format
from .train.loop import train
from .train.run import qat_run

__all__ = ["resolve", "load", "plan", "prepare", "train", "convert", "export", "score", "score_files", "qat_run", "export_trained", "for_format",
           "QATConfig", "TrainConfig", "RunConfig"]
