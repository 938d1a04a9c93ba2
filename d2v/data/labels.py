"""Labels of a folder dataset: the class of a file is its first-level sub-folder."""
from __future__ import annotations

import numpy as np


def labels_from_names(names: list[str]) -> tuple[np.ndarray | None, list[str]]:
    """(label per sample, class names) for relative names such as 'cat/001.jpg' when every name sits in a
    sub-folder and there are at least two of them; else (None, []): an unlabelled set."""
    firsts = [n.replace("\\", "/").split("/", 1)[0] if "/" in n.replace("\\", "/") else None for n in names]
    if not firsts or any(f is None for f in firsts):
        return None, []
    classes = sorted(set(firsts))
    if len(classes) < 2:
        return None, []
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[f] for f in firsts], dtype=np.int64), classes


def unlabelled_message(source: str, names: list[str] | None, layout: str) -> str:
    """The error sentence of a set used for labels that has none: a single class folder (a probe or fine-tuning
    needs at least two), or `layout`, the way to give labels."""
    firsts = [n.replace("\\", "/").split("/", 1)[0] for n in names or () if "/" in n.replace("\\", "/")]
    if names and len(firsts) == len(names) and len(set(firsts)) == 1:
        return (f"{source} has one class (every file is in its sub-folder {firsts[0]!r}); a probe or fine-tuning "
                f"needs at least two classes, one sub-folder each")
    return f"{source} has no labels ({layout})"
