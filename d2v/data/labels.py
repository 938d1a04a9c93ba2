"""Labels of a folder dataset: the class of a file is its first-level sub-folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def labels_from_subfolders(root: Path, files: list[Path]) -> tuple[np.ndarray | None, list[str]]:
    """(label per file, class names) when every file sits in a sub-folder and there are at least two of
    them; else (None, []): an unlabelled folder."""
    parts = [Path(f).relative_to(root).parts for f in files]
    if not parts or not all(len(p) >= 2 for p in parts):
        return None, []
    classes = sorted({p[0] for p in parts})
    if len(classes) < 2:
        return None, []
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[p[0]] for p in parts]), classes
