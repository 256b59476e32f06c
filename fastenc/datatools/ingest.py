"""`fastenc data ingest`: turn an image folder or img2dataset output into validated webdataset shards.

Sources (detected from SRC, or forced with `fmt`):
    folder       a directory of images (.jpg/.jpeg/.png/.webp, searched recursively, hidden files skipped).
                 Captions come from a CSV/JSONL file (`captions_file`), from sidecar files (`name.txt` next to
                 `name.jpg`, as in img2dataset's "files" output, whose `name.json` is merged into the sample json),
                 from the file names, or nowhere (image-only data). Default ("auto"): sidecars when at least one
                 image has one, else none. When every image sits in a first-level subfolder (the ImageNet
                 class-folder layout) each sample records `label` (folder name) and `label_id` (its index in the
                 sorted class list), for linear-probe and k-NN evaluation.
    webdataset   a directory of .tar shards as img2dataset writes them ({key}.jpg, {key}.txt, {key}.json; its
                 .parquet and _stats.json files are ignored), or one shard; .tar.gz/.tar.bz2/.tar.xz are read too
                 (the output is plain tar, which DALI needs). The usable samples are re-sharded in their order,
                 with their json fields, caption and any other members unchanged.

Every image is fully decoded once (`decode_image`) and written with its original bytes (never re-encoded). A sample
whose image fails is skipped; a sample whose caption is missing or unusable is written without .txt (image-only
objectives still use it) unless `require_captions`. Both are counted by reason in manifest.json, with the items
listed (up to `max_listed` each). Output, all in DIR:
    shard-00000.tar ...           {key}.{image ext}, {key}.txt (stripped caption), {key}.json; keys are 9-digit
                                  running numbers; each shard streams into a hidden temporary file
                                  (fastenc.utils.atomic) and is renamed when complete
    shard-00000.idx (+ .idx.json) DALI index and its report (fastenc.data.index), built right after each shard
    manifest.json                 written last: its absence marks an interrupted run
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field

from fastenc.data.index import build_index, iter_tar_samples, reason_kind
from fastenc.data.transforms import IMAGE_EXTENSIONS, CorruptSample, decode_caption, decode_image
from fastenc.datatools import DataToolError
from fastenc.datatools.synth import _add_file, remove_temp_files
from fastenc.utils import atomic

log = logging.getLogger(__name__)

CAPTION_SOURCES = ("auto", "file", "sidecar", "filename", "none")
LABEL_MODES = ("auto", "folder", "none")
FORMATS = ("auto", "folder", "webdataset")
MANIFEST_VERSION = 1
SHARD_NAME = "shard-{:05d}.tar"
SOURCE_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
"""Source shards ingest reads (compressed ones too: the output is plain tar, which DALI needs)."""
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
RESERVED_FIELDS = ("key", "source", "width", "height", "label", "label_id")
"""json fields ingest sets itself; a captions file's or sidecar's fields of the same name are overridden."""


# ----------------------------------------------------------------------------------------------------------------
# Bookkeeping


_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>")


class Tally:
    """Items left out (or kept without caption) by reason: exact counts, and the first `cap` items listed."""

    def __init__(self, cap: int):
        self.cap, self.counts, self.items, self.total = cap, Counter(), [], 0

    def add(self, source: str, reason: str) -> None:
        reason = _OBJECT_REPR.sub("", reason)  # Pillow names its BytesIO by address: keep manifests reproducible
        self.total += 1
        self.counts[reason_kind(reason)] += 1
        if len(self.items) < self.cap:
            self.items.append({"source": source, "reason": reason})


@dataclass
class _Candidate:
    """One sample to validate and write."""

    source: str
    """Where it comes from, for messages and the manifest: a path relative to SRC, or `shard.tar:key`."""
    ext: str | None = None
    """Output image extension (lowercase); None when the sample has no image."""
    path: str | None = None
    """folder source: the image file to read (read by the worker that decodes it)."""
    data: bytes | None = None
    """webdataset source: the image bytes."""
    caption: str | None = None
    caption_problem: str | None = None
    meta: dict = field(default_factory=dict)
    extra: list = field(default_factory=list)
    """webdataset source: other members [(ext, bytes)], copied unchanged."""
    problem: str | None = None
    """Reason to skip it without decoding (no image in the sample)."""


def _check_image_file(path: str):
    """(bytes, (width, height), None) or (None, None, reason): read and fully decode one image file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, None, f"image file cannot be read ({e.strerror or e})"
    size, problem = _check_image_bytes(data)
    return (data if problem is None else None), size, problem


def _check_image_bytes(data: bytes):
    """((width, height), None) or (None, reason)."""
    try:
        return decode_image(data).size, None
    except CorruptSample as e:
        return None, str(e)


