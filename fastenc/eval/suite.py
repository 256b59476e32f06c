"""`fastenc eval RUN_DIR... --suite SUITE.yaml --out DIR`: every protocol of a suite on every run, one report.

A suite (configs/cpu/eval_synth.yaml, configs/paper/eval_imagenet.yaml) names its datasets and protocols:

    name: synth
    features: {layer: -1, pool: cls}               # what "the encoder's features" are (fastenc.eval.features)
    datasets:
      train: {shards: data/synth_eval/shard-{00000..00003}.tar, labels: [category_id, color_id], captions: true}
      val:   {shards: data/synth_eval/shard-{00004..00005}.tar, labels: [category_id, color_id], captions: true}
      inet:  {folder: data/imagenet/val, classes_file: data/imagenet/classnames.txt}   # its label: "label"
    protocols:
      knn:          {train: train, test: val, labels: [category_id, color_id], k: 20, temperature: 0.07}
      linear_probe: {train: train, test: val, labels: [category_id], epochs: 50, warmup_epochs: 10, ...}
      zero_shot:    {dataset: val, label: category_id, class_names: [circle, square], templates: ["a photo of a {}."]}
      retrieval:    {dataset: val}
      pairs:        {dataset: val, a: clip, b: dino, attributes: [category_id, color_id], num_pairs: 1000000}
      loss_curves:  {}
      zero_shot.color: {dataset: val, label: color_id, class_names: [red, blue], templates: ["a {} shape"]}
      vqa:          {benchmark: data/synth_vqa/benchmark.jsonl, mode: likelihood, by: [type]}   # vision-language runs

A protocol entry named TYPE.TAG (zero_shot.color above) is another instance of protocol TYPE with its own arguments.
Sources are run dirs, encoder .safetensors files, or init:RUN_DIR (the run's weights before step 1); each may be
prefixed NAME= to name it (default: the config's run.name, or the file name). Protocols that do not apply to a run
(zero-shot and retrieval for an encoder without a text tower, pairs without both named runs, a label without
samples, vqa for a run that is not a vision-language run) are recorded as skipped with the reason, not dropped.
`vqa` scores the vision-language (llava) runs on a multiple-choice benchmark file in VMCBench's format
(fastenc.eval.vqa: .parquet, .tsv, .jsonl, .json; args benchmark, images, mode likelihood|cloze|generate or a comma
list of them, limit, by, bootstrap, seed, max_new_tokens); their encoders get the other protocols like any run's. A
protocol that fails (bad arguments, data it cannot use) is recorded with its error, the others still run, and after
report.md is written the command fails naming it. Dataset paths and benchmark files are checked before any feature is
extracted.

Features are extracted as `features:` says, unnormalized unless it sets normalize: true: the linear probe
standardizes them with train statistics (the paper's protocol), k-NN and pairs compare cosines (normalizing
themselves). Outputs: DIR/results.json (every number; NaN written as null), DIR/report.md (tables + figures),
DIR/*.png, DIR/<pairs protocol>/, DIR/<vqa protocol>/predictions-<run>.jsonl. Paths inside the suite are relative
to the directory `fastenc eval` runs from (like the recipes' data paths).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time

import yaml

from fastenc.eval.features import DatasetSpec, EvalDataError, FeatureSpec, extract
from fastenc.eval.results import display_path, finite, parse_source
from fastenc.utils import atomic

log = logging.getLogger(__name__)

PROTOCOLS = ("knn", "linear_probe", "zero_shot", "retrieval", "pairs", "loss_curves", "vqa")
_DATASET_KEYS = {"folder", "shards", "labels", "captions", "classes_file", "max_samples"}
_ARGS = {  # protocol -> (required arguments, optional ones)
    "knn": ({"train", "test"}, {"labels", "k", "temperature"}),
    "linear_probe": ({"train", "test"}, {"labels", "epochs", "warmup_epochs", "search_epochs", "batch_size",
                                         "holdout_fraction", "seed", "lrs", "wds"}),
    "zero_shot": ({"dataset"}, {"label", "class_names", "templates"}),
    "retrieval": ({"dataset"}, {"ties"}),
    "pairs": ({"dataset"}, {"a", "b", "attributes", "num_pairs", "thresholds", "seed", "max_pairs", "mode",
                            "unique", "cell", "columns"}),
    "loss_curves": (set(), {"x"}),
    "vqa": ({"benchmark"}, {"images", "mode", "limit", "by", "bootstrap", "seed", "max_new_tokens"}),
}


def resolve_suite(name: str) -> str:
    """A suite file path, or a bare name found as configs/{cpu,paper}/NAME.yaml (from here or the repository)."""
    if os.path.isfile(name):
        return name
    roots = [os.getcwd(), os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
    for root in roots:
        for scale in ("cpu", "paper"):
            path = os.path.join(root, "configs", scale, name if name.endswith(".yaml") else name + ".yaml")
            if os.path.isfile(path):
                return path
    raise EvalDataError(f"suite {name!r} not found: pass a YAML path or a name under configs/cpu or configs/paper")


def load_suite(path: str) -> dict:
    """Read and check a suite file (unknown protocols, datasets a protocol names but the suite lacks)."""
    if not os.path.isfile(path):
        raise EvalDataError(f"suite file {path!r} not found (see configs/cpu/eval_synth.yaml)")
    with open(path) as f:
        suite = yaml.safe_load(f) or {}
    unknown = set(suite) - {"name", "features", "datasets", "protocols"}
    if unknown:
        raise EvalDataError(f"{path}: unknown top-level keys {sorted(unknown)} (name, features, datasets, protocols)")
    datasets = suite.get("datasets") or {}
    for name, d in datasets.items():
        bad = set(d) - _DATASET_KEYS
        if bad:
            raise EvalDataError(f"{path}: dataset {name!r} has unknown keys {sorted(bad)} ({sorted(_DATASET_KEYS)})")
    for proto, args in (suite.get("protocols") or {}).items():
        if protocol_type(proto) not in PROTOCOLS:
            raise EvalDataError(f"{path}: unknown protocol {proto!r} (known: {', '.join(PROTOCOLS)}, each also as "
                                "TYPE.TAG for another instance)")
        required, optional = _ARGS[protocol_type(proto)]
        unknown = sorted(set(args or {}) - required - optional)
        if unknown:
            raise EvalDataError(f"{path}: protocol {proto} has unknown arguments {unknown} (it takes: "
                                f"{', '.join(sorted(required | optional))})")
        if required - set(args or {}):
            raise EvalDataError(f"{path}: protocol {proto} needs {', '.join(sorted(required - set(args or {})))}")
        for key in ("train", "test", "dataset"):
            if key in (args or {}) and args[key] not in datasets:
                raise EvalDataError(f"{path}: protocol {proto} uses dataset {args[key]!r}, which `datasets:` does "
                                    f"not define ({', '.join(datasets) or 'none'})")
    suite.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return suite


def protocol_type(name: str) -> str:
    """"zero_shot.color" -> "zero_shot": the protocol an entry of `protocols:` runs."""
    return name.split(".", 1)[0]


def _dataset(suite: dict, name: str) -> DatasetSpec:
    d = dict(suite["datasets"][name])
    if "labels" in d:
        d["labels"] = tuple(d["labels"])
    for key in ("folder", "shards", "classes_file"):
        if d.get(key) and "{" not in d[key] and "*" not in d[key] and "," not in d[key] and not os.path.exists(d[key]):
            raise EvalDataError(f"dataset {name!r}: {key} {d[key]!r} does not exist")
    return DatasetSpec(**d)


class _Features:
    """Per (run, dataset, space): features, extracted once per suite run (and cached on disk)."""

    def __init__(self, suite, cache_dir, device="cpu", num_workers=0, batch_size=256):
        self.suite, self.cache_dir, self.memo, self.device = suite, cache_dir, {}, device
        self.loader = {"num_workers": num_workers, "batch_size": batch_size}
        try:
            self.spec = FeatureSpec(**{"normalize": False, **(suite.get("features") or {})})
        except TypeError as e:
            raise EvalDataError(f"suite `features:` {suite.get('features')}: {e} (keys: layer, pool, normalize)") from e

    def get(self, run, dataset: str, joint: bool = False):
        key = (run.name, dataset, joint)
        if key not in self.memo:
            spec = FeatureSpec(space="joint") if joint else self.spec
            self.memo[key] = extract(run.encoder, _dataset(self.suite, dataset), spec, checkpoint=run.checkpoint,
                                     cache_dir=self.cache_dir, progress=f"{run.name} {dataset}",
                                     embed=run.encode_image if joint else None, device=self.device, **self.loader,
                                     extra_key=run.objective_identity() if joint else None)
        return self.memo[key]


def _labels_of(feats, names, dataset):
    missing = [n for n in names if n not in feats.labels]
    if missing:
        raise EvalDataError(f"dataset {dataset!r} has no label {missing[0]!r} (it has: {', '.join(feats.labels)}); "
                            "add it to the dataset's `labels:`")
    return {n: feats.labels[n] for n in names}


def _per_label(runs, args, F, evaluate):
    """{run: {label: evaluate(train_x, train_y, test_x, test_y, num_classes)}} over the protocol's labels; samples
    whose label is -1 (attribute absent, e.g. no word written) are left out of that label's evaluation."""
    out = {}
    for run in runs:
        tr, te = F.get(run, args["train"]), F.get(run, args["test"])
        res = {}
        for name, ytr in _labels_of(tr, args.get("labels") or list(tr.labels), args["train"]).items():
            yte = _labels_of(te, [name], args["test"])[name]
            keep_tr, keep_te = ytr >= 0, yte >= 0
            if not keep_tr.any() or not keep_te.any():
                split = args["train"] if not keep_tr.any() else args["test"]
                res[name] = {"skipped": f"no sample of {split!r} has a {name!r} label (all -1)"}
                continue
            res[name] = evaluate(tr.feats[keep_tr], ytr[keep_tr], te.feats[keep_te], yte[keep_te],
                                 int(max(ytr.max(), yte.max())) + 1)
        out[run.name] = res
    return out


