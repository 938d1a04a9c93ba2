"""Speed plumbing: thread defaults on a shared machine, the slow-run warning, the step breakdown, the teacher's
no-grad path and compile settings leave the fp32 losses as they were."""
import time

import pytest

from conftest import tiny_config
from d2v.core import threads
from d2v.train import SLOW_FRACTION, pretrain, throughput_drop


# ---------------------------------------------------------------------------------------------------------- threads
def test_cpu_budget_is_capped_by_affinity_and_quota():
    assert threads.cpu_budget(affinity=8, quota=None) == 8
    assert threads.cpu_budget(affinity=8, quota=2.5) == 2  # docker --cpus 2.5: two whole threads
    assert threads.cpu_budget(affinity=2, quota=16.0) == 2  # taskset -c 0,1
    assert threads.cpu_budget(affinity=8, quota=0.5) == 1  # never zero
    assert threads.cpu_budget(affinity=8, quota=None, processes=3) == 2
    assert threads.cpu_budget(affinity=2, quota=None, processes=4) == 1


@pytest.mark.parametrize("layout,expected", [
    ({"cpu.max": "200000 100000\n"}, 2.0),  # cgroup v2 with a quota
    ({"cpu.max": "max 100000\n"}, None),  # v2 unlimited
    ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.5),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1 unlimited
    ({}, None),  # no cgroup files at all
])
def test_cgroup_quota_is_read_from_v1_and_v2(tmp_path, layout, expected):
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert threads.cgroup_cpus(tmp_path) == expected


