"""Where a .pte's resident memory goes: one process loads the program through ExecuTorch's
Python runtime, then runs it, and reads /proc/self/status after each stage (resident memory
above what the process held before, its peak, and what the loader locked with mlock).

    python benchmarks/pte_load_memory.py PROGRAM.pte      (e.g. the --save file of mobile_vs_gguf.py)

As an app loads it (no mlock allowed), as root:
    setpriv --inh-caps=-ipc_lock --bounding-set=-ipc_lock prlimit --memlock=0:0 -- python benchmarks/pte_load_memory.py PROGRAM.pte
"""

from __future__ import annotations

import sys
from pathlib import Path


def status(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def main() -> None:
    import executorch.kernels.quantized  # noqa: F401
    import torch
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.runtime import Runtime

    torch.set_num_threads(2)
    base = status("VmRSS")

    def say(stage: str) -> None:
        print(f"{stage:<22} resident +{status('VmRSS') - base:7.1f} MB   peak +{status('VmHWM') - base:7.1f} MB   locked {status('VmLck'):6.1f} MB")

    from qatkit.runtime.executorch import data_path

    pte = Path(sys.argv[1])
    ptd = data_path(pte)  # the tied table's named data, where the program keeps it beside itself
    program = Runtime.get().load_program(pte, **({"data_path": ptd} if ptd.exists() else {}))
    say("program loaded")
    method = program.load_method("forward")
    say("method loaded")
    method.execute([torch.tensor([[5]]), torch.tensor([0])])
    say("after 1 token")
    method.execute([torch.arange(100, 108)[None], torch.tensor([1])])
    say("after 8 tokens")
    method.execute([torch.arange(200, 328)[None], torch.tensor([9])])
    say("after 128 tokens")
    for i in range(20):
        method.execute([torch.tensor([[7 + i]]), torch.tensor([137 + i])])
    say("after 20 decode steps")


if __name__ == "__main__":
    main()