def majority_baseline(runs, args, F) -> dict:
    """{label: accuracy of always answering the test split's most frequent class}: the floor a table is read
    against (the synthetic attributes are not uniform: word_id, for one, counts only images with a word)."""
    import torch

    te = F.get(runs[0], args["test"])
    out = {}
    for name, y in _labels_of(te, args.get("labels") or list(te.labels), args["test"]).items():
        y = y[y >= 0]
        out[name] = float(torch.bincount(y).max() / len(y)) if len(y) else float("nan")
    return out


def run_knn(runs, args, F):
    from fastenc.eval.knn import knn_accuracy

    return _per_label(runs, args, F, lambda xtr, ytr, xte, yte, C: knn_accuracy(
        xtr, ytr, xte, yte, k=args.get("k", 20), temperature=args.get("temperature", 0.07), num_classes=C,
        device=F.device))


def run_linear_probe(runs, args, F):
    from fastenc.eval.probe import linear_probe

    kw = {k: args[k] for k in ("epochs", "warmup_epochs", "search_epochs", "batch_size", "holdout_fraction", "seed")
          if k in args}
    for key in ("lrs", "wds"):
        if key in args:
            kw[key] = [float(x) for x in args[key]]

    def probe(xtr, ytr, xte, yte, C):
        r = linear_probe(xtr, ytr, xte, yte, num_classes=C, device=F.device, **kw)
        return {"best_accuracy": r.best_accuracy, "final_accuracy": r.final_accuracy, "lr": r.lr,
                "weight_decay": r.weight_decay, "best_epoch": r.best_epoch}

    return _per_label(runs, args, F, probe)


