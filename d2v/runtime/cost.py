"""What a pretraining run costs, known before it starts: parameters (student, teacher, head or decoder), FLOPs per
update, the memory one process needs and its parts, and from a few timed updates the time per update and per run.

How the estimate is made (`d2v pretrain --estimate` / `--dry-run`):

- Parameters: counted on the objective as built (the teacher is a full copy of the student's encoder).
- FLOPs and activations are counted on one real micro-batch of the run's data, not modelled: it goes forward and
  backward under torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention, forward and
  backward; the teacher's forward included; elementwise ops and the optimizer are not counted), while a
  saved-tensors hook adds up the distinct storages autograd keeps for backward (the activations), each attributed
  to the student block running when it was saved. Both grow linearly with the samples of a micro-batch, so a
  probe of a few samples is scaled to the run's micro-batch (and FLOPs to the global batch).
- Memory of one process, counted: the process as it stands before the model is built (Python, torch, the data in
  memory: measured) + fp32 weights of student, teacher and head / decoder + the student's gradients + AdamW's two
  moments + the activations of one micro-batch + the largest single activation again (the gradient of the tensor
  being back-propagated). Temporaries that are not kept for backward and what the allocator holds on to come on
  top, so the peak is also measured: the process's peak resident memory (on a GPU, the peak allocated) over the
  timed updates below. Where those used smaller micro-batches than the run's, the peak of one update of the probe's
  size is measured too, and the growth per sample between the two carries the peak to the run's micro-batch.
  That measured peak is the estimate (or the peak of the set-up before it, the data read and the pixel statistics,
  if higher); the counted parts say where it goes. DataLoader workers (file data) are processes of their own and
  not in it.
- With per-block activation checkpointing, a block keeps only its input until backward reaches it, and one
  block's activations at a time exist again: the activations then cost the input of every block plus the largest
  block's saved tensors plus everything saved outside the blocks; the peak falls by the difference.
- Time: a few real updates of the run's config on this device, after one untimed warm-up, through the training
  loop's own update (data, forward, backward, clipping, optimizer, EMA); their mean times the remaining steps is
  the run's estimate (start-up, k-NN evaluations and checkpoint writes are not in it). When a whole
  update would take too long (or not fit), updates of one smaller micro-batch are timed: their optimizer step and
  EMA update (timed apart) count once per update, the rest scales with the samples."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field

import torch


@dataclass
class Counts:
    """What one probe micro-batch of `samples` samples cost."""

    samples: int
    flops: int  # forward + backward of the student path, forward of the teacher
    activations: int  # bytes autograd kept for backward, all told
    outside_blocks: int = 0  # of which saved outside the student's blocks
    block_saved: list[int] = field(default_factory=list)  # saved within each student block
    block_input: list[int] = field(default_factory=list)  # bytes of each student block's input
    largest: int = 0  # the largest single saved storage


@dataclass
class Estimate:
    """The cost of one process of a run; bytes are per process, flops per global update."""

    params: dict[str, int]  # "student", "teacher", "head" or "decoder"
    flops_per_update: float
    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int
    baseline: int  # the process before the model (Python, torch, data held in memory)
    probe_samples: int
    micro: int  # samples per micro-batch of the run
    seconds_per_update: float = float("nan")
    timed_micro: int = 0  # samples of the micro-batches the timed updates used
    timed_whole: bool = False  # whole updates of the run's config were timed (else micro-batches, scaled)
    timed_updates: list[float] = field(default_factory=list)
    steps_left: int = 0
    missing: str = ""  # why FLOPs, activations and time are unknown (the model does not fit here to be measured)
    peak: int = 0  # measured over the timed updates (scaled to the run's micro-batch); 0: not measured

    @property
    def counted(self) -> int:
        """Bytes of the counted parts: the process before the model, weights, gradients, AdamW, activations."""
        return self.baseline + self.weights + self.gradients + self.optimizer + self.activations

    @property
    def memory(self) -> int:
        """Bytes one process needs at its peak (without activation checkpointing): measured, else counted."""
        return self.peak or self.counted

    @property
    def memory_checkpointed(self) -> int:
        return self.memory - self.activations + self.activations_checkpointed

    @property
    def run_seconds(self) -> float:
        return self.seconds_per_update * self.steps_left

    def to_dict(self) -> dict:
        """The estimate as JSON values (NaN, where unknown, as null)."""
        out = dataclasses.asdict(self)
        out.update(memory=self.memory, counted=self.counted, memory_checkpointed=self.memory_checkpointed,
                   run_seconds=self.run_seconds)
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in out.items()}


def parameter_counts(model) -> dict[str, int]:
    """Parameters of a Data2Vec objective: the student's encoder, the teacher's copy, and the v1 regression head or
    the v2 decoder."""
    def n(module) -> int:
        return sum(p.numel() for p in module.parameters())

    out = {"student": n(model.student), "teacher": n(model.teacher)}
    if getattr(model, "decoder", None) is not None:
        out["decoder"] = n(model.decoder)
    if getattr(model, "head", None) is not None:
        out["head"] = n(model.head)
    return out


def state_bytes(model) -> tuple[int, int, int]:
    """(weights, gradients, AdamW state) bytes of a Data2Vec objective in fp32: every parameter and buffer is
    held, the trainable ones also have a gradient and two moments."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return weights, trainable, 2 * trainable


