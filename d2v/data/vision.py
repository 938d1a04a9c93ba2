"""Image data: the built-in sets (scikit-learn digits, Debian's Fashion-MNIST), a folder of images, a .npy/.npz
array. Every dataset yields float images (C, H, W) in [0, 1]; labels where the source has them."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from d2v.data.labels import labels_from_subfolders
from d2v.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FASHION_MNIST_DIRS = [Path("/usr/share/datasets/fashion-mnist")]  # Debian package dataset-fashion-mnist
BUILTIN = ("digits", "fashion-mnist")


class ArrayImages(torch.utils.data.Dataset):
    """Images held in memory as uint8 (N, C, H, W)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, name: str):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels)).long()
        self.name = name
        self.skipped = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].float() / 255.0

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices].float() / 255.0  # (B, C, H, W)

    def subset(self, indices: np.ndarray) -> "ArrayImages":
        labels = None if self.labels is None else self.labels.numpy()[indices]
        return ArrayImages(self.images.numpy()[indices], labels, self.name)


class FolderImages(torch.utils.data.Dataset):
    """A folder of image files, decoded lazily; class = first-level sub-folder when every image is in one."""

    def __init__(self, root: Path, files: list[Path], labels: np.ndarray | None, classes: list[str],
                 mode: str, size: int, skipped: int):
        self.root, self.files, self.classes, self.mode, self.size = root, files, classes, mode, size
        self.labels = None if labels is None else torch.from_numpy(labels).long()
        self.name = str(root)
        self.skipped = skipped

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1 if self.mode == "L" else 3, self.size, self.size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert(self.mode)
                if im.size != (self.size, self.size):
                    im = im.resize((self.size, self.size), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as exc:
            raise DataError(f"cannot decode image {path}: {exc}") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(arr.copy()).float() / 255.0

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.stack([self[int(i)] for i in indices])

    def subset(self, indices: np.ndarray) -> "FolderImages":
        labels = None if self.labels is None else self.labels.numpy()[indices]
        return FolderImages(self.root, [self.files[i] for i in indices], labels, self.classes, self.mode,
                            self.size, self.skipped)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    return images, d.target


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()  # writable


def _fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    for root in FASHION_MNIST_DIRS:
        for suffix in ("", ".gz"):
            img, lab = root / f"{prefix}-images-idx3-ubyte{suffix}", root / f"{prefix}-labels-idx1-ubyte{suffix}"
            if img.exists() and lab.exists():
                return _read_idx(img)[:, None], _read_idx(lab)
    raise DataError(
        "the built-in 'fashion-mnist' needs the Debian package dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist), which is not installed"
    )


def _split_indices(labels: np.ndarray | None, n: int, split: str, test_fraction: float, seed: int = 0) -> np.ndarray:
    """A fixed, stratified (when labelled) train/test split of n items."""
    if split == "all":
        return np.arange(n)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if labels is not None else [np.arange(n)]
    test = []
    for g in groups:
        g = rng.permutation(g)
        test.extend(g[: int(round(len(g) * test_fraction))])
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def _load_array(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                key = next((k for k in ("images", "x", "X", "data") if k in z), None)
                if key is None:
                    raise DataError(f"{path} has no array named images, x or data (found: {', '.join(z.files)})")
                label_key = next((k for k in ("labels", "y", "Y", "targets") if k in z), None)
                return z[key], (z[label_key] if label_key else None)
        return np.load(path, allow_pickle=False), None
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read array file {path}: {exc}") from None


def _to_uint8_nchw(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or arr.shape[0] == 0:
        raise DataError(f"{path} must hold images shaped (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3, "
                        f"got {arr.shape}")
    if arr.shape[2] != arr.shape[3]:
        raise DataError(f"{path} holds {arr.shape[2]}x{arr.shape[3]} images; d2v needs square images")
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise DataError(f"{path} contains NaN or infinite values")
    if arr.min() < 0 or arr.max() > 255:
        raise DataError(f"{path} has values outside [0, 1] (floats) or [0, 255]")
    if arr.max() <= 1.0:
        arr = arr * 255.0
    return arr.round().astype(np.uint8)


def _scan_folder(root: Path, image_size: int, skip_bad_files: bool) -> FolderImages:
    from PIL import Image

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    good, sizes, modes, skipped = [], [], [], 0
    for path in files:
        try:
            with Image.open(path) as im:
                im.verify()  # checks the file's structure without decoding all pixels
            with Image.open(path) as im:
                sizes.append(im.size)
                modes.append(im.mode)
            good.append(path)
        except Exception as exc:
            if not skip_bad_files:
                raise DataError(f"cannot read image {path} ({exc}); remove it or pass --skip-bad-files") from None
            skipped += 1
    if not good:
        raise DataError(f"none of the {len(files)} image files under {root} could be read")
    if image_size <= 0:
        if len(set(sizes)) > 1 or sizes[0][0] != sizes[0][1]:
            raise DataError(f"images under {root} are not all square and of one size; pass --image-size N to resize them")
        image_size = sizes[0][0]
    mode = "L" if all(m in ("L", "1", "I", "I;16", "F") for m in modes) else "RGB"
    labels, classes = labels_from_subfolders(root, good)
    return FolderImages(root, good, labels, classes, mode, image_size, skipped)


def _resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, C, h, w) -> (N, C, size, size), in chunks so that memory peaks at the output; an output that
    cannot fit in RAM is refused with its size."""
    if size <= 0 or images.shape[-1] == size:
        return images
    from d2v.validation import available_bytes

    n, c = images.shape[:2]
    need, (have, _) = n * c * size * size, available_bytes("cpu")
    if have and need > have // 2:
        raise DataError(f"resizing {n} images to {size}x{size} px needs {need / 2**30:.1f} GiB in memory but this "
                        f"machine has {have / 2**30:.1f} GiB; choose a smaller --image-size")
    out = np.empty((n, c, size, size), dtype=np.uint8)
    chunk = max(1, (64 << 20) // max(1, c * (size * size + images.shape[-1] * images.shape[-2]) * 4))
    for i in range(0, n, chunk):
        t = torch.from_numpy(images[i:i + chunk]).float()
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i:i + chunk] = t.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def load_images(source: str, split: str = "train", image_size: int = 0, skip_bad_files: bool = False,
                test_fraction: float = 0.3):
    """A dataset of float images in [0, 1] from a built-in name or a path; split is 'train', 'test' or 'all'."""
    if source == "digits":
        images, labels = _digits()
        idx = _split_indices(labels, len(labels), split, test_fraction)
        return ArrayImages(_resize_array(images[idx], image_size), labels[idx], "digits")
    if source == "fashion-mnist":
        if split == "all":
            parts = [_fashion_mnist("train"), _fashion_mnist("test")]
            images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        else:
            images, labels = _fashion_mnist(split)
        return ArrayImages(_resize_array(images, image_size), labels, "fashion-mnist")
    path = Path(os.path.expanduser(source))
    if not path.exists():
        raise DataError(f"data {source!r} is neither a built-in dataset ({', '.join(BUILTIN)}) nor an existing path")
    if path.is_dir():
        ds = _scan_folder(path, image_size, skip_bad_files)
        labels = None if ds.labels is None else ds.labels.numpy()
        return ds.subset(_split_indices(labels, len(ds), split, 0.2))
    if path.suffix not in (".npy", ".npz"):
        raise DataError(f"{path} is not a folder of images or a .npy/.npz array")
    arr, labels = _load_array(path)
    images = _resize_array(_to_uint8_nchw(np.asarray(arr), path), image_size)
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{path} has {len(images)} images but {len(labels)} labels")
    ds = ArrayImages(images, labels, str(path))
    return ds.subset(_split_indices(labels, len(ds), split, 0.2))


def pixel_stats(ds, max_images: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (up to max_images of) a dataset, for the encoder's own normalization."""
    n = min(len(ds), max_images)
    idx = torch.linspace(0, len(ds) - 1, n).long()
    x = ds.get_batch(idx).double()  # (n, C, H, W)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(v, 6) for v in mean.tolist()], [round(v, 6) for v in std.tolist()]