def _validate(c: _Candidate):
    """Worker task: (bytes, size, problem) for a candidate (folder: reads the file; webdataset: bytes given)."""
    if c.problem:
        return None, None, c.problem
    if c.path is not None:
        return _check_image_file(c.path)
    size, problem = _check_image_bytes(c.data)
    return (c.data if problem is None else None), size, problem


def _validated(candidates, workers: int, chunk: int = 64):
    """(candidate, bytes, size, problem) in input order; `workers` > 1 decodes in parallel processes.

    Work goes out in chunks with one chunk in flight while the previous one is written, so memory stays bounded
    (Pool.imap would read the whole input ahead).
    """
    if workers <= 1:
        for c in candidates:
            yield (c, *_validate(c))
        return
    import multiprocessing as mp

    def chunks():
        buf = []
        for c in candidates:
            buf.append(c)
            if len(buf) >= chunk * workers:
                yield buf
                buf = []
        if buf:
            yield buf

    def light(c):  # the worker needs only the path or the bytes: don't ship captions, json, extra members
        return _Candidate(source=c.source, path=c.path, data=c.data, problem=c.problem)

    with mp.get_context("spawn").Pool(workers) as pool:
        pending = None
        for batch in chunks():
            job = pool.map_async(_validate, [light(c) for c in batch], chunksize=max(1, chunk // 4))
            if pending is not None:
                yield from _zip_results(*pending)
            pending = (batch, job)
        if pending is not None:
            yield from _zip_results(*pending)


def _zip_results(batch, job):
    for c, result in zip(batch, job.get()):
        yield (c, *result)


def _caption_from_text(value, where: str, missing: str):
    """(caption, None) or (None, reason) for a caption given as text (captions file, file name)."""
    if value is None:
        return None, f"missing caption ({missing})"
    if not isinstance(value, str):
        return None, f"caption is not text (a {type(value).__name__} in {where})"
    try:
        data = value.encode("utf-8", "surrogateescape")  # surrogate escapes are the file's non-UTF-8 bytes
    except UnicodeEncodeError:
        return None, "caption is not valid Unicode (lone surrogate)"
    try:
        return decode_caption(data), None
    except CorruptSample as e:
        return None, str(e)


def _clean(value):
    """Text that encodes as UTF-8: surrogate escapes of undecodable bytes (file names, captions files) become U+FFFD."""
    if isinstance(value, str):
        try:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:  # a lone surrogate that is no escape (e.g. "\ud800" in a JSONL file)
            return value.encode("utf-8", "replace").decode("utf-8")
    return value


def _json_bytes(meta: dict) -> bytes:
    try:
        return json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates deep inside some field: ASCII escapes keep them representable
        return json.dumps(meta).encode("ascii")


# ----------------------------------------------------------------------------------------------------------------
# Shard writing


class _ShardWriter:
    """Writes samples into DIR/shard-NNNNN.tar (`per_shard` samples each) and indexes each shard. A shard streams
    into fastenc.utils.atomic's temporary file and is renamed into place when complete."""

    def __init__(self, out_dir: str, per_shard: int):
        self.out_dir, self.per_shard = out_dir, per_shard
        self.shards, self.reports = [], []
        self.num_samples = self.num_captioned = 0
        self._tar = self._open = None  # the shard being written, and what closes (or discards) it
        self._in_shard = 0

    def add(self, ext: str, image: bytes, caption: str | None, meta: dict, extra=()) -> str:
        if self._tar is None:
            self._start_shard()
        key = f"{self.num_samples:09d}"
        _add_file(self._tar, f"{key}.{ext}", image)
        if caption is not None:
            _add_file(self._tar, f"{key}.txt", caption.encode("utf-8"))
            self.num_captioned += 1
        for e, data in extra:
            _add_file(self._tar, f"{key}.{e}", data)
        meta = {"key": key, **{k: v for k, v in meta.items() if k != "key"}}
        _add_file(self._tar, f"{key}.json", _json_bytes(meta))
        self.num_samples += 1
        self._in_shard += 1
        if self._in_shard >= self.per_shard:
            self._finish_shard()
        return key

    def _start_shard(self) -> None:
        name = SHARD_NAME.format(len(self.shards))
        self._open = contextlib.ExitStack()
        tmp = self._open.enter_context(atomic.atomic_path(os.path.join(self.out_dir, name)))
        self._tar = self._open.enter_context(tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT))
        self.shards.append(name)
        self._in_shard = 0

    def _finish_shard(self) -> None:
        done, self._open, self._tar = self._open, None, None
        done.close()  # the tar is closed, then fsynced and renamed to its final name
        # Every image was decoded on the way in: the index needs only the quick checks.
        self.reports.append(build_index(os.path.join(self.out_dir, self.shards[-1]), assume_valid=True))

    def close(self) -> None:
        if self._tar is not None:
            self._finish_shard()

    def abort(self, error: BaseException) -> None:
        """Discard the shard being written (its temporary file is removed), after `error`."""
        if self._tar is not None:
            discard, self._open, self._tar = self._open, None, None
            self.shards.pop()
            discard.__exit__(type(error), error, error.__traceback__)


# ----------------------------------------------------------------------------------------------------------------
# Sources


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1][1:].lower() in IMAGE_EXTENSIONS


