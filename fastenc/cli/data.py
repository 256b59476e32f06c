"""`fastenc data synth|ingest|index|inspect` and `fastenc tokenizer train`: the dataset tools."""

from __future__ import annotations

import argparse
import sys

INGEST_HELP = """\
Write validated webdataset shards (DIR/shard-00000.tar ...), their DALI indexes and DIR/manifest.json from SRC:
  an image folder     .jpg/.jpeg/.png/.webp, searched recursively; captions from --captions FILE (CSV with a
                      header, or JSONL), from sidecar NAME.txt files (img2dataset's "files" output; NAME.json is
                      merged into the sample json), from the file names, or none. Images all in first-level
                      subfolders (ImageNet's class folders) get label / label_id in their json.
  img2dataset output  a folder of webdataset .tar shards (its .parquet and _stats.json files are ignored); the
                      usable samples are re-sharded with their json fields and captions.
Every image is fully decoded once and written with its original bytes. Undecodable images are skipped; images
without a usable caption are kept without .txt (image-only objectives use them) unless --require-captions.
Everything left out is counted by reason in manifest.json.
"""

INDEX_HELP = """\
Build the DALI index files (NAME.idx, DALI's wds2idx format) and their reports (NAME.idx.json) for the shards
that lack a current one: this command plays the role of DALI's wds2idx, and validates each sample on the way
(undecodable images are left out of the index, bad captions out of image-text epochs). Exit 0 if every shard could
be read, 1 otherwise.
"""

INSPECT_HELP = ("Read the shards once and write DIR/inspect.json, DIR/contact_sheet.png (a seeded random sample of "
                "images with captions) and DIR/caption_lengths.png. Exit 1 if a shard could not be read.")

# Literal choices (= fastenc.datatools.ingest's): importing it here would load torch for every command.
CAPTION_SOURCES = ("auto", "file", "sidecar", "filename", "none")
LABEL_MODES, FORMATS = ("auto", "folder", "none"), ("auto", "folder", "webdataset")


def add_synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=1000)


def run_synth(args: argparse.Namespace) -> int:
    from fastenc.datatools.synth import write_synthetic_shards

    manifest = write_synthetic_shards(args.out, args.num_samples, image_size=args.image_size, seed=args.seed,
                                      samples_per_shard=args.samples_per_shard)
    print(f"wrote {manifest['num_samples']} samples in {manifest['num_shards']} shards to {args.out}")
    return 0


def add_synth_vqa_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True,
                   help="folder for images/, captions.json, instruct.json, heldout.json, benchmark.jsonl")
    p.add_argument("--num-samples", type=int, default=6000, help="training images (both stages use them)")
    p.add_argument("--num-heldout", type=int, default=300,
                   help="images no stage trains on: heldout.json and benchmark.jsonl ask about them")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mc-fraction", type=float, default=0.5,
                   help="share of stage-2 questions asked as multiple choice (the benchmark's prompt, a letter)")
    p.add_argument("--text-fraction", type=float, default=0.0,
                   help="chance that a training image also gets a text-only stage-2 record: its attributes in words, "
                        "then multiple-choice questions on them (letter binding practice for the LM)")


def run_synth_vqa(args: argparse.Namespace) -> int:
    from fastenc.datatools.synth_vqa import write_synthetic_vqa

    paths = write_synthetic_vqa(args.out, args.num_samples, num_heldout=args.num_heldout,
                                image_size=args.image_size, seed=args.seed, mc_fraction=args.mc_fraction,
                                text_fraction=args.text_fraction)
    print(f"wrote {args.num_samples} + {args.num_heldout} images to {args.out}/images and " + ", ".join(paths.values()))
    return 0


