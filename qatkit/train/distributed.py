"""Training on several processes with PyTorch's own engine: FSDP2 (`fully_shard`) under
`torchrun`, checkpoints with `torch.distributed.checkpoint` (DCP).

    torchrun --standalone --nproc-per-node 8 -m qatkit.cli train MODEL --out RUN_DIR --batch-size 8 --export

What changes against one process, and what does not:
- The processes load, prepare and shard the models in turn (rank 0 first), so a machine holds
  whole float copies for one process at a time.
- Student and teacher are both sharded: each decoder layer is an FSDP unit (its weights gathered
  for its forward and backward, then freed), the rest of the model (embedding, final norm, head)
  is the root unit. Fake-quant runs on the gathered weight, so the numbers are the same. Frozen
  lookup tables not tied to the head are split by rows instead (RowShardedTable).
- `--batch-size` is the *global* micro-batch: every process draws the same sequences (same seed,
  same data position) and keeps its own 1/W of them; FSDP averages the gradients, so an
  optimizer step sees the same mean gradient as one process with that batch. Losses, KL and the
  gradient norm are averaged over the processes before they are logged or tested for NaN.
- Checkpoints are DCP directories: every process writes its own shards (no gather), and any
  number of processes, including one without torchrun, reads them back (DCP reshards on load).
  A run of one process reads a sharded checkpoint and a run of W reads a `checkpoint.pt`: the
  newer step wins.
- Rank 0 logs, draws the progress bar, writes metrics.jsonl and the exported file; at the end
  it gathers the trained tensors (the only full copy) and exports from a plain student.

    RUN_DIR/checkpoint/step-000040/   the DCP files of each process + trainer.json
    RUN_DIR/checkpoint/latest         the name of the last whole one (written last, atomically)
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import QatkitError
from ..atomic import fsync_tree, write_text

log = logging.getLogger(__name__)

SHARDED_DIR = "checkpoint"  # in the run directory


@dataclass(frozen=True)
class Group:
    """This process's place in a torchrun launch."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: object = None  # the 1-D DeviceMesh FSDP shards over (made once, by all processes together)

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True when torchrun started this process as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _die_with_launcher() -> None:
    """torchrun starts its workers in sessions of their own, so `kill -9` of torchrun alone
    leaves them training and writing into the run directory, beside the run a user resumes
    there. Linux's parent-death signal ends each worker with its launcher."""
    import ctypes
    import signal

    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    launcher = os.getppid()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher:  # it died before the signal was armed
        os._exit(1)


def setup() -> Group:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs)."""
    import torch.distributed as dist

    _die_with_launcher()
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        if torch.cuda.device_count() <= local:
            raise QatkitError(f"process {rank} of {world} wants GPU {local}, but this machine has {torch.cuda.device_count()}")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 throughout, as one process trains (loop.default_device)
        torch.backends.cudnn.allow_tf32 = False
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    return Group(rank, world, local, device, init_device_mesh(device.type, (world,)))


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(group: Group) -> None:
    import torch.distributed as dist

    dist.barrier(device_ids=[group.local_rank] if group.device.type == "cuda" else None)


@contextmanager
def in_turn(group: Group | None):
    """The processes run the block one after another, rank 0 first (filling caches the others
    then read: converted models, sampled sequences): process r passes r barriers before the
    block and the rest after it, so its block starts when process r-1's has ended."""
    if group is None:
        yield
        return
    for _ in range(group.rank):
        barrier(group)
    yield
    for _ in range(group.world - group.rank - 1):
        barrier(group)


def check_supported(cfg, group: Group) -> None:
    """What a sharded run cannot do yet, refused before anything loads."""
    t = cfg.train
    if t.batch_size % group.world:
        raise QatkitError(f"--batch-size {t.batch_size} is the global micro-batch and must split evenly over the {group.world} processes")
    if t.faithful:
        raise QatkitError("--faithful trains one process at a time (its llama.cpp rounding is not sharded yet)")
    if t.teacher_topk:
        raise QatkitError("--teacher-topk's disk cache is for one process (under torchrun the teacher is sharded and runs every step)")