def _walk_folder(src: str, skip: set[str]):
    """(sorted image paths relative to src, {folder relative to src: set of its file names}).

    Hidden files and folders (leading '.') and the folders in `skip` (the output folder) are not searched.
    Symlinked folders are followed once each.
    """
    images, names_by_dir, seen = [], {}, set()
    for root, dirs, files in os.walk(src, followlinks=True):
        real = os.path.realpath(root)
        if real in seen or real in skip:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs
                         if not d.startswith(".") and os.path.realpath(os.path.join(root, d)) not in skip)
        rel_root = os.path.relpath(root, src)
        rel_root = "" if rel_root == "." else rel_root.replace(os.sep, "/")
        visible = [f for f in files if not f.startswith(".")]
        names_by_dir[rel_root] = set(visible)
        images.extend(f"{rel_root}/{f}" if rel_root else f for f in visible if _is_image(f))
    images.sort()
    return images, names_by_dir


def _sidecar(names_by_dir: dict, rel: str, ext: str) -> str | None:
    """rel path of `stem.ext` next to image `rel`, if it exists."""
    d, base = os.path.split(rel)
    name = os.path.splitext(base)[0] + ext
    return (f"{d}/{name}" if d else name) if name in names_by_dir.get(d, ()) else None


def _other_files(images: list[str], names_by_dir: dict, exclude: set[str]) -> Counter:
    """Extensions of the files that are neither images nor their .txt/.json sidecars (reported, not ingested)."""
    stems = {os.path.splitext(r)[0] for r in images}
    other = Counter()
    for d, names in names_by_dir.items():
        for n in names:
            rel = f"{d}/{n}" if d else n
            stem, ext = os.path.splitext(rel)
            if _is_image(n) or rel in exclude or (ext.lower() in (".txt", ".json") and stem in stems):
                continue
            other[ext.lower().lstrip(".") or "(no extension)"] += 1
    return other


def _looks_like_img2dataset_files(images: list[str], names_by_dir: dict) -> bool:
    """img2dataset's "files" output: numbered folders 00000/, 00001/ ... with .json sidecars (not classes)."""
    folders = {r.split("/", 1)[0] for r in images}
    return (all(f.isdigit() and len(f) >= 5 for f in folders)
            and any(_sidecar(names_by_dir, r, ".json") for r in images[:100]))


def _class_labels(images: list[str], names_by_dir: dict, mode: str) -> list[str] | None:
    """The sorted class list (first-level folder names), or None when the data has no class folders."""
    if mode == "none":
        return None
    parts = [r.split("/") for r in images]
    if mode == "folder":
        loose = [r for r, p in zip(images, parts) if len(p) < 2]
        if loose:
            raise DataToolError(f"--labels folder needs every image inside a class folder, but {len(loose)} image(s) "
                                f"sit directly in SRC (e.g. {loose[0]!r}); move them into class folders or use "
                                "--labels none")
        return sorted({p[0] for p in parts})
    classes = sorted({p[0] for p in parts})
    if (all(len(p) == 2 for p in parts) and len(classes) >= 2
            and not _looks_like_img2dataset_files(images, names_by_dir)):
        return classes
    return None


@dataclass
class _CaptionRow:
    caption: object
    extra: dict
    line: int


