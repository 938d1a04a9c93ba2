"""Configuration: dataclasses with ../shared/SPEC.md's defaults, JSON round trip, and overrides by dotted key."""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from d2v.core.errors import ConfigError


@dataclass
class VisionModelConfig:
    """Pre-LN ViT with CLS token, LayerScale and one relative position bias shared by all blocks."""

    modality: str = "vision"
    image_size: int = 224
    patch_size: int = 16  # 0: from the image size (smallest divisor >= 2 giving at most 8 x 8)
    in_chans: int = 3
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-4  # the released recipe (large: 1e-5); Hugging Face's config default is 0.1
    # on the attention probabilities after softmax; the recipe's 0.05 (large: 0.15) is set by the presets, and the
    # default stays 0 so that a run saved before this field existed resumes unchanged
    attention_dropout: float = 0.0
    drop_path: float = 0.25
    # weights, CLS and mask token: normal(0, 0.02) cut at +-init_trunc std (BEiT's trunc_normal_(a=-std, b=std): 1,
    # which leaves an effective std of 0.011); 0: uncut (the CPU presets: their digits probe is better)
    init_trunc: float = 1.0
    ln_eps: float = 1e-6
    pixel_mean: list[float] = field(default_factory=list)  # per channel, applied by the encoder; empty: from data
    pixel_std: list[float] = field(default_factory=list)
    # "beit": data2vec 1.0's pre-LN ViT (relative position bias, LayerScale, mask token); "v2": data2vec 2.0's
    # post-LN ViT (fixed 2-D sin-cos positions, LayerNorm before the blocks, no LayerScale, encodes kept patches only)
    arch: str = "beit"
    prenet_depth: int = 0  # v2: the first blocks form a pre-net (local to images): never target layers


@dataclass
class TextModelConfig:
    """RoBERTa-style post-LN Transformer: token + learned position embedding -> LayerNorm -> dropout -> blocks."""

    modality: str = "text"
    vocab_size: int = 0  # 0: from the tokenizer trained on the corpus
    max_length: int = 512  # tokens per sequence; position table = max_length + 2 (RoBERTa offsets by pad_id + 1)
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    ln_eps: float = 1e-5
    pad_id: int = 1  # <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4, RoBERTa's order
    mask_id: int = 4
    tokenizer_sha256: str = ""  # of the tokenizer the embeddings belong to; set when the tokenizer is trained


@dataclass
class SpeechModelConfig:
    """wav2vec 2.0 layout: conv feature extractor (LayerNorm mode) -> projection -> conv positions -> post-LN blocks.

    Takes 16 kHz waveforms and normalizes each utterance itself (zero mean, unit variance over valid samples).
    """

    modality: str = "speech"
    conv_dim: list[int] = field(default_factory=lambda: [512] * 7)
    conv_kernel: list[int] = field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2])
    conv_stride: list[int] = field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2])  # 320 samples = 20 ms a frame
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    pos_conv_depth: int = 5
    pos_conv_kernel: int = 19
    pos_conv_groups: int = 16
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layerdrop: float = 0.05  # whole blocks skipped in training; the teacher never drops
    ln_eps: float = 1e-5
    sample_rate: int = 16000
    alibi: bool = False  # data2vec 2.0: attention biased by -|i - j| x a per-head slope with a learned scale
    prenet_depth: int = 0  # v2: the first blocks form a pre-net: never target layers


@dataclass
class MaskConfig:
    """Which positions the student does not see."""

    kind: str = "block"  # vision: BEiT block-wise
    ratio: float = 0.6
    min_block: int = 16  # smallest rectangle, in patches
    aspect_min: float = 0.3  # aspect ratio drawn log-uniform in [aspect_min, 1 / aspect_min]
    span_length: int = 4  # text "span": masked tokens come in runs of this many; speech: frames per span (10)
    span_prob: float = 0.065  # speech "span": chance that a frame starts a span (wav2vec 2.0)
    random_token: float = 0.1  # text: share of masked tokens replaced by a random token (BERT)
    unchanged: float = 0.1  # text: share of masked tokens left as they are (BERT); the rest become <mask>
    # data2vec 2.0: each sample is seen by the student `clones` times, each with its own mask (one teacher pass);
    # kinds "inverse_block" (images: blocks of block_size^2 kept), "block_1d" (speech: runs of span_length frames)
    # and "random" (text), each with exactly int(ratio * length) masked positions per row
    clones: int = 1
    block_size: int = 3  # inverse_block: side of the kept blocks
    adjust: float = 0.07  # inverse_block / block_1d: extra share of block centres drawn before the exact count


