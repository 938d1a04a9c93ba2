"""docs/RECIPES.md is the fidelity table: its d2v columns are what the base/large presets resolve to, and its
reference columns equal them except on rows marked deliberate. Parsing the doc keeps the two from drifting."""
import ast
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v.config import PretrainConfig
from d2v.presets import preset_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "RECIPES.md"
COLUMNS = ["field", "base: d2v", "base: reference", "large: d2v", "large: reference", "source", "note"]


def _value(text: str):
    text = text.strip()
    if text == "-":
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if m:
        return int(m.group(1)) / int(m.group(2))
    return ast.literal_eval(text)


def _rows():
    """(modality, recipe, row) of every table row; sections "## vision" (v1) and "## v2 vision" (v2)."""
    modality, recipe, rows = None, "v1", []
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            words = line[3:].split()
            recipe, modality = (words[0], words[1]) if words[0] == "v2" else ("v1", " ".join(words))
            continue
        if modality not in ("vision", "speech", "text"):  # other sections' tables are not fidelity rows
            continue
        if not line.startswith("| ") or line.startswith("| field") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(COLUMNS), f"malformed row in {DOC.name}: {line}"
        rows.append((modality, recipe, dict(zip(COLUMNS, cells))))
    return rows


def _get(cfg: PretrainConfig, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


ROWS = _rows()


def test_table_covers_every_modality():
    assert {(m, r) for m, r, _ in ROWS} == {(m, r) for m in ("vision", "speech", "text") for r in ("v1", "v2")}
    assert len(ROWS) > 200


@pytest.mark.parametrize("modality,recipe,row", ROWS, ids=[f"{r}-{m}-{row['field']}" for m, r, row in ROWS])
def test_presets_match_the_table(modality, recipe, row):
    deliberate = row["note"].lower().startswith("deliberate")
    for size in ("base", "large"):
        actual = _get(preset_config(modality, size, recipe), row["field"])
        d2v, ref = _value(row[f"{size}: d2v"]), _value(row[f"{size}: reference"])
        assert _same(actual, d2v), f"{modality} {size} {row['field']}: preset {actual!r}, table's d2v {d2v!r}"
        if ref is not None and not deliberate:
            assert _same(actual, ref), f"{modality} {size} {row['field']}: preset {actual!r}, reference {ref!r}"
        if deliberate:
            assert not _same(d2v, ref), f"{row['field']} is marked deliberate but equals the reference"


def test_weight_decay_groups_follow_the_recipe():
    from d2v.models import build_encoder
    from d2v.objective import Data2Vec
    from d2v.train import param_groups

    def groups(modality, size, **model):
        cfg = preset_config(modality, size)
        for k, v in {"dim": 32, "depth": 2, "num_heads": 2, **model}.items():
            setattr(cfg.model, k, v)
        cfg.targets.top_k = 1
        model = Data2Vec(build_encoder(cfg.model), cfg.targets, cfg.ema)
        names = {id(p): n for n, p in model.named_parameters()}
        decay, no_decay = param_groups(model, cfg.optim.weight_decay, cfg.optim.no_decay)
        return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}

    decay, exempt = groups("vision", "base", image_size=32, patch_size=16)
    assert {"student.mask_token", "student.rel_pos_bias.table"} <= decay
    assert "student.cls_token" in exempt and "student.blocks.0.gamma_1" in exempt and "student.norm.bias" in exempt
    decay, exempt = groups("vision", "tiny", image_size=32, patch_size=16, in_chans=3)
    assert {"student.mask_token", "student.rel_pos_bias.table", "student.cls_token"} <= exempt
    decay, exempt = groups("text", "base", vocab_size=300, ffn_dim=64, max_length=16)
    assert not exempt and "student.blocks.0.norm1.bias" in decay  # fairseq Adam: decay on every parameter


