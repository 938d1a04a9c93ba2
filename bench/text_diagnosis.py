"""Why does the text default not learn? Pretrain the text encoder with data2vec or with a masked-language-model
objective on the same encoder, tokenizer, data, masks and optimizer, and measure along the way what its features
and data2vec's regression targets encode, and how it probes on SentEval's MR and TREC (d2v.data.sentences).

    d2v bench text-diagnosis --objective d2v|mlm [--data english] [--steps 300] [--seconds S] [--seed 0]
                             [--set KEY=VALUE ...] [--diag-at 0,1,100,300] [--probe-at 1,300] [--jsonl OUT]

- `mlm` is BERT's objective on d2v's own encoder (not a recipe users pick): the student sees the same corrupted
  blocks (80/10/10 <mask>/random/unchanged at the same positions) and a RoBERTa LM head (dense, GELU, LayerNorm,
  the token embedding tied as the output layer) predicts the original token by cross-entropy. `--seconds` stops
  it after the wall time of a data2vec run, for the equal-time comparison.
- The loop is d2v.train's for one process (learning rate by update, per-batch torch seed by sample position,
  gradients over the masked count, clipping, AdamW with d2v's parameter groups, EMA after each step), without the
  run directory.
- Diagnostics at each `--diag-at` update, on 64 blocks from the end of the first epoch's order (unseen in short
  runs): the share of variance (R^2) of the student's last-layer features, of the data2vec targets and of each
  teacher layer that is explained by the token's position in its block and by the token's identity (the mean per
  position / per token id, over the plain tokens of those blocks).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OBJECTIVES = ("d2v", "mlm")


class MaskedLM(nn.Module):
    """BERT's masked LM on a d2v text encoder: the RoBERTa LM head, cross-entropy at the masked positions."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.student = encoder
        dim, vocab = encoder.dim, encoder.cfg.vocab_size
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=encoder.cfg.ln_eps)
        self.bias = nn.Parameter(torch.zeros(vocab))
        encoder.init_weights(self.dense)

    def ema_step(self, step: int) -> float:
        return 0.0  # no teacher

    def forward(self, batch):
        """Mean cross-entropy over the masked positions of batch.inputs (B, T) given batch.student_inputs."""
        hidden = self.student.encode(batch.student_inputs, padding_mask=batch.padding_mask).hidden  # (B, T, D)
        h = self.norm(F.gelu(self.dense(hidden[batch.mask])))  # (N, D)
        logits = F.linear(h, self.student.embeddings.tokens.weight) + self.bias  # (N, V)
        loss = F.cross_entropy(logits, batch.inputs[batch.mask])
        return loss, {"masked": batch.mask.sum().float()}


def r2_by_group(x: torch.Tensor, groups: torch.Tensor) -> float:
    """Share of the total variance of x (N, D) explained by the mean of x within each group (N,)."""
    x = x.double() - x.double().mean(0, keepdim=True)
    _, inverse = torch.unique(groups, return_inverse=True)
    n = int(inverse.max()) + 1
    sums = torch.zeros(n, x.shape[1], dtype=x.dtype).index_add_(0, inverse, x)
    counts = torch.bincount(inverse, minlength=n).to(x.dtype)
    residual = x - (sums / counts[:, None])[inverse]
    return float(1.0 - residual.pow(2).sum() / x.pow(2).sum())


@torch.no_grad()
def diagnostics(model, ids: torch.Tensor, specials: list[int], cfg) -> dict[str, float]:
    """R^2 of features and targets against position and token identity on blocks ids (B, T) int64."""
    from d2v import ops

    encoder, was = model.student, model.student.training
    encoder.eval()
    pad = ids.eq(cfg.model.pad_id)
    padding = pad if pad.any() else None
    plain = ~torch.from_numpy(np.isin(ids.numpy(), specials))
    position, token = torch.arange(ids.shape[1]).expand_as(ids)[plain], ids[plain]
    out = {}
    hidden = encoder.encode(ids, padding_mask=padding).hidden[plain]
    out["student_R2_position"], out["student_R2_token"] = r2_by_group(hidden, position), r2_by_group(hidden, token)
    if hasattr(model, "teacher"):
        t = cfg.targets
        t_out = model.teacher.encode(ids, padding_mask=padding, output_layers=t.layer, top_k=t.top_k)
        target = ops.targets(t_out.layers, t.norm, t.final_norm, padding_mask=t_out.padding_mask, eps=t.eps,
                             backend="torch")[plain]
        out["target_R2_position"], out["target_R2_token"] = r2_by_group(target, position), r2_by_group(target, token)
        for i, layer in enumerate(t_out.layers):
            x = F.layer_norm(layer[plain], layer.shape[-1:])
            out[f"teacher_layer{i}_R2_position"] = r2_by_group(x, position)
            out[f"teacher_layer{i}_R2_token"] = r2_by_group(x, token)
    encoder.train(was)
    return out


