"""Speed to quality of the two recipes: `d2v pretrain --recipe v1` and `--recipe v2` run as a user runs them
(alternating when repeated), each saving checkpoints along the way; every checkpoint is exported and
linear-probed, and its wall time is the checkpoint's completion time since the process was launched (start-up,
data loading and checkpoint writing included, as a user waits for them).

Summary figures: the v1 run's final probe accuracy A and wall time W; the wall time at which v2 first reaches A
(and W divided by it); v2's best accuracy within W."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from d2v.core.presets import preset_config
from d2v.export import export_checkpoint
from d2v.probe import probe_path
from d2v.runtime.checkpoint import list_checkpoints

from .harness import run_pretrain, samples_per_s


def _pretrain(recipe: str, modality: str, args: list[str], out: Path, checkpoints: int, steps: int | None,
              threads: int | None) -> tuple[float, float]:
    """Run one pretraining; (launch time, wall seconds)."""
    cmd = ["--modality", modality, "--recipe", recipe, *args]
    if steps:
        cmd += ["--steps", str(steps)]
    total = steps or preset_config(modality, None, recipe).run.steps
    cmd += ["--checkpoint-every", str(max(1, total // checkpoints)), "--set", "run.keep_checkpoints=0"]
    t0 = time.time()
    wall = run_pretrain(cmd, out, threads=threads, what=f"the {recipe} run")
    return t0, wall


def _probe_checkpoints(run: Path, t0: float, probe_data: str, max_train: int, holdout: list[str] | None,
                       work: Path, blocks: int = 0) -> list[dict]:
    rows = []
    for ck in list_checkpoints(run):
        done = (ck / "manifest.json").stat().st_mtime - t0
        enc = work / f"enc-{run.name}-{ck.name}"
        export_checkpoint(ck, enc, hf=False)
        result = probe_path(enc, probe_data, max_train=max_train, holdout=holdout, blocks=blocks)
        rows.append({"step": int(ck.name.split("_")[-1]), "wall_s": round(done, 1), "accuracy": result.accuracy})
    return rows


def _samples_per_s(run: Path) -> float:
    return samples_per_s(run, 2)[0]


def summarize(v1: dict, v2: dict) -> dict:
    """The comparison figures from one v1 and one v2 record (rows of step, wall_s, accuracy)."""
    final = v1["rows"][-1]
    target, w1 = final["accuracy"], final["wall_s"]
    reach = next((r for r in v2["rows"] if r["accuracy"] >= target), None)
    within = [r["accuracy"] for r in v2["rows"] if r["wall_s"] <= w1]
    return {
        "v1_accuracy": target, "v1_wall_s": w1,
        "v2_wall_s_to_v1_accuracy": reach["wall_s"] if reach else None,
        "time_ratio": (w1 / reach["wall_s"]) if reach else None,
        "v2_best_accuracy_within_v1_wall": max(within) if within else None,
        "v2_final_accuracy": v2["rows"][-1]["accuracy"], "v2_wall_s": v2["rows"][-1]["wall_s"],
        "v1_random_init": v1.get("random_init"), "v2_random_init": v2.get("random_init"),
    }


def aggregate(summaries: list[dict]) -> dict:
    """Means over pairs (seeds): accuracies, wall times and time ratios; v2 pairs that never reach v1's accuracy are
    counted, and the mean ratio is over the pairs that do."""
    import statistics

    def mean(key):
        vals = [s[key] for s in summaries if s[key] is not None]
        return statistics.fmean(vals) if vals else None

    return {"pairs": len(summaries), "v2_reached": sum(s["time_ratio"] is not None for s in summaries),
            **{key: mean(key) for key in ("v1_accuracy", "v1_wall_s", "v2_wall_s_to_v1_accuracy", "time_ratio",
                                          "v2_best_accuracy_within_v1_wall", "v2_final_accuracy")}}


def run(modality: str, probe_data: str, data: str | None = None, checkpoints: int = 5,
        v1_steps: int | None = None, v2_steps: int | None = None, max_train: int = 0,
        holdout: list[str] | None = None, repeats: int = 1, threads: int | None = None, extra: list[str] = (),
        on_row=None, seeds: list[int] | None = None, probe_blocks: int = 0) -> dict:
    """Alternate v1 and v2 runs `repeats` times (with seeds: once per seed, both recipes with run.seed set to it);
    probe their checkpoints (probe_blocks: d2v probe's --blocks, 0 its default); a dict of records, summaries (one
    per pair) and, over several pairs, their means."""
    args = [*(["--data", data] if data else []), *extra]
    records = []
    plan = [(rep, None) for rep in range(repeats)] if not seeds else list(enumerate(seeds))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for rep, seed in plan:
            for recipe, steps in (("v1", v1_steps), ("v2", v2_steps)):
                out = work / f"{recipe}-{rep}"
                seeded = args if seed is None else [*args, "--set", f"run.seed={seed}"]
                t0, wall = _pretrain(recipe, modality, seeded, out, checkpoints, steps, threads)
                rows = _probe_checkpoints(out, t0, probe_data, max_train, holdout, work, probe_blocks)
                record = {"recipe": recipe, "repeat": rep, "wall_s": round(wall, 1), "rows": rows,
                          "samples_per_s": _samples_per_s(out)}
                if seed is not None:
                    record["seed"] = seed
                if rep == 0:  # the untrained architecture of this recipe, probed the same way
                    record["random_init"] = probe_path(work / f"enc-{out.name}-{_last(out)}", probe_data,
                                                       random_init=True, max_train=max_train,
                                                       holdout=holdout, blocks=probe_blocks).accuracy
                records.append(record)
                if on_row:
                    on_row(record)
    summaries = [summarize(records[2 * r], records[2 * r + 1]) for r in range(len(plan))]
    result = {"modality": modality, "probe_data": probe_data, "probe_blocks": probe_blocks, "data": data,
              "records": records, "summaries": summaries}
    if len(summaries) > 1:
        result["mean"] = aggregate(summaries)
    return result


def _last(run: Path) -> str:
    return list_checkpoints(run)[-1].name
