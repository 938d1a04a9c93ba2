"""Several processes, one run: launch detection, the process group, global-batch arithmetic, reductions, rank-agreed
stops and the DDP / FSDP2 wrappers. Everything that talks between processes is torch.distributed; this module
only decides what to send and when.

`torchrun --nproc-per-node N -m d2v pretrain ...` starts N copies of the command; each finds RANK, WORLD_SIZE and
LOCAL_RANK in its environment (torchrun sets them), joins the process group (nccl on CUDA, gloo on the CPU) and
trains on its LOCAL_RANK device. Rank 0 writes the run directory; every rank handles SIGTERM / SIGUSR1 / Ctrl-C.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as td

from d2v.core.errors import ConfigError

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")  # Ctrl-C, preemption / scancel, SLURM's --signal warning
STRATEGIES = ("ddp", "fsdp")


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher that sets the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def env_world_size() -> int:
    """The number of processes of this run, from the launcher's environment (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def env_rank() -> int:
    return int(os.environ.get("RANK", "0")) if launched() else 0


# ------------------------------------------------------------------------------------------------ batch arithmetic
@dataclass(frozen=True)
class BatchPlan:
    """How the global batch of one optimizer update is split: world processes x accum micro-batches.

    Micro-batch m of rank r in update u holds the samples at global positions first .. first + count - 1 of the
    run's sample stream (micro_batch(u, m)), so that which samples (and, since masks and augmentations are functions
    of the position, which masks and crops) make up an update does not depend on the number of processes. Without a
    budget every update holds `batch` samples and every micro-batch `micro` of them; with one (speech,
    run.batch_tokens) an update holds the utterances that fit in the budget's samples, cut into accum x world parts
    of about equal samples (d2v.data.budget.BudgetedUpdates)."""

    batch: int  # samples per optimizer update, all processes together (run.batch_size; 0 with a budget)
    accum: int  # micro-batches per update on each process (run.grad_accum)
    world: int
    rank: int = 0
    budget: object = None  # a d2v.data.budget.BudgetedUpdates, or None

    @property
    def micro(self) -> int:
        return self.batch // (self.accum * self.world)

    def first(self, update: int, m: int) -> int:
        return update * self.batch + (m * self.world + self.rank) * self.micro

    def micro_batch(self, update: int, m: int) -> tuple[int, int]:
        """(first sample position, count) of this rank's micro-batch m of `update`."""
        if self.budget is None:
            return self.first(update, m), self.micro
        return self.budget.parts(update, self.accum * self.world)[m * self.world + self.rank]

    def start(self, update: int) -> int:
        """The global sample position where `update` begins (all positions before it were consumed)."""
        return update * self.batch if self.budget is None else self.budget.span(update)[0]

    def samples(self, update: int) -> int:
        """Samples (utterances, images, blocks) in `update`, all processes together."""
        if self.budget is None:
            return self.batch
        start, end = self.budget.span(update)
        return end - start

    def describe(self) -> str:
        split = (f"{self.world} process{'es' if self.world != 1 else ''} x {self.accum} accumulated "
                 f"micro-batch{'es' if self.accum != 1 else ''}")
        if self.budget is not None:
            b = self.budget
            return (f"global batch {b.budget} audio samples per update (about {b.mean_count():.1f} utterances, at least "
                    f"{b.min_count}) = {split} of about {b.budget // (self.accum * self.world)} samples")
        return f"global batch {self.batch} per update = {split} x {self.micro} samples"


def batch_plan(batch: int, accum: int, world: int, rank: int = 0, budget=None) -> BatchPlan:
    """The split of `batch` samples (or of a budget's updates) per update; a ConfigError when it does not divide
    evenly (or an update of the budget can hold fewer utterances than there are micro-batches)."""
    if budget is not None:
        if budget.min_count < accum * world:
            raise ConfigError(
                f"run.batch_tokens {budget.budget} holds as few as {budget.min_count} utterance(s) of up to "
                f"{int(budget.costs.max())} samples, fewer than processes x --grad-accum = {world} x {accum}; raise "
                f"run.batch_tokens to at least {accum * world * int(budget.costs.max())} or lower --grad-accum")
        return BatchPlan(batch, accum, world, rank, budget)
    if batch % (accum * world):
        hint = [d for d in range(1, accum * world + 1) if batch % (d * world) == 0][-1:]
        fix = f" (e.g. --grad-accum {hint[0]})" if hint and world > 1 else ""
        raise ConfigError(f"--batch-size {batch} (the global batch per update) must be divisible by processes x "
                          f"--grad-accum = {world} x {accum} = {world * accum}; choose a batch size that is a "
                          f"multiple of {world * accum}{fix}")
    return BatchPlan(batch, accum, world, rank)


def check_strategy(cfg) -> None:
    """What run.strategy=fsdp cannot do, as a ConfigError before any process group exists."""
    if cfg.run.strategy != "fsdp":
        return
    if cfg.run.precision == "fp16":
        raise ConfigError("run.strategy=fsdp trains in fp32 or bf16; use --precision bf16 (or run.strategy=ddp)")
    if cfg.run.eval_data:
        raise ConfigError("the k-NN monitor (run.eval_data) needs the whole model in one process; with "
                          "run.strategy=fsdp leave run.eval_data empty (or use run.strategy=ddp)")


