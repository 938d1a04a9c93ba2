"""Progress of a run on the console: a one-line rich bar on a terminal, plain lines (about every 5% of the run)
when the output is a file or a pipe."""
from __future__ import annotations

import contextlib
import time


def stats_text(loss: float, lr: float, tau: float | None = None, rate: float | None = None) -> str:
    text = f"loss {loss:.4f} lr {lr:.1e}"
    return text + (f" tau {tau:.4f}" if tau is not None else "") + (f" {rate:.0f}/s" if rate is not None else "")


def duration(seconds: float) -> str:
    """'42 s', '7 min 5 s', '2 h 3 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class Bar:
    """What a loop reports to: update(step, loss=..., lr=...) and note(text)."""

    def __init__(self, console, progress, task, total: int, start: int, label: str = ""):
        self.console, self.progress, self.task, self.total, self.label = console, progress, task, total, label
        self.plain_every = max(1, total // 20)
        self.start = self.last_plain = start
        self.t0 = time.perf_counter()

    def plain_line(self, step: int, stats: str) -> str:
        """The line printed when the output is not a terminal: step, stats, elapsed time and the time left (from
        the rate since this process started)."""
        elapsed = time.perf_counter() - self.t0
        left = elapsed / (step - self.start) * (self.total - step) if step > self.start else float("nan")
        eta = f", about {duration(left)} left" if step < self.total and left == left else ""
        prefix = f"{self.label}: " if self.label else ""
        return f"{prefix}step {step}/{self.total}  {stats}  {duration(elapsed)}{eta}"

    def note(self, text: str) -> None:
        """A line above the bar (or a plain line), e.g. a k-NN evaluation."""
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)
        elif self.console is not None:
            self.console.print(text, highlight=False)

    def update(self, step: int, **fields):
        if self.progress is not None:
            if fields:
                fields = {"stats": stats_text(**fields)}
            self.progress.update(self.task, completed=step, **fields)
        elif self.console is not None and fields and (step - self.last_plain >= self.plain_every or step == self.total):
            self.last_plain = step
            self.console.print(self.plain_line(step, stats_text(**fields)), highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(console, enabled: bool, total: int, start: int, label: str = ""):
    """A Bar for steps start .. total (of a phase called `label`, if any); silent when not enabled."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not enabled:
        yield Bar(None, None, None, total, start, label)
        return
    if not console.is_terminal:
        yield Bar(console, None, None, total, start, label)
        return
    columns = [BarColumn(bar_width=16), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
               TimeRemainingColumn(compact=True)]
    if label:
        columns.insert(0, TextColumn("{task.description}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label or "run", total=total, completed=start, stats="loss - (first log pending)")
        yield Bar(console, progress, task, total, start, label)
