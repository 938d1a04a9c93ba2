"""Which kernel torch.nn.functional.scaled_dot_product_attention actually runs in each encoder's attention:
`d2v bench sdpa`. Every encoder calls SDPA, with what its attention needs: v1 vision a learned relative position bias
(a float (1, H, T, T) bias that needs a gradient), v2 vision and text a boolean key mask (or none), v1 speech a
boolean padding mask (or none), v2 speech ALiBi (a float (B, H, T, T) bias with a learned per-head scale). SDPA picks
a backend per call from the device, dtype, head size, mask kind and whether the mask needs a gradient, and falls back
to the unfused math path silently; this profiles one student forward + backward and one teacher forward of a
one-block encoder at the preset's widths and sequence lengths and names the SDPA kernels that ran (torch.profiler's
aten op names), so that a slow fallback is seen, not guessed."""
from __future__ import annotations

import torch

from d2v.core.presets import preset_config
from d2v.data.synthetic import fill_model_fields, synthetic_batch
from d2v.objective import build_objective

# aten op name (as torch.profiler lists it) -> backend
KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu-flash",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
MASKS = {("vision", "v1"): "float relative position bias (1, H, T, T), learned",
         ("vision", "v2"): "none (boolean key mask when clones keep different counts)",
         ("speech", "v1"): "none (boolean key padding mask on padded batches)",
         ("speech", "v2"): "float ALiBi bias (B, H, T, T), learned scale",
         ("text", "v1"): "none (boolean key padding mask on padded batches)",
         ("text", "v2"): "none (boolean key mask when clones keep different counts)"}


def backends_of(prof) -> list[str]:
    """The SDPA backends a profile saw, in first-seen order."""
    seen = []
    for event in prof.events():
        name = KERNELS.get(event.name)
        if name and name not in seen:
            seen.append(name)
    return seen


def case(modality: str, recipe: str, preset: str, device: torch.device, precision: str, batch: int = 2,
         crop_seconds: float | None = None) -> dict:
    """The SDPA kernels of one modality / recipe at `preset`'s widths and lengths (one block), student and teacher."""
    cfg = preset_config(modality, preset, recipe)
    cfg.model.depth, cfg.targets.top_k = 1, 1
    if hasattr(cfg.model, "prenet_depth"):
        cfg.model.prenet_depth = 0
    if modality == "speech":
        cfg.model.layerdrop = 0.0
        if crop_seconds:
            cfg.data.crop_seconds = crop_seconds
    fill_model_fields(cfg)
    model = build_objective(cfg).to(device).train()
    b = synthetic_batch(cfg, 0, batch).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    student = model.student
    with torch.profiler.profile() as prof, autocast:
        if recipe == "v2":
            out = student.encode_kept(b.inputs, b.mask, b.keep, b.keep_padding, b.clones, b.padding_mask)
        elif b.student_inputs is not None:
            out = student.encode(b.student_inputs, padding_mask=b.padding_mask)
        else:
            out = student.encode(b.inputs, mask=b.mask, padding_mask=b.padding_mask)
        out.hidden.float().sum().backward()
    student_kernels = backends_of(prof)
    with torch.profiler.profile() as prof, autocast, torch.inference_mode():
        model.teacher.encode(b.inputs, padding_mask=b.padding_mask, output_layers=cfg.targets.layer, top_k=1)
    tokens = out.hidden.shape[1]
    return {"modality": modality, "recipe": recipe, "preset": preset, "device": str(device), "precision": precision,
            "mask": MASKS[(modality, recipe)], "student_tokens": tokens, "heads": cfg.model.num_heads,
            "head_dim": cfg.model.dim // cfg.model.num_heads, "student": student_kernels,
            "teacher": backends_of(prof)}


def run(device: str = "auto", precision: str = "bf16", preset: str = "base", crop_seconds: float | None = 15.0,
        on_row=None) -> list[dict]:
    """case() for the three modalities and both recipes."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    rows = []
    for modality in ("vision", "speech", "text"):
        for recipe in ("v1", "v2"):
            rows.append(case(modality, recipe, preset, dev, precision, crop_seconds=crop_seconds))
            if on_row:
                on_row(rows[-1])
    return rows
