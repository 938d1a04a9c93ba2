"""Curves of a run from its metrics.jsonl (the source of truth): loss, learning rate, EMA tau, target and
prediction std, and any accuracy the run logged. matplotlib is optional (`pip install 'd2v[plot]'`)."""
from __future__ import annotations

import math
from pathlib import Path

from d2v.core.errors import DataError, UserError
from d2v.runtime.metrics import read_metrics as read_log

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("tau", "EMA tau"), (("target_std", "pred_std"), "std"))


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl in step order; unreadable lines (a crash mid-write) are skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise DataError(f"{run_dir} has no metrics.jsonl (is it a d2v run directory?)")
    records = read_log(path)
    if not records:
        raise DataError(f"{path} holds no metrics yet")
    return sorted(records, key=lambda r: r["step"])


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[key])) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def accuracy_keys(records: list[dict]) -> list[str]:
    return sorted({k for r in records for k in r if "acc" in k or (k.startswith("knn_") and k != "knn_seconds")})


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write a PNG of the run's curves (default RUN_DIR/metrics.png); returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("d2v plot needs matplotlib: pip install 'd2v[plot]'") from None
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    panels = list(PANELS) + ([(tuple(accuracy_keys(records)), "accuracy")] if accuracy_keys(records) else [])
    # only what the run logged: a fine-tuning run has no EMA tau or target std
    panels = [(keys, title) for keys, title in panels
              if any(_series(records, k)[0] for k in ((keys,) if isinstance(keys, str) else keys))]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.1 * len(panels)), sharex=True, squeeze=False)
    for ax, (keys, title) in zip(axes[:, 0], panels):
        for key in (keys,) if isinstance(keys, str) else keys:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, label=key, linewidth=1.2)
        ax.set_ylabel(title)
        if keys == "loss" and _series(records, "loss")[1] and min(_series(records, "loss")[1]) > 0:
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)  # tau near 1 reads as 0.9998, not 1e-5 + 9.98e-1
        if not isinstance(keys, str):
            ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{run_dir.name}: {records[-1]['step']} steps", fontsize=10)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "metrics.png"
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a .png file path")
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return out
