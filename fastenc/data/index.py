"""DALI index files for webdataset shards, written while validating every sample.

fn.readers.webdataset reads a shard at random offsets through an index file: one line per sample listing each
component's extension, byte offset, size and member name (the "v1.2" format that DALI's wds2idx writes). fastenc
writes that format itself (wds2idx only lists the tar) because it validates each sample on the way:

    image      the first of .jpg/.jpeg/.png/.webp must fully decode (Pillow, truncation is an error); a sample
               whose image fails is left out of the index ("excluded"), so DALI never sees it. DALI cannot skip a
               sample it fails to decode: the whole batch fails and the pipeline must be rebuilt
               (fastenc.data.dali handles that too, as a last resort).
    caption    .txt must be non-empty strict UTF-8; a bad or missing caption keeps the sample (image-only
               objectives use it) but leaves .txt out of its index line ("no_caption"), so caption pipelines,
               which read with missing_component_behavior="skip", drop it.

Next to each index `<stem>.idx` goes a report `<stem>.idx.json`: the shard's size and mtime when indexed (a changed
shard makes the index stale), sample counts, and every excluded sample or dropped caption with its reason.
`validate=False` checks only the image's magic bytes and JPEG end marker (fast, catches non-images and most
truncations, not every corrupt stream).
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from dataclasses import asdict, dataclass, field

from fastenc.data.transforms import IMAGE_EXTENSIONS, CorruptSample, decode_caption, decode_image
from fastenc.utils import atomic

log = logging.getLogger(__name__)

INDEX_VERSION = "v1.2"  # the line format of DALI's wds2idx / fn.readers.webdataset
REPORT_VERSION = 1

_MAGIC = {  # image magic numbers for the quick (validate=False) check
    b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png", b"RIFF": "webp",
}


_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def split_name(name: str) -> tuple[str, str]:
    """Webdataset's sample grouping: key = member name up to the first dot of its basename, ext = the rest."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def index_path_for(shard: str, index_dir: str | None = None) -> str:
    """`dir/stem.tar` -> `dir/stem.idx` (wds2idx's naming), or `index_dir/stem.idx`."""
    base = os.path.basename(shard)
    stem = split_name(base)[0]
    return os.path.join(index_dir if index_dir else os.path.dirname(shard), stem + ".idx")


def report_path_for(index_path: str) -> str:
    return index_path + ".json"


@dataclass
class ShardIndex:
    """What an index holds: counts, and the samples or captions left out with their reasons."""

    shard: str
    index: str
    num_samples: int = 0
    """Samples in the index (usable images)."""
    num_captioned: int = 0
    """Of those, samples whose .txt is in the index (usable by image-text objectives)."""
    shard_bytes: int = 0
    shard_mtime: float = 0.0
    validated: bool = True
    error: str = ""
    """Why the shard could not be read at all (its index is then empty), else empty."""
    excluded: list = field(default_factory=list)
    """[{"key", "reason"}] samples left out (no usable image)."""
    no_caption: list = field(default_factory=list)
    """[{"key", "reason"}] samples kept without their caption."""

    @property
    def empty(self) -> bool:
        return self.num_samples == 0

    def to_json(self) -> dict:
        return {"version": REPORT_VERSION, **asdict(self)}


def _quick_image_check(data: bytes) -> None:
    if not data:
        raise CorruptSample("image is empty (0 bytes)")
    kind = next((k for magic, k in _MAGIC.items() if data.startswith(magic)), None)
    if kind is None:
        raise CorruptSample("not an image (no JPEG/PNG/WebP signature)")
    if kind == "jpeg" and data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        raise CorruptSample("JPEG is truncated (no end-of-image marker)")