class _CaptionTable:
    """A CSV/JSONL captions file, looked up by image path relative to SRC, or by bare file name."""

    def __init__(self, path: str, src: str, path_column: str, caption_column: str):
        self.path, self.name = path, os.path.basename(path)
        self.by_rel: dict[str, _CaptionRow] = {}
        self.by_name: dict[str, list[_CaptionRow]] = {}
        self.num_rows = self.num_duplicate = 0
        self.empty_paths = 0
        self.matched: set[int] = set()
        self.path_column, self.caption_column = path_column, caption_column
        for line, record in self._records(path, path_column, caption_column):
            value = record.get(path_column)
            self.num_rows += 1
            if value is None or not str(value).strip():
                self.empty_paths += 1
                continue
            extra = {k: _clean(v) for k, v in record.items()
                     if k not in (path_column, caption_column) and k not in RESERVED_FIELDS and k is not None}
            row = _CaptionRow(record.get(caption_column), extra, line)
            rel = self._normalize(str(value), src)
            if rel in self.by_rel:
                self.num_duplicate += 1  # the first row for a path wins
                continue
            self.by_rel[rel] = row
            if "/" not in rel:
                self.by_name.setdefault(rel, []).append(row)

    @staticmethod
    def _normalize(value: str, src: str) -> str:
        value = value.strip().replace("\\", "/")
        if os.path.isabs(value):
            value = os.path.relpath(value, src).replace(os.sep, "/")
        value = os.path.normpath(value).replace(os.sep, "/")
        return value

    @staticmethod
    def _records(path: str, path_column: str, caption_column: str):
        """(line number, dict) per row; DataToolError when the columns are missing or the file is malformed."""
        name = os.path.basename(path)
        lower = path.lower()
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
        jsonl = lower.endswith((".jsonl", ".ndjson", ".json")) or (not lower.endswith((".csv", ".tsv"))
                                                                  and head.startswith(b"{"))
        # surrogateescape: a row with non-UTF-8 bytes loses only its own caption (counted), not the whole file.
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="" if not jsonl else None) as f:
            if jsonl:
                if head.startswith(b"["):  # one JSON array of objects instead of JSON lines
                    try:
                        records, where = enumerate(json.load(f), 1), "record"
                    except ValueError as e:
                        raise DataToolError(f"{name} is not valid JSON ({e})") from e
                else:
                    records, where = ((n, _json_line(name, n, t)) for n, t in enumerate(f, 1) if t.strip()), "line"
                checked = False
                for n, record in records:
                    if not isinstance(record, dict):
                        raise DataToolError(f"{name} {where} {n} is a JSON {type(record).__name__}, not an object "
                                            f"with {path_column!r} and {caption_column!r} fields")
                    if not checked:
                        _check_columns(name, list(record), path_column, caption_column, "fields")
                        checked = True
                    yield n, record
                if not checked:
                    raise DataToolError(f"captions file {path} holds no JSON records")
            else:
                reader = csv.DictReader(f, delimiter="\t" if lower.endswith(".tsv") else ",")
                if reader.fieldnames is None:
                    raise DataToolError(f"captions file {path} is empty; it needs a header row with "
                                        f"{path_column!r} and {caption_column!r} columns")
                _check_columns(name, [c for c in reader.fieldnames], path_column, caption_column, "columns")
                for record in reader:
                    yield reader.line_num, record

    def lookup(self, rel: str, same_name_count: int):
        """(caption, caption_problem, extra fields) for the image at `rel`."""
        row = self.by_rel.get(rel)
        if row is None:
            base = rel.rsplit("/", 1)[-1]
            rows = self.by_name.get(base, [])
            if not rows:
                return None, f"missing caption (no row of {self.name} names this image)", {}
            if same_name_count > 1:
                return None, (f"missing caption (ambiguous: {self.name} gives only the file name {base!r}, which "
                              f"{same_name_count} images share; give paths relative to SRC)"), {}
            row = rows[0]
        self.matched.add(id(row))
        where = f"{self.name} line {row.line}"
        caption, problem = _caption_from_text(row.caption, where, f"{where} has no {self.caption_column!r} value")
        return caption, problem, row.extra

    def matches(self, rel: str) -> bool:
        return rel in self.by_rel or rel.rsplit("/", 1)[-1] in self.by_name

    @property
    def num_matched(self) -> int:
        return len(self.matched)

    def unmatched_examples(self, n: int = 5) -> list[str]:
        return [rel for rel, row in self.by_rel.items() if id(row) not in self.matched][:n]


def _json_line(name: str, n: int, text: str):
    try:
        return json.loads(text)
    except ValueError as e:
        raise DataToolError(f"{name} line {n} is not valid JSON ({e}); fix that line (JSONL needs one JSON object "
                            "per line)") from e


def _check_columns(name: str, found: list[str], path_column: str, caption_column: str, what: str) -> None:
    missing = [c for c in (path_column, caption_column) if c not in found]
    if missing:
        flags = {path_column: "--path-column", caption_column: "--caption-column"}
        raise DataToolError(f"captions file {name} has no {' or '.join(repr(c) for c in missing)} {what[:-1]}; its "
                            f"{what}: {', '.join(repr(c) for c in found) or '(none)'}. Name the right ones with "
                            + " and ".join(flags[c] for c in missing))


def _caption_from_filename(rel: str):
    stem = os.path.splitext(rel.rsplit("/", 1)[-1])[0]
    return _caption_from_text(re.sub(r"\s+", " ", re.sub(r"[_-]", " ", stem)).strip() or None, "the file name",
                              "the file name has no words")


def _read_sidecar_caption(path: str):
    try:
        with open(path, "rb") as f:
            return decode_caption(f.read()), None
    except OSError as e:
        return None, f"caption file cannot be read ({e.strerror or e})"
    except CorruptSample as e:
        return None, str(e)


def _read_sidecar_json(path: str, source: str, notes: Tally) -> dict:
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        notes.add(source, f"sidecar json not readable ({type(e).__name__}: {e})")
        return {}
    if not isinstance(meta, dict):
        notes.add(source, f"sidecar json is a {type(meta).__name__}, not an object")
        return {}
    return meta


