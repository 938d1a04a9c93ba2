"""Every config value checked before anything is created: ranges, choices, cross-field rules and a memory
estimate. Each failure is one ConfigError sentence naming the field (as `--set` spells it) and what it accepts."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

from d2v.core.config import NO_DECAY_RULES, PretrainConfig
from d2v.core.device import available_bytes, resolve_precision
from d2v.core.errors import ConfigError
from d2v.data.mixture import quotas
from d2v.data.pipeline import BUILTIN, is_builtin
from d2v.masking import kinds
from d2v.models import build_encoder
from d2v.models.common import checkpointed_blocks
from d2v.models.vision import auto_patch_size
from d2v.runtime.distributed import env_world_size
from d2v.runtime.trackers import TRACKERS, check_installed, valid_log

MODALITIES = ("vision", "speech", "text")
RECIPES = ("v1", "v2")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
KERNELS = ("auto", "torch", "triton", "cuda", "cpu")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# (predicate, what the field accepts), by field name within its section; shared by every modality that has it.
Rule = tuple[Callable[[Any], bool], str]
_POS_INT: Rule = (lambda v: v >= 1, "an integer of at least 1")
_NONNEG_INT: Rule = (lambda v: v >= 0, "an integer of at least 0")
_PROB: Rule = (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)")
_UNIT: Rule = (lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]")
_POS: Rule = (lambda v: _finite(v) and v > 0, "a positive number")
_NONNEG: Rule = (lambda v: _finite(v) and v >= 0, "a number of at least 0")
_SMALL_POS: Rule = (lambda v: _finite(v) and 0 < v <= 1, "a positive number of at most 1")
_BOOL: Rule = (lambda v: isinstance(v, bool), "true or false")
# a given tokenizer.json (--tokenizer) places its specials where it likes (RoBERTa: <mask> = 50264)
_SPECIAL_ID: Rule = (lambda v: 0 <= v < 1 << 31, "the id of a special token (<s> <pad> </s> <unk> <mask>), at least 0")

RULES: dict[str, dict[str, Rule]] = {
    "model": {
        "image_size": (lambda v: v == 0 or 2 <= v <= 8192, "0 (from the data) or 2 to 8192 pixels"),
        "patch_size": (lambda v: 0 <= v <= 8192, "0 (from the image size) to 8192 pixels"), "in_chans": (lambda v: 0 <= v <= 64, "0 (from the data) to 64"),
        "dim": (lambda v: 1 <= v <= 65536, "an integer from 1 to 65536"),
        "depth": (lambda v: 1 <= v <= 1024, "an integer from 1 to 1024"),
        "num_heads": (lambda v: 1 <= v <= 1024, "an integer from 1 to 1024"),
        "mlp_ratio": (lambda v: _finite(v) and 0 < v <= 64, "a positive number of at most 64"),
        "layer_scale_init": (lambda v: _finite(v) and 0 <= v <= 10, "a number from 0 to 10"), "drop_path": _PROB,
        "init_trunc": (lambda v: _finite(v) and 0 <= v <= 10, "0 (uncut) or a number of standard deviations up to 10"),
        "ln_eps": _SMALL_POS,
        "pixel_mean": (lambda v: all(_finite(x) for x in v), "finite numbers, one per channel"),
        "pixel_std": (lambda v: all(_finite(x) and 0 < x <= 10 for x in v), "numbers in (0, 10], one per channel"),
        "tokenizer_sha256": (lambda v: v == "" or (len(v) == 64 and all(c in "0123456789abcdef" for c in v)),
                             "empty or the 64-hex-digit sha256 of the run's tokenizer (set by d2v)"),
        "vocab_size": (lambda v: 0 <= v <= 1_000_000, "0 (from the tokenizer) to 1000000"),
        "max_length": (lambda v: 8 <= v <= 1 << 20, "an integer from 8 to 1048576"),
        "ffn_dim": (lambda v: 1 <= v <= 1 << 20, "an integer from 1 to 1048576"), "dropout": _PROB, "attention_dropout": _PROB, "activation_dropout": _PROB,
        "layerdrop": _PROB, "pad_id": _SPECIAL_ID, "mask_id": _SPECIAL_ID,
        "conv_dim": (lambda v: len(v) >= 1 and all(1 <= x <= 65536 for x in v), "a non-empty list of integers from 1 to 65536"),
        "conv_kernel": (lambda v: len(v) >= 1 and all(1 <= x <= 1024 for x in v), "a non-empty list of integers from 1 to 1024"),
        "conv_stride": (lambda v: len(v) >= 1 and all(1 <= x <= 1024 for x in v), "a non-empty list of integers from 1 to 1024"),
        "pos_conv_depth": (lambda v: 1 <= v <= 64, "an integer from 1 to 64"),
        "pos_conv_kernel": (lambda v: 1 <= v <= 1024, "an integer from 1 to 1024"), "pos_conv_groups": _POS_INT,
        "sample_rate": (lambda v: 1000 <= v <= 384_000, "a sample rate in Hz between 1000 and 384000"),
        "arch": (lambda v: v in ("beit", "v2"), "'beit' (data2vec 1.0) or 'v2' (data2vec 2.0)"),
        "prenet_depth": (lambda v: 0 <= v <= 1024, "an integer from 0 to 1024"), "alibi": _BOOL,
    },
    "mask": {
        "ratio": (lambda v: _finite(v) and 0 < v < 1, "a number strictly between 0 and 1"),
        "min_block": (lambda v: 1 <= v <= 65536, "an integer from 1 to 65536"), "aspect_min": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
        "span_length": (lambda v: 1 <= v <= 65536, "an integer from 1 to 65536"), "span_prob": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
        "random_token": _UNIT, "unchanged": _UNIT,
        "clones": (lambda v: 1 <= v <= 256, "an integer from 1 to 256"),
        "block_size": (lambda v: 1 <= v <= 64, "an integer from 1 to 64"),
        "adjust": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    },
    "targets": {
        "top_k": _POS_INT, "layer": (lambda v: v in ("block", "ffn"), "'block' or 'ffn'"),
        "norm": (lambda v: v in ("layer", "instance", "none"), "'layer', 'instance' or 'none'"),
        "final_norm": (lambda v: v in ("layer", "instance", "none"), "'layer', 'instance' or 'none'"),
        "eps": _SMALL_POS, "loss_beta": (lambda v: _finite(v) and 0 <= v <= 100, "a number from 0 (L2) to 100"),
        "loss_scale": (lambda v: v in ("one", "inv_dim", "inv_sqrt_dim"), "'one', 'inv_dim' or 'inv_sqrt_dim'"),
        "head": (lambda v: v in ("linear", "mlp"), "'linear' or 'mlp'"),
        "loss_on": (lambda v: v in ("mask_token", "masked"), "'mask_token' or 'masked'"),
        "cls_loss": (lambda v: _finite(v) and 0 <= v <= 100, "a number from 0 (off) to 100"),
    },
    "decoder": {
        "dim": (lambda v: 1 <= v <= 65536, "an integer from 1 to 65536"),
        "kernel": (lambda v: 1 <= v <= 1023 and v % 2 == 1, "an odd integer from 1 to 1023"),
        "groups": (lambda v: 1 <= v <= 65536, "an integer from 1 to 65536"), "depth": (lambda v: 0 <= v <= 64, "an integer from 0 to 64"), "residual": _BOOL,
        "input_dropout": _PROB, "proj_hidden": (lambda v: 0 <= v <= 1 << 20, "an integer from 0 to 1048576"),
    },
    "ema": {"decay": _UNIT, "end_decay": _UNIT, "anneal_steps": _NONNEG_INT,
            "shared": (lambda v: all(isinstance(x, str) and x for x in v), "a list of parameter-name prefixes")},
    "optim": {
        "lr": (lambda v: _finite(v) and 0 < v <= 10, "a positive number of at most 10"),
        "betas": (lambda v: len(v) == 2 and all(_finite(x) and 0 <= x < 1 for x in v), "two numbers in [0, 1)"),
        "eps": _SMALL_POS, "weight_decay": (lambda v: _finite(v) and 0 <= v <= 10, "a number from 0 to 10"),
        "schedule": (lambda v: v in ("cosine", "tri_stage", "constant"), "'cosine', 'tri_stage' or 'constant'"),
        "warmup_fraction": _PROB, "hold_fraction": _PROB, "final_lr_ratio": _UNIT, "clip_grad": _NONNEG,
        "no_decay": (lambda v: all(x in NO_DECAY_RULES for x in v), "a list of " + ", ".join(NO_DECAY_RULES)),
    },
    "data": {
        "source": (lambda v: isinstance(v, str), "a built-in dataset name, a path or a URL"),
        "sources": (lambda v: all(isinstance(x, str) and x.strip() for x in v),
                    "a list of built-in dataset names, paths or URLs"),
        "image_size": (lambda v: v == 0 or 2 <= v <= 8192, "0 (the data's own size) or 2 to 8192 pixels"),
        "color_jitter": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
        "crop_scale": (lambda v: len(v) == 2 and all(_finite(x) for x in v) and 0 < v[0] <= v[1] <= 1,
                       "two area fractions 0 < min <= max <= 1, e.g. 0.6,1.0"),
        "vocab_size": (lambda v: 300 <= v <= 1_000_000, "an integer from 300 to 1000000"),
        "crop_seconds": (lambda v: _finite(v) and 0.1 <= v <= 3600, "a number of seconds from 0.1 to 3600"),
        "min_seconds": (lambda v: _finite(v) and 0 <= v <= 3600, "a number of seconds from 0 to 3600"),
        "num_workers": (lambda v: -1 <= v <= 256, "-1 (automatic) or an integer from 0 to 256"),
        "sample_break": (lambda v: v in ("complete_doc", "none"), "'complete_doc' or 'none'"),
        "tokenizer": (lambda v: v == "" or os.path.isfile(os.path.expanduser(v)), "empty or an existing tokenizer.json"),
    },
    "run": {
        "steps": (lambda v: 1 <= v <= 10**10, "an integer from 1 to 10^10"),
        "batch_size": (lambda v: 0 <= v <= 1 << 24, "an integer from 1 to 16777216 (0: by run.batch_tokens)"),
        "batch_tokens": (lambda v: 0 <= v <= 1 << 40, "an integer from 0 (count utterances) to 2^40 audio samples"),
        "grad_accum": (lambda v: 1 <= v <= 65536, "an integer from 1 to 65536"), "precision": (lambda v: v in PRECISIONS, ", ".join(PRECISIONS)),
        "device": (lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
                   "auto, cpu, cuda or cuda:N"),
        "kernels": (lambda v: v in KERNELS, ", ".join(KERNELS)),
        "compile": (lambda v: v in ("auto", "on", "off"), "auto, on or off"),
        "fused_adamw": (lambda v: v in ("auto", "on", "off"), "auto, on or off"),
        "activation_checkpointing": (lambda v: v in ("off", "all") or (v.isdigit() and int(v) >= 1),
                                     "off, all, or the number of blocks (from the first) to recompute"),
        "seed": (lambda v: 0 <= v < 2**32, "an integer from 0 to 2^32 - 1"),
        "log_every": _POS_INT, "checkpoint_every": _NONNEG_INT, "keep_checkpoints": _NONNEG_INT,
        "checkpoint_minutes": (lambda v: _finite(v) and 0 <= v <= 1e6, "minutes from 0 (never) to 1000000"),
        "strategy": (lambda v: v in ("ddp", "fsdp"), "'ddp' or 'fsdp'"),
        "collapse": (lambda v: v in ("warn", "stop"), "'warn' or 'stop'"), "collapse_after": _UNIT,
        "eval_data": (lambda v: v == "" or is_builtin(v) or os.path.exists(os.path.expanduser(v)),
                      "a built-in labelled set or an existing path"),
        "eval_every": _NONNEG_INT, "log": (valid_log, "a comma-separated list of " + ", ".join(TRACKERS)),
        "init_from": (lambda v: v == "" or os.path.isfile(os.path.join(os.path.expanduser(v), "config.json")),
                      "a directory with a config.json: a d2v export or run, or a transformers Data2Vec model"),
    },
}


# The pretrain flags that set a field, so that an error names what the user typed.
FLAGS = {
    "data.source": "--data", "data.sources": "--data", "data.weights": "--weights",
    "run.steps": "--steps", "run.batch_size": "--batch-size", "run.grad_accum": "--grad-accum",
    "optim.lr": "--lr", "data.image_size": "--image-size", "run.device": "--device", "run.precision": "--precision",
    "run.kernels": "--kernels", "run.compile": "--compile", "run.seed": "--seed", "run.checkpoint_every": "--checkpoint-every",
    "data.num_workers": "--num-workers", "data.vocab_size": "--vocab-size", "data.tokenizer": "--tokenizer",
    "run.eval_data": "--eval-data", "run.eval_every": "--eval-every", "run.log": "--log", "run.init_from": "--init-from",
    "data.doc_per_line": "--doc-per-line", "data.skip_bad_files": "--skip-bad-files",
}


def field_name(key: str) -> str:
    return f"{FLAGS[key]} ({key})" if key in FLAGS else key


# Data fields that one modality reads (DataConfig holds every modality's); the rest apply to all.
DATA_FIELD_MODALITY = {
    "image_size": "vision", "crop_scale": "vision", "hflip": "vision", "color_jitter": "vision",
    "vocab_size": "text", "tokenizer": "text", "doc_per_line": "text", "sample_break": "text",
    "crop_seconds": "speech", "min_seconds": "speech",
}


def check_modality_fields(keys, modality: str) -> None:
    """The options a user gave (dotted keys) against the run's modality: one ConfigError naming the option, the
    modality it applies to and this run's, for a data field of another modality or a model field this modality's
    encoder does not have."""
    from d2v.core.config import MODEL_CONFIGS

    own = {f.name for f in dataclasses.fields(MODEL_CONFIGS[modality])}
    for key in sorted(keys):
        section, _, name = key.partition(".")
        owner = DATA_FIELD_MODALITY.get(name) if section == "data" else None
        if section == "model" and name not in own:
            owner = next((m for m in MODALITIES if name in {f.name for f in dataclasses.fields(MODEL_CONFIGS[m])}),
                         None)
        if owner is not None and owner != modality:
            flag = FLAGS.get(key) or (FLAGS.get(f"data.{name}") if key == "model.image_size" else None)
            raise ConfigError(f"{flag or '--set ' + key} applies to {owner} only; this run pretrains {modality}")


def _fail(key: str, value: Any, accepts: str) -> None:
    raise ConfigError(f"{field_name(key)} must be {accepts}, got {value!r}")


def check_fields(cfg: PretrainConfig) -> None:
    """Each field against its rule (ranges, choices, finiteness)."""
    for section, rules in RULES.items():
        obj = getattr(cfg, section)
        for name, (ok, accepts) in rules.items():
            if not hasattr(obj, name):
                continue
            value = getattr(obj, name)
            try:
                good = ok(value)
            except (TypeError, ValueError):
                good = False
            if not good:
                _fail(f"{section}.{name}", value, accepts)


def check_relations(cfg: PretrainConfig) -> None:
    """Rules that tie fields together."""
    m, mk, t, o = cfg.model, cfg.mask, cfg.targets, cfg.optim
    if cfg.modality not in MODALITIES:
        raise ConfigError(f"unknown modality {cfg.modality!r}; choose vision, speech or text")
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"recipe {cfg.recipe!r} is unknown; use v1 (data2vec 1.0) or v2 (data2vec 2.0)")
    _check_recipe(cfg)
    _check_batch(cfg)
    if m.dim % m.num_heads:
        raise ConfigError(f"model.num_heads ({m.num_heads}) must divide model.dim ({m.dim})")
    prenet = getattr(m, "prenet_depth", 0)
    if prenet >= m.depth:
        raise ConfigError(f"model.prenet_depth ({prenet}) must be below model.depth ({m.depth})")
    if t.top_k > m.depth - prenet:
        what = f"model.depth ({m.depth})" if not prenet else f"model.depth - model.prenet_depth ({m.depth - prenet})"
        raise ConfigError(f"targets.top_k ({t.top_k}) cannot exceed the number of target blocks {what}")
    if mk.kind not in kinds(cfg.modality):
        raise ConfigError(f"mask.kind {mk.kind!r} is not available for {cfg.modality}; use "
                          + " or ".join(repr(k) for k in kinds(cfg.modality)))
    if mk.random_token + mk.unchanged > 1:
        raise ConfigError(f"mask.random_token + mask.unchanged must be at most 1, got {mk.random_token + mk.unchanged}")
    if o.warmup_fraction + o.hold_fraction > 1:
        raise ConfigError("optim.warmup_fraction + optim.hold_fraction must be at most 1")
    _check_sources(cfg)
    if cfg.modality == "vision":
        _check_vision_grid(cfg)
    if cfg.modality == "speech":
        if not len(m.conv_dim) == len(m.conv_kernel) == len(m.conv_stride):
            raise ConfigError("model.conv_dim, model.conv_kernel and model.conv_stride must have the same length")
        if m.dim % m.pos_conv_groups:
            raise ConfigError(f"model.pos_conv_groups ({m.pos_conv_groups}) must divide model.dim ({m.dim})")
    if cfg.modality == "text":
        if m.pad_id == m.mask_id:
            raise ConfigError("model.pad_id and model.mask_id must name different special tokens")
        if m.vocab_size and max(m.pad_id, m.mask_id) >= m.vocab_size:
            raise ConfigError(f"model.pad_id ({m.pad_id}) and model.mask_id ({m.mask_id}) must be below "
                              f"model.vocab_size ({m.vocab_size})")
        if mk.span_length > m.max_length:
            raise ConfigError(f"mask.span_length ({mk.span_length}) cannot exceed model.max_length ({m.max_length})")
    if cfg.modality == "speech":
        frames = tokens_per_sample(cfg)
        if frames < 2:
            raise ConfigError(f"a crop of {cfg.data.crop_seconds} s gives {frames} frame(s) after the conv front end "
                              "(stride product " f"{math.prod(m.conv_stride)}); raise data.crop_seconds")
        if mk.span_length >= frames:
            raise ConfigError(f"mask.span_length ({mk.span_length}) must be shorter than a crop ({frames} frames)")


def _check_batch(cfg: PretrainConfig) -> None:
    """An update holds either run.batch_size samples or (speech) run.batch_tokens audio samples, never both."""
    r = cfg.run
    if r.batch_tokens > 0 and cfg.modality != "speech":
        raise ConfigError(f"run.batch_tokens ({r.batch_tokens}) batches speech by audio samples; {cfg.modality} "
                          "updates hold --batch-size samples: set run.batch_tokens to 0")
    if r.batch_tokens > 0 and r.batch_size > 0:
        raise ConfigError(f"--batch-size (run.batch_size) {r.batch_size} and run.batch_tokens {r.batch_tokens} are "
                          "both set: an update holds run.batch_size utterances (add --set run.batch_tokens=0) or "
                          "run.batch_tokens audio samples (leave --batch-size out)")
    if r.batch_tokens == 0 and r.batch_size == 0:
        _fail("run.batch_size", 0, "an integer from 1 to 16777216 (or 0 with run.batch_tokens > 0, speech)")


def _check_sources(cfg: PretrainConfig) -> None:
    """One source (data.source), or a mixture (data.sources, at least two, with one weight each or none) of
    sources of the run's modality."""
    d = cfg.data
    if not d.sources:
        if not d.source.strip():
            raise ConfigError("--data (data.source) must be a built-in dataset name, a path or a URL, got ''")
        if d.weights:
            raise ConfigError("--weights (data.weights) weighs the sources of a mixture: give several --data")
        return
    if d.source:
        raise ConfigError(f"give the data either as data.source ({d.source!r}) or as data.sources (a mixture), "
                          "not both")
    if len(d.sources) < 2:
        raise ConfigError("data.sources names a mixture of at least two sources; one source goes in data.source "
                          "(--data)")
    quotas(d.weights, len(d.sources))
    for source in d.sources:
        other = next((m for m, names in BUILTIN.items() if source in names and m != cfg.modality), None)
        if other is not None and source not in BUILTIN.get(cfg.modality, ()):
            raise ConfigError(f"every source of a {cfg.modality} mixture must hold {cfg.modality} data, but "
                              f"{source!r} is a built-in {other} set")