def _class_names(args, feats):
    if "class_names" in args:
        return [str(c) for c in args["class_names"]]
    label = args.get("label", "label")
    if label in feats.classes:
        names = feats.classes[label]
        if all(re.fullmatch(r"n\d{8}", n) for n in names):
            raise EvalDataError(f"zero_shot: the class names are the folder names, WordNet ids ({names[0]}, ...), "
                                "which make meaningless prompts: give the dataset a `classes_file` (one readable name "
                                "per line, in sorted folder order) or the protocol `class_names:`")
        return names
    raise EvalDataError("zero_shot needs `class_names:` (or an image-folder dataset, whose folder names are used)")


def _per_text_run(runs, args, F, evaluate):
    """{run: evaluate(run, joint-space features of args["dataset"])} for runs with a text tower; the others are
    recorded as not applicable."""
    return {run.name: evaluate(run, F.get(run, args["dataset"], joint=True)) if run.has_text
            else {"skipped": run.text_unavailable} for run in runs}


def run_zero_shot(runs, args, F):
    from fastenc.eval.zeroshot import DEFAULT_TEMPLATES, class_text_embeddings, zero_shot_accuracy

    def evaluate(run, feats):
        label = args.get("label", "label")
        y = _labels_of(feats, [label], args["dataset"])[label]
        keep = y >= 0  # -1: the attribute is absent (no word written): no class to name
        if not keep.any():
            return {"skipped": f"no sample of {args['dataset']!r} has a {label!r} label (all -1)"}
        names = _class_names(args, feats)
        if int(y.max()) >= len(names):
            raise EvalDataError(f"class-count mismatch: labels of {label!r} go up to {int(y.max())} but "
                                f"{len(names)} class names are given")
        classes = class_text_embeddings(names, args.get("templates") or DEFAULT_TEMPLATES, run.encode_text)
        return zero_shot_accuracy(feats.feats[keep], y[keep], classes)

    return _per_text_run(runs, args, F, evaluate)


