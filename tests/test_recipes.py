"""docs/RECIPES.md is the fidelity table of the base / large presets. Its reference column is data of its own,
docs/reference/data2vec.json (extracted from the reference repositories by docs/reference/build.py): every row names
a data row (file:line, key, d2v field) and shows its value, every data row with a d2v field has its row, and the
presets must equal the reference except on rows whose note starts with "deliberate"."""
import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v.core.config import PretrainConfig
from d2v.core.presets import preset_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "RECIPES.md"
DATA = json.loads((ROOT / "docs" / "reference" / "data2vec.json").read_text())
COLUMNS = ["field", "d2v", "reference", "file:line", "key", "note"]
SECTION = re.compile(r"## (v1|v2) (vision|speech|text) (base|large)$")
NO_FIELD = "## Reference keys d2v has no field for"
ALIASES = [("fairseq/examples/data2vec/", ""), ("fairseq/fairseq/", "fairseq/"), ("data2vec_vision/beit/", "beit/")]
NO_CONFIG = {(n["recipe"], n["modality"], n["size"]) for n in DATA["no_config"]}


def short(path: str) -> str:
    """A reference file as the table names it (its abbreviations are listed in the document's preamble)."""
    for long, abbreviation in ALIASES:
        if path.startswith(long):
            return abbreviation + path[len(long):]
    raise AssertionError(f"no abbreviation for {path}")


def _value(text: str):
    text = text.strip()
    if text == "-":
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if m:
        return int(m.group(1)) / int(m.group(2))
    return ast.literal_eval(text)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _tables():
    """(fidelity rows: (recipe, modality, size, row dict)), (keys without a field: key -> where cell)."""
    rows, no_field, section = [], {}, None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            m = SECTION.fullmatch(line)
            section = m.groups() if m else ("no field" if line == NO_FIELD else None)
            continue
        if section is None or not line.startswith("| ") or line.startswith(("| field", "| key")):
            continue
        cells = _cells(line)
        if section == "no field":
            assert len(cells) == 3, f"malformed row in {DOC.name}: {line}"
            no_field[cells[0].strip("`")] = cells[1]
        else:
            assert len(cells) == len(COLUMNS), f"malformed row in {DOC.name}: {line}"
            rows.append((*section, dict(zip(COLUMNS, cells))))
    return rows, no_field


