"""Image data: the built-in sets (scikit-learn digits, Debian's Fashion-MNIST), a folder of images, tar shards (on
disk or on a server), a .npy/.npz array, or a mixture of several. Every dataset yields float images (C, H, W) in
[0, 1]; labels where the source has them."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from d2v.core.errors import DataError
from d2v.data.imagedecode import GRAY_MODES, center_box, decode, header, random_resized_box
from d2v.data.labels import labels_from_names
from d2v.data.sampling import split_indices
from d2v.data.remote import is_remote
from d2v.data.sources import SampleList, expand, list_mixture, list_source

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FASHION_MNIST_DIRS = [Path("/usr/share/datasets/fashion-mnist")]  # Debian package dataset-fashion-mnist
BUILTIN = ("digits", "fashion-mnist")


class ArrayImages(torch.utils.data.Dataset):
    """Images held in memory as uint8 (N, C, H, W)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, name: str, part_sizes: list[int] | None = None):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels)).long()
        self.name = name
        self.skipped = 0
        self.part_sizes = part_sizes or [len(self)]  # images per source (a mixture's parts, concatenated)

    def skipped_files(self) -> list[tuple[str, str]]:
        return []

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


class FileImages(torch.utils.data.Dataset):
    """Image files (a folder or tar shards), listed but not decoded: a file is read when a batch needs it.

    get_batch gives the evaluation view (shorter side to `size`, centre crop) as float in [0, 1]; train_batch the
    training view (random resized crop of the original, optional flip) as uint8, for DataLoader workers. A file that
    cannot be decoded raises a DataError naming it, or with skip_bad_files is counted and replaced by the next
    readable sample (so a batch keeps its size and the run stays deterministic).
    """

    def __init__(self, samples: SampleList, labels: np.ndarray | None, classes: list[str], channels: int, size: int,
                 skip_bad_files: bool):
        self.samples, self.classes, self.channels, self.size = samples, classes, channels, size
        self.labels = None if labels is None else torch.from_numpy(labels).long()
        self.skip_bad_files = skip_bad_files
        self.name = samples.root
        self.bad: dict[int, str] = {}  # indices found unreadable in this process -> why
        self.decodes = 0  # files decoded in this process (tests check laziness with it)

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def skipped_files(self) -> list[tuple[str, str]]:
        """(file, why) of each file left out as unreadable so far, in sample order."""
        return [(self.samples.where(i), self.bad[i]) for i in sorted(self.bad)]

    @property
    def part_sizes(self) -> list[int]:
        """Images per source (a mixture's parts, concatenated)."""
        return self.samples.sizes

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, i: int, box_for, flip: bool = False) -> np.ndarray | None:
        """Sample i decoded, or None when it is unreadable and bad files are skipped."""
        if i in self.bad:
            return None
        self.decodes += 1
        try:
            return decode(self.samples.open(i), self.channels, self.size, box_for, flip)
        except Exception as exc:
            why = str(exc).strip() or type(exc).__name__
            if not self.skip_bad_files:
                raise DataError(f"cannot decode image {self.samples.where(i)} ({why}); "
                                f"remove it or pass --skip-bad-files") from None
            self.bad[i] = f"cannot decode: {why}"
            return None

    def _first_readable(self, i: int, box_for, flip: bool = False) -> np.ndarray:
        n = len(self)
        for j in range(n):
            arr = self._decode((i + j) % n, box_for, flip)
            if arr is not None:
                return arr
        raise DataError(f"none of the {n} images of {self.name} could be decoded")

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._first_readable(int(i), center_box)).float() / 255.0

    def prefetch(self, indices) -> None:
        """Fetch a batch's files at once (shards on a server: concurrently); the unreadable ones are not asked."""
        self.samples.prefetch([int(i) for i in indices if int(i) not in self.bad])

    def read(self, i: int) -> torch.Tensor | None:
        """The evaluation view of image i alone (C, S, S) float in [0, 1]; None when it is unreadable and bad files
        are skipped (never another image in its place)."""
        arr = self._decode(int(i), center_box)
        return None if arr is None else torch.from_numpy(arr).float() / 255.0

    def get_batch(self, indices) -> torch.Tensor:
        """(B, C, S, S) float in [0, 1]: the evaluation view."""
        self.prefetch(indices)
        return torch.stack([self[int(i)] for i in indices])

    def train_batch(self, indices, scale: tuple[float, float], hflip: bool, rngs) -> torch.Tensor:
        """(B, C, S, S) uint8: a random resized crop of each original image (and a flip), one rng per sample."""
        self.prefetch(indices)
        out = []
        for i, rng in zip(indices, rngs):
            box_for = (lambda w, h, rng=rng: random_resized_box(w, h, scale, rng))
            flip = bool(hflip and rng.random() < 0.5)
            out.append(self._first_readable(int(i), box_for, flip))
        return torch.from_numpy(np.stack(out))

    def subset(self, indices: np.ndarray) -> "FileImages":
        labels = None if self.labels is None else self.labels.numpy()[indices]
        sub = FileImages(self.samples.subset(indices), labels, self.classes, self.channels, self.size,
                         self.skip_bad_files)
        where = {int(old): new for new, old in enumerate(indices)}
        sub.bad.update({where[b]: why for b, why in self.bad.items() if b in where})
        return sub


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as load_digits reads them (its digits.csv.gz: 64 pixels in 0..16, then the label), read
    without importing scikit-learn (1.3 s of a dry run's 4.8 s)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",")
        pixels, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels, target = d.images, d.target
    images = np.clip(pixels * (255.0 / 16.0), 0, 255).round().astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    return images, target


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


FILE_STATS_IMAGES = 256  # images decoded before the first step of a file dataset, for its pixel mean and std
HEADER_SAMPLE = 64  # headers read (not decoded) to choose the channels and the size of a folder's images


def _scan_files(samples: SampleList, image_size: int, skip_bad_files: bool) -> FileImages:
    """A dataset over listed image files; only a few evenly spread headers are read, to choose channels (grayscale
    when every one read is) and, without --image-size, the common square size."""
    n = len(samples)
    picks = np.unique(np.linspace(0, n - 1, min(n, HEADER_SAMPLE)).round().astype(np.int64))
    samples.prefetch(picks)
    sizes, modes, bad = [], [], {}
    for i in picks:
        try:
            size, mode = header(samples.open(int(i)))
        except Exception as exc:
            why = str(exc).strip() or type(exc).__name__
            if not skip_bad_files:
                raise DataError(f"cannot read image {samples.where(int(i))} ({why}); "
                                f"remove it or pass --skip-bad-files") from None
            bad[int(i)] = f"cannot read: {why}"
            continue
        sizes.append(size)
        modes.append(mode)
    if not sizes:
        raise DataError(f"none of the {len(picks)} image files read from {samples.root} could be opened")
    if image_size <= 0:
        if len(set(sizes)) > 1 or sizes[0][0] != sizes[0][1]:
            raise DataError(f"images in {samples.root} are not all square and of one size; pass --image-size N "
                            f"to crop and resize them")
        image_size = sizes[0][0]
    channels = 1 if all(m in GRAY_MODES for m in modes) else 3
    labels, classes = labels_from_names(samples.names())
    ds = FileImages(samples, labels, classes, channels, image_size, skip_bad_files)
    ds.bad.update(bad)
    return ds


def _resize_array(images: np.ndarray, size: int, path) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, C, size, size): shorter side to size, then a centre crop (never a stretch); in chunks
    so that memory peaks at the output; an output that cannot fit in RAM is refused with its size."""
    h, w = images.shape[-2:]
    if size <= 0:
        if h != w:
            raise DataError(f"{path} holds {h}x{w} images; pass --image-size N to crop and resize them to N x N")
        return images
    if (h, w) == (size, size):
        return images
    from d2v.core.device import available_bytes

    n, c = images.shape[:2]
    need, (have, _) = n * c * size * size, available_bytes("cpu")
    if have and need > have // 2:
        raise DataError(f"resizing {n} images to {size}x{size} px needs {need / 2**30:.1f} GiB in memory but this "
                        f"machine has {have / 2**30:.1f} GiB; choose a smaller --image-size")
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    out = np.empty((n, c, size, size), dtype=np.uint8)
    chunk = max(1, (64 << 20) // max(1, c * (size * size + s * s) * 4))
    for i in range(0, n, chunk):
        t = torch.from_numpy(images[i:i + chunk, :, top: top + s, left: left + s]).float()
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        out[i:i + chunk] = t.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def load_images(source: str, split: str = "train", image_size: int = 0, skip_bad_files: bool = False,
                test_fraction: float = 0.3, run_dir: Path | None = None):
    """A dataset of images from a built-in name, a folder, tar shards or a .npy/.npz array; split is 'train',
    'test' or 'all'. Files are listed, not decoded (run_dir: reuse the run's saved list)."""
    if source == "digits":
        images, labels = _digits()
        idx = split_indices(labels, len(labels), split, test_fraction)
        return ArrayImages(_resize_array(images[idx], image_size, source), labels[idx], "digits")
    if source == "fashion-mnist":
        if split == "all":
            parts = [_fashion_mnist("train"), _fashion_mnist("test")]
            images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        else:
            images, labels = _fashion_mnist(split)
        return ArrayImages(_resize_array(images, image_size, source), labels, "fashion-mnist")
    path = expand(source)
    if path.is_file() and path.suffix in (".npy", ".npz"):
        arr, labels = _load_array(path)
        images = _resize_array(_to_uint8_nchw(np.asarray(arr), path), image_size, path)
        if labels is not None and len(labels) != len(images):
            raise DataError(f"{path} has {len(images)} images but {len(labels)} labels")
        ds = ArrayImages(images, labels, str(path))
        return ds.subset(split_indices(labels, len(ds), split, 0.2))
    _check_files_source(source)
    samples = list_source(source, IMAGE_SUFFIXES, "images", run_dir)
    ds = _scan_files(samples, image_size, skip_bad_files)
    labels = None if ds.labels is None else ds.labels.numpy()
    return ds if split == "all" else ds.subset(split_indices(labels, len(ds), split, 0.2))


def channel_mismatch(source: str, have: int, want: int, encoder: str) -> str:
    """The sentence for images of `have` channels given to an encoder (described by `encoder`) of `want`."""
    kind = {1: "grayscale", 3: "colour"}
    how = ("convert them to grayscale first (Pillow: Image.open(p).convert('L'))" if want == 1 else
           "convert them to RGB first (Pillow: Image.open(p).convert('RGB'))" if want == 3 else
           f"give it {want}-channel images")
    return (f"{encoder} takes {want}-channel ({kind.get(want, 'multi-channel')}) images but {source} holds "
            f"{have}-channel ({kind.get(have, 'multi-channel')}) ones; {how}")


def _check_files_source(source: str) -> None:
    if not is_remote(source) and not expand(source).exists() and "{" not in source:
        raise DataError(f"data {source!r} is neither a built-in dataset ({', '.join(BUILTIN)}) nor an existing path "
                        f"or URL")


def _in_memory(source: str) -> bool:
    return source in BUILTIN or (not is_remote(source) and expand(source).suffix in (".npy", ".npz")
                                 and expand(source).is_file())


def load_image_mixture(sources: list[str], image_size: int = 0, skip_bad_files: bool = False,
                       run_dir: Path | None = None):
    """Several image sources as one data set, in order (a mixture's parts; part_sizes says where each ends): all
    in memory (built-ins, their training split; arrays), concatenated; or all files (folders, shards, URLs), listed
    as one (run_dir: reuse the run's saved list). Images of other sizes need image_size; grayscale parts are
    repeated to three channels when another part has colour."""
    in_memory = [_in_memory(s) for s in sources]
    if any(in_memory) and not all(in_memory):
        raise DataError(f"a mixture of images takes either in-memory sets (built-ins, .npy/.npz arrays) or files "
                        f"(folders, shards, URLs), not both: {sources[in_memory.index(True)]} is the first and "
                        f"{sources[in_memory.index(False)]} the second kind")
    if not all(in_memory):
        for source in sources:
            _check_files_source(source)
        samples = list_mixture(sources, lambda s: list_source(s, IMAGE_SUFFIXES, "images"), run_dir)
        return _scan_files(samples, image_size, skip_bad_files)
    parts = [load_images(s, "train" if s in BUILTIN else "all", image_size) for s in sources]
    sizes = {p.shape[1:] for p in parts}
    if len(sizes) > 1:
        raise DataError("the images of a mixture must be of one size: " + ", ".join(
            f"{s} has {p.shape[1]}x{p.shape[2]}" for s, p in zip(sources, parts)) + "; pass --image-size N")
    channels = max(p.shape[0] for p in parts)
    images = [p.images.numpy() if p.shape[0] == channels else np.repeat(p.images.numpy(), channels, axis=1)
              for p in parts]
    return ArrayImages(np.concatenate(images), None, " + ".join(sources), [len(p) for p in parts])


def pixel_stats(ds, max_images: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (up to max_images of) a dataset, for the encoder's own normalization; files are
    decoded for it, so a file dataset reads at most FILE_STATS_IMAGES of them before the first step."""
    if isinstance(ds, FileImages):
        max_images = min(max_images, FILE_STATS_IMAGES)
    n = min(len(ds), max_images)
    idx = torch.linspace(0, len(ds) - 1, n).long()
    x = ds.get_batch(idx).double()  # (n, C, H, W)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(v, 6) for v in mean.tolist()], [round(v, 6) for v in std.tolist()]