def run_retrieval(runs, args, F):
    from fastenc.eval.retrieval import retrieval_recall

    def evaluate(run, feats):
        if not feats.captions:
            raise EvalDataError(f"retrieval needs captions: set `captions: true` on dataset {args['dataset']!r}")
        # ties="expected": duplicate captions (common in the synthetic data) count as a random tie-break, not as
        # misses; on data with unique captions every choice gives the same numbers.
        return retrieval_recall(feats.feats, run.encode_text(feats.captions), ties=args.get("ties", "expected"))

    return _per_text_run(runs, args, F, evaluate)


def run_pairs(runs, args, F, out_dir):
    from fastenc.analysis.pairs import analyze_pairs

    by_name = {r.name: r for r in runs}
    a, b = args.get("a", "clip_tiny"), args.get("b", "dino_tiny")
    if a not in by_name or b not in by_name:
        return {"skipped": f"needs runs named {a!r} and {b!r} (got {', '.join(by_name)})"}
    fa, fb = F.get(by_name[a], args["dataset"]), F.get(by_name[b], args["dataset"])
    attributes = _labels_of(fa, args.get("attributes", []), args["dataset"])
    kw = {k: args[k] for k in ("num_pairs", "thresholds", "seed", "max_pairs", "mode", "unique", "cell", "columns")
          if k in args}
    return analyze_pairs(fa.feats, fb.feats, names=(a, b), attributes=attributes or None,
                         load_image=_image_loader(_dataset(F.suite, args["dataset"]), fa.ids),
                         out_dir=out_dir, **kw)


def _image_loader(dataset: DatasetSpec, ids):
    """index -> PIL image of the evaluated sample (folders: its path; shards: one header scan per shard maps keys to
    their image's byte range, then each image is one seek and read)."""
    import functools

    from PIL import Image

    if dataset.folder:
        return lambda i: Image.open(ids[i]).convert("RGB")
    from fastenc.data.index import iter_tar_samples
    from fastenc.data.shards import expand_shards
    from fastenc.data.transforms import IMAGE_EXTENSIONS, decode_image

    urls = {os.path.basename(u): u for u in expand_shards(dataset.shards)}

    @functools.lru_cache(maxsize=16)
    def image_members(shard: str) -> dict:
        out = {}
        for key, members in iter_tar_samples(urls[shard], read=lambda k, e: False):
            ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            if ext is not None:
                info = members[ext][0]
                out[key] = (info.offset_data, info.size)
        return out

    def load(i):
        shard, key = ids[i].rsplit(":", 1)
        if key not in image_members(shard):
            raise EvalDataError(f"sample {ids[i]} not found")
        offset, size = image_members(shard)[key]
        with open(urls[shard], "rb") as f:
            f.seek(offset)
            return decode_image(f.read(size))

    return load


def run_loss_curves(runs, args, out_dir):
    from fastenc.analysis.curves import plot_loss_curves

    paths = [(r.name, r.metrics_path) for r in runs if r.metrics_path]
    if not paths:
        return {"skipped": "no run has training metrics"}
    png = plot_loss_curves([p for _, p in paths], os.path.join(out_dir, "loss_curves.png"),
                           labels=[n for n, _ in paths], x=args.get("x", "samples_seen"))
    return {"png": os.path.basename(png), "runs": [n for n, _ in paths]}




