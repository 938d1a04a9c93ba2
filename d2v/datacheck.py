"""`d2v data check`: every item of a data source read once (in DataLoader worker processes), the way pretraining
reads it, and a report: counts, classes, the distribution of image sizes / recording durations / document lengths,
what cannot be read or used (with the reason, for a TSV), and what a pretraining run would skip.

A source is usable when `d2v pretrain` with the same --data, --skip-bad-files and --image-size would run on it:
at least one usable item, no unusable item unless bad files are skipped (pretraining stops at the first one
otherwise), and for images either one square size or --image-size."""
from __future__ import annotations

import codecs
import itertools
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from d2v.core.config import SpeechModelConfig
from d2v.core.errors import DataError
from d2v.data.audio import AUDIO_SUFFIXES, read_audio
from d2v.data.corpus import BUILTIN as TEXT_BUILTIN
from d2v.data.corpus import fortune_files, read_corpus
from d2v.data.imagedecode import center_box, decode, header
from d2v.data.images import BUILTIN as IMAGE_BUILTIN
from d2v.data.images import IMAGE_SUFFIXES, load_images
from d2v.data.labels import labels_from_names
from d2v.data.recordings import BUILTIN as SPEECH_BUILTIN
from d2v.data.recordings import builtin_source
from d2v.data.sources import SampleList, expand, from_names, list_source
from d2v.models.speech import receptive_field

# Image modes decoding converts, and how (d2v.data.imagedecode): reported, not refused.
ODD_MODES = {"RGBA": "transparency composited over white", "LA": "transparency composited over white",
             "P": "palette expanded", "PA": "palette expanded, transparency over white", "CMYK": "converted to RGB",
             "YCbCr": "converted to RGB", "1": "1-bit, read as grayscale", "I": "32-bit integer, scaled",
             "I;16": "16-bit, scaled", "I;16B": "16-bit, scaled", "I;16L": "16-bit, scaled", "F": "float, taken as 0..1"}
CHUNK = 32  # items per task handed to a worker


@dataclass
class Record:
    """What reading one item found."""

    name: str
    problem: str = ""  # "" when usable: unreadable, too short, silent, not UTF-8, empty, ...
    detail: str = ""
    values: dict = field(default_factory=dict)  # width/height/mode, seconds/rate/channels, docs/chars/words/tokens


@dataclass
class DataReport:
    modality: str
    source: str
    records: list[Record]
    classes: dict[str, int]  # class name -> items, where the source has classes
    notes: list[str]  # conditions a run needs a flag for, odd modes, rates
    skip_bad_files: bool
    blocking: str = ""  # why a pretraining run could not start on it ('' when it could)

    @property
    def problems(self) -> list[Record]:
        return [r for r in self.records if r.problem]

    @property
    def usable(self) -> int:
        return len(self.records) - len(self.problems)

    @property
    def ok(self) -> bool:
        return not self.blocking

    def distribution(self, key: str) -> dict | None:
        """min, p5, median, mean, p95, max of a value over the usable items that have it."""
        xs = np.array([r.values[key] for r in self.records if not r.problem and key in r.values], dtype=np.float64)
        if xs.size == 0:
            return None
        p5, med, p95 = np.percentile(xs, [5, 50, 95])
        return {"n": int(xs.size), "min": float(xs.min()), "p5": float(p5), "median": float(med),
                "mean": float(xs.mean()), "p95": float(p95), "max": float(xs.max())}

    @property
    def odd(self) -> list[Record]:
        """Usable items that reading converts in a way worth knowing (images in modes such as RGBA, CMYK, 16-bit)."""
        return [r for r in self.records if not r.problem and r.values.get("mode") in ODD_MODES]

    def problem_tsv(self) -> bytes:
        """The unusable items (their problem) and then the odd ones ("odd mode", usable), one per line."""
        rows = [(r.name, r.problem, r.detail) for r in self.problems]
        rows += [(r.name, "odd mode", f"{r.values['mode']}: {ODD_MODES[r.values['mode']]}") for r in self.odd]
        lines = ["item\tproblem\tdetail"] + [f"{_cell(a)}\t{b}\t{_cell(c)}" for a, b, c in rows]
        return ("\n".join(lines) + "\n").encode()


def _cell(text: str) -> str:
    return text.replace("\t", " ").replace("\n", " ")


# ---------------------------------------------------------------------------------------------- one item each
def _image(samples: SampleList, i: int, options: dict) -> Record:
    rec = Record(samples.where(i))
    try:
        (w, h), mode = header(samples.open(i))
        decode(samples.open(i), 3, 16, center_box)  # the training decoder, all pixels read, at a small output size
    except Exception as exc:  # noqa: BLE001 - any failure is the file's, named in the report
        rec.problem, rec.detail = "unreadable", str(exc).strip() or type(exc).__name__
        return rec
    rec.values = {"width": w, "height": h, "mode": mode, "pixels": w * h}
    return rec