def test_thread_defaults_leave_what_the_user_set_alone():
    env = {}
    chosen = threads.apply_env(env)
    assert env["OMP_NUM_THREADS"] == str(threads.cpu_budget()) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert chosen == env
    user = {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.apply_env(user) == {} and user == {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE"}
    # under a launcher that says how many processes share the machine, each takes its share
    env = {"LOCAL_WORLD_SIZE": "64", "KMP_BLOCKTIME": "0"}
    assert threads.apply_env(env) == {"OMP_NUM_THREADS": "1"}


def test_the_cli_sets_the_defaults_before_torch_loads():
    import subprocess
    import sys

    code = ("import os, sys\n"
            "from d2v.core.threads import apply_env\n"
            "import d2v.cli\n"
            "assert 'torch' not in sys.modules, 'd2v.cli imported torch: thread defaults would come too late'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------- slow-run warning
def test_throughput_drop_rule():
    assert throughput_drop([100, 100, 100, 100, 100]) == ""
    assert throughput_drop([100, 20, 20, 20]) != ""  # slowed for most of the run
    assert throughput_drop([100, 20, 20]) == ""  # too few windows to say
    assert throughput_drop([30, 100, 100, 10, 100, 100]) == ""  # a warm-up and one eval window: fine
    edge = [100, SLOW_FRACTION * 100, SLOW_FRACTION * 100, SLOW_FRACTION * 100]
    assert throughput_drop(edge) == ""  # exactly at the threshold: no warning
    assert "samples/s" in throughput_drop([100, 40, 40, 40, 40])
    assert throughput_drop([float("nan"), 0.0, 100, 100]) == ""  # unusable windows are ignored


class _FakeClock:
    """time, except perf_counter: a clock that runs 1 ms per call, 20x faster-ageing after `slow_after` calls
    (the run then seems to take 20x as long per step, as beside a busy process)."""

    def __init__(self, slow_after: int | None):
        self.t, self.calls, self.slow_after = 0.0, 0, slow_after

    def perf_counter(self):
        self.calls += 1
        slow = self.slow_after is not None and self.calls > self.slow_after
        self.t += 0.02 if slow else 0.001
        return self.t

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.mark.parametrize("slow_after", [None, 5])  # the loop reads the clock once per logged window
def test_summary_warns_when_the_run_slowed_down(tmp_path, monkeypatch, slow_after):
    import d2v.train

    monkeypatch.setattr(d2v.train, "time", _FakeClock(slow_after))
    s = pretrain(tiny_config(**{"run.steps": 16, "run.log_every": 2}), out=tmp_path / "run", progress=False)
    assert s.steps == 16
    assert bool(s.slow_warning) == (slow_after is not None)


# ------------------------------------------------------------------------------ same losses with the speed changes
def test_teacher_without_autograd_bookkeeping_gives_the_same_loss_and_gradients(monkeypatch):
    """The teacher runs under inference_mode; under no_grad (the old path) loss and gradients are bit-identical."""
    import torch

    from d2v.data.pipeline import build_pipeline
    from d2v.objective import build_objective

    cfg = tiny_config()
    batch = build_pipeline(cfg).micro_batch(0, 16)

    def loss_and_grads():
        torch.manual_seed(0)
        model = build_objective(cfg)
        loss, stats = model(batch)
        (loss * stats["masked"]).backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    new_loss, new_grads = loss_and_grads()
    with monkeypatch.context() as m:
        m.setattr(torch, "inference_mode", torch.no_grad)
        old_loss, old_grads = loss_and_grads()
    assert torch.equal(new_loss, old_loss)
    assert len(new_grads) == len(old_grads) and all(torch.equal(a, b) for a, b in zip(new_grads, old_grads))


def test_step_breakdown_times_every_phase_and_changes_nothing(tmp_path):
    import json

    from d2v.runtime.steptimes import PHASES, StepTimes
    from d2v import ops

    cfg = lambda: tiny_config(**{"run.steps": 5})  # noqa: E731
    plain = pretrain(cfg(), out=tmp_path / "plain", progress=False)
    times = StepTimes(warmup=2)
    original_targets = ops.targets
    try:
        timed = pretrain(cfg(), out=tmp_path / "timed", progress=False, step_times=times)
    finally:
        times.close()
    assert ops.targets is original_targets  # close() undid the timing wrappers
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("plain", "timed")]
    assert losses[0] == losses[1] and plain.final_loss == timed.final_loss
    result = times.result(batch_size=16)
    assert result["steps_timed"] == 3
    assert all(result["phases_ms"][p] > 0 for p in PHASES)
    assert abs(sum(result["phases_share"].values()) - 1.0) < 1e-6


def test_compile_auto_rule():
    from d2v.train import COMPILE_MIN_STEPS, use_compile

    assert not use_compile("auto", "cpu", 10**6)  # compiling never pays on the CPU (measured)
    assert use_compile("auto", "cuda", COMPILE_MIN_STEPS) and not use_compile("auto", "cuda", COMPILE_MIN_STEPS - 1)
    assert use_compile("on", "cpu", 1) and not use_compile("off", "cuda", 10**6)


# -------------------------------------------------------------------------------------------------- peer harness
def test_peer_harness_runs_d2v_at_birders_config(tmp_path):
    """The d2v side of `d2v bench peer` resolves to birder's config; without birder the harness says why."""
    import json
    import sys

    from typer.testing import CliRunner

    from d2v.bench.peer import CONFIG, birder_available, d2v_args, write_images
    from d2v.cli import app

    data = write_images(tmp_path / "images.npy", n=8)
    result = CliRunner().invoke(app, ["pretrain", *d2v_args(12, data), "--dry-run", "--no-estimate", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout[result.stdout.index("{"):])
    m = cfg["model"]
    assert (m["image_size"], m["in_chans"], m["patch_size"], m["dim"], m["depth"], m["num_heads"]) == (
        CONFIG["image_size"], 3, CONFIG["patch_size"], CONFIG["dim"], CONFIG["depth"], CONFIG["heads"])
    assert cfg["run"]["batch_size"] == CONFIG["batch"] and cfg["targets"]["top_k"] == CONFIG["top_k"]
    import importlib.util

    if importlib.util.find_spec("birder") is None:
        assert birder_available(sys.executable)  # a reason, not a crash


def test_peer_harness_v2_resolves_to_birders_data2vec2_config(tmp_path):
    """`d2v bench peer --recipe v2`: d2v's v2 run gets birder's data2vec2 values (clones, inverse blocks, decoder,
    CLS weight, end-of-block targets) on the same backbone and batch."""
    import json

    from typer.testing import CliRunner

    from d2v.bench.peer import CONFIG, CONFIG_V2, d2v_args, write_images
    from d2v.cli import app

    data = write_images(tmp_path / "images.npy", n=8)
    result = CliRunner().invoke(app, ["pretrain", *d2v_args(12, data, "v2"), "--dry-run", "--no-estimate", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout[result.stdout.index("{"):])
    c = CONFIG_V2
    assert cfg["recipe"] == "v2" and cfg["model"]["dim"] == CONFIG["dim"] and cfg["model"]["depth"] == CONFIG["depth"]
    assert (cfg["mask"]["kind"], cfg["mask"]["ratio"], cfg["mask"]["clones"], cfg["mask"]["block_size"]) == (
        "inverse_block", c["mask_ratio"], c["clones"], c["block_size"])
    d = cfg["decoder"]
    assert (d["dim"], d["depth"], d["kernel"], d["groups"]) == (c["decoder_dim"], c["decoder_layers"],
                                                                c["decoder_kernel"], c["decoder_groups"])
    assert cfg["targets"]["cls_loss"] == c["cls_loss"] and cfg["targets"]["layer"] == "block"
    assert cfg["run"]["batch_size"] == CONFIG["batch"] and cfg["targets"]["top_k"] == CONFIG["top_k"]