def run_suite(sources: list[str], suite_path: str, out_dir: str, *, cache_dir: str | None = None,
              device: str = "cpu", command: str | None = None, num_workers: int = 0,
              batch_size: int = 256, model: str | None = None) -> dict:
    """Evaluate every run of `sources` with every protocol of the suite; write results.json and report.md (with
    `command`, the code's git revision and the time, for whoever reads them later). Raises EvalDataError (after
    writing both) if a protocol failed. num_workers / batch_size: the feature extraction's data loader (decoding
    processes; images per encoder call). model: the ViT preset of bare .safetensors sources without fastenc's
    metadata (timm checkpoints)."""
    from fastenc.eval.runs import load_run

    suite = load_suite(suite_path)
    for name in suite.get("datasets") or {}:
        _dataset(suite, name)  # every path checked before hours of extraction
    for proto, args in (suite.get("protocols") or {}).items():
        if protocol_type(proto) == "vqa" and not os.path.isfile(str(args["benchmark"])):
            raise EvalDataError(f"protocol {proto}: benchmark file {args['benchmark']!r} not found")
    runs = []
    for source in sources:
        name, src = parse_source(source)
        runs.append(load_run(src, name=name, model=model).to(device))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise EvalDataError(f"two runs share a name ({names}): name them on the command line, NAME=RUN_DIR")
    os.makedirs(out_dir, exist_ok=True)
    F = _Features(suite, cache_dir or os.path.join(out_dir, "feature_cache"), device, num_workers, batch_size)
    from fastenc.utils.provenance import git_revision

    results = {"suite": suite["name"], "runs": {r.name: r.source for r in runs},
               "made_by": {"command": command, "suite_file": display_path(suite_path), "git": git_revision(),
                           "device": device, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
               "protocols": {}}
    failed = []
    for proto, args in (suite.get("protocols") or {}).items():
        args = args or {}
        start = time.time()
        log.info("%s ...", proto)
        kind = protocol_type(proto)
        entry = results["protocols"][proto] = {"args": args}
        try:
            if kind == "pairs":
                res = run_pairs(runs, args, F, os.path.join(out_dir, proto))  # pairs.json, sharing.md, PNGs
            elif kind == "loss_curves":
                res = run_loss_curves(runs, args, out_dir)
            elif kind == "vqa":
                from fastenc.eval.vqa import suite_protocol

                res = suite_protocol(runs, args, os.path.join(out_dir, proto), device)
            else:
                res = {"knn": run_knn, "linear_probe": run_linear_probe, "zero_shot": run_zero_shot,
                       "retrieval": run_retrieval}[kind](runs, args, F)
            entry["results"] = res
            if kind in ("knn", "linear_probe"):
                entry["majority"] = majority_baseline(runs, args, F)
        except (EvalDataError, ValueError) as e:  # bad arguments or data this protocol cannot use
            log.error("%s failed: %s", proto, e)
            entry["error"] = str(e)
            failed.append(f"{proto}: {e}")
        entry["seconds"] = round(time.time() - start, 1)
    _attribute_figure(results, out_dir)
    atomic.write_json(os.path.join(out_dir, "results.json"), finite(results), default=_jsonable, allow_nan=False)
    atomic.write_text(os.path.join(out_dir, "report.md"), render_report(results, out_dir))
    if failed:
        raise EvalDataError(f"{len(failed)} protocol(s) failed (the others are in {out_dir}/report.md): "
                            + "; ".join(failed))
    return results






def _attribute_figure(results: dict, out_dir: str) -> None:
    """attributes.png: k-NN and linear-probe accuracy per attribute per run, against the majority class."""
    from fastenc.analysis.curves import plot_attribute_accuracy

    protos = {p: e for p, e in results["protocols"].items()
              if protocol_type(p) in ("knn", "linear_probe") and "results" in e}
    if not protos:
        return
    tables = {p: {run: {lab: _accuracy(v) for lab, v in r.items() if _accuracy(v) is not None}
                  for run, r in e["results"].items()} for p, e in protos.items()}
    baseline = {lab: v for e in protos.values() for lab, v in (e.get("majority") or {}).items()}
    plot_attribute_accuracy(tables, os.path.join(out_dir, "attributes.png"), baseline=baseline)
    results["figures"] = {"attributes": "attributes.png"}


def _jsonable(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "__dict__"):
        return vars(x)
    return str(x)


def _accuracy(v) -> float | None:
    """A per-label result's headline accuracy: k-NN's float, the probe's best_accuracy; None when skipped."""
    if isinstance(v, dict):
        return v.get("best_accuracy")
    return v


def _fmt(v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{100 * v:.1f}" if isinstance(v, float) else str(v)


def render_report(results: dict, out_dir: str = ".") -> str:
    """report.md: one table per protocol (accuracies in %), figures linked."""
    lines = [f"# Evaluation: {results['suite']}", ""]
    made = results.get("made_by") or {}
    if made:
        lines += [f"Made by `{made.get('command') or 'fastenc.eval.suite.run_suite'}` (suite `{made['suite_file']}`) "
                  f"at git {made['git']} on {made['device']}, {made['time']}.", ""]
    lines += ["| run | source |", "| --- | --- |"]
    lines += [f"| {n} | `{s}` |" for n, s in results["runs"].items()]
    if "attributes" in results.get("figures", {}):
        lines += ["", f"![accuracy per attribute]({results['figures']['attributes']})"]
    for proto, entry in results["protocols"].items():
        lines += ["", f"## {proto}", ""]
        if "error" in entry:
            lines += [f"**failed:** {entry['error']}", f"\n({entry['seconds']} s)"]
            continue
        res = entry["results"]
        kind = protocol_type(proto)
        if kind in ("knn", "linear_probe"):
            labels = list(dict.fromkeys(lab for r in res.values() for lab in r))  # the suite's order
            lines += ["| run | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
            skipped = {}
            for run, r in res.items():
                lines.append(f"| {run} | " + " | ".join(_fmt(_accuracy(r.get(lab))) for lab in labels) + " |")
                skipped.update({lab: v["skipped"] for lab, v in r.items() if isinstance(v, dict) and "skipped" in v})
            if "majority" in entry:
                lines.append("| *majority class* | " + " | ".join(_fmt(entry["majority"].get(lab, "-"))
                                                               for lab in labels) + " |")
            lines.append("")
            lines.append("top-1 accuracy on the test split, % (linear probe: best over epochs, the paper's report; "
                         "majority class: always answering the most frequent test class)")
            lines += [f"n/a for {lab}: {why}" for lab, why in skipped.items()]
        elif kind in ("zero_shot", "retrieval"):
            keys = list(dict.fromkeys(k for r in res.values() for k in r if k != "skipped"))
            lines += ["| run | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
            for run, r in res.items():
                if "skipped" in r:
                    lines.append(f"| {run} | " + " | ".join(["n/a"] * len(keys)) + f" |  ({r['skipped']})")
                else:
                    lines.append(f"| {run} | " + " | ".join(_fmt(r.get(k, "-")) for k in keys) + " |")
        elif kind == "loss_curves":
            lines.append(f"![loss curves]({res['png']})" if "png" in res else f"skipped: {res.get('skipped')}")
        elif kind == "vqa":
            from fastenc.eval.vqa import render_tables

            lines.append(f"multiple-choice accuracy on `{entry['args']['benchmark']}` (fastenc.eval.vqa; "
                         f"predictions in {proto}/)")
            lines += render_tables(res)
        elif kind == "pairs":
            if "skipped" in res:
                lines.append(f"skipped: {res['skipped']}")
            else:
                from fastenc.analysis.pairs import report_markdown

                lines.append(report_markdown(res).split("\n", 1)[1].lstrip("\n"))  # its own title is this section's
                for key, path in res.get("files", {}).items():
                    if key.startswith("png_"):
                        lines.append(f"![{key[4:]}]({os.path.relpath(path, out_dir)})")
        lines.append(f"\n({entry['seconds']} s)")
    return "\n".join(lines) + "\n"


def summary_lines(results: dict) -> list[str]:
    """The suite's headline numbers in a few lines a newcomer can read (what `fastenc eval` prints at the end):
    each zero-shot protocol's top-1 per run against uniform guessing, and each k-NN / linear-probe label per run
    against always answering the majority class."""
    lines = []
    for proto, entry in results["protocols"].items():
        kind, res = protocol_type(proto), entry.get("results") or {}
        if kind == "zero_shot":
            label = entry["args"].get("label", "label")
            names = entry["args"].get("class_names") or []
            scores = [f"{run} {r['top1']:.1%}" for run, r in res.items() if isinstance(r, dict) and "top1" in r]
            if scores:
                chance = f"1 in {len(names)} = {1 / len(names):.1%}" if names else "n/a"
                lines.append(f"{proto}: which {label.removesuffix('_id')} is it, by text prompts alone: "
                             f"{', '.join(scores)} (chance {chance})")
        elif kind in ("knn", "linear_probe"):
            majority = entry.get("majority") or {}
            for label, base in majority.items():
                scores = [f"{run} {r[label]:.1%}" for run, r in res.items() if isinstance(r, dict)
                          and isinstance(r.get(label), (int, float))]
                if scores:
                    lines.append(f"{proto} {label}: {', '.join(scores)} (majority class {base:.1%})")
    return lines