def _check_recipe(cfg: PretrainConfig) -> None:
    """What ties the recipe to the model, masks and decoder."""
    m, mk, dec = cfg.model, cfg.mask, cfg.decoder
    arch = getattr(m, "arch", None)
    if cfg.targets.cls_loss > 0 and (cfg.recipe != "v2" or cfg.modality != "vision"):
        raise ConfigError(f"targets.cls_loss ({cfg.targets.cls_loss}) is data2vec 2.0's image CLS loss: it needs "
                          "--recipe v2 and --modality vision; set it to 0")
    if cfg.recipe == "v1":
        if mk.kind == "random":
            raise ConfigError("mask.kind 'random' is data2vec 2.0's text masking: use it with --recipe v2 (v1 text "
                              "masks with 'bert' or 'span')")
        if mk.clones != 1:
            raise ConfigError(f"mask.clones ({mk.clones}) > 1 needs --recipe v2 (data2vec 2.0's multi-mask)")
        if arch == "v2":
            raise ConfigError("model.arch 'v2' is data2vec 2.0's encoder (no mask token): use it with --recipe v2")
        return
    if arch == "beit":
        raise ConfigError("--recipe v2 needs model.arch 'v2' (the BEiT-style v1 encoder cannot skip masked patches)")
    if arch == "v2" and m.dim % 4:
        raise ConfigError(f"model.dim ({m.dim}) must be divisible by 4 for the 2-D sin-cos positions of model.arch v2")
    for width, name in ((m.dim, "model.dim"), (dec.dim, "decoder.dim")):
        if width % dec.groups:
            raise ConfigError(f"decoder.groups ({dec.groups}) must divide {name} ({width})")