@contextlib.contextmanager
def counting(model, samples: int):
    """Count the FLOPs and saved activations of what runs inside (one forward and backward of `samples`); yields
    the Counts, filled when the block exits."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = Counts(samples, 0, 0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}  # storage -> bytes
    where: dict[int, int] = {}  # storage -> student block (-1: outside)
    blocks = list(getattr(model.student, "blocks", []))
    current = [-1]
    inputs = [0] * len(blocks)

    def enter(i):
        def hook(module, args):
            current[0] = i
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is not None and torch.is_grad_enabled():
                inputs[i] = max(inputs[i], x.numel() * x.element_size())
        return hook

    def leave(module, args, out):
        current[0] = -1

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in params and ptr not in seen and t.device.type != "meta":
                seen[ptr], where[ptr] = storage.nbytes(), current[0]
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage (sparse, nested)
            pass
        return t

    handles = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(leave) for b in blocks]
    flop_mode = FlopCounterMode(display=False)
    try:
        with flop_mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield counts
    finally:
        for h in handles:
            h.remove()
    counts.flops = int(flop_mode.get_total_flops())
    counts.activations = sum(seen.values())
    counts.largest = max(seen.values(), default=0)
    counts.outside_blocks = sum(b for p, b in seen.items() if where[p] < 0)
    counts.block_saved = [sum(b for p, b in seen.items() if where[p] == i) for i in range(len(blocks))]
    counts.block_input = inputs


def checkpointed_activations(c: Counts) -> int:
    """Saved bytes of the probe with per-block activation checkpointing: everything saved outside the blocks, each
    block's input, and one block's saved tensors at a time (the largest)."""
    if not c.block_saved:
        return c.activations
    return c.outside_blocks + sum(c.block_input) + max(c.block_saved)


def reset_peak(device: torch.device) -> None:
    """Start a new window for peak_bytes: the GPU's peak statistics, or the kernel's peak resident memory of this
    process (Linux: writing 5 to /proc/self/clear_refs sets VmHWM to the current size; elsewhere the peak then
    covers the process's whole life)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes(device: torch.device) -> int:
    """The peak since reset_peak (or since the process began): resident memory (CPU), or allocated on a GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def scaled_peak(small: tuple[int, int], large: tuple[int, int], micro: int) -> int:
    """The peak of a micro-batch of `micro` samples from two measured (samples, peak bytes), small and large: the
    larger one plus the growth per sample between them for the samples it lacks."""
    (b, p_b), (m, p_m) = small, large
    per_sample = max(0.0, (p_m - p_b) / (m - b)) if m > b else 0.0
    return int(p_m + per_sample * max(0, micro - m))


def process_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def estimate(model, counts: Counts, micro: int, accum: int, world: int, baseline: int, steps_left: int = 0) -> Estimate:
    """The Estimate of a run whose processes each take `accum` micro-batches of `micro` samples per update, from
    the objective and one probe's counts."""
    scale = micro / counts.samples
    weights, gradients, optimizer = state_bytes(model)
    act = int(counts.activations * scale + counts.largest * scale)
    ckpt = int(checkpointed_activations(counts) * scale + counts.largest * scale)
    return Estimate(params=parameter_counts(model), flops_per_update=counts.flops / counts.samples * micro * accum * world,
                    weights=weights, gradients=gradients, optimizer=optimizer, activations=act,
                    activations_checkpointed=ckpt, baseline=baseline, probe_samples=counts.samples, micro=micro,
                    steps_left=steps_left)


def unprobed(model, micro: int, baseline: int) -> Estimate:
    """What is known of a run without running anything: the parameters and the state's memory (a model built on
    the meta device will do)."""
    weights, gradients, optimizer = state_bytes(model)
    return Estimate(params=parameter_counts(model), flops_per_update=float("nan"), weights=weights,
                    gradients=gradients, optimizer=optimizer, activations=0, activations_checkpointed=0,
                    baseline=baseline, probe_samples=0, micro=micro)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def human_seconds(s: float) -> str:
    if s != s:  # nan
        return "unknown"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h" if s < 172800 else f"{s / 86400:.1f} days"
