"""Speech updates by a budget of audio samples (run.batch_tokens, fairseq's max_tokens x GPUs): each update holds the
utterances that fit in the budget, taken in sample order; its split over processes and micro-batches is balanced by
samples and changes nothing else; updates are a function of the seed and the listed lengths, so a resumed run reads
what an uninterrupted one reads, and the recipes' per-update totals are the reference's."""
import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from d2v.cli import app
from d2v.core.config import set_by_path
from d2v.core.errors import ConfigError
from d2v.core.presets import preset_config
from d2v.data.budget import BudgetedUpdates
from d2v.data.pipeline import build_pipeline
from d2v.data.sampling import SampleOrder
from d2v.models.speech import conv_output_lengths
from d2v.objective import Data2Vec
from d2v.runtime.distributed import batch_plan
from d2v.train import pretrain, validate

# The embedded speech set holds utterances of 2.5 to 5.2 s: 4 s crops leave them of different lengths.
SMALL = {"model.conv_dim": [16, 16, 32, 32, 32, 32, 32], "model.dim": 32, "model.depth": 2, "model.num_heads": 2,
         "model.ffn_dim": 64, "model.pos_conv_groups": 4, "targets.top_k": 2, "data.crop_seconds": 4.0,
         "run.batch_size": 0, "run.batch_tokens": 200_000, "run.steps": 6, "run.log_every": 1}


def speech_config(recipe: str = "v1", **overrides):
    cfg = preset_config("speech", "tiny", recipe)
    for key, value in {**SMALL, **overrides}.items():
        set_by_path(cfg, key, value)
    return cfg


def random_budget(n=50, budget=1000, seed=0):
    costs = np.random.default_rng(seed).integers(20, 200, n)
    return BudgetedUpdates(costs, SampleOrder(n, seed), budget)


def test_updates_take_utterances_in_sample_order_until_the_budget_is_full():
    b = random_budget()
    end = 0
    for u in range(60):  # several epochs of 50 utterances
        start, stop = b.span(u)
        assert start == end and stop > start  # consecutive runs of positions, none empty
        end = stop
        files = b.order.indices(start, stop - start).numpy()
        assert sorted(b.files(u)) == sorted(files)  # the update's utterances are those of its positions
        total = b.costs[files].sum()
        nxt = b.costs[b.order.indices(stop, 1).numpy()[0]]
        assert total <= b.budget < total + nxt  # full: the next utterance would not fit
        assert np.all(np.diff(b.costs[b.files(u)]) >= 0)  # placed shortest first


def test_a_fresh_reader_finds_any_update_as_the_run_did():
    """A resumed run (or a DataLoader worker) starts at update u without having read the ones before."""
    seq, fresh = random_budget(), random_budget()
    spans = [seq.span(u) for u in range(40)]
    assert fresh.span(37) == spans[37]
    first, stop = spans[23]
    assert np.array_equal(random_budget().indices(first - 3, 9), seq.indices(first - 3, 9))
    assert random_budget(seed=1).span(37) != spans[37]  # another seed, another order


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_parts_cover_an_update_with_about_equal_samples(parts):
    b = random_budget(budget=2000)
    for u in range(20):
        start, stop = b.span(u)
        cuts = b.parts(u, parts)
        assert len(cuts) == parts and all(count > 0 for _, count in cuts)
        assert [p for first, count in cuts for p in range(first, first + count)] == list(range(start, stop))
        share = b.costs[b.files(u)].sum() / parts
        for first, count in cuts:
            cost = b.costs[b.indices(first, count)].sum()
            assert abs(cost - share) <= b.costs.max()  # within one utterance of an equal share


