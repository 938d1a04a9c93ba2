"""data2vec 2.0 (--recipe v2): exact-count masks, kept-token students, the conv decoder, multi-mask with one
teacher pass, the CLS loss, short runs of every modality, exact resume, export."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from d2v.cli import app
from d2v.core.config import DecoderConfig, set_by_path
from d2v.data.pipeline import build_pipeline
from d2v.masking import block_mask_1d, inverse_block_masks, kept_positions, random_mask
from d2v.models.decoder import ConvDecoder
from d2v.core.batch import Batch
from d2v.objective import build_objective
from d2v.core.presets import preset_config
from d2v.train import pretrain
from test_speech import audio_dir  # noqa: F401  (fixture)
from test_train import _interrupt_at

runner = CliRunner()

TINY = {
    "vision": {"model.dim": 32, "model.depth": 2, "model.num_heads": 2, "targets.top_k": 2, "decoder.dim": 32,
               "decoder.groups": 4, "mask.clones": 3, "run.batch_size": 8, "run.steps": 12, "run.log_every": 1},
    "text": {"model.dim": 32, "model.depth": 2, "model.num_heads": 2, "model.ffn_dim": 64, "model.max_length": 32,
             "targets.top_k": 2, "decoder.dim": 32, "decoder.proj_hidden": 48, "mask.clones": 3,
             "data.vocab_size": 400, "run.batch_size": 8, "run.steps": 12, "run.log_every": 1},
    "speech": {"model.conv_dim": [16, 16, 32, 32, 32, 32, 32], "model.dim": 32, "model.depth": 2,
               "model.num_heads": 2, "model.ffn_dim": 64, "model.pos_conv_groups": 4, "targets.top_k": 2,
               "decoder.dim": 32, "decoder.groups": 4, "mask.clones": 3, "data.crop_seconds": 0.5,
               "run.batch_size": 4, "run.steps": 12, "run.log_every": 1},
}


def v2_config(modality, **overrides):
    cfg = preset_config(modality, "tiny", recipe="v2")
    for key, value in {**TINY[modality], **overrides}.items():
        set_by_path(cfg, key, value)
    return cfg


# ------------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("grid,ratio,block", [((14, 14), 0.8, 3), ((4, 4), 0.6, 2), ((5, 7), 0.75, 3), ((2, 2), 0.5, 1)])
def test_inverse_block_masks_keep_exactly_and_in_blocks(grid, ratio, block):
    rng = np.random.default_rng(grid[0] * 100 + block)
    L = grid[0] * grid[1]
    masks = inverse_block_masks(64, grid, ratio, rng, block, 0.07)
    kept = max(1, int(L * (1 - ratio)))
    assert masks.shape == (64, L) and ((~masks).sum(axis=1) == kept).all()
    if grid == (14, 14):  # ViT-B/16 at 224 px: 39 kept, 157 masked, as the reference
        assert kept == 39
        # kept cells cluster: a kept cell's 4-neighbours are kept far more often than the 20% chance level
        keep = ~masks.reshape(64, *grid)
        same = (keep[:, 1:, :] & keep[:, :-1, :]).sum() + (keep[:, :, 1:] & keep[:, :, :-1]).sum()
        pairs = keep[:, 1:, :].sum() + keep[:, :, 1:].sum()
        assert same / pairs > 0.4
        assert len({m.tobytes() for m in masks}) == 64  # masks differ


def test_block_mask_1d_exact_counts_runs_and_no_padding():
    rng = np.random.default_rng(1)
    for length in [2, 3, 7, 50, 499]:
        mask = block_mask_1d(length, 520, 0.5, rng, 5, 0.05)
        assert mask.sum() == min(max(int(length * 0.5), 1), length - 1)
        assert not mask[length:].any()
    assert not block_mask_1d(0, 10, 0.5, rng).any()
    runs = [np.diff(np.flatnonzero(np.diff(np.concatenate([[0], block_mask_1d(1000, 1000, 0.5, rng).astype(int),
                                                            [0]])))) for _ in range(20)]
    masked_runs = np.concatenate([r[0::2] for r in runs])
    assert masked_runs.mean() > 4  # blocks of 5 (merged when they touch), not scattered frames


def test_random_mask_keeps_exactly():
    rng = np.random.default_rng(2)
    for length in [1, 2, 10, 63]:
        mask = random_mask(length, 64, 0.48, rng)
        kept = min(max(int(length * 0.52), 1), max(length - 1, 1))
        assert (~mask[:length]).sum() == kept and not mask[length:].any()
    frac = np.mean([random_mask(1000, 1000, 0.48, rng)[:10].mean() for _ in range(300)])
    assert abs(frac - 0.48) < 0.05  # uniform over positions


def test_kept_positions_ascending_with_filler():
    rng = np.random.default_rng(3)
    mask = rng.random((6, 11)) < 0.5
    valid = np.arange(11)[None, :] < rng.integers(3, 12, size=6)[:, None]
    keep, filler = kept_positions(mask, valid)
    for b in range(6):
        want = np.flatnonzero(~mask[b] & valid[b])
        n = want.size
        assert (keep[b, :n] == want).all() and (keep[b, n:] == 11).all()
        if filler is not None:
            assert (filler[b] == (np.arange(keep.shape[1]) >= n)).all()
    keep, filler = kept_positions(np.array([[True, False, False], [False, True, False]]))
    assert filler is None and keep.tolist() == [[1, 2], [0, 2]]


# ------------------------------------------------------------------------------------------------ decoder
@pytest.mark.parametrize("grid", [None, (3, 5)])
def test_decoder_shapes_and_locality(grid):
    cfg = DecoderConfig(dim=24, kernel=3, groups=4, depth=3, proj_hidden=0)
    dec = ConvDecoder(cfg, in_dim=16, out_dim=16, grid=grid)
    T = 15
    x = torch.randn(2, T, 16)
    y = dec(x)
    assert y.shape == (2, T, 16)
    # a conv decoder is local: changing position 0 leaves far positions unchanged (receptive field 3 layers x 1)
    x2 = x.clone()
    x2[:, 0] += 1.0
    far = dec(x2)[:, -1]
    assert torch.allclose(far, y[:, -1])
    mlp = ConvDecoder(DecoderConfig(dim=16, kernel=5, groups=1, depth=2, residual=False, proj_hidden=32), 16, 8)
    assert mlp(torch.randn(3, 7, 16)).shape == (3, 7, 8)
    with pytest.raises(ValueError, match="groups"):
        ConvDecoder(DecoderConfig(dim=24, groups=5), 16, 16)


# ------------------------------------------------------------------------------------------------ objective
def _vision_objective_and_batch(clones=3):
    cfg = v2_config("vision", **{"mask.clones": clones})
    pipe = build_pipeline(cfg)
    torch.manual_seed(0)
    model = build_objective(cfg).train()
    batch = pipe.on_device(pipe.micro_batch(0, 4), 0)
    return cfg, model, batch


def test_one_teacher_pass_serves_every_clone():
    for clones in (1, 4):
        _, model, batch = _vision_objective_and_batch(clones)
        calls = []
        original = model.teacher.encode

        def counting(x, **kw):
            calls.append(x.shape[0])
            return original(x, **kw)

        model.teacher.encode = counting
        loss, stats = model(batch)
        assert calls == [4], f"teacher called on {calls} samples with {clones} clones"
        assert batch.mask.shape[0] == 4 * clones and torch.isfinite(loss)
        loss.backward()


def test_text_teacher_blocks_take_the_students_embedding_output_after_its_dropout():
    """The reference (ema_encoder_only) feeds its teacher's blocks the student's local features: token + position
    embedding, LayerNorm and the student's dropout, the same dropped-out values its clones were built from. With
    ema.shared off the teacher embeds the ids itself (its own averaged embeddings, no dropout)."""
    cfg = v2_config("text", **{"model.dropout": 0.5})
    pipe = build_pipeline(cfg)
    batch = pipe.micro_batch(0, 4)
    for shared in (True, False):
        cfg.ema.shared = ["embeddings."] if shared else []
        torch.manual_seed(0)
        model = build_objective(cfg).train()
        seen = {}

        def keep(name, index=None):  # a hook that records the first call's tensor and changes nothing
            def hook(module, args, out=None):
                seen.setdefault(name, args[0] if index == 0 else out)
            return hook

        model.student.embeddings.register_forward_hook(keep("student"))
        model.teacher.embeddings.register_forward_hook(keep("teacher"))
        model.teacher.blocks[0].register_forward_pre_hook(keep("blocks", 0))
        torch.manual_seed(1)
        model(batch)
        dropped = (seen["student"] == 0).float().mean().item()
        assert 0.4 < dropped < 0.6  # the student's embedding dropout ran
        if shared:
            assert "teacher" not in seen and torch.equal(seen["blocks"], seen["student"])
        else:
            assert torch.equal(seen["blocks"], seen["teacher"]) and (seen["teacher"] == 0).float().mean() < 0.01


def test_clones_equal_the_batch_repeated():
    """M clones of B samples (one teacher pass) give the loss of the B x M repeated samples with the same masks."""
    cfg, model, batch = _vision_objective_and_batch(3)
    model.eval()  # no dropout / drop-path; the decoder noise is drawn with the same shapes below
    torch.manual_seed(1)
    a, _ = model(batch)
    repeated = Batch(inputs=batch.inputs.repeat_interleave(3, 0), mask=batch.mask, keep=batch.keep,
                     keep_padding=batch.keep_padding, clones=1)
    torch.manual_seed(1)
    b, _ = model(repeated)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_student_sees_only_kept_patches_and_decoder_gets_them_back():
    _, model, batch = _vision_objective_and_batch(2)
    model.eval()
    seen = {}
    model.decoder.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    model(batch)
    out = model.student.encode_kept(batch.inputs, batch.mask, batch.keep, batch.keep_padding, 2)
    x = seen["x"]  # (B * clones, T, D)
    for row in range(x.shape[0]):
        kept = batch.keep[row]
        assert torch.allclose(x[row, kept], out.hidden[row, 1:])
        assert x[row, batch.mask[row]].abs().max() < 0.1  # N(0, 0.01) noise in the masked slots
    # changing a patch that clone 0 masks leaves clone 0's student outputs unchanged
    grid = model.student.grid
    p = int(torch.nonzero(batch.mask[0])[0])
    images = batch.inputs.clone()
    size = model.student.cfg.patch_size
    r, c = divmod(p, grid[1])
    images[0, :, r * size:(r + 1) * size, c * size:(c + 1) * size] += 1.0
    out2 = model.student.encode_kept(images, batch.mask, batch.keep, batch.keep_padding, 2)
    assert torch.allclose(out.hidden[0], out2.hidden[0], atol=1e-6)


def test_cls_loss_is_the_weighted_mean_over_clones_of_each_clones_sample_target():
    """The CLS term: cls_loss x mean over clones of ||cls_i - mean_t target[i // M]||^2 x scale, in float64."""
    cfg, model, batch = _vision_objective_and_batch(3)
    model.eval()
    torch.manual_seed(0)
    with_cls, _ = model(batch)
    w = model.targets_cfg.cls_loss
    model.targets_cfg.cls_loss = 0.0
    torch.manual_seed(0)
    without, _ = model(batch)
    t = model.targets_cfg
    with torch.no_grad():
        t_out = model.teacher.encode(batch.inputs, output_layers=t.layer, top_k=t.top_k)
        from d2v.ops.reference import targets_reference

        target = targets_reference([x[:, 1:] for x in t_out.layers], t.norm, t.final_norm, eps=t.eps,
                                   dtype=torch.float64)
        cls = model.student.encode_kept(batch.inputs, batch.mask, batch.keep, batch.keep_padding, 3).hidden[:, 0]
    want = (cls.double() - target.mean(dim=1).repeat_interleave(3, 0)).pow(2).sum(-1).mean() * model.loss_scale
    assert w > 0 and abs((with_cls - without).item() - w * want.item()) < 1e-4 * max(1.0, w * want.item())


def test_encode_kept_with_nothing_masked_equals_encode(audio_dir):  # noqa: F811
    """Gathering kept positions loses nothing: with every position kept, the student path is the full encoder."""
    for modality, extra in (("vision", {}), ("text", {}),
                            ("speech", {"data.source": str(audio_dir), "data.crop_seconds": 2.0})):
        cfg = v2_config(modality, **extra)
        pipe = build_pipeline(cfg)
        torch.manual_seed(0)
        enc = build_objective(cfg).student.eval()
        batch = _padded_batch(pipe) if modality == "speech" else pipe.on_device(pipe.micro_batch(0, 4), 0)
        full = enc.encode(batch.inputs, padding_mask=batch.padding_mask)
        T = batch.mask.shape[1]
        none = torch.zeros(4, T, dtype=torch.bool)
        valid = None
        if full.padding_mask is not None:
            valid = (~full.padding_mask).numpy()
        keep, filler = kept_positions(none.numpy(), valid)
        kept = enc.encode_kept(batch.inputs, none, torch.from_numpy(keep),
                               None if filler is None else torch.from_numpy(filler), 1, batch.padding_mask)
        P = full.num_prefix
        for b in range(4):
            n = int((~torch.from_numpy(filler[b])).sum()) if filler is not None else T
            torch.testing.assert_close(kept.hidden[b, : P + n], full.hidden[b, : P + n], rtol=1e-4, atol=1e-5,
                                       msg=f"{modality} row {b}")
        if modality == "speech":
            assert full.padding_mask is not None, "the speech batch should hold padding"


def _padded_batch(pipe):
    """The first speech micro-batch of 4 whose clips differ in length (so it holds padding)."""
    for k in range(16):
        batch = pipe.micro_batch(4 * k, 4)
        if batch.padding_mask is not None:
            return batch
    raise AssertionError("no padded speech batch")


def test_alibi_slopes_sign_and_scale():
    from d2v.models.speech import alibi_slopes

    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    twelve = alibi_slopes(12)
    assert torch.allclose(twelve[:8], alibi_slopes(8)) and torch.allclose(twelve[8:], alibi_slopes(16)[0::2][:4])
    cfg = v2_config("speech")
    enc = build_objective(cfg).student
    positions = torch.tensor([[0, 2, 3, 9]])
    bias = enc._attention_bias(positions, None, torch.float32)  # (1, H, 4, 4)
    assert (bias[0, :, 0, 3] < bias[0, :, 0, 1]).all() and (bias.diagonal(dim1=-2, dim2=-1) == 0).all()
    assert torch.allclose(bias[0, 0, 1, 3], -7 * alibi_slopes(enc.cfg.num_heads)[0])
    with torch.no_grad():
        enc.alibi_scale[0] = -1.0  # clamped at 0: head 0 becomes position-blind, with no gradient to the scale
    enc.alibi_scale.grad = None
    enc._attention_bias(positions, None, torch.float32).sum().backward()
    assert enc.alibi_scale.grad[0] == 0 and (enc.alibi_scale.grad[1:] != 0).all()
    key_pad = torch.tensor([[False, False, False, True]])
    assert torch.isinf(enc._attention_bias(positions, key_pad, torch.float32)[0, :, :, 3]).all()


def test_speech_clones_with_padding_equal_the_batch_repeated(audio_dir):  # noqa: F811
    cfg = v2_config("speech", **{"data.source": str(audio_dir), "model.dropout": 0.0, "data.crop_seconds": 2.0,
                                 "model.attention_dropout": 0.0, "decoder.input_dropout": 0.0})
    pipe = build_pipeline(cfg)
    torch.manual_seed(0)
    model = build_objective(cfg).train()
    batch = _padded_batch(pipe)
    assert batch.padding_mask is not None and batch.keep_padding is not None
    a, _ = model(batch)
    repeated = Batch(inputs=batch.inputs.repeat_interleave(3, 0), mask=batch.mask, keep=batch.keep,
                     keep_padding=batch.keep_padding, clones=1, first=batch.first * 3,  # the same global clone rows
                     padding_mask=batch.padding_mask.repeat_interleave(3, 0))
    b, _ = model(repeated)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_v2_loss_matches_a_float64_reference_on_repeated_targets():
    """The objective's loss equals the reference loss on explicitly repeated targets (clones indexed, not copied)."""
    from d2v.ops.reference import masked_regression_loss_reference, targets_reference

    cfg, model, batch = _vision_objective_and_batch(3)
    model.eval()
    model.targets_cfg.cls_loss = 0.0
    seen = {}
    model.decoder.register_forward_hook(lambda mod, args, out: seen.setdefault("pred", out))
    torch.manual_seed(0)
    loss, _ = model(batch)
    t = model.targets_cfg
    with torch.no_grad():
        t_out = model.teacher.encode(batch.inputs, output_layers=t.layer, top_k=t.top_k)
        target = targets_reference([x[:, 1:] for x in t_out.layers], t.norm, t.final_norm, eps=t.eps,
                                   dtype=torch.float64)
    want = masked_regression_loss_reference(seen["pred"].double(), target.repeat_interleave(3, 0), batch.mask,
                                            beta=t.loss_beta, scale=model.loss_scale, dtype=torch.float64)
    assert abs(loss.item() - want.item()) < 1e-4 * max(1.0, abs(want.item()))


# ------------------------------------------------------------------------------------------------ runs
def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("modality", ["vision", "text", "speech"])
def test_short_v2_run_loss_falls_and_resume_is_exact(modality, tmp_path, monkeypatch, request):
    extra = {"data.source": str(request.getfixturevalue("audio_dir"))} if modality == "speech" else {}
    steps = 12
    full = pretrain(v2_config(modality, **extra), out=tmp_path / "full", progress=False)
    losses = _losses(tmp_path / "full")
    assert len(losses) == steps and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)
        part = pretrain(v2_config(modality, **extra), out=tmp_path / "part", progress=False)
    assert part.interrupted and part.steps == 5
    resumed = pretrain(v2_config(modality, **extra), out=tmp_path / "part", resume=True, progress=False)
    assert resumed.steps == steps
    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("decoder.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_v2_vision_export_probe_and_no_silent_hf_mapping(tmp_path):
    run, enc = tmp_path / "run", tmp_path / "enc"
    args = [a for k, v in TINY["vision"].items() if k != "run.steps" for a in ("--set", f"{k}={v}")]
    result = runner.invoke(app, ["pretrain", "--recipe", "v2", "--steps", "3", "--out", str(run), "--no-progress",
                                 *args])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["recipe"] == "v2"
    result = runner.invoke(app, ["export", "checkpoint", str(run), "--out", str(enc)])
    assert result.exit_code == 0, result.output
    assert "No Hugging Face directory" in result.output and not (enc / "hf").exists()
    import d2v

    encoder = d2v.load_encoder(enc)
    images = torch.rand(2, 1, 8, 8)
    assert encoder(images).shape[0] == 2 and encoder.embed(images).shape == (2, 32)
    result = runner.invoke(app, ["probe", str(enc), "--data", "digits"])
    assert result.exit_code == 0, result.output
    # the recipe cannot change on resume
    result = runner.invoke(app, ["pretrain", "--resume", "--out", str(run), "--recipe", "v1"])
    assert result.exit_code == 2 and "--recipe cannot change" in result.output


def test_v2_text_export_maps_onto_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = v2_config("text", **{"run.steps": 2})
    pretrain(cfg, out=tmp_path / "run", progress=False)
    from d2v.export import export_checkpoint
    from d2v.encoders.load import load_encoder

    paths = export_checkpoint(tmp_path / "run", tmp_path / "enc")
    assert "hf" in paths
    ours = load_encoder(tmp_path / "enc").eval()
    hf = transformers.Data2VecTextModel.from_pretrained(str(paths["hf"])).eval()
    ids = torch.randint(5, 400, (2, 12))
    with torch.no_grad():
        a = ours.encode(ids).hidden
        b = hf(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4)


def test_v2_config_errors_are_one_sentence():
    from d2v.core.errors import ConfigError
    from d2v.validation import validate_config

    cfg = preset_config("vision", "tiny")
    set_by_path(cfg, "mask.clones", 4)
    with pytest.raises(ConfigError, match="needs --recipe v2"):
        validate_config(cfg)
    cfg = preset_config("vision", "tiny", recipe="v2")
    set_by_path(cfg, "model.arch", "beit")
    with pytest.raises(ConfigError, match="model.arch 'v2'"):
        validate_config(cfg)
    cfg = preset_config("vision", "tiny", recipe="v2")
    set_by_path(cfg, "decoder.groups", 7)
    with pytest.raises(ConfigError, match="decoder.groups"):
        validate_config(cfg)
    cfg = preset_config("speech", "tiny", recipe="v2")
    set_by_path(cfg, "targets.cls_loss", 0.5)
    with pytest.raises(ConfigError, match="needs --recipe v2 and --modality vision"):
        validate_config(cfg)
    cfg = preset_config("text", "tiny")
    set_by_path(cfg, "mask.kind", "random")
    with pytest.raises(ConfigError, match="use it with --recipe v2"):
        validate_config(cfg)
    with pytest.raises(ConfigError, match="unknown recipe"):
        preset_config("vision", "tiny", recipe="v3")
    for modality in ("vision", "speech", "text"):
        for size in ("tiny", "small", "base", "large"):
            validate_config(preset_config(modality, size, recipe="v2"), memory=False)


def test_position_noise_is_standard_normal_and_split_invariant():
    """The decoder's fill noise: about N(0, 1) (mean, std, kurtosis, no correlation between neighbours), and
    element (row, t, d) depends on (seed, global clone index, t, d) only: a batch split at any sample or padded
    to any length gives the same values; another seed gives other values."""
    from d2v.objective import position_noise

    seed = int(torch.randint(0, 2**31, ()))
    full = position_noise(seed, 0, 4, (24, 9, 40), "cpu").double()
    flat = full.flatten()
    assert abs(flat.mean()) < 0.02 and abs(flat.std() - 1) < 0.02
    assert abs(((flat - flat.mean()) ** 4).mean() / flat.var() ** 2 - 3) < 0.15
    for a, b in ((full[:, :, 1:], full[:, :, :-1]), (full[:, 1:], full[:, :-1]), (full[1:], full[:-1])):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.03
    split = int(torch.randint(1, 6, ()))  # samples of 4 clones each
    head = position_noise(seed, 0, 4, (4 * split, 9, 40), "cpu").double()
    tail = position_noise(seed, split, 4, (24 - 4 * split, 13, 40), "cpu").double()  # padded to 13 steps
    torch.testing.assert_close(torch.cat([head, tail[:, :9]]), full, rtol=0, atol=0)
    other = position_noise(seed + 1, 0, 4, (24, 9, 40), "cpu").double()
    assert (other - full).abs().mean() > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_position_noise_chunks_are_bit_identical(dtype):
    """The CPU path makes the noise a few rows at a time: any chunk size (one row, an uneven split, more than the
    whole) gives exactly the one-pass values, in the requested dtype."""
    from d2v.objective import position_noise

    seed, first = int(torch.randint(0, 2**31, ())), int(torch.randint(0, 50, ()))
    shape = (int(torch.randint(5, 40, ())), int(torch.randint(1, 17, ())), int(torch.randint(1, 70, ())))
    whole = position_noise(seed, first, 4, shape, "cpu", dtype=dtype, chunk_elements=0)
    assert whole.dtype == dtype and whole.shape == shape
    per_row = shape[1] * shape[2]
    for chunk in (1, per_row, per_row * int(torch.randint(2, 7, ())) + 1, per_row * shape[0] * 2):
        got = position_noise(seed, first, 4, shape, "cpu", dtype=dtype, chunk_elements=chunk)
        assert got.dtype == dtype
        torch.testing.assert_close(got, whole, rtol=0, atol=0)
    torch.testing.assert_close(position_noise(seed, first, 4, shape, "cpu", dtype=dtype), whole, rtol=0, atol=0)