def add_ingest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="image folder, or folder of webdataset .tar shards")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for shards, indexes, manifest.json")
    p.add_argument("--captions", metavar="FILE", default=None,
                   help="CSV (with a header) or JSONL file with one row per image")
    p.add_argument("--path-column", default="file",
                   help="captions file column with the image path relative to SRC, or its file name (default: file)")
    p.add_argument("--caption-column", default="caption", help="captions file column with the caption "
                   "(default: caption)")
    p.add_argument("--captions-from", choices=CAPTION_SOURCES, default="auto",
                   help="image folders: where captions come from; auto = the --captions file if given, else "
                   "sidecar .txt files if any image has one, else none (image-only)")
    p.add_argument("--labels", choices=LABEL_MODES, default="auto",
                   help="record class labels from first-level folder names; auto = when every image sits in a "
                   "first-level folder and there are at least 2 (not img2dataset's numbered folders)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="auto",
                   help="what SRC holds (auto: .tar shards -> webdataset, else folder)")
    p.add_argument("--require-captions", action="store_true",
                   help="skip images without a usable caption (default: keep them without .txt)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="(default: 1000)")
    p.add_argument("--workers", type=int, default=0,
                   help="with N > 1, decode images in N processes (default: in this one)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="keep a folder's sorted order (default: a seeded shuffle, so class folders mix in shards)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folder shuffle")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards, indexes and manifest.json already in DIR")


def run_ingest(args: argparse.Namespace) -> int:
    """Exit 0 when samples were written, 1 when none was usable, 2 on bad input."""
    from fastenc.datatools import DataToolError
    from fastenc.datatools.ingest import format_summary, ingest

    try:
        manifest = ingest(args.src, args.out, captions_file=args.captions, path_column=args.path_column,
                          caption_column=args.caption_column, captions_from=args.captions_from,
                          labels=args.labels, fmt=args.fmt, require_captions=args.require_captions,
                          samples_per_shard=args.samples_per_shard, workers=args.workers, shuffle=args.shuffle,
                          seed=args.seed, overwrite=args.overwrite)
    except DataToolError as e:
        print(f"fastenc data ingest: {e}", file=sys.stderr)
        return 2
    print(format_summary(manifest, args.out))
    return 0 if manifest["num_samples"] else 1


def add_index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", metavar="SHARDS", help="shard dir, brace pattern, glob or comma-separated list")
    p.add_argument("--index-dir", default=None, help="write the indexes here (default: next to each shard)")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="check only image signatures and JPEG end markers instead of decoding every image")
    p.add_argument("--force", action="store_true", help="rebuild every index, even current ones")
    p.add_argument("--workers", type=int, default=0, help="with N > 1, index shards in N processes")


def run_index(args: argparse.Namespace) -> int:
    """Exit 0 if every shard could be read, 1 otherwise, 2 on bad input."""
    from fastenc.data.index import ensure_indexes, index_path_for, read_report
    from fastenc.data.shards import expand_shards

    try:
        shards = expand_shards(args.shards, check=False)  # unreadable shards are reported below, not dropped
    except FileNotFoundError as e:
        print(f"fastenc data index: {e}", file=sys.stderr)
        return 2
    remote = [s for s in shards if "://" in s or s.startswith("pipe:")]
    if remote:
        print(f"fastenc data index: DALI reads local shards only, and so does indexing; got {remote[0]!r}. Copy the "
              "shards to a local or mounted file system first.", file=sys.stderr)
        return 2
    current = 0
    if not args.force:
        for s in shards:
            rep = read_report(s, index_path_for(s, args.index_dir))
            current += rep is not None and (rep.validated or not args.validate)
    reports, failed = ensure_indexes(shards, index_dir=args.index_dir, validate=args.validate, force=args.force,
                                     workers=args.workers)
    _print_index_summary(shards, current, reports, failed, args.validate)
    return 1 if failed else 0


def _print_index_summary(shards: list[str], current: int, reports, failed, validate: bool) -> None:
    from fastenc.data.index import summarize

    summ = summarize(reports, failed)

    def reasons(counts):
        return ", ".join(f"{n} {r}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))

    built = len(shards) - current
    print(f"{len(shards)} shard(s): {built} indexed{' with validation' if validate else ' (quick checks)'}, "
          f"{current} already current. {summ['num_samples']:,} usable sample(s), {summ['num_captioned']:,} with "
          "a caption.")
    if summ["num_excluded"]:
        print(f"excluded {summ['num_excluded']:,} sample(s) (not in the index): {reasons(summ['excluded_reasons'])}")
    if summ["num_no_caption"]:
        print(f"kept {summ['num_no_caption']:,} sample(s) without caption (left out of image-text epochs): "
              f"{reasons(summ['no_caption_reasons'])}")
    empty = [r.shard for r in reports if r.empty and not r.error]
    if empty:
        print(f"{len(empty)} empty shard(s) (no usable sample; the loaders skip them): {', '.join(empty[:5])}"
              + (" ..." if len(empty) > 5 else ""))
    for shard, why in failed:
        print(f"could not read {shard}: {why}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(shards)} shard(s) could not be read; their indexes are empty (the loaders skip "
              "them, and say why) until the shard files change", file=sys.stderr)


def add_inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", metavar="SHARDS", help="shard dir, brace pattern, glob or comma-separated list")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--num-samples", type=int, default=32, help="images on the contact sheet (default: 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index-dir", default=None, help="where the index reports are (default: next to the shards)")


def run_inspect(args: argparse.Namespace) -> int:
    """Exit 0 if every shard could be read, 1 otherwise, 2 on bad input."""
    from fastenc.datatools import DataToolError
    from fastenc.datatools.inspect import format_summary, inspect_shards

    try:
        result = inspect_shards(args.shards, args.out, num_samples=args.num_samples, seed=args.seed,
                                index_dir=args.index_dir)
    except DataToolError as e:
        print(f"fastenc data inspect: {e}", file=sys.stderr)
        return 2
    print(format_summary(result))
    return 1 if result["num_unreadable_shards"] else 0


def add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="shard dir, brace pattern, glob or list")
    p.add_argument("--out", required=True, help="model prefix: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--max-sentences", type=int, default=1_000_000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="sentencepiece model type")


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from fastenc.data.tokenizer import train_tokenizer

    path = train_tokenizer(args.shards, args.out, vocab_size=args.vocab_size, max_sentences=args.max_sentences,
                           model_type=args.model_type)
    print(f"wrote {path}")
    return 0
