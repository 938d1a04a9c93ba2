"""Gradients of one micro-batch through the objective with and without activation checkpointing, for the three
modalities and both recipes, with dropout, drop-path and (speech v1) LayerDrop on so that recomputation must replay
their random draws. Imported by tests/test_activation_checkpointing.py; run under torchrun (2 processes, gloo) it
checks the same under DDP or FSDP2:

    torchrun --standalone --nproc-per-node 2 tests/ac_grads.py ddp|fsdp

and prints one JSON line per case from rank 0: {"case", "max_diff", "recomputed"}."""
from __future__ import annotations

import json
import sys

import torch

from d2v.core.config import set_by_path
from d2v.core.presets import preset_config
from d2v.data.synthetic import fill_model_fields, synthetic_batch
from d2v.models.common import set_activation_checkpointing
from d2v.objective import build_objective

# Tiny shapes; dropout everywhere the encoder has it
SHAPES = {
    "vision": {"model.image_size": 16, "data.image_size": 16, "model.patch_size": 4, "model.dim": 32,
               "model.depth": 3, "model.num_heads": 2, "targets.top_k": 2, "model.drop_path": 0.2,
               "model.attention_dropout": 0.1, "decoder.dim": 32, "decoder.groups": 4},
    "speech": {"model.conv_dim": [16, 16, 32, 32, 32, 32, 32], "model.dim": 32, "model.depth": 3,
               "model.num_heads": 2, "model.ffn_dim": 64, "model.pos_conv_groups": 4, "targets.top_k": 2,
               "data.crop_seconds": 0.5, "model.dropout": 0.1, "model.attention_dropout": 0.1,
               "model.activation_dropout": 0.1, "decoder.dim": 32, "decoder.groups": 4, "decoder.input_dropout": 0.1},
    "text": {"model.dim": 32, "model.depth": 3, "model.num_heads": 2, "model.ffn_dim": 64, "model.max_length": 24,
             "targets.top_k": 2, "model.vocab_size": 400, "data.vocab_size": 400, "model.dropout": 0.1,
             "model.attention_dropout": 0.1, "decoder.dim": 32, "decoder.proj_hidden": 32,
             "decoder.input_dropout": 0.1},
}
CASES = [(m, r) for m in ("vision", "speech", "text") for r in ("v1", "v2")]


def config(modality: str, recipe: str, **overrides):
    cfg = preset_config(modality, "tiny", recipe)
    for key, value in {**SHAPES[modality], "run.kernels": "torch", **overrides}.items():
        set_by_path(cfg, key, value)
    if modality == "speech":  # LayerDrop draws happen outside the recomputed blocks; v2 tiny has none
        set_by_path(cfg, "model.layerdrop", 0.3 if recipe == "v1" else 0.0)
    return fill_model_fields(cfg)


def grads(engine, model, batch, seed: int) -> dict[str, torch.Tensor]:
    """One forward and backward of `batch` through `engine` (the model, DDP or FSDP2) with run seed `seed` (the key
    of dropout, drop-path and LayerDrop draws, d2v.models.stochastic; also torch's seed): this rank's gradient (its
    shard under FSDP2) of every student / head / decoder parameter, cleared afterwards."""
    torch.manual_seed(seed)
    model.seed = seed
    loss, _ = engine(batch)
    loss.backward()
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[name] = (g.to_local() if hasattr(g, "to_local") else g).detach().clone()
            p.grad = None
    return out


def max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise AssertionError(f"different parameters got gradients: {sorted(a.keys() ^ b.keys())}")
    return max([(a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel()], default=0.0)


def main(strategy: str) -> None:
    from d2v.runtime import distributed

    dist = distributed.init(torch.device("cpu"))
    try:
        for modality, recipe in CASES:
            cfg = config(modality, recipe)
            torch.manual_seed(0)
            model = build_objective(cfg).train()
            engine = distributed.wrap(model, dist, strategy)  # LayerDrop runs every block: no parameter unused
            batch = synthetic_batch(cfg, 4 * dist.rank, 4)  # each rank its own samples
            plain = grads(engine, model, batch, 100 + dist.rank)
            recomputed = set_activation_checkpointing(model.student, "all")
            checked = grads(engine, model, batch, 100 + dist.rank)
            diff = torch.tensor([max_diff(plain, checked)], dtype=torch.float64)
            torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
            if dist.is_main:
                print(json.dumps({"case": f"{modality}-{recipe}", "max_diff": diff.item(), "recomputed": recomputed,
                                  "parameters": len(plain)}), flush=True)
    finally:
        distributed.shutdown(dist)


if __name__ == "__main__":
    main(sys.argv[1])