@dataclass
class TargetConfig:
    """How teacher layers become regression targets, and the regression loss."""

    top_k: int = 6
    layer: str = "block"  # "block": end of block; "ffn": FFN output before residual
    norm: str = "layer"  # per-layer norm: "layer" | "instance" | "none"
    final_norm: str = "layer"
    eps: float = 1e-5
    loss_beta: float = 2.0  # 0: L2; > 0: Smooth-L1 with this beta
    loss_scale: str = "inv_dim"  # per-row sum over D times: "one" | "inv_dim" (= mean over D) | "inv_sqrt_dim"
    head: str = "linear"  # "linear": Linear(D, D); "mlp": Linear(D, 2D) -> GELU -> Linear(2D, D)
    # text with BERT corruption: "mask_token": the loss only where the student's input shows <mask> (the released
    # recipe); "masked": also at the masked tokens replaced by a random token or left unchanged
    loss_on: str = "mask_token"
    # data2vec 2.0 (images): weight of the loss regressing the mean target over patches from each clone's CLS
    # output, averaged over clones, added to the mean loss over masked positions. The reference's cls_loss 0.01
    # multiplies a sum over the images x clones on each of its GPUs: base 16 x 16 -> 2.56, large 8 x 16 -> 1.28.
    cls_loss: float = 0.0


@dataclass
class EMAConfig:
    """teacher <- tau * teacher + (1 - tau) * student; tau rises linearly from decay to end_decay."""

    decay: float = 0.9998
    end_decay: float = 0.9998
    anneal_steps: int = 0
    shared: list[str] = field(default_factory=list)  # parameter-name prefixes the teacher takes from the student


@dataclass
class DecoderConfig:
    """data2vec 2.0's decoder: masked slots refilled with noise, conv layers (2-D for images, 1-D otherwise), each
    conv -> LayerNorm without affine -> GELU (+ residual when widths match), then a projection to the model width."""

    dim: int = 768
    kernel: int = 3
    groups: int = 16
    depth: int = 6
    residual: bool = True
    input_dropout: float = 0.0
    proj_hidden: int = 0  # 0: Linear(dim, D); > 0: Linear(dim, proj_hidden) -> GELU -> Linear(proj_hidden, D)


@dataclass
class OptimConfig:
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    schedule: str = "cosine"  # "cosine" | "tri_stage" | "constant"
    warmup_fraction: float = 0.0125  # 10 of 800 epochs
    hold_fraction: float = 0.0  # tri_stage only
    final_lr_ratio: float = 0.0
    clip_grad: float = 3.0  # 0: no clipping
    # Parameters exempt from weight decay, by rule: "1d" (every parameter with at most one dimension: biases, norms,
    # LayerScale), "bias" (names ending in .bias), or a named parameter: one of NO_DECAY_NAMES. Empty: decay all.
    # The default is what d2v did before this field existed (runs saved then resume with the same optimizer
    # groups); the presets set the recipes' lists (vision: 1d, bias, cls_token; speech and text v1: none).
    no_decay: list[str] = field(default_factory=lambda: ["1d", "bias", "cls_token", "mask_token", "rel_pos"])


# optim.no_decay names -> the student parameter-name prefix each stands for.
NO_DECAY_NAMES = {"cls_token": "cls_token", "mask_token": "mask_token", "rel_pos": "rel_pos_bias.",
                  "mask_emb": "mask_emb", "embeddings": "embeddings."}
NO_DECAY_RULES = ("1d", "bias", *NO_DECAY_NAMES)


@dataclass
class DataConfig:
    source: str = "digits"  # a built-in name, a path or a URL of shards; "" when `sources` names a mixture
    # a mixture (several --data): its sources, drawn by `weights` (relative; empty: equal) per sample position
    sources: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    image_size: int = 0  # 0: the data's own size; else images are resized to this
    crop_scale: tuple[float, float] = (0.6, 1.0)  # random resized crop, area fraction (1, 1): none
    hflip: bool = True
    color_jitter: float = 0.0  # brightness, contrast and saturation factors drawn from [1 - x, 1 + x] (BEiT: 0.4)
    skip_bad_files: bool = False
    vocab_size: int = 8192  # text: byte-level BPE vocabulary trained on the corpus
    tokenizer: str = ""  # text: a tokenizer.json to use instead of training one (e.g. RoBERTa's BPE)
    doc_per_line: bool = False  # text: one document per line (else one per file)
    sample_break: str = "none"  # text: "none" packs documents across blocks; "complete_doc": blocks of one document
    crop_seconds: float = 20.0  # speech: random crops of at most this long (data2vec: 320k samples)
    min_seconds: float = 0.0  # speech: files shorter are refused, or skipped with skip_bad_files (data2vec: 32k
    # samples = 2 s, skipped); 0: only what the encoder's receptive field needs
    num_workers: int = -1  # DataLoader workers; -1: automatic (files: one per spare core, up to 8; in memory: 0)


