"""The data2vec objective, for every modality: student on the masked view, EMA teacher on the full input,
top-K layer targets at masked positions, regression head, loss, and the EMA schedule."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from d2v import ops
from d2v.core.batch import Batch
from d2v.core.config import DecoderConfig, EMAConfig, TargetConfig
from d2v.core.device import local
from d2v.models import build_encoder
from d2v.models.decoder import ConvDecoder
from d2v.models.stochastic import hash32, keyed, mix32, number_sites


def position_noise(seed: int, first: int, clones: int, shape: tuple[int, int, int], device,
                   dtype=torch.float32, chunk_elements: int | None = None) -> torch.Tensor:
    """N(0, 1) noise of shape (B * clones, T, D) whose element (row, t, d) is a function of (seed, global clone
    index first * clones + row, t, d) alone: the same however a batch is split over processes and micro-batches
    and however long its padded sequences are. Counter-based: (row, t) and d are hashed separately on the small
    (B * clones, T) and (D,) grids, two independent keys each; every element then costs one xor and one
    multiply-xorshift round per uniform (the full three-round hash of every element took 12% of a v2 image step
    on the CPU); Box-Muller turns the two uniforms into a normal value.

    On the CPU the elements are made a few rows at a time (about chunk_elements, default 2^16, per pass) so that the
    dozen int64 temporaries stay in cache: (512, 64, 768) in 0.35 s instead of 1.7 s (2 threads, idle), and
    bit-identical to it. On a GPU one pass (chunk_elements 0) avoids a launch per chunk."""
    B2, T, D = shape
    salt = hash32(torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64, device=device))
    rows = torch.arange(B2, device=device, dtype=torch.int64) + first * clones
    key = hash32(hash32((rows >> 32) ^ salt) ^ (rows & 0xFFFFFFFF))  # (B2,)
    key = hash32(key[:, None] ^ torch.arange(T, device=device, dtype=torch.int64)[None, :])  # (B2, T)
    col = hash32(torch.arange(D, device=device, dtype=torch.int64) + 0x9E3779B9)  # (D,)
    k1, k2 = key[:, :, None], hash32(key ^ 0x1B873593)[:, :, None]
    c1, c2 = col[None, None], hash32(col ^ 0x68E31DA4)[None, None]

    def normal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        u1 = (mix32(a ^ c1, 0x5BD1E995).to(torch.float32) + 1.0) * (1.0 / 4294967296.0)  # (0, 1]
        u2 = mix32(b ^ c2, 0x27D4EB2F).to(torch.float32) * (1.0 / 4294967296.0)  # [0, 1)
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)

    if chunk_elements is None:
        chunk_elements = 0 if torch.device(device).type == "cuda" else 1 << 16
    rows_per = B2 if chunk_elements <= 0 else max(1, chunk_elements // max(1, T * D))
    if rows_per >= B2:
        return normal(k1, k2).to(dtype)
    out = torch.empty(shape, dtype=dtype, device=device)
    for start in range(0, B2, rows_per):
        out[start:start + rows_per] = normal(k1[start:start + rows_per], k2[start:start + rows_per])
    return out


def ema_decay(cfg: EMAConfig, step: int) -> float:
    """tau at optimizer update `step`: linear from cfg.decay to cfg.end_decay over anneal_steps, then held."""
    if cfg.anneal_steps <= 0 or step >= cfg.anneal_steps:
        return cfg.end_decay
    return cfg.decay + (cfg.end_decay - cfg.decay) * step / cfg.anneal_steps


def build_head(kind: str, dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
    raise ValueError(f"unknown head {kind!r}; expected 'linear' or 'mlp'")


def _masked_std(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean over features of the std over masked rows; x (B, T, D), w (B, T, 1) in {0, 1}. No host sync."""
    n = w.sum().clamp_min(2.0)
    x = x.float()
    mean = (x * w).sum(dim=(0, 1)) / n
    var = (((x - mean) * w) ** 2).sum(dim=(0, 1)) / (n - 1)
    return torch.sqrt(var + 1e-6).mean()