class RowShardedTable(torch.nn.Module):
    """A frozen lookup table split by rows over the processes. Each process holds rows lo..hi;
    the ids of all processes are gathered (each has its own share of the batch), each process
    looks up those that fall in its rows (zeros for the rest), and a reduce-scatter adds the
    pieces and hands each process the rows of its own ids: exactly the whole lookup (one row
    plus zeros). Gemma 4 E2B's per-layer table (2.35B entries) costs 1/W of itself per device
    this way; as an FSDP unit it would be gathered whole for every lookup (14 GB of student and
    bf16 teacher at once)."""

    def __init__(self, table: torch.nn.Embedding, group: Group):
        super().__init__()
        rows = table.weight.shape[0]
        per = -(-rows // group.world)
        self.lo, self.hi = min(rows, group.rank * per), min(rows, (group.rank + 1) * per)
        self.register_buffer("rows", table.weight.detach()[self.lo : self.hi].to(group.device, copy=True), persistent=False)
        scale = getattr(table, "embed_scale", None)  # Gemma's scaled embeddings multiply the row, in the table's dtype
        self.register_buffer("scale", None if scale is None else scale.detach().to(group.device, table.weight.dtype), persistent=False)
        self.num_embeddings, self.embedding_dim = rows, table.weight.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        world = dist.get_world_size()
        every = ids.new_empty((world * ids.shape[0], *ids.shape[1:]))
        dist.all_gather_single(every, ids.contiguous())  # the processes' shares are the same shape
        here = (every >= self.lo) & (every < self.hi)
        local = (every - self.lo).clamp(0, max(0, self.hi - self.lo - 1))
        part = torch.nn.functional.embedding(local, self.rows) if self.hi > self.lo else self.rows.new_zeros((*every.shape, self.embedding_dim))
        part = part * here.unsqueeze(-1).to(part.dtype)
        out = part.new_empty((ids.shape[0], *part.shape[1:]))
        dist.reduce_scatter_single(out, part)  # sum over processes, this process's share back
        return out if self.scale is None else out * self.scale


def shard(model: torch.nn.Module, group: Group) -> None:
    """Spread `model` over the processes, in place: each frozen lookup table that does not share
    its weight with the output head (Gemma 4's per-layer table; an untied token embedding) split
    by rows (RowShardedTable); FSDP2 units on each decoder layer and on the whole model as the
    root (token embedding tied to the head, final norm); everything on the group's device."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise QatkitError(f"{type(model).__name__}: no decoder layers at model.layers to shard")
    head = getattr(model.get_output_embeddings(), "weight", None)
    tables = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding) and m.weight is not head and not m.weight.requires_grad]
    for name, table in tables:  # only this process's rows reach its device
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, RowShardedTable(table, group))
    # fully_shard moves each unit's weights and buffers to the device as it shards them: one
    # layer at a time is whole there, never the model
    for layer in layers:
        fully_shard(layer, mesh=group.mesh)
    fully_shard(model, mesh=group.mesh)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_batch(x: torch.Tensor, group: Group | None) -> torch.Tensor:
    """This process's share of the global micro-batch `x` (B, L): rows rank*B/W .. (rank+1)*B/W."""
    if group is None:
        return x
    n = len(x) // group.world
    return x[group.rank * n : (group.rank + 1) * n]


def mean_over(stats: dict[str, float], group: Group | None) -> dict[str, float]:
    """Each statistic averaged over the processes (their shares are equal)."""
    if group is None or not stats:
        return stats
    import torch.distributed as dist

    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=group.device)
    dist.all_reduce(t)
    return {k: float(v) / group.world for k, v in zip(keys, t.tolist())}


def global_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s result as a plain tensor (over FSDP's shards it is a replicated DTensor)."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ----------------------------------------------------------------------- sharded checkpoints
def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)  # only what trains, like checkpoint.pt