# ------------------------------------------------------------------------------------------------ process group
@dataclass
class Dist:
    """This process's place in the run. world == 1 without a launcher; then every collective below is a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this module initialized the process group (and destroys it)
    control: object = None  # a gloo group for host-side agreement (stop flags) without a device sync

    @property
    def enabled(self) -> bool:
        return self.world > 1 or self.owns_group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: torch.device) -> Dist:
    """Join the launcher's process group (once) and pick this rank's device; a single Dist without a launcher."""
    if not launched():
        return Dist(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} has no GPU: this machine shows {torch.cuda.device_count()}; "
                              "start at most that many processes per node (torchrun --nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not td.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        td.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    control = td.new_group(backend="gloo") if td.get_backend() != "gloo" else td.group.WORLD
    return Dist(rank=rank, world=world, local_rank=local, device=device, owns_group=owns, control=control)


def shutdown(dist: Dist) -> None:
    """Destroy the process group this module made. DDP and FSDP objects keep the group alive past
    destroy_process_group; freed only by the garbage collector at interpreter exit, the group's threads then abort
    the process ("terminate called without an active exception", exit 134) now and then. So collect first: the
    group goes away here, while the interpreter is whole."""
    if dist.owns_group and td.is_initialized():
        import gc

        gc.collect()
        td.destroy_process_group()
        gc.collect()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        td.barrier(group=dist.control)


def all_sum_(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """In-place sum over ranks of a device tensor (no host sync)."""
    if dist.enabled:
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def agree(values: list[int], dist: Dist) -> list[int]:
    """Element-wise maximum of small integers over ranks, on the host: what one rank raises, every rank sees."""
    if not dist.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    td.all_reduce(t, op=td.ReduceOp.MAX, group=dist.control)
    return t.tolist()


def broadcast_int(value: int, dist: Dist) -> int:
    """Rank 0's integer, on every rank."""
    if not dist.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    td.broadcast(t, src=0, group=dist.control)
    return int(t.item())


def union_pairs(pairs: list[tuple[str, str]], dist: Dist) -> list[tuple[str, str]]:
    """Every rank's (str, str) pairs together, each once, sorted (e.g. the files each rank left out as unreadable)."""
    if not dist.enabled:
        return sorted(set(map(tuple, pairs)))
    gathered: list = [None] * dist.world
    td.all_gather_object(gathered, list(pairs), group=dist.control)
    return sorted({tuple(p) for part in gathered for p in part})


def check_same(text: str, what: str, dist: Dist) -> None:
    """Fail on every rank when the ranks hold different `text` (e.g. the resolved config)."""
    if not dist.enabled:
        return
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
    lo, hi = agree([-h, h], dist)
    if -lo != hi:
        raise ConfigError(f"the {dist.world} processes resolved different {what}; every node must see the same "
                          "data and d2v version")


# ------------------------------------------------------------------------------------------------ signals
class StopSignals:
    """SIGINT, SIGTERM and SIGUSR1 become a flag the loop checks after each update (and agrees on over ranks): the
    run saves a checkpoint and exits with 128 + the signal number. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum = 0
        self._old: dict[int, object] = {}

    @property
    def set(self) -> bool:
        return self.signum != 0

    def __enter__(self):
        for name in STOP_SIGNALS:
            num = getattr(signal, name, None)
            if num is None:
                continue
            try:
                self._old[num] = signal.signal(num, self._handle)
            except ValueError:  # not in the main thread: no handlers, the default behaviour stays
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for num, old in self._old.items():
            signal.signal(num, old)


# ------------------------------------------------------------------------------------------------ wrapping
def wrap(model: torch.nn.Module, dist: Dist, strategy: str, find_unused: bool = False,
         mp_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The module to run forward/backward through: the model itself (one process), DDP, or (FSDP2) the model
    sharded in place per block, student and teacher alike."""
    if not dist.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DDP(model, device_ids=ids, forward_sync_buffers=False, find_unused_parameters=find_unused)
    if strategy == "fsdp":
        import warnings

        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # Blocks return their FFN output, a view; only the teacher's (no grad, so no backward hook to lose) is ever
        # modified in place (ops.targets normalizes it), so FSDP2's warning about views does not apply.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else MixedPrecisionPolicy()
        for net in (model.student, model.teacher):
            for block in net.blocks:
                fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        model.rebind()  # the EMA pairs now hold the sharded parameters
        return model
    raise ConfigError(f"run.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")


def no_sync(engine: torch.nn.Module, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an update (DDP no_sync; FSDP2 defers the
    reduce-scatter the same way)."""
    if last:
        return contextlib.nullcontext()
    if hasattr(engine, "no_sync"):
        return engine.no_sync()
    if hasattr(engine, "set_requires_gradient_sync"):
        return _fsdp_no_sync(engine)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(engine):
    engine.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        engine.set_requires_gradient_sync(True)