def test_vision_init_layer_scale_and_ffn_target():
    from d2v.models.vision import VisionEncoder

    cfg = preset_config("vision", "base").model
    cfg.image_size, cfg.patch_size, cfg.dim, cfg.depth, cfg.num_heads = 32, 16, 64, 2, 2
    torch.manual_seed(0)
    enc = VisionEncoder(cfg).eval()
    assert torch.all(enc.blocks[0].gamma_1 == 1e-4) and enc.blocks[0].attn.dropout == 0.05
    w = enc.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= 0.02 + 1e-7 and w.std() > 0.01  # truncated at +-1 std, not effectively untruncated
    x = torch.rand(2, 3, 32, 32)
    out = enc.encode(x, output_layers="ffn", top_k=2)
    h = (x - enc.pixel_mean) / enc.pixel_std
    h = torch.cat([enc.cls_token.expand(2, -1, -1), enc.patch_embed(h).flatten(2).transpose(1, 2)], 1)
    block = enc.blocks[0]
    h = h + block.gamma_1 * block.attn(block.norm1(h), enc.rel_pos_bias())
    torch.testing.assert_close(out.layers[0], block.gamma_2 * block.mlp(block.norm2(h)))  # the branch as added


def test_vision_cpu_presets_keep_the_uncut_init():
    from d2v.models.vision import VisionEncoder

    cfg = preset_config("vision", "tiny").model
    cfg.image_size, cfg.patch_size, cfg.in_chans = 32, 4, 3
    torch.manual_seed(0)
    w = VisionEncoder(cfg).blocks[0].mlp.fc1.weight
    assert cfg.init_trunc == 0 and w.abs().max() > 0.04 and 0.018 < w.std() < 0.022  # normal std 0.02, uncut


def test_regression_head_gets_the_model_init():
    from d2v.models import build_encoder
    from d2v.objective import Data2Vec

    cfg = preset_config("vision", "base")
    cfg.model.image_size, cfg.model.patch_size, cfg.model.dim, cfg.model.depth, cfg.model.num_heads = 32, 16, 64, 2, 2
    cfg.targets.top_k = 1
    head = Data2Vec(build_encoder(cfg.model), cfg.targets, cfg.ema).head
    assert head.weight.abs().max() <= 0.02 + 1e-7 and torch.all(head.bias == 0)


def test_text_loss_only_where_the_input_shows_mask():
    from d2v.masking import bert_corrupt, token_masks
    from d2v.models import build_encoder
    from d2v.objective import Batch, Data2Vec

    cfg = preset_config("text", "tiny")
    cfg.model.vocab_size, cfg.model.depth, cfg.targets.top_k = 300, 2, 1
    model = Data2Vec(build_encoder(cfg.model), cfg.targets, cfg.ema)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 300, size=(8, 32))
    mask = token_masks(np.ones_like(ids, dtype=bool), 0.3, rng)
    student = bert_corrupt(ids, mask, rng, cfg.model.mask_id, (5, 300), 0.2, 0.2)
    batch = Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(student))
    shows_mask = (mask & (student == cfg.model.mask_id)).sum()
    assert 0 < shows_mask < mask.sum()
    assert model(batch)[1]["masked"].item() == shows_mask
    model.targets_cfg.loss_on = "masked"
    assert model(batch)[1]["masked"].item() == mask.sum()


def test_speech_teacher_reuses_the_student_front_end_with_the_same_values():
    from d2v.models import build_encoder
    from d2v.objective import Batch, Data2Vec

    cfg = preset_config("speech", "tiny")
    cfg.model.dropout = cfg.model.attention_dropout = cfg.model.layerdrop = 0.0
    torch.manual_seed(0)
    model = Data2Vec(build_encoder(cfg.model), cfg.targets, cfg.ema).train()
    assert model.reuse_features
    wave = torch.randn(2, 8000)
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[:, 3:13] = True
    calls = []
    hook = model.teacher.feature_extractor.register_forward_hook(lambda *a: calls.append(1))
    reused = model(Batch(wave, mask))[0]
    assert not calls  # the teacher ran no conv pass of its own
    model.reuse_features = False
    recomputed = model(Batch(wave, mask))[0]
    hook.remove()
    assert calls and torch.equal(reused, recomputed)