def test_micro_batches_of_any_split_hold_the_same_crops_and_masks():
    pipe = build_pipeline(speech_config("v2"))
    assert pipe.budget is not None and len(set(np.minimum(pipe.dataset.lengths, pipe.max_samples))) > 1
    for update in range(3):
        whole = pipe.micro_batch(*pipe.budget.parts(update, 1)[0])
        halves = [pipe.micro_batch(first, count) for first, count in pipe.budget.parts(update, 2)]
        rows = [(b, i) for b in halves for i in range(b.inputs.shape[0])]
        assert len(rows) == whole.inputs.shape[0]
        c = whole.clones
        for i, (half, j) in enumerate(rows):
            n = int((~whole.padding_mask[i]).sum()) if whole.padding_mask is not None else whole.inputs.shape[1]
            assert torch.equal(whole.inputs[i, :n], half.inputs[j, :n])  # the same crop, padded differently
            frames = int(conv_output_lengths(n, pipe.cfg.model.conv_kernel, pipe.cfg.model.conv_stride))
            assert torch.equal(whole.mask[i * c:(i + 1) * c, :frames], half.mask[j * c:(j + 1) * c, :frames])
            assert not whole.mask[i * c:(i + 1) * c, frames:].any()  # padding is never masked


def test_the_recipes_per_update_totals_in_a_dry_run():
    """base: 1M samples x 8 GPUs; large: 320k x 48 (data2vec 2.0); data2vec 1.0 base: 3.8M x 16."""
    for recipe, preset, total in (("v2", "base", 8_000_000), ("v2", "large", 15_360_000), ("v1", "base", 60_800_000)):
        cfg = preset_config("speech", preset, recipe)
        assert (cfg.run.batch_tokens, cfg.run.batch_size) == (total, 0)
        result = CliRunner().invoke(app, ["pretrain", "--modality", "speech", "--preset", preset, "--recipe", recipe,
                                          "--dry-run", "--no-estimate", "--grad-accum", "4"])
        assert result.exit_code == 0, result.output
        assert f"global batch {total} audio samples per update" in result.output
        assert "1 process x 4 accumulated micro-batches" in result.output
    assert preset_config("speech", "tiny").run.batch_tokens == 0  # the CPU presets count utterances


def test_batch_tokens_errors_are_one_sentence():
    with pytest.raises(ConfigError, match="both set"):
        validate(speech_config(**{"run.batch_size": 4}))
    cfg = preset_config("vision", "tiny")
    cfg.run.batch_tokens = 1000
    with pytest.raises(ConfigError, match="batches speech by audio samples"):
        validate(cfg)
    with pytest.raises(ConfigError, match="batch_size"):
        validate(speech_config(**{"run.batch_tokens": 0}))
    pipe = build_pipeline(speech_config(**{"run.batch_tokens": 130_000}))  # two 4 s crops at the least
    assert batch_plan(0, 2, 1, budget=pipe.budget).micro_batch(0, 1)[1] >= 1
    with pytest.raises(ConfigError, match="fewer than processes x --grad-accum = 1 x 3"):
        batch_plan(0, 3, 1, budget=pipe.budget)
    result = CliRunner().invoke(app, ["pretrain", "--modality", "speech", "--preset", "base", "--batch-size", "8",
                                      "--dry-run"])
    assert result.exit_code == 2 and "run.batch_tokens=0" in result.output and "Traceback" not in result.output


def test_resume_is_exact_with_a_budget(tmp_path, monkeypatch):
    full = pretrain(speech_config(), out=tmp_path / "full", progress=False)
    original = Data2Vec.ema_step

    def ema_step(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
        return original(self, step)

    with monkeypatch.context() as m:
        m.setattr(Data2Vec, "ema_step", ema_step)
        part = pretrain(speech_config(), out=tmp_path / "part", progress=False)
    assert part.interrupted and part.steps == 3
    resumed = pretrain(speech_config(), out=tmp_path / "part", resume=True, progress=False)
    a, b = load_file(str(full.checkpoint / "model.safetensors")), load_file(str(resumed.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["samples_per_s"] > 0 for r in records)