def _recording(samples: SampleList, i: int, options: dict) -> Record:
    import soundfile as sf

    rec = Record(samples.where(i))
    rate = options["sample_rate"]
    try:
        info = sf.info(samples.open(i))
        wave = read_audio(samples.open(i), rate, rec.name)
    except DataError as exc:
        rec.problem, rec.detail = "unreadable", str(exc)
        return rec
    except Exception as exc:  # noqa: BLE001
        rec.problem, rec.detail = "unreadable", str(exc).strip() or type(exc).__name__
        return rec
    rec.values = {"seconds": wave.size / rate, "rate": int(info.samplerate), "channels": int(info.channels)}
    if wave.size < options["min_samples"]:
        rec.problem = "too short"
        rec.detail = f"{wave.size} samples at {rate} Hz; a run needs at least {options['min_samples']}"
    return rec


def _text(samples: SampleList, i: int, options: dict) -> Record:
    rec = Record(samples.where(i))
    decoder, parts, offset = codecs.getincrementaldecoder("utf-8")(), [], 0
    src = samples.open(i)
    with (open(src, "rb") if isinstance(src, str) else src) as f:
        for chunk in itertools.chain(iter(lambda: f.read(1 << 20), b""), [b""]):  # b"": the end, decoded last
            try:
                parts.append(decoder.decode(chunk, final=not chunk))
            except UnicodeDecodeError as exc:
                at = offset + exc.start - len(decoder.getstate()[0])
                rec.problem, rec.detail = "not UTF-8", f"invalid byte at offset {max(at, 0)}"
                return rec
            offset += len(chunk)
    text = "".join(parts)
    docs = [ln for ln in text.splitlines() if ln.strip()] if options["doc_per_line"] else (
        [text] if text.strip() else [])
    if not docs:
        rec.problem, rec.detail = "empty", "holds no text (a run reads nothing from it)"
        return rec
    rec.values = {"docs": len(docs), "chars": sum(len(d) for d in docs) / len(docs),
                  "words": sum(len(d.split()) for d in docs) / len(docs)}
    tok = options.get("tokenizer")
    if tok is not None:
        rec.values["tokens"] = sum(len(e.ids) for e in tok.encode_batch(docs)) / len(docs)
    return rec


READERS = {"vision": _image, "speech": _recording, "text": _text}


