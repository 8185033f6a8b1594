"""MTP drafters in llama.cpp, on tiny random Gemma 4 models: does QAT against the quantized target
keep the drafter's acceptance where users run the model?

A tiny random E-style target (peaked: its embedding scaled so that its next token is not a coin
toss) is written as F32 and as Q4_0 (qatkit's PTQ). A tiny drafter is trained by qatkit to the
float target on the target's own sampled generations (float training, `--steps`), then:
  (a) the float drafter (F32 file) with the float target;
  (b) the same drafter with the Q4_0 target, as an F32 file and as PTQ Q4_0 (what a user gets by
      quantizing it);
  (c) the QAT drafter: the float drafter trained `--qat-steps` more against the Q4_0 target file,
      fake-quantized for its own Q4_0 file, with that target.
Each is run by qatkit.runtime.mtp (llama.cpp's draft-mtp driver: the drafter reads the target's
KV cache) on held-out prompts, greedy, beside plain greedy decoding of the same target, same
threads: acceptance rate, tokens per target step, tokens/s. The output of every run is checked
against plain greedy (speculation must not change it; F16 KV cache, llama.cpp's default).

    python benchmarks/mtp.py [--steps 400] [--qat-steps 200] [--prompts 16] [--tokens 48] [--n-draft 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


@__import__("torch").no_grad()
def sample(model, n: int, length: int, seed: int):
    """n sequences of BOS + a random token + sampled continuations (temperature 1) of `model`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.full((n, 1), 2), torch.randint(4, model.config.vocab_size, (n, 1), generator=g)], 1)
    while x.shape[1] < length:
        p = torch.softmax(model(x).logits[:, -1].double(), -1)
        x = torch.cat([x, torch.multinomial(p, 1, generator=g)], 1)
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400, help="float training of the drafter against the float target")
    ap.add_argument("--qat-steps", type=int, default=200, help="QAT of that drafter against the Q4_0 target")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--n-draft", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--qat-lr", type=float, default=3e-4)
    args = ap.parse_args()

    import torch

    from qatkit import quiet_import_noise
    from qatkit.cli import main as cli
    from qatkit.config import TrainConfig
    from qatkit.drafter import train_drafter
    from qatkit.runtime import mtp
    from tiny_models import assistant_dir, gemma_tokenizer, tiny_gemma4

    quiet_import_noise()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        target = tiny_gemma4(0)
        with torch.no_grad():
            target.model.embed_tokens.weight.mul_(30)
        target.save_pretrained(d / "t")
        gemma_tokenizer().save_pretrained(d / "t")
        files = {f: d / f"target-{f}.gguf" for f in ("f32", "q4_0")}
        for f, path in files.items():
            assert cli(["export", str(d / "t"), "--format", f, "--out", str(path)]) == 0
        train = sample(target, 256, 64, seed=0)
        prompts = sample(target, args.prompts, 12, seed=1).tolist()
        cfg = dict(seq_len=64, warmup_steps=0, min_lr_ratio=1.0, ckpt_every=10**6)
        fl = train_drafter(str(assistant_dir(d / "a")), str(files["f32"]), d / "float", TrainConfig(steps=args.steps, lr=3e-3, **cfg),
                           fmt="f32", seqs=train, progress=False)
        fl["student"].save_pretrained(d / "a-float")
        gemma_tokenizer().save_pretrained(d / "a-float")
        ptq = d / "drafter-ptq-q4_0.gguf"
        assert cli(["export", str(d / "a-float"), "--format", "q4_0", "--out", str(ptq)]) == 0
        qat = train_drafter(str(d / "a-float"), str(files["q4_0"]), d / "qat", TrainConfig(steps=args.qat_steps, lr=args.qat_lr, **cfg),
                            seqs=train, progress=False)
        # held-out KL to the Q4_0 target (torch: every file's own numbers), step 1, on sequences not trained on
        held = sample(target, 16, 64, seed=2)
        from qatkit.export.gguf import load_gguf_weights
        from qatkit.models.load import load, resolve
        from qatkit.train.drafter import draft_kl, target_state

        def twin(spec, gguf):
            src = resolve(str(spec))
            m, _ = load(src)
            load_gguf_weights(m, src.arch, str(gguf))
            return m.eval()

        tq = twin(d / "t", files["q4_0"])
        states = [target_state(tq, s) for s in held]
        kls = {}
        for name, gguf in (("float drafter", fl["gguf"]), ("float drafter PTQ Q4_0", ptq), ("QAT drafter Q4_0", qat["gguf"])):
            m = twin(d / "a-float", gguf)
            with torch.no_grad():
                kls[name] = statistics.mean(draft_kl(m, st, 1)[1][0] for st in states)
        print(f"drafter training: {args.steps} float steps (lr 3e-3) against the F32 target, then {args.qat_steps} QAT steps (lr {args.qat_lr}) "
              f"against the Q4_0 target; held-out KL(Q4_0 target || drafter), first draft step, 16 x 63 positions: "
              + ", ".join(f"{k} {v:.4f}" for k, v in kls.items()))
        cases = [("(a) float drafter, F32 target", "f32", fl["gguf"]), ("(b) float drafter (F32), Q4_0 target", "q4_0", fl["gguf"]),
                 ("(b) float drafter PTQ Q4_0, Q4_0 target", "q4_0", ptq), ("(c) QAT drafter Q4_0, Q4_0 target", "q4_0", qat["gguf"])]
        print(f"{len(prompts)} held-out prompts of 12 tokens (the target's own samples), {args.tokens} greedy tokens each, "
              f"{args.n_draft} drafts per step, {args.threads} thread(s), F16 KV cache")
        print(f"{'':<42} {'accepted':>9} {'tokens/step':>12} {'tok/s':>8} {'plain tok/s':>12} {'speed-up':>9}")
        for label, tf, drafter in cases:
            acc = drafted = steps = 0
            speed, plain_speed = [], []
            for p in prompts:
                r = mtp.speculative_greedy(files[tf], drafter, p, args.tokens, args.n_draft, args.threads)
                g = mtp.plain_greedy(files[tf], p, args.tokens, args.threads)
                if r["tokens"] != g["tokens"]:
                    print(f"  note: a prompt's speculative output differs from plain greedy (F16 KV batch numerics): {label}")
                acc, drafted, steps = acc + r["accepted"], drafted + r["drafted"], steps + r["target_steps"]
                speed.append(r["tokens_per_s"])
                plain_speed.append(g["tokens_per_s"])
            s, ps = statistics.median(speed), statistics.median(plain_speed)
            print(f"{label:<42} {acc / drafted:>8.1%} {len(prompts) * args.tokens / steps:>12.2f} {s:>8.0f} {ps:>12.0f} {s / ps:>8.2f}x")


if __name__ == "__main__":
    main()
