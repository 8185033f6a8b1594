"""What each CPU cost cutter of the QAT step is worth on the default model, side by side.

One Q4_0 student of Gemma 3 270M (and one mobile-format student) train on the same batches,
the variants alternated step by step in one process (these machines are noisy):
- default:            batch 1 x 256, KL on 25% of positions, embedding frozen at its file values;
- KL on all positions: the 262k-vocabulary head and softmax on every position;
- embedding trained:  the 168M-parameter tied embedding gets gradients and AdamW state;
- sequences of 128:   half the tokens per step (compare per token);
- mobile format:      int4 per-channel weights and int8 per-token activations instead of Q4_0;
- teacher top-64 cache: the teacher's side read from a warm disk cache (--teacher-topk 64);
- llama.cpp-faithful: the student rounds activations as llama.cpp does (--faithful).
Also timed alone: the teacher's forward pass (what the cache saves when warm), and filling the
cache for one sequence (a teacher forward with the head on every position, what a miss costs).
Prints the median seconds per step and per 1k tokens, and each ratio to the default.

    python benchmarks/cost_cutters.py [--steps 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from qatkit.models.load import load, resolve
from qatkit.prepare import QATConfig, linear_weight_types, prepare
from qatkit.runtime.faithful import llamacpp_faithful
from qatkit.train.data import default_train_texts, pack
from qatkit.train.loop import TrainConfig, _head, distill_loss, positions
from qatkit.train.teacher_cache import TeacherCache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one warm-up step)")
    args = ap.parse_args()
    source = resolve("gemma3-270m")
    teacher, tokenizer = load(source)
    teacher.requires_grad_(False)
    seqs = pack(tokenizer, default_train_texts()[:8], 256, teacher.config.vocab_size)
    q4 = copy.deepcopy(teacher)
    plan = prepare(q4, source.arch, QATConfig())
    faithful = partial(llamacpp_faithful, q4, linear_weight_types(q4, source.arch, plan), exact=False)
    cache = TeacherCache(teacher, _head, seqs, 64, root=Path(tempfile.mkdtemp(prefix="qatkit-topk-")))
    fill_times = []
    for i in range(args.steps + 1):  # warm the cache for every sequence the variants will see
        t = time.perf_counter()
        cache.lookup(seqs[i : i + 1], torch.arange(1))
        fill_times.append(time.perf_counter() - t)
    mob = copy.deepcopy(teacher)
    prepare(mob, source.arch, QATConfig(fmt="mobile"))
    emb = q4.get_input_embeddings().weight
    default = TrainConfig(seq_len=256, kl_positions=0.25)
    variants = {  # name: (student, TrainConfig, embedding trained, teacher cache, student context)
        "default": (q4, default, False, None, nullcontext),
        "KL on all positions": (q4, TrainConfig(seq_len=256, kl_positions=1.0), False, None, nullcontext),
        "embedding trained": (q4, default, True, None, nullcontext),
        "sequences of 128": (q4, TrainConfig(seq_len=128, kl_positions=0.25), False, None, nullcontext),
        "mobile format": (mob, default, False, None, nullcontext),
        "teacher top-64 cache": (q4, default, False, cache, nullcontext),
        "llama.cpp-faithful": (q4, default, False, None, faithful),
    }
    for s in (q4, mob):  # the teacher was frozen before the copies: the students train
        s.train().requires_grad_(True)
        s.get_input_embeddings().weight.requires_grad_(False)
    opts = {}
    for name, (s, _, train_emb, _, _) in variants.items():
        params = [p for p in s.parameters() if p.requires_grad] + ([emb] if train_emb else [])
        opts[name] = torch.optim.AdamW(params, lr=1e-7)
    times: dict[str, list[float]] = {k: [] for k in variants}
    teacher_times: list[float] = []
    for step in range(args.steps + 1):
        for name, (s, cfg, train_emb, cached, context) in variants.items():
            x = seqs[step : step + 1, : cfg.seq_len]
            pos = positions(cfg.seq_len, cfg.kl_positions, torch.Generator().manual_seed(step))
            emb.requires_grad_(train_emb)
            t = time.perf_counter()
            loss, _ = distill_loss(s, teacher, x, pos, cfg, cached, context)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if step:  # the first step warms up allocators and caches
                times[name].append(time.perf_counter() - t)
        emb.requires_grad_(False)
        x = seqs[step : step + 1]
        pos = positions(256, 0.25, torch.Generator().manual_seed(step))
        t = time.perf_counter()
        with torch.no_grad():
            _head(teacher, teacher.model(x).last_hidden_state[:, pos])
        if step:
            teacher_times.append(time.perf_counter() - t)
    print(f"Gemma 3 270M, {torch.get_num_threads()} threads; median of {args.steps} alternated steps")
    base = statistics.median(times["default"])
    base_tok = base / 256
    for name, ts in times.items():
        m = statistics.median(ts)
        per_k = 1000 * m / variants[name][1].seq_len
        print(f"  {name:<22} {m:6.2f} s/step {per_k:6.2f} s/1k tokens   {m / base:5.2f}x per step  {m / variants[name][1].seq_len / base_tok:5.2f}x per token")
    tt = statistics.median(teacher_times)
    print(f"  teacher forward alone  {tt:6.2f} s/step ({tt / base:.0%} of the default step: what a warm teacher cache saves)")
    ft = statistics.median(fill_times[1:])
    print(f"  cache fill, 1 sequence {ft:6.2f} s     ({ft / base:.0%} of the default step: the extra cost of a miss is {(ft - tt) / base:.0%})")
    assert cache.misses == args.steps + 1 and cache.hits == args.steps + 1, (cache.misses, cache.hits)


if __name__ == "__main__":
    main()