class Data2Vec(nn.Module):
    """student + EMA teacher + predictor. forward(batch) -> (loss, stats).

    data2vec 1.0 (decoder None): the student encodes the whole masked view; a regression head predicts.
    data2vec 2.0 (a DecoderConfig): the student encodes only the kept positions of each of the batch's clones;
    a conv decoder predicts at every position from those outputs and noise in the masked slots. Everything else
    (teacher, EMA, targets, loss) is the same code for both."""

    def __init__(self, encoder: nn.Module, targets: TargetConfig, ema: EMAConfig, backend: str = "auto",
                 decoder: DecoderConfig | None = None, seed: int = 0):
        super().__init__()
        self.seed = seed
        main_blocks = len(encoder.blocks) - getattr(getattr(encoder, "cfg", None), "prenet_depth", 0)
        if not 1 <= targets.top_k <= main_blocks:
            raise ValueError(f"top_k must be between 1 and the encoder's {main_blocks} target blocks, "
                             f"got {targets.top_k}")
        self.student = encoder
        self.teacher = copy.deepcopy(encoder).requires_grad_(False).eval()
        self.v2 = decoder is not None
        if self.v2:
            self.decoder = ConvDecoder(decoder, encoder.dim, encoder.dim, getattr(encoder, "grid", None))
            for name, p in encoder.named_parameters():  # what only a v1 student uses (its masked view)
                if name in ("mask_emb", "mask_token"):
                    p.requires_grad_(False)
        else:
            self.head = build_head(targets.head, encoder.dim)
            init = getattr(encoder, "init_weights", None)  # vision and text: the model's init; speech: PyTorch's
            if init is not None:
                self.head.apply(init)
        self.targets_cfg = targets
        self.ema_cfg = ema
        self.backend = backend
        self.loss_scale = {"one": 1.0, "inv_dim": 1.0 / encoder.dim, "inv_sqrt_dim": 1.0 / math.sqrt(encoder.dim)}[
            targets.loss_scale
        ]
        self._pairs = self._ema_pairs()
        # The teacher's input is the student's front-end output when it shares every front-end parameter, as the
        # reference's teacher takes its student's local features: speech, the projected conv features (the same
        # values, one conv pass fewer per step); data2vec 2.0 text, the embedding output after the student's
        # dropout (ema_encoder_only). A v1 text student embeds its corrupted ids and returns no features.
        front = tuple(getattr(encoder, "front_end", ()))
        self.reuse_features = bool(front) and all(any(p.startswith(s) for s in ema.shared) for p in front)
        self.mask_id = getattr(getattr(encoder, "cfg", None), "mask_id", None)  # text: the <mask> token id
        if self.v2:
            self.mask_id = None  # a data2vec 2.0 student never sees <mask>: it skips masked tokens
        number_sites(self)  # the call sites of dropout, drop-path and LayerDrop, head and decoder included

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout or drop-path
        return self

    def _ema_pairs(self):
        """(averaged teacher/student pairs, shared teacher/student pairs) of parameters and buffers."""
        shared = tuple(self.ema_cfg.shared)
        student = dict(self.student.named_parameters())
        averaged, copied = [], []
        for name, t in self.teacher.named_parameters():
            (copied if name.startswith(shared) and shared else averaged).append((t, student[name]))
        s_buffers = dict(self.student.named_buffers())
        copied += [(t, s_buffers[name]) for name, t in self.teacher.named_buffers() if t.is_floating_point()]
        return averaged, copied

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._pairs = self._ema_pairs()  # .to() / .cuda() may replace parameter tensors
        return self

    @torch.no_grad()
    def ema_step(self, step: int) -> float:
        """Move the teacher towards the student after optimizer update `step`; shared tensors are copied."""
        decay = ema_decay(self.ema_cfg, step)
        averaged, copied = self._pairs
        if averaged:  # sharded (FSDP) teacher and student: each rank averages its own, identically placed shards
            ops.ema_update_([local(t) for t, _ in averaged], [local(s) for _, s in averaged], decay,
                            backend=self.backend)
        for t, s in copied:
            local(t).copy_(local(s))
        return decay

    def rebind(self) -> None:
        """Pair teacher and student parameters again after they were replaced (FSDP sharding)."""
        self._pairs = self._ema_pairs()

    def _predict_v1(self, batch: Batch):
        """The whole masked view -> head predictions (B, T, D) at every position."""
        if batch.student_inputs is not None:
            out = self.student.encode(batch.student_inputs, padding_mask=batch.padding_mask)
        else:
            out = self.student.encode(batch.inputs, mask=batch.mask, padding_mask=batch.padding_mask)
        # The head runs on every position and the loss selects masked rows: no data-dependent shapes, no sync.
        return self.head(out.hidden[:, out.num_prefix :]), out

    def _predict_v2(self, batch: Batch):
        """Kept positions of every clone -> decoder predictions (B * clones, T, D) at every position."""
        if batch.keep is None:
            raise ValueError("a data2vec 2.0 batch needs the kept positions (Batch.keep)")
        out = self.student.encode_kept(batch.inputs, batch.mask, batch.keep, batch.keep_padding, batch.clones,
                                       batch.padding_mask)
        x = self.decoder.input_dropout(out.hidden[:, out.num_prefix :])  # (B2, Tk, D): dropout before the refill
        B2, T = batch.mask.shape
        # masked slots: N(0, 0.01) noise; padding: zeros; kept slots: the student's outputs (filler slots land in an
        # extra column T that is dropped)
        noise = position_noise(self.seed, batch.first, batch.clones, (B2, T, x.shape[-1]), x.device, x.dtype) * 0.01
        noise = noise * batch.mask.unsqueeze(-1).to(x.dtype)
        full = torch.cat([noise, noise.new_zeros(B2, 1, x.shape[-1])], dim=1)
        full = full.scatter(1, batch.keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)[:, :T]
        return self.decoder(full), out

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.targets_cfg
        # Dropout, drop-path and LayerDrop by sample position (d2v.models.stochastic): a sample draws the same masks
        # in whichever process and micro-batch it is trained
        with keyed(self.seed, batch.first, batch.inputs.shape[0], batch.mask.device):
            pred, out = self._predict_v2(batch) if self.v2 else self._predict_v1(batch)
        clones = batch.clones if self.v2 else 1
        with torch.inference_mode():  # no autograd records, and no version counters or view tracking either
            reuse = {"features": out.features.detach()} if self.reuse_features and out.features is not None else {}
            t_out = self.teacher.encode(
                batch.inputs, padding_mask=batch.padding_mask, output_layers=cfg.layer, top_k=cfg.top_k, **reuse
            )
            layers = [layer[:, t_out.num_prefix :] for layer in t_out.layers]  # K x (B, T, D)
            target = ops.targets(
                layers, cfg.norm, cfg.final_norm, padding_mask=t_out.padding_mask, eps=cfg.eps, backend=self.backend
            )  # (B, T, D) fp32
        mask = batch.mask
        if out.padding_mask is not None:  # frames: padding is never predicted
            pad = out.padding_mask if clones == 1 else out.padding_mask.repeat_interleave(clones, 0)
            mask = mask & ~pad
        if batch.student_inputs is not None and self.mask_id is not None and cfg.loss_on == "mask_token":
            mask = mask & (batch.student_inputs == self.mask_id)  # not the random / unchanged ones
        # One teacher pass serves every clone: the loss pairs pred row i with target row i // clones (no copies).
        loss = ops.masked_regression_loss(
            pred, target, mask, beta=cfg.loss_beta, scale=self.loss_scale, reduction="mean", backend=self.backend,
            clones=clones,
        )
        if self.v2 and cfg.cls_loss > 0 and out.num_prefix:
            # data2vec 2.0 images: each clone's CLS output regresses the mean target over patches. The reference
            # adds cls_loss x (masked count) x the sum over its GPU's clones before dividing by the masked count,
            # which ties the weight to the per-GPU batch; here the weight multiplies the mean over clones, so the
            # loss is the same on any number of processes (the presets carry the reference's effective weight).
            cls_target = target.mean(dim=1, keepdim=True)  # (B, 1, D)
            cls_loss = ops.masked_regression_loss(
                out.hidden[:, :1], cls_target, None, beta=cfg.loss_beta, scale=self.loss_scale, reduction="mean",
                backend=self.backend, clones=clones,
            )
            loss = loss + cfg.cls_loss * cls_loss
        with torch.no_grad():
            w = mask.unsqueeze(-1).float()
            t_w = w if clones == 1 else w.view(-1, clones, *w.shape[1:]).amax(dim=1)  # rows any clone predicts
            stats = {
                "target_std": _masked_std(target, t_w),
                "pred_std": _masked_std(pred.detach(), w),
                "masked": w.sum(),
            }
        return loss, stats


def build_objective(cfg, encoder: nn.Module | None = None) -> Data2Vec:
    """The objective of a PretrainConfig: its recipe picks the student path (v1: head, v2: decoder)."""
    encoder = build_encoder(cfg.model) if encoder is None else encoder
    return Data2Vec(encoder, cfg.targets, cfg.ema, backend=cfg.run.kernels,
                    decoder=cfg.decoder if cfg.recipe == "v2" else None, seed=cfg.run.seed)
