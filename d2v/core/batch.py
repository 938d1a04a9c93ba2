"""One micro-batch: what the data layer hands the objective."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One micro-batch on the device.

    inputs: what the teacher sees (images (B, C, H, W), waveforms (B, S), token ids (B, T)).
    mask: (B, T) bool, True where the student must predict the target.
    student_inputs: the corrupted view when masking happens on the input itself (text); else the student gets
    `inputs` plus `mask` and replaces masked positions by its mask embedding.
    padding_mask: (B, S) bool, True at padded input positions, or None.
    data2vec 2.0 (clones >= 1 masked views per sample): mask is (B * clones, T), clone i of sample i // clones;
    keep (B * clones, Tk) the positions each clone's student encodes (d2v.masking.kept_positions), keep_padding
    (B * clones, Tk) True at filler slots, or None.
    """

    inputs: torch.Tensor
    mask: torch.Tensor
    student_inputs: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    keep_padding: torch.Tensor | None = None
    clones: int = 1
    first: int = 0  # global sample position of the first sample (dropout and data2vec 2.0's decoder noise: by position)

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.inputs), move(self.mask), move(self.student_inputs), move(self.padding_mask),
                     move(self.keep), move(self.keep_padding), self.clones, self.first)