def _folder_candidates(src, images, names_by_dir, captions, table, classes, notes):
    basename_counts = Counter(r.rsplit("/", 1)[-1] for r in images) if table is not None else None
    label_ids = {c: i for i, c in enumerate(classes)} if classes else None
    for rel in images:
        c = _Candidate(source=_clean(rel), ext=os.path.splitext(rel)[1][1:].lower(),
                       path=os.path.join(src, *rel.split("/")))
        meta = {}
        if captions == "sidecar":
            side_json = _sidecar(names_by_dir, rel, ".json")
            if side_json:  # img2dataset "files" output: url, caption, status, width, ...
                meta.update(_read_sidecar_json(os.path.join(src, side_json), c.source, notes))
            side_txt = _sidecar(names_by_dir, rel, ".txt")
            if side_txt:
                c.caption, c.caption_problem = _read_sidecar_caption(os.path.join(src, side_txt))
            else:
                stem = os.path.splitext(rel.rsplit("/", 1)[-1])[0]
                c.caption_problem = f"missing caption (no {stem}.txt next to the image)"
        elif captions == "file":
            c.caption, c.caption_problem, extra = table.lookup(rel, basename_counts[rel.rsplit("/", 1)[-1]])
            meta.update(extra)
        elif captions == "filename":
            c.caption, c.caption_problem = _caption_from_filename(rel)
        meta["source"] = c.source
        if label_ids is not None:
            label = rel.split("/", 1)[0]
            meta["label"], meta["label_id"] = _clean(label), label_ids[label]
        c.meta = meta
        yield c


def _iter_tar_samples(path: str):
    """(key, {ext: bytes}) per sample of a (possibly compressed: gzip, bzip2, xz) tar (index.iter_tar_samples)."""
    with open(path, "rb") as f:
        if f.read(4) == _ZSTD_MAGIC:
            raise tarfile.ReadError("zstd-compressed, which Python's tarfile cannot read: decompress it first "
                                    "(zstd -d)")
    for key, members in iter_tar_samples(path, mode="r|*"):
        yield key, {ext: data for ext, (_, data) in members.items()}


def _webdataset_candidates(src: str, tars: list[str], skipped: Tally, notes: Tally):
    for tar in tars:
        name = os.path.relpath(tar, src).replace(os.sep, "/") if os.path.isdir(src) else os.path.basename(tar)
        n = 0
        try:
            for key, members in _iter_tar_samples(tar):
                n += 1
                source = f"{name}:{_clean(key)}"
                c = _Candidate(source=source)
                c.ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
                if c.ext is None:
                    found = ", ".join("." + e for e in members) or "nothing"
                    c.problem = f"no image (.jpg/.jpeg/.png/.webp); found: {found}"
                    yield c
                    continue
                c.data = members[c.ext]
                if "txt" in members:
                    try:
                        c.caption = decode_caption(members["txt"])
                    except CorruptSample as e:
                        c.caption_problem = str(e)
                else:
                    c.caption_problem = "missing caption (.txt)"
                if "json" in members:
                    try:
                        meta = json.loads(members["json"].decode("utf-8"))
                        if not isinstance(meta, dict):
                            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
                        c.meta = meta
                    except ValueError as e:
                        notes.add(source, f"sample json not readable ({type(e).__name__}: {e})")
                c.meta["source"] = source
                c.extra = [(e, data) for e, data in members.items() if e not in (c.ext, "txt", "json")]
                yield c
        except (tarfile.TarError, EOFError, OSError) as e:
            skipped.add(name, f"shard not readable (after {n} samples; {type(e).__name__}: {e}); the rest of this "
                              "shard is lost")


# ----------------------------------------------------------------------------------------------------------------
# The command


def _detect_format(src: str, fmt: str, out_real: str):
    """('folder' | 'webdataset', tar list). DataToolError when SRC holds neither images nor shards."""
    if os.path.isfile(src):
        if src.endswith(SOURCE_TAR_SUFFIXES):
            return "webdataset", [src]
        raise DataToolError(f"SRC {src!r} is a file; give a folder of images or of .tar shards (img2dataset output)")
    tars = sorted(os.path.join(src, f) for f in os.listdir(src)
                  if f.endswith(SOURCE_TAR_SUFFIXES) and not f.startswith(".") and os.path.isfile(os.path.join(src, f)))
    if fmt == "webdataset":
        if not tars:
            raise DataToolError(f"--format webdataset, but {src!r} holds no .tar shards")
        return "webdataset", tars
    if fmt == "folder":
        return "folder", []
    if tars:
        has_images = any(_is_image(f) for root, _, files in os.walk(src) if os.path.realpath(root) != out_real
                         for f in files)
        if has_images:
            raise DataToolError(f"{src!r} holds both .tar shards and image files; say which to ingest with --format "
                                "webdataset or --format folder")
        return "webdataset", tars
    return "folder", []