@dataclass
class RunConfig:
    steps: int = 500_000
    batch_size: int = 2048  # samples per optimizer update, all processes together (the global batch)
    # speech: > 0 makes an update hold as many utterances as fit in this many waveform samples, all processes
    # together (fairseq's max_tokens x GPUs; run.batch_size is then 0); 0: run.batch_size utterances per update
    batch_tokens: int = 0
    grad_accum: int = 1  # micro-batches per update on each process: micro-batch = batch_size / (processes x grad_accum)
    # "auto" | "fp32" | "bf16" | "fp16": autocast dtype over fp32 weights; auto: bf16 on a GPU that has it, else
    # fp32, resolved when the run starts (d2v.core.device.resolve_precision) and saved resolved, so a resumed run
    # keeps what it trained with (runs saved before "auto" existed hold their explicit value)
    precision: str = "auto"
    device: str = "auto"
    kernels: str = "auto"
    compile: str = "auto"  # torch.compile the student and teacher forward: "auto" | "on" | "off" (d2v.train.use_compile)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end (and on Ctrl-C)
    checkpoint_minutes: float = 30.0  # also save when this long has passed since the last checkpoint; 0: never
    strategy: str = "ddp"  # with several processes (torchrun): "ddp" (replicated) or "fsdp" (FSDP2, sharded)
    keep_checkpoints: int = 2
    collapse: str = "warn"  # "warn" | "stop"
    collapse_after: float = 0.2  # fraction of steps before the collapse guard looks
    eval_data: str = ""  # labelled set for the live k-NN monitor ("": off); built-ins use their test split
    eval_every: int = 0  # updates between k-NN evaluations (0: ten per run); always at the end
    log: str = ""  # "tensorboard": also write TensorBoard events to RUN/tb (metrics.jsonl stays the record)
    init_from: str = ""  # start from this encoder: a d2v export, a d2v run, or a transformers Data2Vec*Model dir
    # Recompute the student's blocks in the backward instead of keeping their activations: "off", "all", or N (the
    # first N blocks). Same gradients (dropout draws are replayed), less memory, about one more student forward.
    activation_checkpointing: str = "off"
    fused_adamw: str = "auto"  # AdamW as one fused kernel: "auto" (on CUDA), "on", "off" (torch's foreach AdamW)


@dataclass
class PretrainConfig:
    modality: str = "vision"
    preset: str = "base"
    # "v1": data2vec 1.0; "v2": data2vec 2.0 (kept tokens only, decoder, multi-mask). "v1" here is what a saved
    # config without the field means (runs from before v2); new runs take presets.DEFAULT_RECIPE per modality.
    recipe: str = "v1"
    model: VisionModelConfig = field(default_factory=VisionModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # v2 only
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


MODEL_CONFIGS: dict[str, type] = {"vision": VisionModelConfig, "text": TextModelConfig, "speech": SpeechModelConfig}


def from_dict(cls: type, data: dict[str, Any], prefix: str = ""):
    """Build dataclass `cls` from a (JSON) dict, recursing into nested dataclasses; unknown keys and values of the
    wrong type are errors naming the field."""
    data = _section(data, prefix.rstrip(".") or cls.__name__)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(prefix + u for u in sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if name == "model" and cls is PretrainConfig:
            model_cls = MODEL_CONFIGS.get(data.get("modality", "vision"))
            if model_cls is None:
                raise ConfigError(f"unknown modality {data.get('modality')!r}")
            value = from_dict(model_cls, value, f"{prefix}{name}.")
        elif dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, f"{prefix}{name}.")
        else:
            value = coerce(value, hint, prefix + name)
        kwargs[name] = value
    return cls(**kwargs)


def _section(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"config section {name!r} must be an object, got {value!r}")
    return value


def set_by_path(cfg: PretrainConfig, key: str, value: Any) -> None:
    """Set a dotted field such as 'optim.lr', converting `value` (often a string) to the field's declared type."""
    *parents, last = key.split(".")
    obj = cfg
    for part in parents:
        if not hasattr(obj, part) or not dataclasses.is_dataclass(getattr(obj, part)):
            raise ConfigError(f"unknown config section {part!r} in {key!r}")
        obj = getattr(obj, part)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if last not in fields:
        raise ConfigError(f"unknown config field {key!r}")
    if dataclasses.is_dataclass(getattr(obj, last)):
        raise ConfigError(f"{key!r} is a config section, not a field; set one of its fields, e.g. {key}.{dataclasses.fields(getattr(obj, last))[0].name}=...")
    if key in ("modality", "preset", "model.modality", "recipe"):
        raise ConfigError(f"{key} cannot be set with --set; use --modality / --preset / --recipe")
    hint = typing.get_type_hints(type(obj))[last]
    setattr(obj, last, coerce(value, hint, key))


def _kind(hint) -> tuple[type, type | None]:
    """(container or scalar type, element type) of a field's type hint: int, float, bool, str, list[x], tuple[x, ...]."""
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return origin, (args[0] if args else str)
    return hint, None


def _scalar(value: Any, kind: type, key: str) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ValueError
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError
        return float(value)
    if kind is str and not isinstance(value, str):
        raise ValueError
    return value


def coerce(value: Any, hint, key: str) -> Any:
    """`value` (a CLI string or a JSON value) as the type `hint` declares; a wrong type is a ConfigError."""
    kind, elem = _kind(hint)
    given = value
    try:
        if kind in (list, tuple):
            if isinstance(value, str):
                text = value.strip()
                value = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return kind(_scalar(v, elem, key) for v in value)
        return _scalar(value, kind, key)
    except (ValueError, OverflowError, TypeError):
        want = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        many = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}
        what = f"a list of {many.get(elem, 'values')}" if kind in (list, tuple) else want.get(kind, str(kind))
        raise ConfigError(f"{key} expects {what}, got {given!r}") from None
