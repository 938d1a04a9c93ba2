"""An encoder with a classification head: the model `d2v finetune` trains, `d2v export` writes with its label names
and `d2v predict` runs.

Two heads (FinetuneConfig.head):

- "data2vec" (the default): each modality's fine-tuning head in data2vec's recipes, which is also what transformers'
  Data2Vec...For...Classification computes, so an export loads there with identical logits:
  vision: the mean of the last block's patch outputs -> LayerNorm (BEiT's `fc_norm`; the encoder's final norm is
  not used) -> Linear; text: the first token (<s>) of the last hidden states -> Linear -> tanh -> Linear (RoBERTa's
  classification head); speech: the mean over valid frames of the last hidden states -> Linear.
- "mean": `encoder.embed` (the mean-pooled representation the probe uses) -> Linear, the head of fine-tuning runs
  made before "data2vec" existed; transformers reproduces it for speech only.

Both standardize the features before the first Linear with a fixed mean and std (those of the training split as
fine-tuning starts, the probe's StandardScaler), saved with the head; export folds them into that Linear."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from d2v.core.errors import CheckpointError

HEADS = ("data2vec", "mean")
HEAD_FILE = "head.safetensors"  # the head's tensors in an export (the encoder's stay in model.safetensors)


def pooling(modality: str, head: str) -> str:
    """How the head pools the encoder's output: "patch_mean_norm" (vision data2vec), "first_token" (text data2vec)
    or "embed" (encoder.embed: speech, and every modality under the "mean" head)."""
    if head not in HEADS:
        raise CheckpointError(f"unknown classification head {head!r}; use {' or '.join(HEADS)}")
    if head == "mean" or modality == "speech":
        return "embed"
    return {"vision": "patch_mean_norm", "text": "first_token"}[modality]


class Classifier(nn.Module):
    """encoder -> pool (B, D) -> [LayerNorm (vision data2vec)] -> standardize -> [Linear -> tanh (text data2vec)]
    -> Linear -> logits (B, classes)."""

    def __init__(self, encoder: nn.Module, classes: int, head: str = "mean", labels: list[str] | None = None):
        super().__init__()
        self.student = encoder
        cfg = encoder.cfg
        self.head_kind, self.pooling = head, pooling(cfg.modality, head)
        self.labels = list(labels) if labels is not None else [str(i) for i in range(classes)]
        if len(self.labels) != classes:
            raise CheckpointError(f"{len(self.labels)} label names for {classes} classes")
        D = encoder.dim
        if self.pooling == "patch_mean_norm":
            self.fc_norm = nn.LayerNorm(D, eps=cfg.ln_eps)
            final = getattr(encoder, "norm", None)
            if getattr(encoder, "norm_on_top", False) and final is not None:  # start from the pretrained final norm
                self.fc_norm.load_state_dict(final.state_dict())
        if self.pooling == "first_token":
            self.dense = nn.Linear(D, D)
            nn.init.normal_(self.dense.weight, std=0.02)  # RoBERTa's init of its classification head
            nn.init.zeros_(self.dense.bias)
        self.head = nn.Linear(D, classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("feature_mean", torch.zeros(D))
        self.register_buffer("feature_std", torch.ones(D))

    def embed(self, *inputs) -> torch.Tensor:
        """The pooled features (B, D) of a batch of encoder inputs: what the head-only phase computes once."""
        enc = self.student
        if self.pooling == "embed":
            return enc.embed(*inputs)
        if self.pooling == "patch_mean_norm":  # the last block's output before any final norm, patches only
            out = enc.encode(inputs[0], output_layers="block", top_k=1)
            return out.layers[-1][:, out.num_prefix:].mean(dim=1)
        hidden, _ = enc(*inputs)  # text: (B, T, D); token 0 is <s>
        return hidden[:, 0]

    def normalized(self, features: torch.Tensor) -> torch.Tensor:
        """What the standardization applies to: the pooled features, after fc_norm for vision."""
        return self.fc_norm(features) if self.pooling == "patch_mean_norm" else features

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features -> (B, classes) logits."""
        z = (self.normalized(features) - self.feature_mean) / self.feature_std
        if self.pooling == "first_token":
            z = torch.tanh(self.dense(z))
        return self.head(z)

    def forward(self, inputs: tuple) -> torch.Tensor:
        return self.classify(self.embed(*inputs))

    @torch.no_grad()
    def standardize_from(self, features: torch.Tensor) -> None:
        """Fix the standardization to the mean and std (over rows) of `features` (N, D), pooled training items."""
        features = features.to(self.feature_mean.device)
        x = self.fc_norm(features.float()).double() if self.pooling == "patch_mean_norm" else features.double()
        self.feature_mean.copy_(x.mean(0))
        self.feature_std.copy_(x.std(0, correction=0).clamp_min(1e-6))

    def head_state(self) -> dict[str, torch.Tensor]:
        """The tensors of everything but the encoder (state-dict names)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    def describe(self) -> dict:
        """What an export records about the head beside its tensors."""
        return {"head": self.head_kind, "labels": self.labels}


def read_head(path: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(description, head tensors) of an export with a classifier, else None."""
    path = Path(path).expanduser()
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    info = meta.get("classifier") if isinstance(meta, dict) else None
    if not isinstance(info, dict):
        return None
    try:
        return info, load_file(str(path / HEAD_FILE))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file to the user
        raise CheckpointError(f"cannot read {path / HEAD_FILE}: {exc}") from None


def build_classifier(encoder: nn.Module, info: dict, tensors: dict[str, torch.Tensor], where) -> Classifier:
    """The Classifier a description and its head tensors make, around a loaded encoder."""
    labels = info.get("labels")
    if not isinstance(labels, list) or not labels:
        raise CheckpointError(f"{where} names no labels for its classifier")
    model = Classifier(encoder, len(labels), info.get("head", "mean"), [str(x) for x in labels])
    state = {**{f"student.{k}": v for k, v in encoder.state_dict().items()}, **tensors}
    state.setdefault("feature_mean", model.feature_mean)  # fine-tuning runs from before the standardization
    state.setdefault("feature_std", model.feature_std)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"the classifier in {where} does not match its encoder: "
                              f"{str(exc).splitlines()[0]}") from None
    return model