def _check_vision_grid(cfg: PretrainConfig) -> None:
    m = cfg.model
    size = cfg.data.image_size or m.image_size
    if not size:
        return  # from the data; checked again once the data is read
    if m.image_size and cfg.data.image_size and m.image_size != cfg.data.image_size:
        raise ConfigError(f"model.image_size ({m.image_size}) differs from --image-size ({cfg.data.image_size})")
    patch = m.patch_size or auto_patch_size(size)
    if size % patch:
        raise ConfigError(f"model.patch_size ({patch}) must divide the image size ({size})")
    if size // patch < 2:
        raise ConfigError(f"an image of {size} px with {patch} px patches gives a {size // patch}x{size // patch} "
                          "grid; data2vec needs at least 2x2 patches (raise --image-size or lower model.patch_size)")
    if m.pixel_mean and m.in_chans and len(m.pixel_mean) != m.in_chans:
        raise ConfigError(f"model.pixel_mean needs one value per channel ({m.in_chans}), got {len(m.pixel_mean)}")
    if len(m.pixel_mean) != len(m.pixel_std):
        raise ConfigError("model.pixel_mean and model.pixel_std must have the same number of values")


def tokens_per_sample(cfg: PretrainConfig) -> int:
    m = cfg.model
    if cfg.modality == "vision":
        size = cfg.data.image_size or m.image_size or 8
        patch = m.patch_size or auto_patch_size(size)
        return (size // patch) ** 2 + 1
    if cfg.modality == "text":
        return m.max_length
    samples = int(cfg.data.crop_seconds * m.sample_rate)
    for stride in m.conv_stride:
        samples //= stride
    return max(samples, 1)


def estimate_bytes(cfg: PretrainConfig) -> int:
    """A lower bound on the memory one training step needs: fp32 weights with Adam state for the student, the
    teacher's weights, and the activations the student keeps for backward (B x T x D per block, times the
    tensors a pre/post-LN block stores, plus the attention probabilities)."""
    m = cfg.model
    parts = cfg.run.grad_accum * env_world_size()
    B = max(1, cfg.run.batch_size // parts)  # one process's micro-batch
    if cfg.run.batch_tokens > 0:  # speech by audio samples: at least this many full crops per micro-batch
        B = max(1, -(-cfg.run.batch_tokens // (parts * max(1, int(cfg.data.crop_seconds * cfg.model.sample_rate)))))
    D, L, T = m.dim, m.depth, tokens_per_sample(cfg)
    ffn = getattr(m, "ffn_dim", 0) or int(D * getattr(m, "mlp_ratio", 4.0))
    params = L * (4 * D * D + 2 * D * ffn)
    if cfg.modality == "text":
        params += max(m.vocab_size, cfg.data.vocab_size) * D + (m.max_length + 2) * D
    if cfg.modality == "speech":
        chans = [1, *m.conv_dim]
        params += sum(chans[i] * chans[i + 1] * k for i, k in enumerate(m.conv_kernel))
    weights = params * 4 * 5  # student, grad, two Adam moments, teacher
    if cfg.recipe == "v2":  # the student sees the kept tokens of every clone; the teacher keeps no activations
        B, T = B * cfg.mask.clones, max(1, int(T * (1.0 - cfg.mask.ratio)) + 1)
    per_block = B * T * (6 * D + 2 * ffn) + B * m.num_heads * T * T
    # a recomputed block keeps only its input; in the backward one block's activations exist at a time
    recomputed = checkpointed_blocks(cfg.run.activation_checkpointing, L)
    kept = per_block * (L - recomputed) + B * T * D * recomputed + (per_block if recomputed else 0)
    if cfg.modality == "speech":  # the conv front end's activations at its first (widest in time) layers
        samples = int(cfg.data.crop_seconds * m.sample_rate)
        kept += B * samples // max(m.conv_stride[0], 1) * m.conv_dim[0] * 2
    precision = resolve_precision(cfg.run.precision, _device_of(cfg.run.device))
    act_bytes = 4 if precision == "fp32" else 2
    return int(weights + kept * act_bytes)


def _device_of(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cuda" if name.startswith("cuda") else "cpu")


def memory_problem(cfg: PretrainConfig) -> str:
    """A sentence when one training step cannot fit in the device's memory, else ''."""
    need = estimate_bytes(cfg)
    have, where = available_bytes(cfg.run.device)
    if have and need > have:
        return (f"this config needs at least {need / 2**30:.1f} GiB per step but {where} has {have / 2**30:.1f} GiB; "
                "raise --grad-accum (same batch, smaller micro-batches per process), or lower "
                f"{'run.batch_tokens' if cfg.run.batch_tokens else '--batch-size'}, --image-size, model.dim or model.depth")
    return ""


def check_model(cfg: PretrainConfig) -> None:
    """Build the encoder on the meta device (no memory, no compute) and check what needs its parameter names."""
    import torch

    try:
        with torch.device("meta"):
            encoder = build_encoder(cfg.model)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ConfigError(f"the model config cannot be built: {str(exc).splitlines()[0]}") from None
    names = [n for n, _ in encoder.named_parameters()]
    for prefix in cfg.ema.shared:
        if not any(n.startswith(prefix) for n in names):
            raise ConfigError(f"ema.shared prefix {prefix!r} matches no parameter of the {cfg.modality} encoder "
                              f"(its parameters start with {', '.join(sorted({n.split('.')[0] + '.' for n in names}))})")


def validate_config(cfg: PretrainConfig, data_ready: bool = False, memory: bool = True) -> None:
    """Every check that needs no data: fields, relations between them, and (with memory) the memory estimate;
    with data_ready (the data filled in image size, channels, vocabulary) also a build of the model on the meta
    device."""
    check_fields(cfg)
    check_relations(cfg)
    check_installed(cfg.run.log)  # a missing tracker client fails before any work, on every process
    problem = memory_problem(cfg) if memory else ""
    if problem:
        raise ConfigError(problem)
    if data_ready:
        check_model(cfg)