class _Chunks(torch.utils.data.Dataset):
    """Chunk k: the records of items k * CHUNK .. (k + 1) * CHUNK - 1 (read in a worker)."""

    def __init__(self, modality: str, samples: SampleList, options: dict):
        self.read, self.samples, self.options = READERS[modality], samples, options

    def __len__(self) -> int:
        return -(-len(self.samples) // CHUNK)

    def __getitem__(self, k: int) -> list[Record]:
        stop = min((k + 1) * CHUNK, len(self.samples))
        return [self.read(self.samples, i, self.options) for i in range(k * CHUNK, stop)]


def read_all(modality: str, samples: SampleList, options: dict, num_workers: int, progress=None) -> list[Record]:
    """Every item's record, in order, read in `num_workers` processes (0: here)."""
    chunks = _Chunks(modality, samples, options)
    out: list[Record] = []
    if num_workers <= 0:
        parts = (chunks[k] for k in range(len(chunks)))
    else:  # tokenizers' own threads do not survive fork: read tokens after the fork, in each worker, single-threaded
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        parts = torch.utils.data.DataLoader(chunks, batch_size=None, num_workers=num_workers,
                                            collate_fn=lambda x: x)
    for part in parts:
        out += part
        if progress is not None:
            progress(len(out), len(samples))
    return out


# ---------------------------------------------------------------------------------------------- a whole source
def _listing(modality: str, source: str) -> SampleList | None:
    """The files of a path or built-in source, or None for data held in memory (image arrays, pydoc)."""
    if modality == "vision":
        path = expand(source)
        if source in IMAGE_BUILTIN or (path.is_file() and path.suffix in (".npy", ".npz")):
            return None
        if not path.exists() and "{" not in source:
            raise DataError(f"data {source!r} is neither a built-in image set ({', '.join(IMAGE_BUILTIN)}) nor an "
                            "existing path")
        return list_source(source, IMAGE_SUFFIXES, "images")
    if modality == "speech":
        source = builtin_source(source) if source in SPEECH_BUILTIN else source
        path = expand(source)
        if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES:
            return from_names("folder", str(path.parent), [path.name])
        if not path.exists() and "{" not in source:
            raise DataError(f"data {source!r} is neither a built-in speech set ({', '.join(SPEECH_BUILTIN)}) nor "
                            "an existing path")
        return list_source(source, AUDIO_SUFFIXES, "audio files")
    if source == "pydoc":
        return None
    if source == "fortunes":
        files = fortune_files()
        return from_names("folder", str(files[0].parent), [f.name for f in files])
    path = expand(source)
    if path.is_file() and path.suffix != ".tar":
        return from_names("folder", str(path.parent), [path.name])
    if not path.exists() and "{" not in source:
        raise DataError(f"text data {source!r} is neither a built-in name ({', '.join(TEXT_BUILTIN)}) nor an "
                        "existing path")
    return list_source(source, {".txt"}, ".txt files")


def _in_memory(modality: str, source: str) -> tuple[list[Record], dict[str, int]]:
    """Records of a set held in memory (image arrays and built-ins, pydoc): nothing in it can be unreadable."""
    if modality == "vision":
        ds = load_images(source, "all")
        c, s, _ = ds.shape
        records = [Record(f"{source}/{i}", values={"width": s, "height": s, "mode": "L" if c == 1 else "RGB",
                                                    "pixels": s * s}) for i in range(len(ds))]
        counts = {} if ds.labels is None else {str(k): int(v) for k, v in sorted(Counter(ds.labels.tolist()).items())}
        return records, counts
    corpus = read_corpus(source)
    records = [Record(name, values={"docs": 1, "chars": len(d), "words": len(d.split())})
               for name, d in zip(corpus.names or [f"{source}/{i}" for i in range(len(corpus.docs))], corpus.docs)]
    return records, {}


def check_data(modality: str, source: str, skip_bad_files: bool = False, image_size: int = 0,
               min_seconds: float = 0.0, doc_per_line: bool = False, tokenizer=None, num_workers: int = -1,
               progress=None) -> DataReport:
    """Read every item of `source` once as a `modality` pretraining run would, and report (see the module doc)."""
    if modality not in READERS:
        raise DataError(f"unknown modality {modality!r}; choose vision, speech or text")
    samples = _listing(modality, source)
    if samples is None:
        records, classes = _in_memory(modality, source)
    else:
        speech = SpeechModelConfig()
        rate = speech.sample_rate
        options = {"sample_rate": rate, "doc_per_line": doc_per_line, "tokenizer": tokenizer,
                   "min_samples": max(receptive_field(speech.conv_kernel, speech.conv_stride),
                                      int(min_seconds * rate))}
        workers = num_workers if num_workers >= 0 else min(8, max(0, (os.cpu_count() or 1) - 1))
        records = read_all(modality, samples, options, min(workers, -(-len(samples) // CHUNK)), progress)
        labels, names = labels_from_names(samples.names())
        classes = {} if labels is None else {names[k]: int(v) for k, v in sorted(Counter(labels.tolist()).items())}
    report = DataReport(modality, source, records, classes, [], skip_bad_files)
    _judge(report, image_size)
    return report


def _judge(report: DataReport, image_size: int) -> None:
    """The report's notes and whether a run could start on the data."""
    if report.modality == "vision":
        modes = Counter(r.values["mode"] for r in report.records if not r.problem)
        for mode, n in sorted(modes.items()):
            if mode in ODD_MODES:
                report.notes.append(f"{n} image(s) in mode {mode}: {ODD_MODES[mode]} when read")
        sizes = {(r.values["width"], r.values["height"]) for r in report.records if not r.problem}
        if len(sizes) > 1 or any(w != h for w, h in sizes):
            report.notes.append(f"{len(sizes)} different image sizes (or non-square images): a run needs "
                                "--image-size N (shorter side resized, centre-cropped, never stretched)")
            if not image_size:
                report.blocking = "the images are not all square and of one size; pass --image-size N"
    if report.modality == "speech":
        rates = Counter(r.values["rate"] for r in report.records if not r.problem)
        if set(rates) - {16000}:
            report.notes.append("sample rates " + ", ".join(f"{k} Hz x{v}" for k, v in sorted(rates.items()))
                                + ": resampled to 16 kHz when read")
        multi = sum(1 for r in report.records if not r.problem and r.values["channels"] > 1)
        if multi:
            report.notes.append(f"{multi} recording(s) with several channels: mixed down to mono when read")
    bad = [r for r in report.problems if r.problem != "empty"]
    if report.usable == 0:
        report.blocking = f"none of the {len(report.records)} items can be used"
    elif bad and not report.skip_bad_files:
        report.blocking = (f"{len(bad)} item(s) cannot be used and a run would stop at the first "
                           f"({bad[0].name}: {bad[0].problem}); remove them or pass --skip-bad-files")