def _prepare_output(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataToolError(f"--out {out_dir!r} exists and is not a folder")
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    existing = sorted(f for f in names if f.endswith(".tar") and not atomic.is_temp_name(f))
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise DataToolError(f"{out_dir!r} already holds {len(existing)} shard(s) ({shown}); pass --overwrite to "
                            "replace them (every .tar, .idx, .idx.json and manifest.json in it is deleted), or pick "
                            "another --out")


def _clear_output(out_dir: str) -> None:
    """--overwrite: remove what a previous ingest (or any shard writer) left at the top of out_dir."""
    for f in os.listdir(out_dir):
        if (f == "manifest.json" or f.endswith((".tar", ".idx", ".idx.json"))) and not atomic.is_temp_name(f):
            os.remove(os.path.join(out_dir, f))


@dataclass
class _Options:
    """ingest's arguments; _check_options resolves captions_from ("file" when a captions file is given)."""

    src: str
    out_dir: str
    captions_file: str | None
    path_column: str
    caption_column: str
    captions_from: str
    labels: str
    fmt: str
    require_captions: bool
    samples_per_shard: int
    workers: int
    shuffle: bool
    seed: int
    overwrite: bool
    progress: bool


def _check_options(o: _Options) -> None:
    """DataToolError, before anything is read or written, for options that contradict each other or the disk."""
    if o.captions_from not in CAPTION_SOURCES:
        raise DataToolError(f"captions_from must be one of {', '.join(CAPTION_SOURCES)}, got {o.captions_from!r}")
    if o.labels not in LABEL_MODES or o.fmt not in FORMATS:
        raise DataToolError(f"labels must be one of {LABEL_MODES} and format one of {FORMATS}")
    if o.samples_per_shard < 1:
        raise DataToolError(f"--samples-per-shard must be >= 1, got {o.samples_per_shard}")
    if o.captions_file is not None:
        if o.captions_from not in ("auto", "file"):
            raise DataToolError(f"--captions FILE and --captions-from {o.captions_from} contradict each other; drop "
                                "one")
        o.captions_from = "file"
        o.captions_file = os.fspath(o.captions_file)
        if not os.path.isfile(o.captions_file):
            raise DataToolError(f"captions file {o.captions_file!r} does not exist")
    elif o.captions_from == "file":
        raise DataToolError("--captions-from file needs --captions FILE (a CSV with a header, or JSONL)")
    if o.captions_from == "none" and o.require_captions:
        raise DataToolError("--require-captions with --captions-from none would skip every image")
    if not os.path.exists(o.src):
        raise DataToolError(f"SRC {o.src!r} does not exist")
    src_real, out_real = os.path.realpath(o.src), os.path.realpath(o.out_dir)
    if src_real == out_real or (os.path.isfile(o.src) and os.path.dirname(src_real) == out_real):
        raise DataToolError(f"--out {o.out_dir!r} is SRC itself; write the shards to another folder")
    _prepare_output(o.out_dir, o.overwrite)


@dataclass
class _Source:
    """What ingest reads: the candidates in write order, and what manifest.json says about them."""

    candidates: object
    """Iterator of _Candidate."""
    total: int | None
    """How many candidates (None: unknown until read, for the progress bar)."""
    manifest: dict
    classes: list | None = None
    table: _CaptionTable | None = None
    other: Counter = field(default_factory=Counter)
    """Extensions of the files in SRC that are not ingested."""


def _open_source(o: _Options, skipped: Tally, notes: Tally) -> _Source:
    """The candidates of SRC (a folder or webdataset shards); DataToolError when SRC cannot be ingested as asked.
    Resolves o.captions_from ("auto" -> what the folder has)."""
    fmt, tars = _detect_format(o.src, o.fmt, os.path.realpath(o.out_dir))
    # "fastenc.data.ingest": the manifest format's name, as earlier versions wrote it (readers may check it)
    manifest = {"generator": "fastenc.data.ingest", "version": MANIFEST_VERSION, "source": os.path.abspath(o.src),
                "format": fmt}
    source = _folder_source(o, manifest, notes) if fmt == "folder" else _webdataset_source(o, tars, manifest,
                                                                                           skipped, notes)
    if o.captions_from == "none":
        source.candidates = (_drop_caption(c) for c in source.candidates)
    return source


def _folder_source(o: _Options, manifest: dict, notes: Tally) -> _Source:
    src_real = os.path.realpath(o.src)
    images, names_by_dir = _walk_folder(o.src, {os.path.realpath(o.out_dir)})
    if not images:
        raise DataToolError(f"{o.src!r} holds no images ({', '.join('.' + e for e in IMAGE_EXTENSIONS)}, searched "
                            "recursively) and no .tar shards")
    if o.captions_from == "auto":
        o.captions_from = "sidecar" if any(_sidecar(names_by_dir, r, ".txt") for r in images) else "none"
    table = None
    if o.captions_from == "file":
        table = _CaptionTable(o.captions_file, o.src, o.path_column, o.caption_column)
    classes = _class_labels(images, names_by_dir, o.labels)
    exclude = set()
    if o.captions_file is not None and os.path.realpath(o.captions_file).startswith(src_real + os.sep):
        exclude.add(os.path.relpath(os.path.realpath(o.captions_file), src_real).replace(os.sep, "/"))
    other = _other_files(images, names_by_dir, exclude)
    if table is not None:
        # Match every image before writing anything: a wrong --path-column should fail fast, not after hours.
        if not any(table.matches(r) for r in images):
            first = next(iter(table.by_rel), None)
            raise DataToolError(f"no row of {table.name} names an image under {o.src!r} ({table.num_rows} rows; "
                                f"first {o.path_column!r} value: {first!r}; first image: {images[0]!r}). "
                                "--path-column values must be paths relative to SRC, or bare file names")
    if o.shuffle:
        random.Random(o.seed).shuffle(images)
    candidates = _folder_candidates(o.src, images, names_by_dir, o.captions_from, table, classes, notes)
    manifest.update(captions=o.captions_from, shuffled=o.shuffle, seed=o.seed if o.shuffle else None)
    if table is not None:
        manifest.update(captions_file=os.path.abspath(o.captions_file), path_column=o.path_column,
                        caption_column=o.caption_column)
    return _Source(candidates, len(images), manifest, classes, table, other)


def _webdataset_source(o: _Options, tars: list[str], manifest: dict, skipped: Tally, notes: Tally) -> _Source:
    if o.captions_from in ("file", "sidecar", "filename"):
        raise DataToolError(f"--captions{'' if o.captions_from == 'file' else '-from ' + o.captions_from} applies to "
                            "image folders; webdataset shards bring their own captions (.txt)")
    manifest.update(captions="webdataset" if o.captions_from == "auto" else o.captions_from,
                    source_shards=[os.path.relpath(t, o.src) if os.path.isdir(o.src) else os.path.basename(t)
                                   for t in tars])
    return _Source(_webdataset_candidates(o.src, tars, skipped, notes), None, manifest)


def _write_samples(o: _Options, source: _Source, writer: _ShardWriter, skipped: Tally, no_caption: Tally) -> int:
    """Validate every candidate and write the usable ones (with their caption, or without one unless
    require_captions); returns how many candidates were read."""
    from tqdm.auto import tqdm

    num_inputs = 0
    bar = tqdm(total=source.total, desc=f"ingest -> {o.out_dir}", unit="img", disable=not o.progress)
    try:
        for c, data, size, problem in _validated(source.candidates, o.workers):
            num_inputs += 1
            bar.update(1)
            if problem:
                skipped.add(c.source, problem)
                continue
            if c.caption is None and o.captions_from != "none":
                reason = c.caption_problem or "missing caption"
                if o.require_captions:
                    skipped.add(c.source, f"{reason} (--require-captions)")
                    continue
                no_caption.add(c.source, reason)
            meta = dict(c.meta)
            meta["width"], meta["height"] = size
            writer.add(c.ext, data, c.caption, meta, c.extra)
        writer.close()
    except BaseException as e:
        writer.abort(e)
        raise
    finally:
        bar.close()
    return num_inputs


def _finish_manifest(o: _Options, source: _Source, writer: _ShardWriter, num_inputs: int, skipped: Tally,
                     no_caption: Tally, notes: Tally, max_listed: int) -> dict:
    """manifest.json's content: the source's fields, then the counts, then the long lists."""
    manifest, table = source.manifest, source.table
    manifest.update({
        "num_inputs": num_inputs,
        "num_samples": writer.num_samples,
        "num_captioned": writer.num_captioned,
        "num_shards": len(writer.shards),
        "samples_per_shard": o.samples_per_shard,
        "total_bytes": sum(os.path.getsize(os.path.join(o.out_dir, s)) for s in writer.shards),
        "require_captions": o.require_captions,
        "num_skipped": skipped.total,
        "skipped_reasons": dict(skipped.counts),
        "num_no_caption": no_caption.total,
        "no_caption_reasons": dict(no_caption.counts),
    })
    if source.classes is not None:
        manifest.update(labels="folder", num_classes=len(source.classes), classes=source.classes)
    if source.other:
        manifest["ignored_files"] = dict(sorted(source.other.items()))
    if table is not None:
        manifest.update(caption_rows=table.num_rows, caption_rows_matched=table.num_matched,
                        caption_rows_unmatched=len(table.by_rel) - table.num_matched,
                        caption_rows_unmatched_examples=table.unmatched_examples(),
                        caption_rows_duplicate=table.num_duplicate, caption_rows_without_path=table.empty_paths)
    if notes.total:
        manifest.update(num_metadata_problems=notes.total, metadata_problems=notes.items)
    # The long lists last, so the summary fields above are what one sees first.
    manifest.update(shards=writer.shards, lists_capped_at=max_listed, skipped=skipped.items,
                    no_caption=no_caption.items)
    return manifest


def ingest(src, out_dir, *, captions_file=None, path_column: str = "file", caption_column: str = "caption",
           captions_from: str = "auto", labels: str = "auto", fmt: str = "auto", require_captions: bool = False,
           samples_per_shard: int = 1000, workers: int = 0, shuffle: bool = True, seed: int = 0,
           overwrite: bool = False, progress: bool = True, max_listed: int = 10_000) -> dict:
    """Write validated shards, their DALI indexes and manifest.json from an image folder or img2dataset output.

    See the module docstring for the sources and the output. shuffle: write a folder's images in a seeded random
    order (class folders would otherwise give class-sorted shards, which a shuffle buffer cannot mix); webdataset
    sources keep their order. Raises DataToolError on unusable input or options (nothing is written then).
    Returns the manifest.
    """
    o = _Options(os.fspath(src), os.fspath(out_dir), captions_file, path_column, caption_column, captions_from,
                 labels, fmt, require_captions, samples_per_shard, workers, shuffle, seed, overwrite, progress)
    _check_options(o)
    skipped, no_caption, notes = Tally(max_listed), Tally(max_listed), Tally(max_listed)
    source = _open_source(o, skipped, notes)
    os.makedirs(o.out_dir, exist_ok=True)
    remove_temp_files(o.out_dir)  # what a killed ingest left
    if overwrite:
        _clear_output(o.out_dir)
    writer = _ShardWriter(o.out_dir, samples_per_shard)
    num_inputs = _write_samples(o, source, writer, skipped, no_caption)
    manifest = _finish_manifest(o, source, writer, num_inputs, skipped, no_caption, notes, max_listed)
    atomic.write_json(os.path.join(o.out_dir, "manifest.json"), manifest, ensure_ascii=False)
    log.info("ingested %d of %d samples from %s into %d shards in %s (%d skipped, %d without caption)",
             writer.num_samples, num_inputs, o.src, len(writer.shards), o.out_dir, skipped.total, no_caption.total)
    return manifest


def _drop_caption(c: _Candidate) -> _Candidate:
    c.caption = c.caption_problem = None
    return c


def _reasons(counts: dict) -> str:
    return ", ".join(f"{n} {r}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def format_summary(manifest: dict, out_dir: str) -> str:
    """The one-paragraph summary `fastenc data ingest` prints."""
    m = manifest
    kind = "image folder" if m["format"] == "folder" else f"{len(m.get('source_shards', []))} webdataset shard(s)"
    captions = {"sidecar": "sidecar .txt files", "file": f"{os.path.basename(m.get('captions_file', ''))}",
                "filename": "file names", "none": "none (image-only)", "webdataset": "the shards' .txt"}
    parts = [f"Ingested {m['num_samples']:,} of {m['num_inputs']:,} sample(s) from the {kind} {m['source']} into "
             f"{m['num_shards']} shard(s) ({_size(m['total_bytes'])}) in {out_dir}, with DALI indexes; captions from "
             f"{captions.get(m['captions'], m['captions'])}: {m['num_captioned']:,} captioned."]
    if m["num_no_caption"]:
        parts.append(f"{m['num_no_caption']:,} kept without caption ({_reasons(m['no_caption_reasons'])}).")
    if m["num_skipped"]:
        parts.append(f"Skipped {m['num_skipped']:,} ({_reasons(m['skipped_reasons'])}).")
    if m.get("classes"):
        shown = ", ".join(m["classes"][:5]) + (", ..." if len(m["classes"]) > 5 else "")
        parts.append(f"{m['num_classes']} classes from the folder names ({shown}) recorded as label/label_id.")
    if m.get("caption_rows_unmatched"):
        parts.append(f"{m['caption_rows_unmatched']:,} row(s) of the captions file name no image "
                     f"(e.g. {', '.join(m['caption_rows_unmatched_examples'][:3])}).")
    if m.get("num_metadata_problems"):
        parts.append(f"{m['num_metadata_problems']:,} sample(s) had unreadable json metadata (kept without it).")
    if m.get("ignored_files"):
        parts.append("Not ingested: " + ", ".join(f"{n} .{e}" if not e.startswith("(") else f"{n} {e}"
                                                  for e, n in m["ignored_files"].items()) + " file(s).")
    parts.append(f"Details: {os.path.join(out_dir, 'manifest.json')}")
    return " ".join(parts)


__all__ = ["DataToolError", "Tally", "format_summary", "ingest"]
