"""Shard lists: turn what a user writes (brace pattern, directory, glob, comma list) into a checked list of tars.

Remote specs (`pipe:...`, `s3://...`, `https://...`) are brace-expanded and passed through unchecked: webdataset
opens them, and the loader counts a shard it cannot read instead of stopping.
"""

from __future__ import annotations

import glob
import os
import tarfile
import warnings

from fastenc.utils.optional import require

# Compressed tars that webdataset opens with tarfile's "r|*": accept them on their magic number.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


def _split_top_level(spec: str) -> list[str]:
    """Split on ',' and webdataset's '::' outside braces, so "a-{0,1}.tar,b.tar" gives two parts."""
    parts, depth, current = [], 0, []
    for ch in spec.replace("::", ","):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _is_remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def _hint(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    folder = path if os.path.isdir(path) or "." not in name else (os.path.dirname(path) or ".")
    if "synth" in os.path.basename(os.path.normpath(folder)):
        return f" Create the synthetic demo shards with `fastenc data synth --out {folder}`."
    return (" Shards are webdataset .tar files (as written by img2dataset); for a demo set run "
            "`fastenc data synth --out data/synth`.")


def _expand_one(part: str) -> list[str]:
    braceexpand = require("braceexpand", "shard patterns").braceexpand
    if _is_remote(part):
        return list(braceexpand(part))
    path = os.path.expanduser(part)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
        if not found:
            raise FileNotFoundError(f"shard directory {path!r} contains no .tar files.{_hint(path)}")
        return found
    if "{" in path:
        expected = list(braceexpand(path))
        missing = [p for p in expected if not os.path.exists(p)]
        if len(missing) == len(expected):
            raise FileNotFoundError(f"no shard matches {part!r}: all {len(expected)} expanded paths are missing "
                                    f"(first: {expected[0]!r}).{_hint(expected[0])}")
        if missing:
            shown = ", ".join(repr(p) for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise FileNotFoundError(f"{len(missing)} of {len(expected)} shards of {part!r} are missing: {shown}. "
                                    "Fix the pattern's range or regenerate the missing shards.")
        return expected
    if glob.has_magic(path):
        found = sorted(glob.glob(path))
        if not found:
            raise FileNotFoundError(f"no file matches the glob {part!r}.{_hint(path)}")
        return found
    if not os.path.exists(path):
        raise FileNotFoundError(f"shard {part!r} does not exist.{_hint(path)}")
    return [path]


def _shard_problem(path: str) -> str | None:
    """Why a local shard cannot be read (cheap: stat + first 512-byte header), or None if it looks fine."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "is empty (0 bytes; an interrupted download or write?)"
        with open(path, "rb") as f:
            head = f.read(tarfile.BLOCKSIZE)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if head.startswith(_COMPRESSED_MAGIC):
        return None
    try:
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as e:
        return f"is not a tar file ({e})"
    return None


def expand_shards(spec, *, check: bool = True) -> list[str]:
    """Expand a shard spec into a list of tar paths.

    spec: a brace pattern ("data/shard-{00000..00009}.tar"), a directory (its *.tar, sorted), a glob, a
    comma-separated list of those, or a list of any of them. Raises FileNotFoundError naming what is missing.
    With `check`, local shards that are empty, unreadable or not tar files are dropped with a warning (the rest of
    the set still trains); if none is left, raises ValueError.
    """
    if isinstance(spec, (str, os.PathLike)):
        parts = _split_top_level(os.fspath(spec))
    elif isinstance(spec, (list, tuple)):
        parts = [p for item in spec for p in _split_top_level(os.fspath(item))]
    else:
        raise TypeError(f"shard spec must be a string, path or list of them, got {type(spec).__name__}")
    if not parts:
        raise FileNotFoundError("the shard spec is empty: give a directory, brace pattern, glob or list of .tar files")
    paths = [p for part in parts for p in _expand_one(part)]
    if not check:
        return paths
    good, bad, truncated = [], [], []
    for p in paths:
        problem = None if _is_remote(p) else _shard_problem(p)
        if problem:
            bad.append(f"{p} {problem}")
        else:
            good.append(p)
            # Tar writers emit whole 512-byte blocks; any other size means the file was cut short. tarfile reads
            # such a shard up to the cut without an error, so this is the only place it can be noticed.
            if not _is_remote(p) and p.endswith(".tar") and os.path.getsize(p) % tarfile.BLOCKSIZE:
                truncated.append(p)
    if truncated:
        shown = ", ".join(truncated[:5]) + (" ..." if len(truncated) > 5 else "")
        warnings.warn(f"{len(truncated)} shard(s) look truncated (size not a multiple of 512 bytes): {shown}; "
                      "their last samples will be missing", stacklevel=2)
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
        if not good:
            raise ValueError(f"none of the {len(paths)} shards can be read: {shown}")
        warnings.warn(f"skipping {len(bad)} of {len(paths)} shards: {shown}", stacklevel=2)
    return good


def tar_samples(src, *, handler, on_shard=None, select_files=None):
    """webdataset's tarfile_to_samples (open, expand, group by key) that closes each shard's file when done.

    src yields dict(url=...); `handler(exn) -> bool` is webdataset's error handler (True: skip and go on);
    `on_shard(url)` is called as each shard starts, so a handler can tell which shard failed.
    """
    tariterators = require("webdataset", "reading shards").tariterators

    def tracked(items):
        item = None
        try:
            for item in items:
                if on_shard is not None:
                    on_shard(item.get("url"))
                yield item  # url_opener adds item["stream"]; we get control back once the shard is consumed
                _close(item)
        finally:
            if item is not None:
                _close(item)

    streams = tariterators.url_opener(tracked(src), handler=handler)
    files = tariterators.tar_file_expander(streams, handler=handler, select_files=select_files)
    return tariterators.group_by_keys(files, handler=handler)


def _close(item: dict) -> None:
    stream = item.pop("stream", None)
    if stream is not None:
        stream.close()