def latest(run_dir: Path) -> tuple[Path, int] | None:
    """The last whole sharded checkpoint of the run and its step, or None."""
    pointer = run_dir / SHARDED_DIR / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / SHARDED_DIR / pointer.read_text().strip()
    try:
        trainer = json.loads((path / "trainer.json").read_text())
        return path, int(trainer["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QatkitError(f"{path}: not a readable sharded checkpoint ({e})") from None


def remove_unfinished(run_dir: Path) -> int:
    """Directories of sharded writes a kill cut short (and superseded ones): all but `latest`."""
    root = run_dir / SHARDED_DIR
    if not root.is_dir():
        return 0
    keep = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    n = 0
    for p in root.iterdir():
        if p.is_dir() and p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


def save(run_dir: Path, student, opt, step: int, batches, cfg, group: Group) -> Path:
    """Every process writes its shards of the trainable tensors and the optimizer into a new
    step directory; rank 0 adds trainer.json (step, data position, config), fsyncs the directory
    and then points `latest` at it. A kill anywhere leaves `latest` on a whole checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = run_dir / SHARDED_DIR
    name = f"step-{step:06d}"
    tmp = root / f".{name}.tmp"
    if group.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(group)
    model_sd, optim_sd = get_state_dict(student, opt, options=_options())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    if group.main:
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "batches": batches.state_dict(), "config": asdict(cfg), "world": group.world}))
        fsync_tree(tmp)
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text(root / "latest", name)  # the switch: atomic and fsynced
        remove_unfinished(run_dir)
    barrier(group)
    return root / name


class _MetadataUnpickler(pickle.Unpickler):
    """DCP reads a checkpoint's `.metadata` with plain pickle, which runs whatever a crafted file
    names. qatkit reads it first with this one, which builds only the classes DCP's metadata is
    made of (checked on torch 2.13's files), and refuses any other."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
               ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
               ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED or module == "torch.distributed.checkpoint.metadata" or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is no part of a checkpoint's metadata")


def _weights_only_planner():
    """DCP's load planner, but its non-tensor items (the optimizer's settings) are read with
    torch's weights-only unpickler: DCP's own reads them with weights_only=False."""
    import io

    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            plain = torch.load(value, weights_only=True)  # numbers, strings, containers; no code
            buf = io.BytesIO()
            torch.save(plain, buf)
            buf.seek(0)
            super().load_bytes(read_item, buf)

    return Planner()


def _why(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def load(path: Path, student, opt, batches) -> int:
    """Read a sharded checkpoint into `student` and `opt` (sharded or not: DCP reshards to
    whatever this run has, one process included); returns its step. Nothing in it runs code:
    the metadata is checked by a restricted unpickler, tensors and settings are read weights-only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    try:
        trainer = json.loads((path / "trainer.json").read_text())
        with open(path / ".metadata", "rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as e:  # missing, cut, flipped, or foreign
        raise QatkitError(f"{path}: not a readable sharded checkpoint ({_why(e)})") from None
    model_sd, optim_sd = get_state_dict(student, opt, options=_options())  # the layout to fill
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=path, planner=_weights_only_planner())
        step = int(trainer["step"])
        batches.load_state_dict(trainer["batches"])
    except (Exception, CheckpointException) as e:  # a missing or foreign key, a damaged file (DCP's exception is a BaseException)
        raise QatkitError(f"{path}: this sharded checkpoint does not fit this run ({_why(e)})") from None
    for name, t in state["model"].items():
        local = t.to_local() if hasattr(t, "to_local") else t
        if isinstance(local, torch.Tensor) and not torch.isfinite(local).all():
            raise QatkitError(f"{path}: {name} holds values that are not finite")
    set_state_dict(student, opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_options(strict=False))
    return step


def load_whole(state: dict, student, opt) -> None:
    """A one-process checkpoint's whole tensors ({"params", "optimizer"} of checkpoint.pt) into a
    sharded student and its optimizer, each process keeping its shard. The optimizer state,
    numbered by position in the param groups, is renamed to the tensors' names, the form
    torch.distributed.checkpoint.state_dict reads."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    name = {id(p): n for n, p in student.named_parameters()}
    order = [name[id(p)] for g in opt.param_groups for p in g["params"]]
    saved = state["optimizer"]
    optim = {"state": {order[int(i)]: v for i, v in saved["state"].items()},
             "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}
    set_state_dict(student, opt, model_state_dict=state["params"], optim_state_dict=optim, options=_options(full_state_dict=True, strict=False))


def full_trainable_state(student) -> dict[str, torch.Tensor]:
    """The trained tensors, whole and on the CPU, on rank 0 (empty elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(student, options=_options(full_state_dict=True, cpu_offload=True))
