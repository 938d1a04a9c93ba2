"""Named presets: data, not code paths. Each is a set of dotted overrides on the modality's SPEC defaults."""
from __future__ import annotations

from typing import Any

from d2v.config import MODEL_CONFIGS, ConfigError, PretrainConfig, set_by_path

# Vision: base and large follow ../shared/SPEC.md; tiny and small are sized for CPU work on small images.
_VISION_CPU = {
    "model.image_size": 0,  # from the data
    "model.patch_size": 0,  # chosen from the image size
    "model.in_chans": 0,  # from the data
    "model.drop_path": 0.0,
    "model.layer_scale_init": 0.1,
    "mask.min_block": 4,
    "data.image_size": 0,
    "data.crop_scale": (0.7, 1.0),
    "data.hflip": False,  # small CPU sets are often digits and letters, which flipping changes
    "ema.decay": 0.998,
    "ema.end_decay": 0.9999,
    "optim.lr": 1e-3,
    "optim.warmup_fraction": 0.05,
    "run.batch_size": 128,
    "run.log_every": 10,
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "vision": {
        "tiny": {
            **_VISION_CPU,
            "model.dim": 96,
            "model.depth": 4,
            "model.num_heads": 3,
            "targets.top_k": 3,
            "ema.anneal_steps": 300,
            "run.steps": 300,
        },
        "small": {
            **_VISION_CPU,
            "model.dim": 192,
            "model.depth": 6,
            "model.num_heads": 6,
            "targets.top_k": 4,
            "ema.anneal_steps": 1000,
            "run.steps": 1000,
        },
        "base": {"data.image_size": 224},
        "large": {
            "data.image_size": 224,
            "model.dim": 1024,
            "model.depth": 24,
            "model.num_heads": 16,
        },
    },
}

DEFAULT_PRESET = {"vision": "tiny"}


def modalities() -> list[str]:
    return sorted(PRESETS)


def preset_names(modality: str) -> list[str]:
    return list(PRESETS.get(modality, {}))


def preset_config(modality: str, name: str | None = None) -> PretrainConfig:
    """The resolved config of a named preset (default: the modality's CPU-sized default)."""
    if modality not in PRESETS:
        raise ConfigError(f"unknown modality {modality!r}; choose one of {', '.join(modalities())}")
    name = name or DEFAULT_PRESET[modality]
    if name not in PRESETS[modality]:
        raise ConfigError(
            f"unknown {modality} preset {name!r}; choose one of {', '.join(preset_names(modality))}"
        )
    cfg = PretrainConfig(modality=modality, preset=name, model=MODEL_CONFIGS[modality]())
    for key, value in PRESETS[modality][name].items():
        set_by_path(cfg, key, value)
    return cfg