def probe_now(encoder, tokenizer, tasks: list, seed: int = 0) -> dict[str, float]:
    """Cross-validated accuracy of the encoder's `embed` features on each SentenceTask."""
    from d2v.probe import cross_validated, sentence_features

    was = encoder.training
    encoder.eval()
    encoder.tokenizer = tokenizer
    result = {task.name: cross_validated(sentence_features(encoder, task), task, seed)[0] for task in tasks}
    encoder.train(was)
    return result


def build(objective: str, cfg):
    """(pipeline, model, optimizer) for the objective, seeded as d2v.train.setup seeds them."""
    from d2v.data.pipeline import build_pipeline
    from d2v.models import build_encoder
    from d2v.objective import build_objective
    from d2v.runtime.params import no_decay_rule, param_groups

    pipeline = build_pipeline(cfg)
    torch.manual_seed(cfg.run.seed)
    model = build_objective(cfg) if objective == "d2v" else MaskedLM(build_encoder(cfg.model))
    groups = param_groups(model.named_parameters(), cfg.optim.weight_decay, no_decay_rule(cfg.optim.no_decay))
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    return pipeline, model, optimizer


def run(cfg, objective: str = "d2v", seconds: float = 0.0, diag_at=(), probe_at=(), tasks=("mr", "trec"),
        on_record=print) -> None:
    """Train cfg.run.steps updates (or until `seconds` of training time), calling on_record(dict) with the loss
    every 10 updates, the diagnostics at diag_at and the probes at probe_at (and at the last update)."""
    from d2v.data.sentences import load_sentence_task
    from d2v.runtime.schedule import lr_at

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    pipeline, model, optimizer = build(objective, cfg)
    sentence_tasks = [load_sentence_task(t) for t in tasks]
    n = len(pipeline.blocks)
    held = torch.from_numpy(pipeline.blocks.blocks(pipeline.order.indices(max(0, n - 64), min(64, n)).numpy()))
    specials = pipeline.special.all
    params = [p for g in optimizer.param_groups for p in g["params"]]
    total, size = cfg.run.steps, cfg.run.batch_size
    on_record({"objective": objective, "blocks": n, "config": cfg.to_dict()})

    def measure(step: int, train_s: float, last: bool = False) -> None:
        if step in diag_at:
            on_record({"step": step, "train_s": train_s, "diag": diagnostics(model, held, specials, cfg)})
        if step in probe_at or (last and sentence_tasks):
            on_record({"step": step, "train_s": train_s,
                       "probe": probe_now(model.student, pipeline.tokenizer, sentence_tasks, cfg.run.seed)})

    model.train()
    measure(0, 0.0)
    step, train_s, losses = 0, 0.0, []
    while step < total and not (seconds and train_s >= seconds):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg.optim, step, total)
        first = step * size
        batch = pipeline.micro_batch(first, size)
        torch.manual_seed(hash((cfg.run.seed, first)) & 0x7FFFFFFF)  # the MLM arm's dropout (d2v's is keyed)
        loss, stats = model(batch)
        (loss * stats["masked"]).backward()
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], 1.0 / stats["masked"].clamp_min(1.0))
        if cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.ema_step(step + 1)
        step += 1
        train_s += time.perf_counter() - start
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            on_record({"step": step, "train_s": train_s, "loss": float(np.mean(losses))})
            losses = []
        done = step >= total or (seconds and train_s >= seconds)
        measure(step, train_s, last=bool(done) and step not in probe_at)
    on_record({"done": True, "steps": step, "train_s": train_s})
