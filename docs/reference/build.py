"""Extract the data2vec reference recipes into docs/reference/data2vec.json, the reference column of docs/RECIPES.md.

    python docs/reference/build.py --fairseq FAIRSEQ_GIT_DIR --data2vec-vision DATA2VEC_VISION_GIT_DIR

reads the files with `git show COMMIT:PATH` at the pinned commits below (clones of facebookresearch/fairseq and
facebookresearch/data2vec_vision; nothing of them is copied here but the values, the keys and short quotes naming a
line of code). Every key of the eight pretraining yaml files (data2vec 1.0 audio and text base, data2vec 2.0 images,
audio and text base and large), every argument of the two data2vec 1.0 vision README commands, and the code defaults
those leave unset become rows: file, line, key, the value as written, and, where d2v has a field for it, the field
and the reference's value in d2v's units (`reference`) with the conversion that gives it. The conversions use the
reference's values only, never d2v's presets: tests/test_recipes.py compares those with this file.

Row kinds: recipe (a training hyper-parameter d2v has a field for), effective (what the released code does where it
differs from what its config states), runtime (hardware or run choices: precision, seed, collapse guard), input (a
value that only enters another row's conversion: GPU count, update_freq), data-stat (normalization constants),
gap (a recipe setting d2v has no field for), n/a (logging, paths, checkpoints, validation, switches that are off)."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import yaml

COMMITS = {  # the snapshots read (fairseq: data2vec 2.0's files last changed by d871f616, 2022-12-12)
    "fairseq": "3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99",
    "data2vec_vision": "af9a36349aaed59ae66e69b5dabeef2d62fdc5da",
}
OUT = Path(__file__).with_name("data2vec.json")
MIRRORS: dict[str, str] = {}  # repository -> git dir, from the command line
_cache: dict = {}

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def fix(v):
    """PyYAML reads 1e-06 as a string; OmegaConf (fairseq's loader) as a float."""
    if isinstance(v, str) and _FLOAT.match(v.strip()):
        return float(v)
    if isinstance(v, dict):
        return {k: fix(x) for k, x in v.items()}
    if isinstance(v, list):
        return [fix(x) for x in v]
    return v


def flatten(d, prefix=""):
    """Nested yaml mappings as dotted keys."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def lines(text):
    """Dotted key -> 1-based line number, by indentation."""
    stack, res = [], {}
    for i, line in enumerate(text.splitlines(), 1):
        s = line.split("#", 1)[0].rstrip() if not line.lstrip().startswith("'") else line.rstrip()
        if not s.strip() or s.strip().startswith("-"):
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_]+)\s*:", s)
        if not m:
            continue
        ind, name = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= ind:
            stack.pop()
        stack.append((ind, name))
        res[".".join(n for _, n in stack)] = i
    return res


def show(repo: str, path: str) -> str:
    key = (repo, path)
    if key not in _cache:
        _cache[key] = subprocess.run(["git", "--git-dir", MIRRORS[repo], "show", f"{COMMITS[repo]}:{path}"],
                                     check=True, capture_output=True, text=True).stdout
    return _cache[key]


def line_of(repo: str, path: str, pattern: str, after: str | None = None) -> int:
    """1-based line of the first line matching regex `pattern` (after the first line matching `after`)."""
    text = show(repo, path).splitlines()
    start = 0
    if after is not None:
        for i, t in enumerate(text):
            if re.search(after, t):
                start = i
                break
        else:
            raise ValueError(f"{after!r} not in {path}")
    for i in range(start, len(text)):
        if re.search(pattern, text[i]):
            return i + 1
    raise ValueError(f"{pattern!r} not in {repo}/{path} after {after!r}")


FS = "fairseq"
D2 = "examples/data2vec"
CFG = f"{D2}/config"
D2V2 = f"{D2}/models/data2vec2.py"
BASE = f"{D2}/models/modalities/base.py"
IMG = f"{D2}/models/modalities/images.py"
AUD = f"{D2}/models/modalities/audio.py"
TXT = f"{D2}/models/modalities/text.py"
MOD = f"{D2}/models/modalities/modules.py"
D2VA = f"{D2}/models/data2vec_audio.py"
D2VT = f"{D2}/models/data2vec_text.py"
W2V = "fairseq/models/wav2vec/wav2vec2.py"
COMP = "fairseq/optim/composite.py"
ADAM = "fairseq/optim/adam.py"
COS = "fairseq/optim/lr_scheduler/cosine_lr_scheduler.py"
TRI = "fairseq/optim/lr_scheduler/tri_stage_lr_scheduler.py"
CONFIGS = "fairseq/dataclass/configs.py"
MLM = "fairseq/tasks/masked_lm.py"
AUDTASK = "fairseq/tasks/audio_pretraining.py"
IMGTASK = f"{D2}/tasks/mae_image_pretraining.py"
IMGDATA = f"{D2}/data/mae_image_dataset.py"
TCONF = "fairseq/models/transformer/transformer_config.py"

SR = 16000  # task.sample_rate default (AudioPretrainingConfig), used for seconds

rows: list[dict] = []


def row(recipe, modality, size, repo, path, key, value, field=None, reference=None, conversion="", note="",
        kind="recipe", line=None, **extra):
    r = {"recipe": recipe, "modality": modality, "size": size, "file": f"{repo}/{path}", "line": line, "key": key,
         "value": value, "field": field, "reference": reference, "conversion": conversion, "note": note,
         "kind": kind}
    r.update(extra)
    rows.append(r)
    return r


def betas(v):
    if isinstance(v, str):
        return [float(x) for x in v.strip("()[] ").split(",")]
    return [float(x) for x in v]


# ----------------------------------------------------------------------------------------------------------------
# yaml handlers: key (with modalities.<m>.) -> function(value, ctx) -> list of dicts (field, reference, ...)
# ----------------------------------------------------------------------------------------------------------------

def na(note, kind="n/a"):
    return lambda v, c: [dict(note=note, kind=kind)]


def same(field, note="", conv="", cast=None, kind="recipe"):
    def h(v, c):
        return [dict(field=field, reference=cast(v) if cast else v, conversion=conv, note=note, kind=kind)]
    return h


def world(c):
    return c["flat"]["distributed_training.distributed_world_size"]


def update_freq(c):
    uf = c["flat"].get("optimization.update_freq", [1])
    return uf[0]


def max_update(c):
    return c["flat"]["optimization.max_update"]


def h_max_tokens(v, c):
    W = world(c)
    uf = update_freq(c)
    if c["modality"] == "speech":
        total = v * W * uf
        secs = total / SR
        crop = c["flat"].get("task.max_sample_size")
        derived = {"samples_per_gpu_batch": v, "gpus": W, "update_freq": uf, "samples_per_update": total,
                   "seconds_per_update": secs, "minutes_per_update": round(secs / 60, 4),
                   "utterances_per_update_if_all_full_crops": total / crop if crop else None}
        return [dict(field="run.batch_tokens", reference=total,
                     conversion=(f"max_tokens counts waveform samples per GPU batch: {v} x {W} GPUs x update_freq {uf} = "
                                 f"{total} samples = {secs:g} s = {secs / 60:.2f} min of 16 kHz audio per update"),
                     note=(f"{total / crop:g} utterances per update if every one were a full {crop}-sample crop (the "
                           "fewest that fill it); fairseq fills each GPU's batch from size-sorted indices and crops "
                           "it to its shortest utterance (task.enable_padding false)"),
                     kind="recipe", derived=derived)]
    # text v1: max_tokens tokens per GPU batch, fixed-length blocks of tokens_per_sample
    tps = c["flat"]["task.tokens_per_sample"]
    seqs = v // tps * W * uf
    return [dict(field="run.batch_size", reference=seqs,
                 conversion=f"{v} tokens per GPU / {tps} tokens_per_sample = {v // tps} sequences x {W} GPUs x update_freq {uf} = {seqs}",
                 note="blocks of at most tokens_per_sample tokens (complete_doc blocks can be shorter, so the per-GPU count can be larger than 16)",
                 derived={"sequences_per_gpu": v // tps, "gpus": W, "update_freq": uf, "sequences_per_update": seqs,
                          "tokens_per_update": v * W * uf})]


def h_batch_size(v, c):
    W = world(c)
    uf = update_freq(c)
    n = v * W * uf
    extra = ""
    if c["modality"] == "text":
        extra = f" sequences of {c['flat']['task.tokens_per_sample']} tokens"
    clones = c["flat"].get("model.clone_batch", 1)
    return [dict(field="run.batch_size", reference=n,
                 conversion=f"{v} per GPU x {W} GPUs x update_freq {uf} = {n}{extra}",
                 note=(f"each sample is cloned clone_batch={clones} times for the student, so the student sees "
                       f"{n * clones} masked copies per update; the teacher sees {n}"),
                 derived={"per_gpu": v, "gpus": W, "update_freq": uf, "samples_per_update": n,
                          "student_rows_per_update": n * clones, "student_rows_per_gpu": v * clones})]


def h_warmup(v, c):
    mu = max_update(c)
    return [dict(field="optim.warmup_fraction", reference=v / mu,
                 conversion=f"warmup_updates {v} / optimization.max_update {mu} = {v / mu!r}",
                 note="fairseq cosine: linear warm-up from warmup_init_lr (default -1 -> min_lr = 0) to lr, then cosine to min_lr (default 0) over max_update - warmup_updates updates")]


def h_lr(v, c):
    if c["flat"].get("optimizer._name") == "composite":
        lf = c["flat"].get("optimizer.groups.default.lr_float")
        return [dict(field=None,
                     note=(f"not the effective lr: the composite optimizer sets each group's lr from lr_float ({lf}) "
                           f"(composite.py: optimizer_config.lr = [group_cfg.lr_float]); see optimizer.groups.default.lr_float"),
                     kind="n/a")]
    return [dict(field="optim.lr", reference=float(v[0]), conversion="list of one lr -> its value")]


def h_clip(v, c):
    return [dict(field="optim.clip_grad", reference=float(v), conversion="clip_norm -> optim.clip_grad (0 = off)")]


def h_update_freq(v, c):
    return [dict(field=None, reference=None,
                 note="gradient accumulation steps; only enters the global batch (run.batch_size conversion). d2v's run.grad_accum is a runtime split of its global batch",
                 kind="input")]


def h_world(v, c):
    return [dict(field=None, reference=v,
                 note="GPUs (world size); d2v's run.batch_size is the global batch, so this only enters the batch conversion (dataset.max_tokens / dataset.batch_size) and, for v2 images, the cls_loss conversion",
                 kind="input")]


def h_adam_betas(v, c):
    return [dict(field="optim.betas", reference=betas(v),
                 conversion="fairseq evals the string / takes the list" if isinstance(v, str) else "")]


def h_sched_name(v, c):
    return [dict(field="optim.schedule", reference=v, conversion="")]


def h_phase_ratio(v, c):
    return [dict(field="optim.warmup_fraction", reference=float(v[0]), conversion="phase_ratio[0]"),
            dict(field="optim.hold_fraction", reference=float(v[1]), conversion="phase_ratio[1]",
                 note="phase_ratio[2] = 0.07 decay phase; tri_stage init_lr_scale (default 0.01) and final_lr_scale (default 0.01) are code defaults (rows below)")]


def h_ema_decay(v, c):
    return [dict(field="ema.decay", reference=float(v))]


def h_ema_end(v, c):
    return [dict(field="ema.end_decay", reference=float(v),
                 note=("1.0: once annealed the teacher stops moving (data2vec2.py set_num_updates: ema.step only if decay < 1)"
                       if float(v) == 1.0 else ""))]


def h_ema_anneal(v, c):
    return [dict(field="ema.anneal_steps", reference=int(v),
                 note="linear from ema_decay to ema_end_decay over this many updates, then constant (get_annealed_rate)")]


def h_topk(v, c):
    return [dict(field="targets.top_k", reference=int(v))]


def h_loss_beta(v, c):
    return [dict(field="targets.loss_beta", reference=float(v), conversion="0 -> L2 (mse); > 0 -> smooth L1 with this beta")]


def h_loss_scale(v, c):
    if v is None:
        return [dict(field="targets.loss_scale", reference="inv_sqrt_dim",
                     conversion="null -> scale 1/sqrt(D) (d2v_loss / Data2VecAudioModel.forward)")]
    if float(v) == 1.0:
        return [dict(field="targets.loss_scale", reference="one", conversion="1 -> 'one'")]
    return [dict(field="targets.loss_scale", reference=v, note="no d2v equivalent for this constant", kind="gap")]


def target_norm(flat):
    if flat.get("model.instance_norm_target_layer"):
        return "instance"
    if flat.get("model.layer_norm_target_layer"):
        return "layer"
    return "none"


def final_norm(flat):
    if flat.get("model.layer_norm_targets"):
        return "layer"
    if flat.get("model.instance_norm_targets"):
        return "instance"
    return "none"


def h_norm_layer(v, c):
    return [dict(field="targets.norm", reference=target_norm(c["flat"]),
                 conversion="instance_norm_target_layer / layer_norm_target_layer flags -> targets.norm (both false: 'none')",
                 note="" if v else "false: this flag does not select the norm")]


def h_final_norm(v, c):
    return [dict(field="targets.final_norm", reference=final_norm(c["flat"]),
                 conversion="layer_norm_targets / instance_norm_targets -> targets.final_norm (applied to the average of the top-K layers)",
                 note="" if v else "false: this flag does not select the final norm")]


def h_bn_layer(v, c):
    return [dict(note="batch norm of target layers; false: off (d2v has no batch-norm option)", kind="n/a")]


def h_end_of_block(v, c):
    return [dict(field="targets.layer", reference="block" if v else "ffn",
                 conversion="false -> AltBlock(ffn_targets=True): the target is the MLP output before post_mlp dropout, residual and norm2 -> 'ffn'")]


# v2 model depth: main blocks; prenet blocks live in the modality encoder
def h_depth(v, c):
    m = c["mkey"]
    pre = c["flat"].get(f"model.modalities.{m}.prenet_depth", 4)
    return [dict(field="model.depth", reference=int(v) + int(pre),
                 conversion=f"Data2VecMultiConfig.depth counts the shared blocks only; d2v's model.depth counts all: {v} + prenet_depth {pre} = {int(v) + int(pre)}")]


def h_prenet(v, c):
    if c["modality"] == "text":
        return [dict(field=None, reference=int(v), note="0: no pre-net blocks; d2v's text model has no prenet_depth field (nothing to set)", kind="n/a")]
    return [dict(field="model.prenet_depth", reference=int(v),
                 note="blocks inside the modality encoder (never target layers: targets come from the shared blocks)")]


def h_embed_dim(v, c):
    return [dict(field="model.dim", reference=int(v))]


def h_heads(v, c):
    return [dict(field="model.num_heads", reference=int(v))]


def h_clone(v, c):
    return [dict(field="mask.clones", reference=int(v))]


def h_norm_eps(v, c):
    return [dict(field="model.ln_eps", reference=float(v), note="eps of every encoder LayerNorm (make_layer_norm)")]


def h_layerdrop(v, c):
    if c["modality"] == "speech":
        return [dict(field="model.layerdrop", reference=float(v), note="drops whole shared blocks in training (data2vec2.py forward: np.random.random() > layerdrop)")]
    return [dict(field=None, reference=float(v), note="0: no layerdrop; d2v's text model has no layerdrop field (nothing to set)", kind="n/a")]


def h_min_var(v, c):
    return [dict(field=None, note="collapse guard: raise after 5000 updates when target var < min_target_var or pred var < min_pred_var (0 disables it); d2v's run.collapse / run.collapse_after are runtime choices", kind="runtime")]


def h_dropout_like(name):
    def h(v, c):
        if c["modality"] == "vision":
            return [dict(field=None, reference=float(v), note=f"{name} 0: off; d2v's v2 vision model has no such dropout field (off)", kind="n/a")]
        return [dict(field="model.dropout", reference=float(v))]
    return h


def h_attn_drop(v, c):
    return [dict(field="model.attention_dropout", reference=float(v), note="dropout on the attention probabilities (AltAttention attn_drop)")]


def h_act_drop(v, c):
    if c["modality"] == "speech":
        return [dict(field="model.activation_dropout", reference=float(v))]
    return [dict(field=None, reference=float(v), note="MLP hidden dropout 0: off; no d2v field for this modality", kind="n/a")]


def h_cls_loss(v, c):
    bs = c["flat"]["dataset.batch_size"]
    cl = c["flat"]["model.clone_batch"]
    w = float(v) * bs * cl
    return [dict(field="targets.cls_loss", reference=w,
                 conversion=(f"the reference adds d2v_loss(cls_pred, cls_target) x cls_loss x sample_size on each GPU, where "
                             f"sample_size = masked positions on that GPU, and fairseq divides the summed gradient by the total "
                             f"sample_size of all GPUs; relative to the mean loss over masked positions the CLS term weighs "
                             f"cls_loss x (rows per GPU) = {v} x ({bs} images x {cl} clones) = {w:g} times the mean CLS loss over rows"),
                 note="rows per GPU = dataset.batch_size x clone_batch; the weight therefore depends on the per-GPU batch, not the global one")]


def h_ema_encoder_only(v, c):
    m = c["modality"]
    if v:
        return [dict(field="ema.shared", reference=["embeddings."],
                     conversion="true -> the teacher is a copy of the shared blocks only; its input is the student's local (embedding) features (data2vec2.py forward, ema_encoder_only branch) -> everything before the blocks is shared",
                     note="text: token + position embedding, LayerNorm and the student's dropout come from the student (its local features)")]
    loc = c["flat"].get(f"model.modalities.{c['mkey']}.ema_local_encoder")
    shared = [] if loc else ["feature_extractor.", "feature_projection."]
    return [dict(field="ema.shared", reference=shared,
                 conversion=f"false -> the whole model is averaged except what ema_local_encoder={loc} removes",
                 note="")]


def h_ema_local(v, c):
    if v:
        return [dict(field="ema.shared", reference=[],
                     conversion="true -> the teacher keeps its own (averaged) local encoder and runs it on the raw input",
                     note="images: patch embedding and CLS token (extra_tokens) are averaged too; pos_embed is a fixed buffer-like parameter (requires_grad False, copied)")]
    return [dict(field="ema.shared", reference=["feature_extractor.", "feature_projection."],
                 conversion="false -> teacher.local_encoder and project_features set to None (make_target_model); the teacher runs on the student's local features (extractor_out['local_features'])",
                 note="audio: conv stack + LayerNorm(512) + Linear(512, D) shared; positional conv, encoder LayerNorm, pre-net and shared blocks averaged")]


def h_inverse(v, c):
    if c["modality"] == "vision":
        return [dict(field="mask.kind", reference="inverse_block" if v else "block",
                     conversion="true with mask_length 3 -> compute_block_mask_2d on the kept share (inverse) -> 'inverse_block'")]
    return [dict(field="mask.kind", reference="block_1d",
                 conversion="false with mask_length 5 -> compute_block_mask_1d masks blocks directly -> 'block_1d'")]


def h_mask_prob(v, c):
    return [dict(field="mask.ratio", reference=float(v),
                 conversion="share of positions masked (inverse_mask: 1 - mask_prob kept); exactly int(L x mask_prob) masked (image/audio: require_same_masks; text: random_masking keeps int(L x (1 - mask_prob)))")]


def h_mask_adjust(v, c):
    return [dict(field="mask.adjust", reference=float(v),
                 conversion="extra share of block centres drawn before the exact count is enforced")]


def h_mask_length(v, c):
    m = c["modality"]
    if m == "vision":
        return [dict(field="mask.block_size", reference=int(v))]
    if m == "speech":
        return [dict(field="mask.span_length", reference=int(v))]
    return [dict(field="mask.kind", reference="random",
                 conversion="mask_length 1 -> ModalitySpecificEncoder.compute_mask calls random_masking (MAE-style)")]


def h_noise(v, c):
    return [dict(field=None, reference=float(v), note="std of the N(0, std) noise put in the masked slots of the decoder input (decoder_input); d2v has no field (its objective.py uses 0.01)", kind="n/a")]


def h_extra_tokens(v, c):
    return [dict(field=None, reference=int(v), note="1: a CLS token prepended to the patch tokens (d2v's v2 vision model has a CLS token; no field)", kind="n/a")]


def h_init_extra(v, c):
    return [dict(field=None, note="false -> nn.init.normal_(extra_tokens): CLS init N(0, 1) (base.py ModalitySpecificEncoder.__init__); no d2v field", kind="n/a")]


def h_alibi(v, c):
    if c["modality"] == "speech":
        return [dict(field="model.alibi", reference=bool(v))]
    return [dict(field=None, reference=bool(v), note="false: no ALiBi for images (d2v's vision model has none)", kind="n/a")]


def h_dec(field, cast=int):
    def h(v, c):
        return [dict(field=field, reference=cast(v))]
    return h


def h_dec_proj_layers(v, c):
    ratio = c["flat"].get(f"model.modalities.{c['mkey']}.decoder.projection_ratio", 2.0)
    dd = c["flat"][f"model.modalities.{c['mkey']}.decoder.decoder_dim"]
    hid = int(dd * ratio) if int(v) > 1 else 0
    return [dict(field="decoder.proj_hidden", reference=hid,
                 conversion=f"projection_layers {v}: Linear(decoder_dim, decoder_dim x projection_ratio = {hid}) -> GELU -> Linear({hid}, D) (Decoder1d)" if int(v) > 1 else "1 -> a single Linear")]


def h_dec_proj_ratio(v, c):
    return [dict(field=None, reference=float(v), note="enters decoder.proj_hidden (see projection_layers)", kind="input")]


def h_feature_spec(v, c):
    spec = eval(v)  # the reference evals this string (audio.py AudioEncoder.__init__)
    return [dict(field="model.conv_dim", reference=[d for d, _, _ in spec], conversion="eval(spec) -> (dim, kernel, stride) per layer"),
            dict(field="model.conv_kernel", reference=[k for _, k, _ in spec], conversion="eval(spec)"),
            dict(field="model.conv_stride", reference=[s for _, _, s in spec], conversion="eval(spec)")]


def h_conv_pos_width(v, c):
    depth = c["flat"].get(f"model.modalities.{c['mkey']}.conv_pos_depth", c["flat"].get("model.pos_conv_depth", 5))
    k = max(3, int(v) // int(depth))
    return [dict(field="model.pos_conv_kernel", reference=k, conversion=f"kernel = max(3, {v} // depth {depth}) = {k} per layer")]


def h_prenet_layerdrop(v, c):
    pre = c["flat"].get(f"model.modalities.{c['mkey']}.prenet_depth", 4)
    if int(pre) == 0:
        return [dict(field=None, reference=float(v), note="no pre-net blocks at this size (prenet_depth 0): no effect", kind="n/a")]
    return [dict(field="model.layerdrop", reference=float(v),
                 conversion="layerdrop of the pre-net blocks (BlockEncoder); d2v has a single model.layerdrop for all blocks, which the reference sets to model.layerdrop = " + str(c["flat"].get("model.layerdrop")) + " for the shared blocks")]


def h_prenet_dropout(v, c):
    return [dict(field="model.dropout", reference=float(v),
                 conversion="dropout on the encoder input after the modality LayerNorm (BlockEncoder.forward: norm -> dropout -> pre-net blocks); d2v has one model.dropout",
                 note="applies even with prenet_depth 0 (audio: BlockEncoder(norm, dropout) with no blocks)")]


def h_learned_alibi(v, c):
    return [dict(field="model.alibi", reference=True,
                 conversion="learned ALiBi scale (init alibi_scale 1.0, clamped at 0); per head when learned_alibi_scale_per_head",
                 note="shape (1, 1, heads, 1, 1) (learned_alibi_scale_per_layer false)")]


def h_v2_mod_embed(v, c):
    return [dict(field=None, reference=int(v), note="patch-embedding width; equals model.embed_dim, so no extra Linear (images.py); no d2v field", kind="n/a")]


COMMON = {
    "common.fp16": lambda v, c: [dict(field="run.precision", reference="fp16" if v else "fp32", conversion="fp16 true -> mixed precision fp16", note="hardware/runtime choice (d2v presets keep fp32)", kind="runtime")],
    "common.log_format": na("logging"),
    "common.log_interval": na("logging cadence (d2v: run.log_every, a runtime choice)"),
    "common.tensorboard_logdir": na("logging"),
    "common.min_loss_scale": na("fp16 loss-scaler floor"),
    "common.fp16_no_flatten_grads": na("fp16 optimizer internals; must be true for the composite optimizer's several parameter groups"),
    "common.user_dir": na("plugin path"),
    "checkpoint.save_interval": na("checkpointing (runtime)"),
    "checkpoint.save_interval_updates": na("checkpointing (runtime)"),
    "checkpoint.keep_interval_updates": na("checkpointing (runtime)"),
    "checkpoint.no_epoch_checkpoints": na("checkpointing (runtime)"),
    "task._name": na("selects the fairseq task (data pipeline)"),
    "task.data": na("data path: which corpus (d2v data.source is the user's data)"),
    "task.max_sample_size": lambda v, c: [dict(field="data.crop_seconds", reference=v / SR, conversion=f"{v} samples / 16000 Hz")],
    "task.min_sample_size": lambda v, c: [dict(field="data.min_seconds", reference=v / SR, conversion=f"{v} samples / 16000 Hz", note="shorter files are skipped by the dataset")],
    "task.normalize": lambda v, c: [dict(field=None, reference=bool(v), note="true: F.layer_norm over each waveform (zero mean, unit variance); d2v always normalizes (no field)", kind="n/a")],
    "task.rebuild_batches": na("data loader internals"),
    "task.local_cache_path": na("data cache path"),
    "task.key": na("batch dict key"),
    "task.precompute_mask_config": na("{} (not null): masks are computed in the dataset workers, clone_batch masks per sample (compute_block_mask_2d / compute_block_mask_1d) with the model's modality mask settings (II interpolation)"),
    "task.sample_break_mode": same("data.sample_break"),
    "task.tokens_per_sample": lambda v, c: [dict(field="model.max_length", reference=int(v), note="blocks of tokens_per_sample - 1 tokens + <s> (masked_lm.py TokenBlockDataset + PrependTokenDataset)")],
    "task.include_target_tokens": na("dataset plumbing"),
    "task.include_index": na("dataset plumbing (sample ids seed the masks)"),
    "task.skip_masking": na("true: the dataset does not mask (the model masks), so mask_prob / random_token_prob / leave_unmasked_prob of the task do not apply"),
    "task.d2v2_multi": na("dataset plumbing for data2vec_multi"),
    "dataset.num_workers": na("data loader workers (runtime)"),
    "dataset.max_tokens": h_max_tokens,
    "dataset.batch_size": h_batch_size,
    "dataset.skip_invalid_size_inputs_valid_test": na("validation only"),
    "dataset.validate_interval": na("validation only"),
    "dataset.required_batch_size_multiple": na("batching detail (1: no rounding)"),
    "dataset.disable_validation": na("validation only"),
    "dataset.ignore_unused_valid_subsets": na("validation only"),
    "distributed_training.distributed_world_size": h_world,
    "distributed_training.ddp_backend": na("DDP implementation (legacy_ddp / c10d: both replicate the model); d2v's run.strategy (ddp / fsdp) is a runtime choice", kind="runtime"),
    "criterion._name": na("the model returns its losses"),
    "criterion": na("the model returns its losses"),
    "criterion.log_keys": na("logging"),
    "optimization.max_update": lambda v, c: [dict(field="run.steps", reference=int(v))],
    "optimization.lr": h_lr,
    "optimization.debug_param_names": na("logging of parameter names"),
    "optimization.clip_norm": h_clip,
    "optimization.update_freq": h_update_freq,
    "optimizer._name": lambda v, c: [dict(field=None, note=("fairseq adam = Adam with decoupled weight decay (AdamW); one parameter group: every parameter decayed" if v == "adam" else "composite: one optimizer + scheduler per parameter group (groups.default); see docs/RECIPES.md, 'Weight decay in data2vec 2.0'"), kind="n/a")],
    "optimizer.adam_betas": h_adam_betas,
    "optimizer.adam_eps": lambda v, c: [dict(field="optim.eps", reference=float(v))],
    "optimizer.weight_decay": lambda v, c: [dict(field="optim.weight_decay", reference=float(v))],
    "optimizer.dynamic_groups": na("composite: parameters grouped by their optim_overrides (hash); see docs/RECIPES.md, 'Weight decay in data2vec 2.0'"),
    "optimizer.groups.default.lr_float": lambda v, c: [dict(field="optim.lr", reference=float(v), conversion="the group's lr (composite.py sets optimizer_config.lr = [lr_float])")],
    "optimizer.groups.default.optimizer._name": na("adam (decoupled weight decay, AdamW-style)"),
    "optimizer.groups.default.optimizer.adam_betas": h_adam_betas,
    "optimizer.groups.default.optimizer.adam_eps": lambda v, c: [dict(field="optim.eps", reference=float(v))],
    "optimizer.groups.default.optimizer.weight_decay": lambda v, c: [dict(field="optim.weight_decay", reference=float(v))],
    "optimizer.groups.default.lr_scheduler._name": h_sched_name,
    "optimizer.groups.default.lr_scheduler.warmup_updates": h_warmup,
    "lr_scheduler": na("pass_through: the composite optimizer's per-group schedulers run"),
    "lr_scheduler._name": h_sched_name,
    "lr_scheduler.warmup_updates": h_warmup,
    "lr_scheduler.phase_ratio": h_phase_ratio,
    "model._name": na("selects the model class"),
}

V1_AUDIO = {
    "model.extractor_mode": lambda v, c: [dict(field=None, reference=v, note="layer_norm: each conv -> LayerNorm -> GELU; d2v's speech front end always uses this mode (no field)", kind="n/a")],
    "model.encoder_layerdrop": lambda v, c: [dict(field="model.layerdrop", reference=float(v))],
    "model.dropout_input": lambda v, c: [dict(field=None, reference=float(v), note="dropout on the projected features before masking; 0: off (no d2v field)", kind="n/a")],
    "model.dropout_features": lambda v, c: [dict(field=None, reference=float(v), note="0: off (no d2v field)", kind="n/a")],
    "model.feature_grad_mult": lambda v, c: [dict(field=None, reference=float(v), note="1.0: the conv front end gets its plain gradient (no d2v field)", kind="n/a")],
    "model.encoder_embed_dim": lambda v, c: [dict(field="model.dim", reference=int(v))],
    "model.mask_prob": lambda v, c: [dict(field="mask.span_prob", reference=float(v) / c["flat"]["model.mask_length"],
                                          conversion=f"compute_mask_indices starts int(mask_prob x T / mask_length + rand) spans: per-frame start probability {v} / {c['flat']['model.mask_length']}"),
                                     dict(field="mask.kind", reference="span", conversion="wav2vec 2.0 span masking (compute_mask_indices, mask_selection static)")],
    "model.mask_length": lambda v, c: [dict(field="mask.span_length", reference=int(v))],
    "model.loss_beta": h_loss_beta,
    "model.loss_scale": h_loss_scale,
    "model.instance_norm_target_layer": h_norm_layer,
    "model.average_top_k_layers": h_topk,
    "model.pos_conv_depth": lambda v, c: [dict(field="model.pos_conv_depth", reference=int(v))],
    "model.conv_pos": h_conv_pos_width,
    "model.ema_decay": h_ema_decay,
    "model.ema_end_decay": h_ema_end,
    "model.ema_anneal_end_step": h_ema_anneal,
    "model.ema_transformer_only": lambda v, c: [dict(field="ema.shared", reference=["feature_extractor.", "feature_projection.", "pos_conv."],
                                                     conversion="true: the EMA covers self.encoder only (conv front end, its LayerNorm and post_extract_proj are the student's); the teacher runs on the student's pre-mask projected features (pre_encoder_features)",
                                                     note="together with ema_layers_only (next row)")],
    "model.ema_layers_only": lambda v, c: [dict(field="ema.shared", reference=["feature_extractor.", "feature_projection.", "pos_conv."],
                                                conversion="true: encoder.pos_conv parameters are skip_keys of the EMA -> copied from the student, not averaged (data2vec_audio.py make_ema_teacher)",
                                                note="the encoder LayerNorm and the blocks are averaged")],
    "model.require_same_masks": na("true: every row of a batch gets the same number of masked frames (compute_mask_indices)"),
    "model.mask_dropout": na("0: no masked-position dropout"),
}

V1_TEXT = {
    "task.random_token_prob": lambda v, c: [dict(field="mask.random_token", reference=float(v))],
    "task.leave_unmasked_prob": lambda v, c: [dict(field="mask.unchanged", reference=float(v))],
    "task.mask_prob": lambda v, c: [dict(field="mask.ratio", reference=float(v),
                                         conversion="MaskTokensDataset: int(mask_prob x len / mask_multiple_length + rand) span starts, each grown to mask_multiple_length tokens (overlaps allowed)",
                                         note="with mask_multiple_length 4 the share actually masked is below 0.35 because spans overlap")],
    "task.mask_multiple_length": lambda v, c: [dict(field="mask.span_length", reference=int(v)),
                                               dict(field="mask.kind", reference="span", conversion="mask_multiple_length > 1 with random_token_prob 0 and leave_unmasked_prob 0 -> spans replaced by <mask>")],
    "model.head_layers": lambda v, c: [dict(field="targets.head", reference="mlp" if int(v) == 2 else "linear",
                                            conversion="2: Linear(D, 2D) -> GELU -> Linear(2D, D) regression head (data2vec_text.py)")],
    "model.average_top_k_layers": h_topk,
    "model.layer_norm_target_layer": h_norm_layer,
    "model.loss_scale": h_loss_scale,
    "model.ema_decay": h_ema_decay,
    "model.ema_end_decay": h_ema_end,
    "model.ema_anneal_end_step": h_ema_anneal,
    "model.loss_beta": h_loss_beta,
    "model.ema_transformer_layers_only": lambda v, c: [dict(field="ema.shared", reference=["embeddings."],
                                                            conversion="true: embed_tokens, embed_positions and layernorm_embedding are skip_keys of the EMA (copied from the student)")],
    "model.transformer.dropout": lambda v, c: [dict(field="model.dropout", reference=float(v))],
    "model.transformer.attention_dropout": lambda v, c: [dict(field="model.attention_dropout", reference=float(v))],
    "model.transformer.layernorm_embedding": na("true: LayerNorm after token + position embedding (d2v's text model always has it)"),
    "model.transformer.activation_fn": na("gelu (d2v's text model uses GELU)"),
    "model.transformer.no_scale_embedding": na("true: embeddings not multiplied by sqrt(D) (as d2v)"),
    "model.transformer.max_source_positions": lambda v, c: [dict(field="model.max_length", reference=int(v))],
    "model.transformer.encoder.embed_dim": lambda v, c: [dict(field="model.dim", reference=int(v))],
    "model.transformer.encoder.ffn_embed_dim": lambda v, c: [dict(field="model.ffn_dim", reference=int(v))],
    "model.transformer.encoder.layers": lambda v, c: [dict(field="model.depth", reference=int(v))],
    "model.transformer.encoder.attention_heads": lambda v, c: [dict(field="model.num_heads", reference=int(v))],
    "model.transformer.encoder.normalize_before": na("false: post-LN blocks (as d2v's text model)"),
    "model.transformer.encoder.learned_pos": na("true: learned positions (as d2v)"),
    "model.transformer.encoder.layerdrop": lambda v, c: [dict(field=None, reference=float(v), note="0: no layerdrop; d2v's text model has no layerdrop field", kind="n/a")],
}

V2 = {
    "task.random_token_prob": na("not used: task.skip_masking true (the model masks)"),
    "task.leave_unmasked_prob": na("not used: task.skip_masking true (the model masks)"),
    "model.loss_beta": h_loss_beta,
    "model.loss_scale": h_loss_scale,
    "model.depth": h_depth,
    "model.embed_dim": h_embed_dim,
    "model.num_heads": h_heads,
    "model.clone_batch": h_clone,
    "model.ema_decay": h_ema_decay,
    "model.ema_end_decay": h_ema_end,
    "model.ema_anneal_end_step": h_ema_anneal,
    "model.ema_encoder_only": h_ema_encoder_only,
    "model.average_top_k_layers": h_topk,
    "model.instance_norm_target_layer": h_norm_layer,
    "model.layer_norm_target_layer": h_norm_layer,
    "model.batch_norm_target_layer": h_bn_layer,
    "model.layer_norm_targets": h_final_norm,
    "model.instance_norm_targets": h_final_norm,
    "model.end_of_block_targets": h_end_of_block,
    "model.layerdrop": h_layerdrop,
    "model.norm_eps": h_norm_eps,
    "model.min_target_var": h_min_var,
    "model.min_pred_var": h_min_var,
    "model.encoder_dropout": h_dropout_like("encoder_dropout (attention output projection dropout)"),
    "model.post_mlp_drop": h_dropout_like("post_mlp_drop (dropout on the MLP output before the residual)"),
    "model.attention_dropout": h_attn_drop,
    "model.activation_dropout": h_act_drop,
    "model.supported_modality": na("single-modality model"),
    "model.cls_loss": h_cls_loss,
    "model.modalities.<m>.inverse_mask": h_inverse,
    "model.modalities.<m>.mask_prob": h_mask_prob,
    "model.modalities.<m>.mask_prob_adjust": h_mask_adjust,
    "model.modalities.<m>.mask_length": h_mask_length,
    "model.modalities.<m>.mask_noise_std": h_noise,
    "model.modalities.<m>.prenet_depth": h_prenet,
    "model.modalities.<m>.ema_local_encoder": h_ema_local,
    "model.modalities.<m>.num_extra_tokens": h_extra_tokens,
    "model.modalities.<m>.init_extra_token_zero": h_init_extra,
    "model.modalities.<m>.use_alibi_encoder": h_alibi,
    "model.modalities.<m>.embed_dim": h_v2_mod_embed,
    "model.modalities.<m>.decoder.decoder_dim": h_dec("decoder.dim"),
    "model.modalities.<m>.decoder.decoder_groups": h_dec("decoder.groups"),
    "model.modalities.<m>.decoder.decoder_kernel": h_dec("decoder.kernel"),
    "model.modalities.<m>.decoder.decoder_layers": h_dec("decoder.depth"),
    "model.modalities.<m>.decoder.input_dropout": h_dec("decoder.input_dropout", float),
    "model.modalities.<m>.decoder.decoder_residual": h_dec("decoder.residual", bool),
    "model.modalities.<m>.decoder.projection_layers": h_dec_proj_layers,
    "model.modalities.<m>.decoder.projection_ratio": h_dec_proj_ratio,
    "model.modalities.<m>.feature_encoder_spec": h_feature_spec,
    "model.modalities.<m>.conv_pos_depth": lambda v, c: [dict(field="model.pos_conv_depth", reference=int(v))],
    "model.modalities.<m>.conv_pos_width": h_conv_pos_width,
    "model.modalities.<m>.conv_pos_groups": lambda v, c: [dict(field="model.pos_conv_groups", reference=int(v))],
    "model.modalities.<m>.mask_dropout": na("0: no masked-position dropout"),
    "model.modalities.<m>.add_masks": na("false: compute_block_mask_1d / compute_mask_indices option off"),
    "model.modalities.<m>.prenet_layerdrop": h_prenet_layerdrop,
    "model.modalities.<m>.prenet_dropout": h_prenet_dropout,
    "model.modalities.<m>.learned_alibi_scale": h_learned_alibi,
    "model.modalities.<m>.learned_alibi_scale_per_head": h_learned_alibi,
}

PRIMARY = [
    ("v1", "speech", "base", "audio/pretraining/base_librispeech.yaml"),
    ("v1", "text", "base", "text/pretraining/base.yaml"),
    ("v2", "vision", "base", "v2/base_images_only_task.yaml"),
    ("v2", "vision", "large", "v2/large_images_only_task.yaml"),
    ("v2", "speech", "base", "v2/base_audio_only_task.yaml"),
    ("v2", "speech", "large", "v2/large_audio_only_task.yaml"),
    ("v2", "text", "base", "v2/base_text_only_task.yaml"),
    ("v2", "text", "large", "v2/large_text_only_task.yaml"),
]
MKEY = {"vision": "image", "speech": "audio", "text": "text"}


def yaml_rows(recipe, modality, size, rel):
    path = f"{CFG}/{rel}"
    text = show(FS, path)
    flat = flatten(fix(yaml.safe_load(text)))
    lmap = lines(text)
    ctx = {"flat": flat, "recipe": recipe, "modality": modality, "size": size, "mkey": MKEY[modality]}
    table = dict(COMMON)
    table.update(V1_AUDIO if (recipe, modality) == ("v1", "speech") else {})
    table.update(V1_TEXT if (recipe, modality) == ("v1", "text") else {})
    table.update(V2 if recipe == "v2" else {})
    for key, value in flat.items():
        norm = re.sub(r"model\.modalities\.(image|audio|text)\.", "model.modalities.<m>.", key)
        if norm not in table:
            raise KeyError(f"no handler for {key} in {rel}")
        for out in table[norm](value, ctx):
            row(recipe, modality, size, FS, path, key, value, line=lmap.get(key), **out)
    return flat


# ----------------------------------------------------------------------------------------------------------------
# code defaults the yaml files leave unset
# ----------------------------------------------------------------------------------------------------------------

def default(recipe, modality, size, path, cls_after, field_pat, key, value, flat=None, yaml_key=None, **kw):
    """A code default: skipped when the yaml sets `yaml_key`."""
    if flat is not None and yaml_key is not None and yaml_key in flat:
        return
    ln = line_of(FS, path, field_pat, after=cls_after)
    kw.setdefault("kind", "recipe" if kw.get("field") else "n/a")
    row(recipe, modality, size, FS, path, key, value, line=ln, **kw)


def v2_defaults(modality, size, flat):
    r = "v2"
    m = MKEY[modality]
    A = r"^class Data2VecMultiConfig"
    MC = r"^class D2vModalityConfig"
    d = lambda *a, **k: default(r, modality, size, *a, flat=flat, **k)  # noqa: E731
    d(D2V2, A, r"^\s+num_heads: int = 12", "Data2VecMultiConfig.num_heads (default)", 12, yaml_key="model.num_heads",
      field="model.num_heads", reference=12)
    d(D2V2, A, r"^\s+embed_dim: int = 768", "Data2VecMultiConfig.embed_dim (default)", 768, yaml_key="model.embed_dim",
      field="model.dim", reference=768)
    dim = flat.get("model.embed_dim", 768)
    if modality == "vision":
        d(D2V2, A, r"^\s+mlp_ratio: float = 4", "Data2VecMultiConfig.mlp_ratio (default)", 4, field="model.mlp_ratio", reference=4.0)
    else:
        d(D2V2, A, r"^\s+mlp_ratio: float = 4", "Data2VecMultiConfig.mlp_ratio (default)", 4, field="model.ffn_dim",
          reference=int(dim * 4), conversion=f"ffn width = embed_dim {dim} x mlp_ratio 4")
    d(D2V2, A, r"^\s+layer_norm_first: bool = False", "Data2VecMultiConfig.layer_norm_first (default)", False,
      **(dict(field="model.arch", reference="v2", conversion="post-LN AltBlock (norm after the residual adds) -> d2v's 'v2' ViT") if modality == "vision"
         else dict(note="post-LN blocks (d2v's speech and text models are post-LN)")))
    for name, default_v, field in (("encoder_dropout", 0.1, "model.dropout"), ("post_mlp_drop", 0.1, "model.dropout"),
                                   ("attention_dropout", 0.1, "model.attention_dropout"), ("activation_dropout", 0.0, None)):
        if modality == "vision":
            continue  # set in the image yamls
        f = field
        if name == "activation_dropout" and modality == "speech":
            f = "model.activation_dropout"
        d(D2V2, A, rf"^\s+{name}: float = ", f"Data2VecMultiConfig.{name} (default)", default_v, yaml_key=f"model.{name}",
          field=f, reference=default_v if f else None,
          note={"encoder_dropout": "AltAttention proj_drop (attention output)", "post_mlp_drop": "dropout on the MLP output before the residual",
                "attention_dropout": "on the attention probabilities", "activation_dropout": "MLP hidden dropout (timm Mlp drop)"}[name])
    d(D2V2, A, r"^\s+dropout_input: float = 0.0", "Data2VecMultiConfig.dropout_input (default)", 0.0, note="0: off")
    d(D2V2, A, r"^\s+start_drop_path_rate: float = 0", "Data2VecMultiConfig.start_drop_path_rate / end_drop_path_rate (default)", 0,
      **(dict(field="model.drop_path", reference=0.0) if modality == "vision" else dict(note="0: no drop path")))
    if modality == "vision":
        d(D2V2, A, r"^\s+layerdrop: float = 0.0", "Data2VecMultiConfig.layerdrop (default)", 0.0, yaml_key="model.layerdrop",
          note="0: no layerdrop (d2v's vision model has no layerdrop)")
    d(D2V2, A, r"^\s+end_of_block_targets: bool = False", "Data2VecMultiConfig.end_of_block_targets (default)", False,
      yaml_key="model.end_of_block_targets", field="targets.layer", reference="ffn",
      conversion="false -> AltBlock(ffn_targets=True): the MLP output before dropout, residual and norm2")
    for name in ("layer_norm_target_layer", "batch_norm_target_layer", "instance_norm_target_layer", "instance_norm_targets", "layer_norm_targets"):
        if f"model.{name}" in flat:
            continue
        fld = "targets.final_norm" if name.endswith("targets") else ("targets.norm" if name != "batch_norm_target_layer" else None)
        val = (final_norm(flat) if fld == "targets.final_norm" else target_norm(flat)) if fld else None
        d(D2V2, A, rf"^\s+{name}: bool = False", f"Data2VecMultiConfig.{name} (default)", False, field=fld, reference=val,
          conversion=("the norm flags -> targets.norm / targets.final_norm" if fld else ""),
          note="false: this flag does not select the norm" if fld else "false: no batch norm of target layers")
    d(D2V2, A, r"^\s+ema_same_dtype: bool = True", "Data2VecMultiConfig.ema_same_dtype (default)", True,
      note="true: the teacher forward runs in the student's dtype (fp16 under common.fp16); the EMA master copy stays fp32 (make_ema_teacher: ema_fp32=True). d2v keeps the EMA in fp32 (no field)")
    d(D2V2, A, r"^\s+loss_beta: float = field", "Data2VecMultiConfig.loss_beta (default)", 0, yaml_key="model.loss_beta",
      field="targets.loss_beta", reference=0.0, conversion="0 -> L2")
    d(D2V2, A, r"^\s+loss_scale: Optional\[float\] = field", "Data2VecMultiConfig.loss_scale (default)", None, yaml_key="model.loss_scale",
      field="targets.loss_scale", reference="inv_sqrt_dim", conversion="None -> 1/sqrt(D)")
    d(D2V2, A, r"^\s+min_target_var: float = field", "Data2VecMultiConfig.min_target_var / min_pred_var (default)", [0.1, 0.01],
      yaml_key="model.min_target_var", kind="runtime", note="collapse guard thresholds (raise after 5000 updates); d2v: run.collapse (runtime)")
    d(D2V2, A, r"^\s+cls_loss: float = 0", "Data2VecMultiConfig.cls_loss (default)", 0, yaml_key="model.cls_loss",
      field="targets.cls_loss", reference=0.0)
    d(D2V2, A, r"^\s+recon_loss: float = 0", "Data2VecMultiConfig.recon_loss / d2v_loss (default)", [0, 1],
      note="no pixel reconstruction loss; regression loss weight 1")
    d(D2V2, A, r"^\s+mae_init: bool = False", "Data2VecMultiConfig.mae_init (default)", False,
      note="false: init_bert_params (normal std 0.02) on the whole model, then each modality encoder's reset_parameters")
    d(D2V2, A, r"^\s+shared_decoder: Optional\[D2vDecoderConfig\] = None", "Data2VecMultiConfig.shared_decoder (default)", None,
      note="no shared decoder: only the modality decoder")
    d(D2V2, A, r"^\s+decoder_group: bool = False", "Data2VecMultiConfig.decoder_group (default)", False,
      note="false: decoder parameters are not put in a separate 'decoder' optimizer group")
    d(D2V2, A, r"^\s+norm_affine: bool = True", "Data2VecMultiConfig.norm_affine (default)", True, note="encoder LayerNorms have weight and bias")
    # no-weight-decay rule (code) and its effective application
    ln = line_of(FS, D2V2, r"if len\(p.shape\) == 1 or pn.endswith\(\"\.bias\"\) or \"alibi_scale\" in pn")
    composite = flat.get("optimizer._name") == "composite"
    row(r, modality, size, FS, D2V2, "Data2VecMultiModel.__init__ no-weight-decay rule (code)",
        'len(p.shape) == 1 or pn.endswith(".bias") or "alibi_scale" in pn -> p.optim_overrides = {"optimizer": {"weight_decay_scale": 0}}',
        field="optim.no_decay", reference=(["1d", "bias"] if composite else []),
        conversion=("intended: 1-D parameters, biases and the ALiBi scale get weight_decay_scale 0; the image CLS token (extra_tokens, shape (1, 1, D)) is not exempt"
                    if composite else "optimizer._name adam (not composite): optim_overrides are never read, one parameter group, every parameter decayed"),
        note=("the ALiBi scale (shape (1, 1, H, 1, 1)) is exempt by name, not by '1d'" if modality == "speech" else "") +
             ("; see the next row: as released, composite.py never applies weight_decay_scale" if composite else ""),
        kind="recipe", line=ln)
    if composite:
        ln2 = line_of(FS, COMP, r'"weight_decay_scale" in overrides\[group\]\["optimizer"\]')
        row(r, modality, size, FS, COMP, "FairseqCompositeOptimizer.__init__ weight_decay_scale application (code)",
            'if "weight_decay_scale" in overrides[group]["optimizer"] and "optimizer_config" in optimizer_config: optimizer_config.weight_decay = optimizer_config.weight_decay * weight_decay_scale',
            field="optim.no_decay", reference=[],
            conversion="the group optimizer configs of the v2 yamls (_name, adam_betas, adam_eps, weight_decay, lr) have no key 'optimizer_config', so the scale is never applied: the overridden parameters form their own group (dynamic_groups) with the same weight_decay -> effectively every parameter is decayed",
            note="effective behaviour of the released code, as opposed to the intended rule in the previous row; see docs/RECIPES.md, 'Weight decay in data2vec 2.0'",
            kind="effective", line=ln2)
    # modality config defaults
    if modality == "vision":
        I = r"^class D2vImageConfig"
        d(IMG, I, r"^\s+input_size: int = 224", "D2vImageConfig.input_size (default)", 224, field="model.image_size", reference=224)
        d(IMG, I, r"^\s+patch_size: int = 16", "D2vImageConfig.patch_size (default)", 16, field="model.patch_size", reference=16)
        d(IMG, I, r"^\s+in_chans: int = 3", "D2vImageConfig.in_chans (default)", 3, field="model.in_chans", reference=3)
        d(IMG, I, r"^\s+fixed_positions: bool = True", "D2vImageConfig.fixed_positions (default)", True,
          note="fixed 2-D sin-cos position embedding (get_2d_sincos_pos_embed, requires_grad False) added before masking (2-D sin-cos, column half first: mae.py get_2d_sincos_pos_embed)")
        d(IMG, I, r"^\s+transformer_decoder: bool = False", "D2vImageConfig.transformer_decoder (default)", False,
          note="false: Decoder2d (conv decoder)")
        d(MOD, r"^class D2vDecoderConfig", r"^\s+decoder_residual: bool = True", "D2vDecoderConfig.decoder_residual (default)", True,
          field="decoder.residual", reference=True, note="residual when channel counts match (add_residual)")
        row(r, modality, size, FS, MOD, "Decoder2d.proj (code)", "nn.Linear(cfg.decoder_dim, input_dim)", field="decoder.proj_hidden",
            reference=0, conversion="Decoder2d always projects with one Linear (projection_layers is not used)",
            line=line_of(FS, MOD, r"self.proj = nn.Linear\(cfg.decoder_dim, input_dim\)", after=r"^class Decoder2d"))
        d(BASE, MC, r"^\s+prenet_layerdrop: float = 0", "D2vModalityConfig.prenet_layerdrop (default)", 0, note="0")
        d(BASE, MC, r"^\s+prenet_dropout: float = 0", "D2vModalityConfig.prenet_dropout (default)", 0,
          note="0: no dropout after the image encoder's LayerNorm")
        d(BASE, MC, r"^\s+mask_dropout: float = 0.0", "D2vModalityConfig.mask_dropout (default)", 0.0, note="0")
        d(IMGTASK, r"^class MaeImagePretrainingConfig", r"^\s+input_size: int = 224", "MaeImagePretrainingConfig.input_size (default)", 224,
          field="data.image_size", reference=224)
        d(IMGTASK, r"^class MaeImagePretrainingConfig", r"^\s+beit_transforms: bool = False", "MaeImagePretrainingConfig.beit_transforms (default)", False,
          note="false -> the MAE augmentation of mae_image_dataset.py (next rows)")
        row(r, modality, size, FS, IMGDATA, "MaeImageDataset transform_train (code)",
            "transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=3)", field="data.crop_scale", reference=[0.2, 1.0],
            conversion="scale -> data.crop_scale", note="interpolation=3 is bicubic", line=line_of(FS, IMGDATA, r"transforms.RandomResizedCrop\("))
        row(r, modality, size, FS, IMGDATA, "MaeImageDataset transform_train (code)", "transforms.RandomHorizontalFlip()", conversion="p 0.5 (default) -> True",
            field="data.hflip", reference=True, line=line_of(FS, IMGDATA, r"transforms.RandomHorizontalFlip\(\),"))
        row(r, modality, size, FS, IMGDATA, "MaeImageDataset transform_train (code)", "no ColorJitter (only with beit_transforms / target_transform)", conversion="none -> 0.0",
            field="data.color_jitter", reference=0.0, line=line_of(FS, IMGDATA, r"transforms.RandomResizedCrop\("))
        row(r, modality, size, FS, IMGDATA, "MaeImageDataset final_transform (code)",
            "transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])", field="model.pixel_mean",
            reference=[0.485, 0.456, 0.406], conversion="ImageNet mean (std [0.229, 0.224, 0.225] -> model.pixel_std)",
            note="d2v's presets leave pixel_mean/std empty (measured from the data)", kind="data-stat",
            line=line_of(FS, IMGDATA, r"transforms.Normalize\("))
    if modality == "speech":
        d(AUD, r"^class D2vAudioConfig", r'^\s+extractor_mode: str = "layer_norm"', "D2vAudioConfig.extractor_mode (default)", "layer_norm",
          note="conv -> LayerNorm -> GELU per conv layer (d2v: always)")
        d(AUD, r"^class D2vAudioConfig", r"^\s+conv_pos_pre_ln: bool = False", "D2vAudioConfig.conv_pos_pre_ln (default)", False, note="false")
        d(BASE, MC, r"^\s+alibi_scale: float = 1.0", "D2vModalityConfig.alibi_scale (default)", 1.0,
          note="init of the learned ALiBi scale (clamped at 0 in contextualized_features)")
        d(BASE, MC, r"^\s+learned_alibi_scale_per_layer: bool = False", "D2vModalityConfig.learned_alibi_scale_per_layer (default)", False,
          note="one scale per head shared by all layers")
        d(BASE, MC, r"^\s+num_extra_tokens: int = 0", "D2vModalityConfig.num_extra_tokens (default)", 0, note="no CLS token for audio")
        d(MOD, r"^class D2vDecoderConfig", r"^\s+decoder_residual: bool = True", "D2vDecoderConfig.decoder_residual (default)", True,
          field="decoder.residual", reference=True)
        d(MOD, r"^class D2vDecoderConfig", r"^\s+projection_layers: int = 1", "D2vDecoderConfig.projection_layers (default)", 1,
          field="decoder.proj_hidden", reference=0, conversion="1 -> a single Linear(decoder_dim, D)")
        d(AUDTASK, r"^class AudioPretrainingConfig", r"^\s+sample_rate: int = field", "AudioPretrainingConfig.sample_rate (default)", 16000,
          field="model.sample_rate", reference=16000)
        d(AUDTASK, r"^class AudioPretrainingConfig", r"^\s+enable_padding: bool = field", "AudioPretrainingConfig.enable_padding (default)", False,
          note="false: the collater crops every utterance of a batch to the batch's shortest (raw_audio_dataset.py collater); d2v pads instead (no field)")
    if modality == "text":
        T = r"^class D2vTextConfig"
        d(TXT, T, r"^\s+max_source_positions: int = 512", "D2vTextConfig.max_source_positions (default)", 512, field="model.max_length", reference=512)
        d(TXT, T, r"^\s+dropout: float = 0.1", "D2vTextConfig.dropout (default)", 0.1, field="model.dropout", reference=0.1,
          note="dropout at the end of TextLocalEncoder (after embedding LayerNorm)")
        d(TXT, T, r"^\s+learned_pos: bool = True", "D2vTextConfig.learned_pos (default)", True, note="learned positions (as d2v)")
        d(TXT, T, r"^\s+no_scale_embedding: bool = True", "D2vTextConfig.no_scale_embedding (default)", True, note="embeddings not scaled")
        d(TXT, T, r"^\s+layernorm_embedding: bool = True", "D2vTextConfig.layernorm_embedding (default)", True, note="LayerNorm after token + position embedding")
        d(BASE, MC, r"^\s+num_extra_tokens: int = 0", "D2vModalityConfig.num_extra_tokens (default)", 0, note="no extra tokens (the <s> token is part of the sequence)")
        d(BASE, MC, r"^\s+mask_prob_adjust: float = 0", "D2vModalityConfig.mask_prob_adjust (default)", 0, note="unused by random_masking (mask_length 1)")
        d(BASE, MC, r"^\s+prenet_layerdrop: float = 0", "D2vModalityConfig.prenet_layerdrop / prenet_dropout (default)", 0,
          note="text: prenet_depth 0, and TextEncoder passes prenet_dropout only when prenet_depth > 0")
        d(BASE, MC, r"^\s+ema_local_encoder: bool = False", "D2vModalityConfig.ema_local_encoder (default)", False,
          note="unused for text: ema_encoder_only true")
        d(MLM, r"^class MaskedLMConfig", r"^\s+mask_prob: float = field", "MaskedLMConfig.mask_prob (default)", 0.15,
          note="not used: task.skip_masking true")
    # optimizer / schedule defaults
    if composite and "optimizer.groups.default.optimizer.adam_eps" not in flat:
        d(ADAM, r"^class FairseqAdamConfig", r"^\s+adam_eps: float = field", "FairseqAdamConfig.adam_eps (default)", 1e-8,
          field="optim.eps", reference=1e-8)
    d(COS, r"^class CosineLRScheduleConfig", r"^\s+min_lr: float = field", "CosineLRScheduleConfig.min_lr (default)", 0.0,
      field="optim.final_lr_ratio", reference=0.0, conversion="min_lr 0 -> ratio 0")
    d(COS, r"^class CosineLRScheduleConfig", r"^\s+warmup_init_lr: float = field", "CosineLRScheduleConfig.warmup_init_lr (default)", -1,
      note="-1 -> min_lr (0): warm-up starts at lr 0")
    if "optimization.clip_norm" not in flat:
        d(CONFIGS, r"^class OptimizationConfig", r"^\s+clip_norm: float = field", "OptimizationConfig.clip_norm (default)", 0.0,
          field="optim.clip_grad", reference=0.0, conversion="0 -> no clipping")
    if "optimization.update_freq" not in flat:
        d(CONFIGS, r"^class OptimizationConfig", r"^\s+update_freq: List\[int\] = field", "OptimizationConfig.update_freq (default)", [1],
          kind="input", note="no gradient accumulation (enters the batch conversion)")
    if "optimization.lr" not in flat:
        d(CONFIGS, r"^class OptimizationConfig", r"^\s+lr: List\[float\] = field", "OptimizationConfig.lr (default)", [0.25],
          note="not effective: the composite optimizer's group lr comes from lr_float")


def v1_audio_defaults(flat):
    r, m, s = "v1", "speech", "base"
    A = r"^class Wav2Vec2Config"
    d = lambda *a, **k: default(r, m, s, *a, flat=flat, **k)  # noqa: E731
    d(W2V, A, r"^\s+encoder_layers: int = field", "Wav2Vec2Config.encoder_layers (default)", 12, field="model.depth", reference=12)
    d(W2V, A, r"^\s+encoder_ffn_embed_dim: int = field", "Wav2Vec2Config.encoder_ffn_embed_dim (default)", 3072, field="model.ffn_dim", reference=3072)
    d(W2V, A, r"^\s+encoder_attention_heads: int = field", "Wav2Vec2Config.encoder_attention_heads (default)", 12, field="model.num_heads", reference=12)
    d(W2V, A, r"^\s+dropout: float = field", "Wav2Vec2Config.dropout (default)", 0.1, field="model.dropout", reference=0.1)
    d(W2V, A, r"^\s+attention_dropout: float = field", "Wav2Vec2Config.attention_dropout (default)", 0.1, field="model.attention_dropout", reference=0.1)
    d(W2V, A, r"^\s+activation_dropout: float = field", "Wav2Vec2Config.activation_dropout (default)", 0.0, field="model.activation_dropout", reference=0.0)
    d(W2V, A, r"^\s+layer_norm_first: bool = field", "Wav2Vec2Config.layer_norm_first (default)", False, note="post-LN (as d2v's speech model)")
    spec = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"
    ln = line_of(FS, W2V, r'default="\[\(512, 10, 5\)\]', after=r"^\s+conv_feature_layers: str = field")
    ev = eval(spec)
    for fld, val in (("model.conv_dim", [x[0] for x in ev]), ("model.conv_kernel", [x[1] for x in ev]), ("model.conv_stride", [x[2] for x in ev])):
        row(r, m, s, FS, W2V, "Wav2Vec2Config.conv_feature_layers (default)", spec, field=fld, reference=val, conversion="eval(spec)", line=ln)
    d(W2V, A, r"^\s+conv_bias: bool = field", "Wav2Vec2Config.conv_bias (default)", False, note="no bias in the conv front end")
    d(W2V, A, r"^\s+conv_pos_groups: int = field", "Wav2Vec2Config.conv_pos_groups (default)", 16, field="model.pos_conv_groups", reference=16)
    d(W2V, A, r"^\s+mask_selection: MASKING_DISTRIBUTION_CHOICES = field", "Wav2Vec2Config.mask_selection (default)", "static",
      note="fixed span length mask_length")
    d(W2V, A, r"^\s+no_mask_overlap: bool = field", "Wav2Vec2Config.no_mask_overlap / mask_min_space (default)", [False, 1], note="spans may overlap")
    d(W2V, A, r"^\s+mask_channel_prob: float = field", "Wav2Vec2Config.mask_channel_prob (default)", 0.0, note="no channel masking")
    D = r"^class Data2VecAudioConfig"
    for name in ("layer_norm_target_layer", "instance_norm_targets", "layer_norm_targets", "batch_norm_target_layer", "group_norm_target_layer"):
        fld = "targets.final_norm" if name.endswith("targets") else None
        d(D2VA, D, rf"^\s+{name}: bool = False", f"Data2VecAudioConfig.{name} (default)", False,
          field=fld, reference=(final_norm(flat) if fld else None), note="false", conversion=("layer_norm_targets / instance_norm_targets -> targets.final_norm (both false: 'none')" if fld else ""))
    d(D2VA, D, r"^\s+min_target_var: float = field", "Data2VecAudioConfig.min_target_var / min_pred_var (default)", [0.1, 0.01],
      kind="runtime", note="collapse guard: raise after 5000 updates (d2v: run.collapse, runtime)")
    row(r, m, s, FS, D2VA, "Data2VecAudioModel.forward target layer (code)", "target_layer_results = [l[2] for l in y['layer_results']]",
        field="targets.layer", reference="ffn", conversion="l[2] is the FFN output of each block before dropout/residual (wav2vec2.py TransformerSentenceEncoderLayer layer_result)",
        line=line_of(FS, D2VA, r"target_layer_results = \[l\[2\] for l in y\[\"layer_results\"\]\]"))
    row(r, m, s, FS, D2VA, "Data2VecAudioModel.final_proj (code)", "nn.Linear(self.embed, self.embed)", field="targets.head", reference="linear",
        conversion="one Linear(D, D) -> 'linear'",
        line=line_of(FS, D2VA, r"self.final_proj = nn.Linear\(self.embed, self.embed\)"))
    d(TRI, r"^class TriStageLRScheduleConfig", r"^\s+init_lr_scale: float = field", "TriStageLRScheduleConfig.init_lr_scale (default)", 0.01,
      kind="gap", note="warm-up starts at 0.01 x lr (d2v has no field for the warm-up start)")
    d(TRI, r"^class TriStageLRScheduleConfig", r"^\s+final_lr_scale: float = field", "TriStageLRScheduleConfig.final_lr_scale (default)", 0.01,
      field="optim.final_lr_ratio", reference=0.01)
    d(CONFIGS, r"^class OptimizationConfig", r"^\s+clip_norm: float = field", "OptimizationConfig.clip_norm (default)", 0.0,
      yaml_key="optimization.clip_norm", field="optim.clip_grad", reference=0.0, conversion="0 -> no clipping")
    d(CONFIGS, r"^class OptimizationConfig", r"^\s+update_freq: List\[int\] = field", "OptimizationConfig.update_freq (default)", [1],
      yaml_key="optimization.update_freq", kind="input", note="no gradient accumulation (enters the batch conversion)")
    d(AUDTASK, r"^class AudioPretrainingConfig", r"^\s+sample_rate: int = field", "AudioPretrainingConfig.sample_rate (default)", 16000,
      field="model.sample_rate", reference=16000)
    d(AUDTASK, r"^class AudioPretrainingConfig", r"^\s+enable_padding: bool = field", "AudioPretrainingConfig.enable_padding (default)", False,
      note="false: the collater crops every utterance of a batch to the batch's shortest")
    row(r, m, s, FS, "fairseq/optim/adam.py", "FairseqAdam (one parameter group) (code)", "self._optimizer = fused_adam_cls(params, ...) / Adam(params, ...)",
        field="optim.no_decay", reference=[], conversion="plain adam: every parameter decayed (biases, norms, mask_emb included)",
        line=line_of(FS, ADAM, r"^class FairseqAdam\("))


def v1_text_defaults(flat):
    r, m, s = "v1", "text", "base"
    d = lambda *a, **k: default(r, m, s, *a, flat=flat, **k)  # noqa: E731
    T = r"^class Data2VecTextConfig"
    for name in ("instance_norm_target_layer", "batch_norm_target_layer", "instance_norm_targets", "layer_norm_targets"):
        fld = "targets.final_norm" if name.endswith("targets") else None
        d(D2VT, T, rf"^\s+{name}: bool = False", f"Data2VecTextConfig.{name} (default)", False,
          field=fld, reference=(final_norm(flat) if fld else None), note="false", conversion=("layer_norm_targets / instance_norm_targets -> targets.final_norm (both false: 'none')" if fld else ""))
    d(TCONF, r"^class TransformerConfig", r"^\s+activation_dropout: float = field", "TransformerConfig.activation_dropout (default)", 0.0,
      note="0: no FFN hidden dropout (d2v's text model has none)")
    d(COS, r"^class CosineLRScheduleConfig", r"^\s+min_lr: float = field", "CosineLRScheduleConfig.min_lr (default)", 0.0,
      field="optim.final_lr_ratio", reference=0.0)
    d(COS, r"^class CosineLRScheduleConfig", r"^\s+warmup_init_lr: float = field", "CosineLRScheduleConfig.warmup_init_lr (default)", -1,
      note="-1 -> min_lr (0): warm-up starts at lr 0")
    d(MLM, r"^class MaskedLMConfig", r"^\s+mask_stdev: float = field", "MaskedLMConfig.mask_stdev (default)", 0.0, note="fixed span length")
    d(MLM, r"^class MaskedLMConfig", r"^\s+mask_whole_words: bool = field", "MaskedLMConfig.mask_whole_words (default)", False, note="false")
    row(r, m, s, FS, ADAM, "FairseqAdam (one parameter group) (code)", "self._optimizer = fused_adam_cls(params, ...) / Adam(params, ...)",
        field="optim.no_decay", reference=[], conversion="plain adam: every parameter decayed",
        line=line_of(FS, ADAM, r"^class FairseqAdam\("))
    row(r, m, s, FS, D2VT, "Data2VecTextEncoder.forward target layers (code)", 'y = encoder_out["fc_results"]',
        field="targets.layer", reference="ffn",
        conversion="fc_results: fc2 output of each layer before dropout and residual (fairseq/modules/transformer_layer.py: fc_result = x after self.fc2)",
        line=line_of(FS, D2VT, r'y = encoder_out\["fc_results"\]'))
    row(r, m, s, FS, D2VT, "Data2VecTextEncoder.forward loss positions (code)", "masked_indices = src_tokens.eq(self.mask_idx)",
        field="targets.loss_on", reference="mask_token", conversion="loss only where the student's input is <mask>",
        note="the teacher's input is target_tokens (include_target_tokens): MaskTokensDataset targets, i.e. pad except at masked positions (the defect ../shared/SPEC.md names)",
        line=line_of(FS, D2VT, r"masked_indices = src_tokens.eq\(self.mask_idx\)"))


# ----------------------------------------------------------------------------------------------------------------
# v1 vision: data2vec_vision beit/README.md commands + run_cyclical.py defaults
# ----------------------------------------------------------------------------------------------------------------

DV = "data2vec_vision"
README = "beit/README.md"
RUNC = "beit/run_cyclical.py"
IMAGENET_TRAIN = 1281167  # ImageNet-1k train images: NOT in these files (standard count); used for steps only


def readme_args(start_pat: str):
    text = show(DV, README).splitlines()
    i = next(k for k, t in enumerate(text) if re.search(start_pat, t))
    # command block: from the line after i that starts the command to the closing ```
    j = next(k for k in range(i, len(text)) if "run_cyclical.py" in text[k])
    end = next(k for k in range(j, len(text)) if text[k].strip() == "```")
    args = {}
    toks_lines = []
    for k in range(j, end):
        for tok in re.findall(r"--([A-Za-z0-9_]+)(?:[= ]+([^\s\\-][^\s\\]*|-[0-9.]+))?", text[k]):
            toks_lines.append((tok[0], tok[1], k + 1))
    for name, val, ln in toks_lines:
        args[name] = (val if val != "" else True, ln)
    return args


def run_default(name: str):
    ln = line_of(DV, RUNC, rf'"--{name}"')
    text = show(DV, RUNC).splitlines()
    # default on the same line or the following few lines
    for k in range(ln - 1, min(ln + 6, len(text))):
        mm = re.search(r"default=([^,\)]+)", text[k])
        if mm:
            return mm.group(1).strip(), k + 1
        if "store_true" in text[k]:
            return "False (store_true)", k + 1
    return None, ln


def num(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        try:
            return float(v)
        except (TypeError, ValueError):
            return v


def v1_vision(size):
    r, m = "v1", "vision"
    pat = r"Command to pretrain the ViT-B model for 800 epochs" if size == "base" else r"Command to pretrain the ViT-L model for 800 epochs"
    args = readme_args(pat)
    W = int(args["world_size"][0])
    bs = int(args["batch_size"][0])
    epochs = int(args["epochs"][0])
    steps_per_epoch = IMAGENET_TRAIN // bs // W
    total = epochs * steps_per_epoch
    lr = float(args["lr"][0])

    def R(key, value, ln, **kw):
        kw.setdefault("kind", "recipe" if kw.get("field") else "n/a")
        row(r, m, size, DV, README, key, value, line=ln, **kw)

    handled = set()
    for name, (val, ln) in args.items():
        v = num(val) if val is not True else True
        handled.add(name)
        key = f"run_cyclical.py --{name}"
        if name == "nproc_per_node":
            R("torch.distributed.launch --nproc_per_node", v, ln, kind="input", note="GPUs per launch (= --world_size)")
        elif name in ("data_path", "output_dir", "log_dir", "dist_url", "seed_model"):
            R(key, val, ln, note="paths / launcher")
        elif name == "num_mask_patches":
            R(key, v, ln, field="mask.ratio", reference=v / 196, conversion=f"{v} of 14 x 14 = 196 patches")
        elif name == "model":
            dim, depth, heads = (768, 12, 12) if "base" in val else (1024, 24, 16)
            R(key, val, ln, field="model.dim", reference=dim, conversion="modeling_cyclical.py beit_*_patch16_224")
            R(key, val, ln, field="model.depth", reference=depth, conversion="modeling_cyclical.py beit_*_patch16_224")
            R(key, val, ln, field="model.num_heads", reference=heads, conversion="modeling_cyclical.py beit_*_patch16_224")
            R(key, val, ln, field="model.patch_size", reference=16, conversion="patch16")
            R(key, val, ln, field="model.image_size", reference=224, conversion="_224 (and --input_size default 224)")
        elif name == "seed":
            R(key, v, ln, field="run.seed", reference=v, kind="runtime")
        elif name == "target_layers":
            lst = eval(val)
            R(key, val, ln, field="targets.top_k", reference=len(lst), conversion=f"{len(lst)} layers, the last {len(lst)} blocks")
        elif name == "ema_decay":
            R(key, v, ln, field="ema.decay", reference=v)
            R(key, v, ln, field="ema.end_decay", reference=v, conversion="--ema_start_at 0: cur_decay = decay from step 0 (engine_for_cyclical.py: annealing only while it < ema_start_at)")
        elif name == "ema_start_at":
            R(key, v, ln, field="ema.anneal_steps", reference=0, conversion="0: no anneal, constant decay")
        elif name == "ema_decay_init":
            R(key, v, ln, note="unused with --ema_start_at 0 (the anneal from ema_decay_init runs only while step < ema_start_at)")
        elif name == "batch_size":
            R(key, v, ln, field="run.batch_size", reference=v * W, conversion=f"{v} per GPU x {W} GPUs (--world_size)")
        elif name == "lr":
            R(key, v, ln, field="optim.lr", reference=float(v))
        elif name == "warmup_epochs":
            R(key, v, ln, field="optim.warmup_fraction", reference=v / epochs, conversion=f"{v} / --epochs {epochs}",
              note="utils.cosine_scheduler(..., warmup_epochs) with start_warmup_value default 0 (run_cyclical.py does not pass --warmup_lr): warm-up from 0")
        elif name == "epochs":
            R(key, v, ln, field="run.steps", reference=total,
              conversion=f"--epochs {v} x (len(dataset) // batch_size // world_size) = {v} x ({IMAGENET_TRAIN} // {bs} // {W} = {steps_per_epoch}) = {total} (run_cyclical.py num_training_steps_per_epoch)",
              note="1,281,167 (ImageNet-1k train) is not in the reference files; it is the standard count")
        elif name == "clip_grad":
            R(key, v, ln, field="optim.clip_grad", reference=float(v))
        elif name == "drop_path":
            R(key, v, ln, field="model.drop_path", reference=float(v))
        elif name == "layer_scale_init_value":
            R(key, v, ln, field="model.layer_scale_init", reference=float(v))
        elif name == "layer_results":
            R(key, val.strip("'"), ln, field="targets.layer", reference="block", conversion="'end': the output at the end of each block")
        elif name in ("var_w0", "var_w1", "var_margin0"):
            R(key, v, ln, note="variance regularizer weight/margin; weights 0: off")
        elif name == "max_mask_patches_per_block":
            R(key, v, ln, kind="gap", note="largest block area of the BEiT masking generator (196 = no limit below the grid size); d2v has no field")
        elif name == "min_mask_patches_per_block":
            R(key, v, ln, field="mask.min_block", reference=v)
        elif name == "l1_beta":
            R(key, v, ln, field="targets.loss_beta", reference=float(v), conversion="smooth_l1_loss(beta=l1_beta) (--l2_loss not set)")
        elif name == "weight_decay":
            R(key, v, ln, field="optim.weight_decay", reference=float(v))
        elif name == "imagenet_default_mean_and_std":
            R(key, True, ln, field="model.pixel_mean", reference=[0.485, 0.456, 0.406], kind="data-stat",
              conversion="IMAGENET_DEFAULT_MEAN / STD (timm) instead of the inception 0.5 ones", note="d2v leaves pixel_mean/std empty (from the data)")
        elif name == "loss_scale":
            R(key, v, ln, note="-1: no loss scaling")
        elif name == "mask_dropout_prob":
            R(key, v, ln, note="-1: off")
        elif name == "post_target_layer_norm":
            R(key, True, ln, field="targets.final_norm", reference="layer", conversion="true -> a LayerNorm of the averaged targets")
        elif name == "world_size":
            R(key, v, ln, kind="input", note="GPUs; enters run.batch_size and run.steps")
        elif name == "attn_drop_rate":
            R(key, v, ln, field="model.attention_dropout", reference=float(v))
        else:
            raise KeyError(f"unhandled README arg --{name}")

    # run_cyclical.py defaults the command leaves unset
    def RD(name, field=None, reference=None, conversion="", note="", kind=None):
        if name in handled:
            return
        val, ln = run_default(name)
        if name == "rel_pos_bias":
            val, ln = True, line_of(DV, RUNC, r"parser.set_defaults\(rel_pos_bias=True\)")
        elif name == "abs_pos_emb":
            val, ln = False, line_of(DV, RUNC, r"parser.set_defaults\(abs_pos_emb=False\)")
        elif isinstance(val, str):
            t = val.strip().strip('"')
            val = {"None": None, "False": False, "True": True, "False (store_true)": False}.get(t, num(t))
        row(r, m, size, DV, RUNC, f"run_cyclical.py --{name} (default)", val,
            field=field, reference=reference, conversion=conversion, note=note,
            kind=kind or ("recipe" if field else "n/a"), line=ln)

    RD("weight_decay", "optim.weight_decay", 0.05)
    RD("weight_decay_end", note="None -> weight_decay: constant weight decay")
    RD("opt", note="adamw (timm create_optimizer -> torch.optim.AdamW)")
    RD("opt_eps", "optim.eps", 1e-8)
    RD("opt_betas", "optim.betas", [0.9, 0.999], conversion="None -> torch.optim.AdamW default betas (0.9, 0.999)")
    RD("min_lr", "optim.final_lr_ratio", 1e-5 / lr, conversion=f"min_lr 1e-5 / lr {lr:g}")
    RD("warmup_lr", note="1e-6, but unused: run_cyclical.py calls utils.cosine_scheduler without start_warmup_value (default 0)")
    RD("warmup_steps", note="-1: warm-up given in epochs")
    RD("input_size", "data.image_size", 224)
    RD("color_jitter", note="0.4, but datasets.py DataAugmentationForBEiT hard-codes ColorJitter(0.4, 0.4, 0.4) in the default aug_level branch")
    RD("train_interpolation", note="bicubic resize in the random resized crop")
    RD("aug_level", note="-1 -> ColorJitter(0.4) + RandomHorizontalFlip(0.5) + RandomResizedCropAndInterpolationWithTwoPic (scale default (0.08, 1.0))")
    RD("rel_pos_bias", note="shared relative position bias on (parser.set_defaults(rel_pos_bias=True))")
    RD("abs_pos_emb", note="no absolute positions")
    RD("l2_loss", note="False: smooth L1 with --l1_beta")
    RD("no_target_layer_norm_last", "targets.norm", "layer", conversion="False -> target_layer_norm_last True: F.layer_norm of each target layer")
    RD("target_instance_norm", note="False")
    RD("target_batch_norm", note="False")
    RD("post_target_instance_norm", note="False")
    RD("ema_annealing_till_end", note="False")
    RD("loss_scale", note="-1: no loss scaling")
    RD("mask_dropout_prob", note="-1: off")
    RD("ema_decay_init", note="unused with --ema_start_at 0")
    # code facts
    row(r, m, size, DV, "beit/datasets.py", "DataAugmentationForBEiT.common_transform (code, aug_level -1)", "transforms.ColorJitter(0.4, 0.4, 0.4)", conversion="brightness, contrast, saturation 0.4 -> 0.4",
        field="data.color_jitter", reference=0.4, line=line_of(DV, "beit/datasets.py", r"transforms.ColorJitter\(0.4, 0.4, 0.4\),", after=r"^\s+else:"), kind="recipe")
    row(r, m, size, DV, "beit/datasets.py", "DataAugmentationForBEiT.common_transform (code, aug_level -1)", "transforms.RandomHorizontalFlip(p=0.5)", conversion="p 0.5 -> True",
        field="data.hflip", reference=True, line=line_of(DV, "beit/datasets.py", r"RandomHorizontalFlip\(p=0.5\),", after=r"^\s+else:"), kind="recipe")
    row(r, m, size, DV, "beit/transforms.py", "RandomResizedCropAndInterpolationWithTwoPic.__init__ scale (default)", [0.08, 1.0],
        field="data.crop_scale", reference=[0.08, 1.0], line=line_of(DV, "beit/transforms.py", r"def __init__\(self, size, second_size=None, scale=\(0.08, 1.0\)"), kind="recipe")
    row(r, m, size, DV, "beit/masking_generator.py", "MaskingGenerator.__init__ min_aspect (default)", 0.3, field="mask.aspect_min", reference=0.3,
        line=line_of(DV, "beit/masking_generator.py", r"min_aspect=0.3"), kind="recipe")
    row(r, m, size, DV, "beit/modeling_cyclical.py", "beit_*_patch16_224 norm_layer (code)", "partial(nn.LayerNorm, eps=1e-6)", conversion="eps", field="model.ln_eps",
        reference=1e-6, line=line_of(DV, "beit/modeling_cyclical.py", r"norm_layer=partial\(nn.LayerNorm, eps=1e-6\)",
                                     after=r"def beit_base_patch16_224" if size == "base" else r"def beit_large_patch16_224"), kind="recipe")
    row(r, m, size, DV, "beit/modeling_cyclical.py", "beit_*_patch16_224 mlp_ratio (code)", 4, field="model.mlp_ratio", reference=4.0,
        line=line_of(DV, "beit/modeling_cyclical.py", r"mlp_ratio=4,", after=r"def beit_base_patch16_224" if size == "base" else r"def beit_large_patch16_224"), kind="recipe")
    row(r, m, size, DV, "beit/modeling_cyclical.py", "VisionTransformerForCyclicalTraining.no_weight_decay (code)", ["pos_embed", "cls_token"],
        field="optim.no_decay", reference=["1d", "bias", "cls_token"],
        conversion="optim_factory.get_parameter_groups: no decay if len(param.shape) == 1 or name.endswith('.bias') or name in no_weight_decay() -> 1-D, biases, cls_token (pos_embed absent: relative position bias); mask_token (1, 1, D) and the relative position bias table (2-D) are decayed",
        line=line_of(DV, "beit/modeling_cyclical.py", r"def no_weight_decay"), kind="recipe")
    row(r, m, size, DV, "beit/modeling_cyclical.py", "trunc_normal_ (code)", "__call_trunc_normal_(tensor, mean=mean, std=std, a=-std, b=std)",
        field="model.init_trunc", reference=1.0, conversion="cut at +-1 std",
        line=line_of(DV, "beit/modeling_cyclical.py", r"__call_trunc_normal_\(tensor, mean=mean, std=std, a=-std, b=std\)"), kind="recipe")


NO_CONFIG = {  # (recipe, modality, size) the reference released no pretraining config for
    ("v1", "speech", "large"): "config/audio/pretraining holds base_librispeech.yaml and audioset.yaml only; the "
                               "README lists a Large checkpoint (Libri-light) without its config",
    ("v1", "text", "large"): "config/text/pretraining holds base.yaml only, and the README lists only a Base model",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fairseq", required=True, help="git dir of a facebookresearch/fairseq clone")
    parser.add_argument("--data2vec-vision", required=True, help="git dir of a facebookresearch/data2vec_vision clone")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    MIRRORS.update({"fairseq": args.fairseq, "data2vec_vision": args.data2vec_vision})
    flats = {}
    for recipe, modality, size, rel in PRIMARY:
        flats[(recipe, modality, size)] = yaml_rows(recipe, modality, size, rel)
    v1_audio_defaults(flats[("v1", "speech", "base")])
    v1_text_defaults(flats[("v1", "text", "base")])
    for (recipe, modality, size), flat in flats.items():
        if recipe == "v2":
            v2_defaults(modality, size, flat)
    v1_vision("base")
    v1_vision("large")
    order = {"v1": 0, "v2": 1}
    rows.sort(key=lambda r: (order[r["recipe"]], r["modality"], r["size"]))  # stable: file order kept inside
    data = {"commits": COMMITS, "no_config": [{"recipe": r, "modality": m, "size": s, "why": why}
                                              for (r, m, s), why in NO_CONFIG.items()], "rows": rows}
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
