"""Model FLOPs of one optimizer update, counted from a config's shapes, and the dense peak rates of GPUs that turn
an achieved rate into model FLOPs utilization (MFU).

What counts: the matrix multiplies, convolutions and attention products of the student's forward and backward, the
teacher's forward and (data2vec 2.0) the decoder, 2 FLOPs per multiply-add, as torch.utils.flop_counter counts
them (tests/test_flops.py checks every preset and recipe against it). Elementwise work (norms, activations, the
loss, the EMA, AdamW) is left out, as MFU conventionally does. A backward costs twice its forward for every product
whose input needs a gradient and once where only the weight does (the first layer on the data); attention's
backward is twice its forward (no recomputation counted, whatever the kernel does). Sequences are counted at their
nominal length (images: the patch grid; speech: data.crop_seconds; text: model.max_length) without padding; speech's
LayerDrop counts the student's blocks at their expected share (1 - model.layerdrop)."""
from __future__ import annotations

import re
from dataclasses import dataclass

PARTS = ("student_forward", "student_backward", "decoder_forward", "decoder_backward", "teacher_forward")


@dataclass
class _Count:
    """Forward and backward FLOPs of one network path, accumulated op by op."""

    fwd: float = 0.0
    bwd: float = 0.0

    def product(self, flops: float, input_grad: bool = True, weight_grad: bool = True) -> None:
        """A weighted product of `flops` forward FLOPs; its backward computes the input's and the weight's grads."""
        self.fwd += flops
        self.bwd += flops * (int(input_grad) + int(weight_grad))

    def linear(self, rows: float, d_in: int, d_out: int, input_grad: bool = True) -> None:
        self.product(2.0 * rows * d_in * d_out, input_grad)

    def conv(self, positions: float, c_out: int, c_in: int, groups: int, kernel: int, input_grad: bool = True) -> None:
        """A convolution producing `positions` outputs (per channel) of c_out channels, `kernel` taps per output."""
        self.product(2.0 * positions * c_out * (c_in // groups) * kernel, input_grad)

    def attention(self, seqs: float, tokens: int, dim: int) -> None:
        """Scores q k^T and the weighted sum p v over all heads: 2 x 2 T^2 D per sequence; backward twice that."""
        flops = 4.0 * seqs * tokens * tokens * dim
        self.fwd += flops
        self.bwd += 2.0 * flops

    def scaled(self, factor: float) -> "_Count":
        return _Count(self.fwd * factor, self.bwd * factor)

    def add(self, other: "_Count") -> None:
        self.fwd += other.fwd
        self.bwd += other.bwd


def _blocks(seqs: float, tokens: int, dim: int, ffn: int, depth: int) -> _Count:
    """`depth` Transformer blocks (qkv, attention, output projection, two FFN layers) over `seqs` sequences."""
    c = _Count()
    rows = seqs * tokens
    c.linear(rows, dim, 3 * dim)
    c.attention(seqs, tokens, dim)
    c.linear(rows, dim, dim)
    c.linear(rows, dim, ffn)
    c.linear(rows, ffn, dim)
    return c.scaled(depth)


def _head(rows: float, dim: int, kind: str) -> _Count:
    c = _Count()
    if kind == "mlp":
        c.linear(rows, dim, 2 * dim)
        c.linear(rows, 2 * dim, dim)
    else:
        c.linear(rows, dim, dim)
    return c


def _decoder(cfg, seqs: float, positions: int, two_d: bool, dim: int) -> _Count:
    """data2vec 2.0's conv decoder on `seqs` clones of `positions` positions, then its projection to `dim`."""
    dec, c = cfg.decoder, _Count()
    kernel = dec.kernel * dec.kernel if two_d else dec.kernel
    for i in range(dec.depth):
        c.conv(seqs * positions, dec.dim, dim if i == 0 else dec.dim, dec.groups, kernel)
    width = dec.dim if dec.depth else dim
    if dec.proj_hidden > 0:
        c.linear(seqs * positions, width, dec.proj_hidden)
        c.linear(seqs * positions, dec.proj_hidden, dim)
    else:
        c.linear(seqs * positions, width, dim)
    return c


def _ffn_dim(m) -> int:
    return getattr(m, "ffn_dim", 0) or int(m.dim * getattr(m, "mlp_ratio", 4.0))


def vision_grid(cfg) -> tuple[int, int, int]:
    """(image size, patch size, channels) of a vision config; a ValueError while the data has yet to set them."""
    from d2v.models.vision import auto_patch_size

    m = cfg.model
    size = m.image_size or cfg.data.image_size
    if not size or not m.in_chans:
        raise ValueError("the FLOP count of a vision config needs model.image_size and model.in_chans, which the "
                         "data sets for this preset (count after the pipeline has filled them)")
    return size, m.patch_size or auto_patch_size(size), m.in_chans


def kept_tokens(cfg, length: int) -> int:
    """Positions of `length` each data2vec 2.0 clone encodes, as the exact-count masks leave them (d2v.masking)."""
    ratio = cfg.mask.ratio
    if cfg.modality == "vision":
        return min(length, max(1, int(length * (1.0 - ratio))))
    if cfg.modality == "text":
        return min(max(int(length * (1.0 - ratio)), 1), max(length - 1, 1))
    masked = int(length * ratio)
    if length >= 2:
        masked = min(max(masked, 1), length - 1)
    return length - masked


def _vision(cfg) -> dict[str, _Count]:
    m = cfg.model
    size, patch, chans = vision_grid(cfg)
    n = (size // patch) ** 2
    embed = _Count()
    embed.conv(n, m.dim, chans, 1, patch * patch, input_grad=False)  # the images need no gradient
    ffn, depth = _ffn_dim(m), m.depth
    student = _Count()
    student.add(embed)
    decoder = _Count()
    if cfg.recipe == "v2":
        clones = cfg.mask.clones
        student.add(_blocks(clones, 1 + kept_tokens(cfg, n), m.dim, ffn, depth))
        decoder = _decoder(cfg, clones, n, True, m.dim)
    else:
        student.add(_blocks(1, 1 + n, m.dim, ffn, depth))
        student.add(_head(n, m.dim, cfg.targets.head))
    teacher = _Count()
    teacher.add(embed)
    teacher.add(_blocks(1, 1 + n, m.dim, ffn, depth))
    return {"student": student, "decoder": decoder, "teacher": teacher}


def speech_frames(cfg) -> list[int]:
    """Output lengths of each conv layer of the front end for a crop of data.crop_seconds."""
    m = cfg.model
    length, lengths = int(round(cfg.data.crop_seconds * m.sample_rate)), []
    for k, s in zip(m.conv_kernel, m.conv_stride):
        length = max((length - k) // s + 1, 0)
        lengths.append(length)
    return lengths


def _speech(cfg) -> dict[str, _Count]:
    m = cfg.model
    lengths = speech_frames(cfg)
    T, ffn = lengths[-1], _ffn_dim(m)
    front = _Count()
    chans = [1, *m.conv_dim]
    for i, (k, length) in enumerate(zip(m.conv_kernel, lengths)):
        front.conv(length, chans[i + 1], chans[i], 1, k, input_grad=i > 0)  # the waveform needs no gradient
    front.linear(T, m.conv_dim[-1], m.dim)  # the feature projection

    def pos_conv(seqs: float) -> _Count:
        c = _Count()
        for _ in range(m.pos_conv_depth):
            c.conv(seqs * T, m.dim, m.dim, m.pos_conv_groups, m.pos_conv_kernel)
        return c

    keep_blocks = 1.0 - m.layerdrop  # the student skips each block with probability layerdrop
    student = _Count()
    student.add(front)
    decoder = _Count()
    if cfg.recipe == "v2":
        clones = cfg.mask.clones
        student.add(pos_conv(clones))  # each clone's position convs run over all its frames
        student.add(_blocks(clones, kept_tokens(cfg, T), m.dim, ffn, m.depth).scaled(keep_blocks))
        decoder = _decoder(cfg, clones, T, False, m.dim)
    else:
        student.add(pos_conv(1))
        student.add(_blocks(1, T, m.dim, ffn, m.depth).scaled(keep_blocks))
        student.add(_head(T, m.dim, cfg.targets.head))
    teacher = _Count()
    shared = tuple(cfg.ema.shared)
    if not all(any(p.startswith(s) for s in shared) for p in ("feature_extractor.", "feature_projection.")):
        teacher.add(front)  # a teacher with its own front end runs it; else it reuses the student's features
    teacher.add(pos_conv(1))
    teacher.add(_blocks(1, T, m.dim, ffn, m.depth))
    return {"student": student, "decoder": decoder, "teacher": teacher}


def _text(cfg) -> dict[str, _Count]:
    m = cfg.model
    T, ffn = m.max_length, _ffn_dim(m)
    student, decoder = _Count(), _Count()
    if cfg.recipe == "v2":
        clones = cfg.mask.clones
        student.add(_blocks(clones, kept_tokens(cfg, T), m.dim, ffn, m.depth))
        decoder = _decoder(cfg, clones, T, False, m.dim)
    else:
        student.add(_blocks(1, T, m.dim, ffn, m.depth))
        student.add(_head(T, m.dim, cfg.targets.head))
    return {"student": student, "decoder": decoder, "teacher": _blocks(1, T, m.dim, ffn, m.depth)}


def flops_per_sample(cfg) -> dict[str, float]:
    """Model FLOPs per sample of a PretrainConfig, by part (PARTS) and "total"."""
    counts = {"vision": _vision, "speech": _speech, "text": _text}[cfg.modality](cfg)
    s, d, t = counts["student"], counts["decoder"], counts["teacher"]
    parts = {"student_forward": s.fwd, "student_backward": s.bwd, "decoder_forward": d.fwd, "decoder_backward": d.bwd,
             "teacher_forward": t.fwd}
    parts["total"] = sum(parts.values())
    return parts


def flops_per_update(cfg) -> dict[str, float]:
    """Model FLOPs of one optimizer update (run.batch_size samples, all processes together) of a PretrainConfig, by
    part: student_forward, student_backward (encoder and, v1, the regression head), decoder_forward,
    decoder_backward (data2vec 2.0; 0 for v1), teacher_forward, and their "total". Needs the data-dependent
    model fields (image size, channels) where the preset leaves them to the data: a ValueError otherwise."""
    return {k: v * cfg.run.batch_size for k, v in flops_per_sample(cfg).items()}


# ---------------------------------------------------------------------------------------------- peak rates
@dataclass(frozen=True)
class Peak:
    """Dense (no sparsity) peak rates of a GPU in TFLOP/s at its boost clock, from NVIDIA's datasheets."""

    name: str
    bf16: float | None  # tensor cores, bf16 in, fp32 accumulate (None: no bf16 tensor cores)
    fp16: float  # tensor cores, fp16 in, fp32 accumulate
    tf32: float | None
    fp32: float  # CUDA cores, no tensor cores
    source: str


# Matched in order against torch.cuda.get_device_name() (the first pattern that matches wins). The datasheets quote
# tensor rates "with sparsity"; the dense rates here are half of those.
PEAKS: tuple[tuple[str, Peak], ...] = (
    (r"H100.*NVL", Peak("H100 NVL", 835.5, 835.5, 417.5, 60.0, "NVIDIA H100 datasheet (H100 NVL column)")),
    (r"H100.*PCIe", Peak("H100 PCIe", 756.5, 756.5, 378.0, 51.2, "NVIDIA H100 datasheet (H100 PCIe column)")),
    (r"H100", Peak("H100 SXM", 989.4, 989.4, 494.7, 66.9, "NVIDIA H100 datasheet (H100 SXM column)")),
    (r"H200.*NVL", Peak("H200 NVL", 835.5, 835.5, 417.5, 60.0, "NVIDIA H200 datasheet (H200 NVL column)")),
    (r"H200", Peak("H200 SXM", 989.4, 989.4, 494.7, 66.9, "NVIDIA H200 datasheet (H200 SXM column)")),
    (r"A100", Peak("A100", 312.0, 312.0, 156.0, 19.5, "NVIDIA A100 datasheet (SXM and PCIe alike)")),
    (r"\bA10\b", Peak("A10", 125.0, 125.0, 62.5, 31.2, "NVIDIA A10 datasheet")),
    (r"L40S", Peak("L40S", 362.05, 362.05, 183.0, 91.6, "NVIDIA L40S datasheet")),
    (r"\bL4\b", Peak("L4", 121.0, 121.0, 60.0, 30.3, "NVIDIA L4 datasheet")),
    (r"V100.*PCIE|V100.*PCIe", Peak("V100 PCIe", None, 112.0, None, 14.0, "NVIDIA V100 datasheet (PCIe)")),
    (r"V100", Peak("V100 SXM2", None, 125.0, None, 15.7, "NVIDIA V100 datasheet (SXM2)")),
    (r"RTX 4090", Peak("RTX 4090", 165.2, 165.2, 82.6, 82.6, "NVIDIA Ada GPU architecture whitepaper (fp32 accumulate)")),
    (r"RTX 3090", Peak("RTX 3090", 71.0, 71.0, 35.6, 35.6, "NVIDIA Ampere GA102 whitepaper (fp32 accumulate)")),
)


def device_peak(device_name: str) -> Peak | None:
    """The peak rates of the GPU named `device_name` (torch.cuda.get_device_name), or None if it is not listed."""
    for pattern, peak in PEAKS:
        if re.search(pattern, device_name):
            return peak
    return None


def peak_tflops(device_name: str, precision: str, tf32: bool = False) -> float | None:
    """The dense peak TFLOP/s a run at `precision` ("fp32", "bf16", "fp16") can reach on `device_name`: tensor-core
    rates for bf16 / fp16; for fp32 the CUDA-core rate, or the TF32 tensor-core rate when `tf32` matmuls are allowed.
    None for a device not in PEAKS (a CPU included) or a precision it lacks."""
    peak = device_peak(device_name)
    if peak is None:
        return None
    if precision == "fp32":
        return peak.tf32 if tf32 else peak.fp32
    return peak.bf16 if precision == "bf16" else peak.fp16


def mfu(flops_per_s: float, device_name: str, precision: str, tf32: bool = False) -> float | None:
    """Achieved model FLOP/s over the device's dense peak at `precision`; None where the peak is unknown."""
    peak = peak_tflops(device_name, precision, tf32)
    return None if not peak else flops_per_s / (peak * 1e12)