def _get(cfg: PretrainConfig, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _identity(recipe, modality, size, row) -> tuple:
    return recipe, modality, size, row["file:line"], row["key"].strip("`"), row["field"]


ROWS, NO_FIELD_KEYS = _tables()
REFERENCE = {(r["recipe"], r["modality"], r["size"], f"{short(r['file'])}:{r['line']}", r["key"], r["field"]): r
             for r in DATA["rows"] if r["field"]}


def test_every_reference_key_with_a_field_has_its_row_and_no_other_rows():
    table = [_identity(*row) for row in ROWS if row[:3] not in NO_CONFIG]
    assert len(table) == len(set(table)), "a reference row appears twice"
    assert set(table) == set(REFERENCE), (f"rows missing from {DOC.name}: {sorted(set(REFERENCE) - set(table))[:5]}; "
                                          f"rows naming no data row: {sorted(set(table) - set(REFERENCE))[:5]}")
    sections = {row[:3] for row in ROWS}
    assert sections == {(r, m, s) for r in ("v1", "v2") for m in ("vision", "speech", "text") for s in ("base", "large")}


@pytest.mark.parametrize("recipe,modality,size,row", ROWS,
                         ids=[f"{r}-{m}-{s}-{row['field']}-{row['key'].strip('`')}" for r, m, s, row in ROWS])
def test_presets_match_the_reference_or_say_why(recipe, modality, size, row):
    actual = _get(preset_config(modality, size, recipe), row["field"])
    d2v, ref = _value(row["d2v"]), _value(row["reference"])
    assert _same(actual, d2v), f"{recipe} {modality} {size} {row['field']}: preset {actual!r}, table's d2v {d2v!r}"
    if (recipe, modality, size) in NO_CONFIG:  # no released config: the row names the base key, with no value
        assert ref is None and (recipe, modality, "base", *_identity(recipe, modality, size, row)[3:]) in REFERENCE
        return
    data = REFERENCE[_identity(recipe, modality, size, row)]
    assert _same(ref, data["reference"]), f"{row['field']}: the table shows {ref!r}, the data holds {data['reference']!r}"
    if row["note"].lower().startswith("deliberate"):
        assert not _same(actual, ref), f"{row['field']} is marked deliberate but equals the reference"
    else:
        assert _same(actual, ref), (f"{recipe} {modality} {size} {row['field']}: preset {actual!r}, reference {ref!r} "
                                    f"({data['file']}:{data['line']} {data['key']}); fix the preset or say why")


def test_keys_without_a_field_are_listed_with_why():
    for r in DATA["rows"]:
        if r["field"] is None:
            assert r["key"] in NO_FIELD_KEYS, f"{r['key']} ({r['file']}) is not listed as a key without a field"
            assert f"{short(r['file'])}:{r['line']} " in NO_FIELD_KEYS[r["key"]] + " ", r
            assert r["note"] or r["kind"] != "n/a", f"{r['key']}: no reason given in the data"


def test_reference_values_come_from_the_files():
    """A row without a conversion holds the value as written in its file; every row names where it comes from."""
    assert set(DATA["commits"]) == {"fairseq", "data2vec_vision"}
    for r in DATA["rows"]:
        assert r["file"] and r["key"] and isinstance(r["line"], int) and r["line"] > 0, r
        if r["field"] and not r["conversion"]:
            assert _same(r["reference"], r["value"]), r
    large = {(r["modality"], r["key"]): r["value"] for r in DATA["rows"] if (r["recipe"], r["size"]) == ("v2", "large")}
    assert large[("speech", "model.layerdrop")] == 0 and large[("speech", "optimization.max_update")] == 600000
    assert large[("vision", "dataset.batch_size")] == 8 and large[("text", "optimizer.groups.default.lr_scheduler.warmup_updates")] == 4000


@pytest.mark.skipif(not (os.environ.get("D2V_REFERENCE_FAIRSEQ") and os.environ.get("D2V_REFERENCE_VISION")),
                    reason="set D2V_REFERENCE_FAIRSEQ and D2V_REFERENCE_VISION to git dirs of the reference "
                           "repositories to check the data file against a fresh extraction (needs PyYAML)")
def test_the_data_file_is_what_the_script_extracts(tmp_path):
    out = tmp_path / "data2vec.json"
    subprocess.run([sys.executable, str(ROOT / "docs" / "reference" / "build.py"), "--fairseq",
                    os.environ["D2V_REFERENCE_FAIRSEQ"], "--data2vec-vision", os.environ["D2V_REFERENCE_VISION"],
                    "--out", str(out)], check=True, capture_output=True)
    assert json.loads(out.read_text()) == DATA


def test_weight_decay_groups_follow_the_recipe():
    from d2v.models import build_encoder
    from d2v.objective import Data2Vec
    from d2v.runtime.params import no_decay_rule, param_groups

    def groups(modality, size, recipe="v1", **model):
        cfg = preset_config(modality, size, recipe)
        for k, v in {"dim": 32, "depth": 2, "num_heads": 2, **model}.items():
            setattr(cfg.model, k, v)
        cfg.targets.top_k = 1
        model = Data2Vec(build_encoder(cfg.model), cfg.targets, cfg.ema)
        names = {id(p): n for n, p in model.named_parameters()}
        decay, no_decay = param_groups(model.named_parameters(), cfg.optim.weight_decay,
                                       no_decay_rule(cfg.optim.no_decay))
        return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}

    decay, exempt = groups("vision", "base", image_size=32, patch_size=16)
    assert {"student.mask_token", "student.rel_pos_bias.table"} <= decay
    assert "student.cls_token" in exempt and "student.blocks.0.gamma_1" in exempt and "student.norm.bias" in exempt
    decay, exempt = groups("vision", "tiny", image_size=32, patch_size=16, in_chans=3)
    assert {"student.mask_token", "student.rel_pos_bias.table", "student.cls_token"} <= exempt
    decay, exempt = groups("text", "base", vocab_size=300, ffn_dim=64, max_length=16)
    assert not exempt and "student.blocks.0.norm1.bias" in decay  # fairseq Adam: decay on every parameter
    # data2vec 2.0's rule: 1-D parameters, biases and the ALiBi scale exempt; the image CLS token decayed
    decay, exempt = groups("vision", "base", "v2", image_size=32, patch_size=16, prenet_depth=0)
    assert "student.cls_token" in decay and "student.blocks.0.norm1.weight" in exempt
    decay, exempt = groups("speech", "large", "v2", ffn_dim=64, prenet_depth=0, pos_conv_groups=2)
    assert "student.alibi_scale" in exempt and "student.blocks.0.attn.qkv.bias" in exempt


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
    from d2v.core.batch import Batch
    from d2v.objective import Data2Vec

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
    from d2v.core.batch import Batch
    from d2v.objective import Data2Vec

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