def _check_sample(members: dict, validate: bool) -> tuple[str | None, str | None, str | None]:
    """(image ext or None, reason the image is unusable, reason the caption is unusable) for one sample."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        found = ", ".join("." + e for e in members) or "nothing"
        return None, f"no image (.jpg/.jpeg/.png/.webp); found: {found}", None
    try:
        if validate:
            decode_image(members[ext][1])
        else:
            _quick_image_check(members[ext][1])
    except CorruptSample as e:
        return None, str(e), None
    caption_problem = None
    if "txt" not in members:
        caption_problem = "missing caption (.txt)"
    else:
        try:
            decode_caption(members["txt"][1])
        except CorruptSample as e:
            caption_problem = str(e)
    return ext, None, caption_problem


def iter_tar_samples(path: str, *, mode: str = "r:", read=None):
    """(key, {ext: (TarInfo, bytes or None)}) per sample of a tar, grouping consecutive members by key as
    webdataset does; hidden members (leading '.') and members without an extension are not samples. Extensions are
    lower-cased. read(key, ext) -> bool decides which members' bytes are read (default: all); mode "r|*" streams
    compressed tars too."""
    key, members = None, {}
    with tarfile.open(path, mode) as tar:
        for info in tar:
            if not info.isreg():
                continue
            k, ext = split_name(info.name)
            if not ext or os.path.basename(k).startswith("."):
                continue
            if k != key:
                if members:
                    yield key, members
                key, members = k, {}
            ext = ext.lower()
            members[ext] = (info, tar.extractfile(info).read() if read is None or read(k, ext) else None)
    if members:
        yield key, members


def build_index(shard: str, index_path: str | None = None, *, validate: bool = True,
                assume_valid: bool = False) -> ShardIndex:
    """Validate `shard` and write its DALI index (only usable samples) and report; returns the report.

    assume_valid: the writer of the shard already decoded every image (`fastenc data ingest`, synthetic data): do
    only the quick checks, and record the index as validated. A shard that is not a readable plain tar raises
    CorruptSample with the reason; an empty shard gets an empty index (the loaders skip it and say so).
    """
    index_path = index_path or index_path_for(shard)
    stat = os.stat(shard)
    rep = ShardIndex(shard=os.path.abspath(shard), index=os.path.abspath(index_path), shard_bytes=stat.st_size,
                     shard_mtime=stat.st_mtime, validated=validate or assume_valid)
    validate = validate and not assume_valid
    lines = []
    with open(shard, "rb") as f:
        if f.read(6).startswith(_COMPRESSED):
            raise CorruptSample(f"shard {shard} is compressed: DALI reads plain tars at byte offsets. Decompress it "
                                "(gunzip/zstd -d), re-ingest it with `fastenc data ingest`, or use data.backend=torch")
    try:
        for key, members in iter_tar_samples(shard):  # plain tar: DALI reads at raw byte offsets
            ext, image_problem, caption_problem = _check_sample(members, validate)
            if image_problem:
                rep.excluded.append({"key": key, "reason": image_problem})
                continue
            parts = []
            for e, (info, _) in members.items():
                if e == "txt" and caption_problem:
                    continue
                parts.append(f"{e} {info.offset_data} {info.size} {info.name}")
            if any(" " in info.name for info, _ in members.values()):
                rep.excluded.append({"key": key, "reason": "member name contains a space (the DALI index format "
                                                         "cannot hold it)"})
                continue
            lines.append(" ".join(parts))
            rep.num_samples += 1
            if caption_problem:
                rep.no_caption.append({"key": key, "reason": caption_problem})
            else:
                rep.num_captioned += 1
    except (tarfile.TarError, EOFError, OSError) as e:
        if not lines and not rep.excluded and stat.st_size == 0:
            pass  # a 0-byte file: an empty shard, not a broken one
        else:
            raise CorruptSample(f"shard {shard} is not a readable tar ({type(e).__name__}: {e}); re-create it, or "
                                "remove it from the shard list") from e
    _write_index(index_path, lines, rep)
    return rep


def _write_index(index_path: str, lines: list[str], rep: ShardIndex) -> None:
    """The index (DALI's wds2idx format: a header, then one line per sample) and its report, each atomically."""
    atomic.write_text(index_path, f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines))
    atomic.write_json(report_path_for(index_path), rep.to_json())


