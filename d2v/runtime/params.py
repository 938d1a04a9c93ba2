"""Optimizer parameter groups: which parameters are exempt from weight decay, and (fine-tuning) a learning-rate
scale per layer."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from d2v.core.config import NO_DECAY_NAMES

Exempt = Callable[[str, torch.Tensor], bool]


def no_decay_rule(rules: Iterable[str], prefix: str = "student.") -> Exempt:
    """optim.no_decay as a predicate on (parameter name, parameter): "1d" (at most one dimension), "bias" (names
    ending in .bias), or a named encoder parameter (NO_DECAY_NAMES, under `prefix`)."""
    rules = tuple(rules)
    prefixes = tuple(f"{prefix}{NO_DECAY_NAMES[r]}" for r in rules if r in NO_DECAY_NAMES)
    return lambda name, p: (("1d" in rules and p.ndim <= 1) or ("bias" in rules and name.endswith(".bias"))
                            or (bool(prefixes) and name.startswith(prefixes)))


def param_groups(named: Iterable[tuple[str, torch.Tensor]], weight_decay: float, exempt: Exempt,
                 layer_of: Callable[[str], int] | None = None, layer_decay: float = 1.0,
                 top_layer: int = 0) -> list[dict]:
    """AdamW groups of the trainable parameters: weight decay except where `exempt`. Without `layer_of`: two groups,
    decayed then exempt. With it (layer-wise learning-rate decay): one group per (layer, decayed) in the order the
    parameters come, each with "lr_scale" = layer_decay ** (top_layer - layer)."""
    groups: dict[tuple[int, bool], dict] = {}
    if layer_of is None:
        groups = {(0, True): {"params": [], "weight_decay": weight_decay},
                  (0, False): {"params": [], "weight_decay": 0.0}}
    for name, p in named:
        if not p.requires_grad:
            continue
        decay = not exempt(name, p)
        layer = 0 if layer_of is None else layer_of(name)
        group = groups.get((layer, decay))
        if group is None:
            group = groups[(layer, decay)] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                              "lr_scale": layer_decay ** (top_layer - layer)}
        group["params"].append(p)
    return list(groups.values())
