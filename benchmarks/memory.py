"""Peak memory of QAT against plain fine-tuning, measured, and the predictor checked against it.

Part 1 (predicted, no weights): `qatkit.plan.training_memory` per device for the Gemma 4 text
decoders (qatkit.models.gemma4.REFERENCE_SHAPES, from ../shared/GEMMA4.md) and the default
model, on 1 and 8 devices, with the settings of recipes/fsdp_qat.sh (global batch 8 x 512, KL on
half the positions, grad checkpointing), teacher in float32 and in bfloat16.

Part 2 (measured, on this CPU): each model trains 3 steps in a fresh process, once as QAT (Q4_0
fake-quant student distilled from its float teacher: qatkit's own step) and once as plain
fine-tuning (the same weights trainable, cross-entropy, no teacher, no fake-quant), and QAT
with gradient checkpointing (qat-gc). The figure
is the process's peak resident memory during the steps (VmHWM, reset after loading) above its
resident memory before any model existed, i.e. what the models and the step added (glibc told
to map every large block on its own, so that freed tensors leave the resident set). Printed
beside the prediction and their ratio. Models: a small Llama (4 layers, hidden 512, 32k
vocabulary), a small Gemma 4 E-style (6 layers, per-layer table, K/V sharing), and Gemma 3 270M.

Part 3 (measured, sharded): the same QAT under torchrun over --world CPU processes (gloo, FSDP2,
global batch = world): each process's peak against the per-device prediction for that world.

    python benchmarks/memory.py [--steps 3] [--seq-len 256] [--models small-llama ...] [--world 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def small_model(name: str):
    import torch
    from transformers import AutoModelForCausalLM, Gemma4TextConfig, LlamaConfig

    torch.manual_seed(0)
    if name == "small-llama":
        cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False)
    else:  # small-gemma4: E-style, the shapes of tests/tiny_models.py's GEMMA4_E at a realistic vocabulary
        sys.path.insert(0, str(HERE.parent / "tests"))
        from tiny_models import GEMMA4_E

        shape = {**GEMMA4_E, "hidden_size": 256, "intermediate_size": 512, "hidden_size_per_layer_input": 64}
        cfg = Gemma4TextConfig(**shape, vocab_size=32000, vocab_size_per_layer_input=32000, max_position_embeddings=1024, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def warm_up(model_name: str) -> None:
    """Import the model's code and run one training step of a tiny model of its family, so that
    the baseline holds what any run of it holds before its weights exist (modules, kernels,
    thread pools)."""
    import ctypes

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kind = {"small-llama": "llama", "small-gemma4": "gemma4_text", "gemma3-270m": "gemma3_text"}[model_name]
    extra = {"gemma4_text": dict(hidden_size_per_layer_input=16, vocab_size_per_layer_input=64, global_head_dim=16)}.get(kind, {})
    cfg = AutoConfig.for_model(kind, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16, **extra)
    m = AutoModelForCausalLM.from_config(cfg)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long)).loss.backward()
    opt.step()
    del m, opt
    ctypes.CDLL(None).malloc_trim(0)


def measure(model_name: str, mode: str, steps: int, seq_len: int) -> dict:
    """One model, one mode, in this (fresh) process; under torchrun, this process's share of a
    sharded QAT run (global batch = the number of processes)."""
    from qatkit import quiet_import_noise

    quiet_import_noise()
    import copy

    import torch
    import torch.nn.functional as F

    from qatkit.config import QATConfig, TrainConfig
    from qatkit.models.arch import arch_for_config
    from qatkit.plan import training_memory
    from qatkit.prepare import prepare
    from qatkit.train import distributed, loop
    from qatkit.train.data import Batches

    group = distributed.setup() if distributed.launched() else None
    torch.set_num_threads(1 if group else 2)
    warm_up(model_name)
    base = rss_kb("VmRSS")
    if model_name == "gemma3-270m":
        from qatkit.models.load import load, resolve

        teacher, _ = load(resolve(model_name))
    else:
        teacher = small_model(model_name)
    config = teacher.config
    vocab = config.get_text_config().vocab_size
    seqs = torch.randint(0, vocab, (16, seq_len), generator=torch.Generator().manual_seed(0))
    world = group.world if group else 1
    cfg = TrainConfig(steps=steps, batch_size=world, seq_len=seq_len, kl_positions=0.25, lr=1e-5, grad_checkpointing=mode == "qat-gc")
    if mode.startswith("qat"):
        student = copy.deepcopy(teacher)
        prepare(student, arch_for_config(config), QATConfig())
        teacher.requires_grad_(False)
        student.train()
        if cfg.grad_checkpointing:
            loop.enable_grad_checkpointing(student)
        if group:
            distributed.shard(student, group)
            distributed.shard(teacher, group)
    else:
        student, teacher = teacher, None
        for m in student.modules():
            if isinstance(m, torch.nn.Embedding):
                m.weight.requires_grad_(False)  # frozen as in QAT: the comparison is of the same trained weights
        student.train()
    opt = loop.make_optimizer(student, cfg)
    batches = Batches(seqs, cfg.batch_size, 0)
    import ctypes

    ctypes.CDLL(None).malloc_trim(0)  # what loading freed goes back to the system before the peak is reset
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: loading's transients are not the step's
    for step in range(steps):
        if mode.startswith("qat"):
            loop._step(student, teacher, opt, batches, step, cfg, torch.device("cpu"), group=group)
        else:
            x = next(batches)
            pos = loop.positions(seq_len, cfg.kl_positions, torch.Generator().manual_seed(step))
            logits = loop.logits_at(student, x, pos)
            F.cross_entropy(logits.flatten(0, 1), x[:, pos + 1].flatten()).backward()
            torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = (rss_kb("VmHWM") - base) * 1024
    pred = training_memory(config, cfg.batch_size, seq_len, cfg.kl_positions, cfg.grad_checkpointing, qat=mode.startswith("qat"), device="cpu", world=world)
    if group:
        distributed.teardown()
    return {"model": model_name, "mode": mode, "measured": peak, "predicted": pred["total"], "params": pred["params"], "trainable": pred["trainable"]}


def predicted_table() -> None:
    from qatkit.models.gemma4 import REFERENCE_SHAPES, reference_config
    from qatkit.models.load import read_config, resolve
    from qatkit.plan import GB, training_memory

    configs = {name: reference_config(name) for name in REFERENCE_SHAPES}
    configs["Gemma 3 270M"] = read_config(resolve("gemma3-270m").hf_dir)
    print("Predicted peak GB per device: global batch 8 x 512, KL on 0.5 of positions, grad checkpointing (recipes/fsdp_qat.sh)")
    head = f"{'model':<14} {'params':>7} {'trained':>8} {'1 dev f32':>10} {'1 dev bf16':>11} {'8 dev f32':>10} {'8 dev bf16':>11}"
    print(head)
    print("-" * len(head))
    for name, c in configs.items():
        cells = [training_memory(c, 8, 512, 0.5, True, world=w, teacher_dtype=t)["total"] / GB for w in (1, 8) for t in ("float32", "bfloat16")]
        m = training_memory(c, 8, 512, 0.5, True)
        print(f"{name:<14} {m['params'] / 1e9:>6.2f}B {m['trainable'] / 1e9:>7.2f}B" + "".join(f"{v:>{w}.1f}" for v, w in zip(cells, (11, 12, 11, 12))))
    c = configs["E2B"]
    for w in (1, 8):
        m = training_memory(c, 8, 512, 0.5, True, world=w, teacher_dtype="bfloat16")
        print(f"E2B, bf16 teacher, {w} device{'s' if w > 1 else ''}: " + ", ".join(f"{k} {m[k] / GB:.1f}" for k in
              ("weights", "grads_and_adamw", "gathered", "fake_quant", "activations", "logits") if m[k]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--models", nargs="+", default=["small-llama", "small-gemma4", "gemma3-270m"], help="which models to measure")
    ap.add_argument("--world", type=int, default=2, help="also QAT sharded over this many CPU processes under torchrun (1: not)")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.steps, args.seq_len)))
        return
    predicted_table()
    print()
    models = args.models
    print(f"Measured on this CPU: peak resident memory of {args.steps} steps of batch 1 x {args.seq_len} (KL/CE on 0.25 of positions) above the "
          "process before any model; each in a fresh process")
    head = f"{'model':<14} {'mode':<9} {'measured GB':>12} {'predicted GB':>13} {'measured/predicted':>19}"
    print(head)
    print("-" * len(head))
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}  # a fixed threshold: freed tensors leave the resident set
    for model in models:
        for mode in ("qat", "qat-gc", "finetune"):
            out = subprocess.run([sys.executable, __file__, "--one", model, mode, "--steps", str(args.steps), "--seq-len", str(args.seq_len)],
                                 capture_output=True, text=True, env=env)
            if out.returncode:
                print(out.stderr[-2000:])
                raise SystemExit(1)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[model, mode] = r
            print(f"{model:<14} {mode:<9} {r['measured'] / 1e9:>12.3f} {r['predicted'] / 1e9:>13.3f} {r['measured'] / r['predicted']:>19.2f}", flush=True)
        q, f = results[model, "qat"], results[model, "finetune"]
        print(f"{model:<14} {'qat/ft':<9} {q['measured'] / f['measured']:>12.2f} {q['predicted'] / f['predicted']:>13.2f}")
        if args.world > 1:  # the same QAT sharded over processes (gloo): each process's peak, the largest printed
            out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.world}", __file__, "--one", model,
                                  "qat", "--steps", str(args.steps), "--seq-len", str(args.seq_len)], capture_output=True, text=True, env=env)
            if out.returncode:
                print(out.stderr[-2000:])
                raise SystemExit(1)
            ranks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
            r = max(ranks, key=lambda r: r["measured"])
            print(f"{model:<14} {f'qat x{args.world}':<9} {r['measured'] / 1e9:>12.3f} {r['predicted'] / 1e9:>13.3f} {r['measured'] / r['predicted']:>19.2f}"
                  f"   (per process; global batch {args.world})", flush=True)


if __name__ == "__main__":
    main()