def read_report(shard: str, index_path: str | None = None) -> ShardIndex | None:
    """The report of `shard`'s index, or None if the index or its report is missing or stale (shard changed)."""
    index_path = index_path or index_path_for(shard)
    rp = report_path_for(index_path)
    if not (os.path.isfile(index_path) and os.path.isfile(rp)):
        return None
    try:
        with open(rp) as f:
            data = json.load(f)
        data.pop("version", None)
        rep = ShardIndex(**data)
    except (OSError, ValueError, TypeError):
        return None
    stat = os.stat(shard)
    if stat.st_size != rep.shard_bytes or abs(stat.st_mtime - rep.shard_mtime) > 1e-3:
        return None
    return rep


def _build_one(args):
    shard, index_path, validate = args
    try:
        return build_index(shard, index_path, validate=validate), None
    except CorruptSample as e:
        # An empty index with the reason: loaders skip the shard (and say why) until the shard file changes.
        stat = os.stat(shard)
        rep = ShardIndex(shard=os.path.abspath(shard), index=os.path.abspath(index_path), shard_bytes=stat.st_size,
                         shard_mtime=stat.st_mtime, validated=validate, error=str(e))
        _write_index(index_path, [], rep)
        return rep, str(e)


def ensure_indexes(shards: list[str], *, index_dir: str | None = None, validate: bool = True, force: bool = False,
                   workers: int = 0, progress: bool = True) -> tuple[list[ShardIndex], list[tuple[str, str]]]:
    """Index every shard that lacks a current index (all of them with force): (reports in shard order, unreadable
    shards as (shard, reason)). An unreadable shard gets an empty index whose report holds the reason (so loaders
    skip it, and say why, until the shard changes). workers > 1 indexes shards in parallel processes."""
    todo, reports = [], {}
    for s in shards:
        ip = index_path_for(s, index_dir)
        rep = None if force else read_report(s, ip)
        if rep is not None and (rep.validated or not validate):
            reports[s] = rep
        else:
            todo.append((s, ip, validate))
    if todo:
        from tqdm import tqdm

        if workers > 1 and len(todo) > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(min(workers, len(todo))) as pool:
                results = list(tqdm(pool.imap(_build_one, todo), total=len(todo), desc="index", unit="shard",
                                    disable=not progress))
        else:
            results = [_build_one(t) for t in tqdm(todo, desc="index", unit="shard", disable=not progress)]
        for (s, _, _), (rep, err) in zip(todo, results):
            reports[s] = rep
    failed = [(s, reports[s].error) for s in shards if reports[s].error]
    return [reports[s] for s in shards], failed


def summarize(reports: list[ShardIndex], failed: list[tuple[str, str]] = ()) -> dict:
    """Totals over shard reports, with the reasons counted (for manifests, logs and `fastenc data index`)."""
    from collections import Counter

    excluded = Counter(reason_kind(e["reason"]) for r in reports for e in r.excluded)
    no_caption = Counter(reason_kind(e["reason"]) for r in reports for e in r.no_caption)
    return {
        "num_shards": len(reports),
        "num_empty_shards": sum(r.empty and not r.error for r in reports),
        "num_unreadable_shards": len(failed),
        "num_samples": sum(r.num_samples for r in reports),
        "num_captioned": sum(r.num_captioned for r in reports),
        "num_excluded": sum(len(r.excluded) for r in reports),
        "excluded_reasons": dict(excluded),
        "num_no_caption": sum(len(r.no_caption) for r in reports),
        "no_caption_reasons": dict(no_caption),
        "unreadable_shards": [{"shard": s, "reason": why} for s, why in failed],
    }


def reason_kind(reason: str) -> str:
    """A reason without its sample-specific details (for counting): text up to the first '(' or ';'."""
    for sep in (" (", ";", ":"):
        reason = reason.split(sep, 1)[0]
    return reason.strip()
