"""The data2vec text encoder: a RoBERTa-style post-LN Transformer (token + learned position embedding ->
LayerNorm -> dropout; blocks of attention and FFN, each followed by dropout, residual and LayerNorm)."""
from __future__ import annotations

import torch
from torch import nn

from d2v.core.config import TextModelConfig
from d2v.core.tokenizer import tokenize
from d2v.models.common import EncoderOutput, gather_kept, init_transformer_weights, key_mask, run_blocks
from d2v.models.stochastic import Dropout
from d2v.models.transformer import PostLNBlock


class Embeddings(nn.Module):
    """Token + position embedding -> LayerNorm -> dropout. Positions count real tokens from pad_id + 1 (RoBERTa)."""

    def __init__(self, cfg: TextModelConfig):
        super().__init__()
        self.pad_id = cfg.pad_id
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_id)
        self.positions = nn.Embedding(cfg.max_length + cfg.pad_id + 1, cfg.dim, padding_idx=cfg.pad_id)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        real = ids.ne(self.pad_id)
        positions = torch.cumsum(real, dim=1) * real + self.pad_id  # (B, T); padding -> pad_id (a zero row)
        return self.dropout(self.norm(self.tokens(ids) + self.positions(positions)))


class TextEncoder(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, D). Called on strings, it tokenizes them with its tokenizer
    (set by load_encoder from the exported tokenizer.json)."""

    num_prefix = 0
    front_end = ("embeddings.",)  # what produces EncoderOutput.features (encode_kept only)

    def __init__(self, cfg: TextModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("vocab_size is not set: it comes from the tokenizer trained on the corpus")
        self.cfg = cfg
        self.tokenizer = None
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList(
            PostLNBlock(cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.attention_dropout, cfg.ln_eps)
            for _ in range(cfg.depth)
        )
        self.apply(init_transformer_weights)

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def no_weight_decay(self) -> set[str]:
        return set()  # biases and norms are already exempt; RoBERTa decays embeddings

    def init_weights(self, module: nn.Module) -> None:
        """This model's init (BERT's: normal std 0.02, zero biases), for modules built around it (the head)."""
        init_transformer_weights(module)

    def encode(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        output_layers: str | None = None,
        top_k: int = 0,
        features: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """ids (B, T) int64; mask (B, T) bool, True = replaced by <mask>; padding_mask (B, T) bool, True at padding
        (None: attend everywhere). output_layers: None, "block" or "ffn"; top_k: how many top blocks to return.
        features: the embedding output (B, T, D) of these ids from another encoder (a data2vec 2.0 student's, for the
        teacher that shares its embeddings), used instead of embedding them here."""
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected token ids (B, T) int64, got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] > self.cfg.max_length:
            raise ValueError(f"sequences of {ids.shape[1]} tokens exceed the model's max length {self.cfg.max_length}")
        if mask is not None:
            ids = ids.masked_fill(mask, self.cfg.mask_id)
        x = self.embeddings(ids) if features is None else features  # (B, T, D)
        keep = None if padding_mask is None else ~padding_mask[:, None, None, :]  # (B, 1, 1, T), True = attend
        x, layers = run_blocks(self.blocks, x, keep, output_layers, top_k)
        return EncoderOutput(hidden=x, layers=layers, num_prefix=0, padding_mask=padding_mask)

    def encode_kept(self, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor,
                    keep_padding: torch.Tensor | None = None, clones: int = 1,
                    padding_mask: torch.Tensor | None = None) -> EncoderOutput:
        """The data2vec 2.0 student: ids (B, T) embedded once (tokens + their positions, LayerNorm, dropout), then only
        the kept positions keep (B * clones, Tk) of each clone are encoded -> hidden (B * clones, Tk, D).
        features: that embedding output (B, T, D), dropout included: the reference's teacher input (its
        `local_features` under `ema_encoder_only`)."""
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected token ids (B, T) int64, got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] > self.cfg.max_length:
            raise ValueError(f"sequences of {ids.shape[1]} tokens exceed the model's max length {self.cfg.max_length}")
        embedded = self.embeddings(ids)
        x = gather_kept(embedded, keep, clones)
        x, _ = run_blocks(self.blocks, x, key_mask(keep_padding))
        return EncoderOutput(hidden=x, num_prefix=0, features=embedded)

    def _ids(self, x) -> torch.Tensor:
        """Token ids (B, T) on the encoder's device from strings (tokenized here) or an id tensor."""
        if isinstance(x, str):
            x = [x]
        if isinstance(x, (list, tuple)):
            if self.tokenizer is None:
                raise ValueError("this encoder has no tokenizer; load it with d2v.load_encoder or pass token ids")
            x = tokenize(self.tokenizer, x, self.cfg.max_length)[0]
        return x.to(self.embeddings.tokens.weight.device)

    def forward(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Strings or ids (B, T) -> (last hidden states (B, T, D), attention mask (B, T) int64, 1 at real tokens)."""
        ids = self._ids(x)
        padding = ids.eq(self.cfg.pad_id)
        out = self.encode(ids, padding_mask=padding if bool(padding.any()) else None)
        return out.hidden, (~padding).long()

    def embed(self, x) -> torch.Tensor:
        """Mean of the last hidden states over real tokens (B, D)."""
        hidden, attention = self(x)
        w = attention.unsqueeze(-1).to(hidden.dtype)
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)
