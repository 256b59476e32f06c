"""Study files: the runs of one controlled comparison, encoders and the VLMs built on them, and where each stands.

A study compares objectives (CLIP, SigLIP, DINO, ...) trained under identical conditions (what "controlled" means,
and the fingerprint every run records: fastenc.run.fingerprint), then, optionally, the same vision-language model
built on each of them. A study file (paths relative to the study file, except `prepare` and `eval` outputs, which
are relative to where the command runs, like the recipes' data paths):

    name: cpu_study
    runs: [clip_tiny.yaml, siglip_tiny.yaml, dino_tiny.yaml]   # the encoder runs; only `objective:` may differ
    overrides: []                                              # applied to every encoder run
    vlm:                                                       # optional: one VLM per encoder run
      stages: [llava_tiny_stage1.yaml, llava_tiny_stage2.yaml]
      overrides: []                                            # applied to every VLM run
    prepare:                                                   # optional: files made first when missing, each by
      data/synth_vqa/manifest.json: data synth-vqa --out data/synth_vqa           # the `fastenc` command after it
    eval:                                                      # optional: `fastenc study run` ends with it
      out: eval/cpu_study
      suite: eval_synth.yaml                                   # the encoder runs and init:<first run>
      vqa: {benchmark: data/synth_vqa/benchmark.jsonl, by: [type]}   # the VLM runs' last stage

The VLM run of stage k on encoder run E is named "<stage's run.name>-<E>"; it is the stage's recipe with
objective.vision.source set to E's run dir and, from the second stage on, objective.init_from set to the previous
stage's run on E. The VLM runs of one stage must then differ in nothing else (fingerprint.VISION_TOWER).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import yaml

from fastenc.config import Config, ConfigError, config_hash, load_config
from fastenc.run.configs import read_config
from fastenc.run.fingerprint import VISION_TOWER, check_controlled, diff_configs
from fastenc.run.layout import RunDir
from fastenc.run.metrics import metrics_history

_KEYS = ("name", "runs", "overrides", "vlm", "prepare", "eval")
_VLM_KEYS = ("stages", "overrides")
_EVAL_KEYS = ("out", "suite", "init", "vqa")


# ----------------------------------------------------------------------------------------------------------------
# Study files


@dataclass
class StudyRun:
    """One training run of a study: the recipe and every override that makes it this run, and its config."""

    recipe: str
    overrides: list
    config: Config
    encoder: str | None = None
    """For a VLM run: the run.name of the encoder run it is built on."""
    stage: int = 0
    """0 for an encoder run; k for a VLM run of vlm.stages[k - 1]."""

    @property
    def name(self) -> str:
        return self.config.run.name


@dataclass
class Study:
    name: str
    path: str
    runs: list                 # StudyRun per encoder recipe
    vlm_stages: list = field(default_factory=list)  # per VLM stage: a StudyRun per encoder run
    prepare: dict = field(default_factory=dict)    # {path: fastenc command line that makes it}
    eval: dict = field(default_factory=dict)

    @property
    def configs(self) -> list:
        """The encoder runs' configs."""
        return [r.config for r in self.runs]

    @property
    def all_runs(self) -> list:
        """Every run in training order: the encoders, then each VLM stage on every encoder."""
        return [*self.runs, *(r for stage in self.vlm_stages for r in stage)]

    @property
    def final_vlm_runs(self) -> list:
        return list(self.vlm_stages[-1]) if self.vlm_stages else []


def _section(data: dict, key: str, valid: tuple, path: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"study {path}: `{key}` must be a mapping with keys {', '.join(valid)}")
    unknown = set(value) - set(valid)
    if unknown:
        raise ConfigError(f"study {path}: unknown keys {sorted(unknown)} in `{key}` (valid: {', '.join(valid)})")
    return value


def _resolve(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def load_study(path: str, extra_overrides=()) -> Study:
    """The study file at `path` (see the module docstring); extra_overrides apply to every encoder run."""
    if not os.path.isfile(path):
        raise ConfigError(f"study file {path} not found")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    unknown = set(data) - set(_KEYS)
    if unknown:
        raise ConfigError(f"study {path}: unknown keys {sorted(unknown)} (valid: {', '.join(_KEYS)})")
    runs = data.get("runs") or []
    if not isinstance(runs, list) or len(runs) < 2:
        raise ConfigError(f"study {path}: `runs` must list at least two recipe files")
    base = os.path.dirname(os.path.abspath(path))
    overrides = list(data.get("overrides") or []) + list(extra_overrides)
    encoders = [StudyRun(r, overrides, load_config(r, overrides)) for r in (_resolve(base, r) for r in runs)]
    vlm = _section(data, "vlm", _VLM_KEYS, path)
    stages = _vlm_stages(encoders, [_resolve(base, s) for s in vlm.get("stages") or []],
                         list(vlm.get("overrides") or []))
    names = [r.name for r in encoders] + [r.name for stage in stages for r in stage]
    if len(set(names)) != len(names):
        raise ConfigError(f"study {path}: runs must have distinct run.name values, got {names}")
    prepare = data.get("prepare") or {}
    if not isinstance(prepare, dict) or not all(isinstance(v, str) for v in prepare.values()):
        raise ConfigError(f"study {path}: `prepare` maps a file to the fastenc command that makes it, e.g. "
                          "{data/synth_vqa/manifest.json: data synth-vqa --out data/synth_vqa}")
    evaluation = _section(data, "eval", _EVAL_KEYS, path)
    if evaluation:
        if "out" not in evaluation:
            raise ConfigError(f"study {path}: `eval` needs `out`, the folder of the study's report")
        if evaluation.get("suite"):
            evaluation = {**evaluation, "suite": _resolve(base, evaluation["suite"])}
        if evaluation.get("vqa") is not None:
            if not stages:
                raise ConfigError(f"study {path}: `eval.vqa` scores the VLM runs, but the study has no `vlm` stages")
            if not isinstance(evaluation["vqa"], dict) or "benchmark" not in evaluation["vqa"]:
                raise ConfigError(f"study {path}: `eval.vqa` needs `benchmark` (and optionally images, mode, limit, "
                                  "by, bootstrap, seed, max_new_tokens: fastenc.eval.vqa.run_vqa's arguments)")
    return Study(data.get("name") or os.path.splitext(os.path.basename(path))[0], path, encoders, stages,
                 dict(prepare), evaluation)


def _vlm_stages(encoders: list, recipes: list, overrides: list) -> list:
    """A StudyRun per (stage, encoder run): the stage recipe built on that encoder (the module docstring)."""
    stages, previous = [], {}
    for k, recipe in enumerate(recipes, start=1):
        stage_cfg = load_config(recipe, overrides)
        if stage_cfg.objective.name != "llava":
            raise ConfigError(f"vlm stage {recipe}: objective {stage_cfg.objective.name!r}, but a VLM stage trains a "
                              "vision-language objective (llava)")
        stage_name = stage_cfg.run.name
        runs = []
        for enc in encoders:
            own = [f"run.name={stage_name}-{enc.name}", f"objective.vision.source={RunDir.of(enc.config).root}"]
            if k > 1:
                own.append(f"objective.init_from={RunDir.of(previous[enc.name].config).root}")
            run = StudyRun(recipe, [*overrides, *own], load_config(recipe, [*overrides, *own]), enc.name, k)
            runs.append(run)
            previous[enc.name] = run
        stages.append(runs)
    return stages


def check_study(study: Study) -> list[str]:
    """Why the study's recipes are not a controlled comparison, one line per problem (empty: they are): encoder runs
    that differ outside `objective:`, or VLM runs of one stage that differ in more than their vision tower."""
    problems = check_controlled(study.configs, [r.name for r in study.runs])
    for stage in study.vlm_stages:
        problems += check_controlled([r.config for r in stage], [r.name for r in stage], varying=VISION_TOWER)
    return problems


def run_state(cfg: Config) -> tuple[str, str]:
    """Where a study run stands, for `study run` to start, continue or skip it: ("new", ...) no run dir yet;
    ("done", ...) trained to schedule.steps and exported with this config; ("partial", ...) a run dir of this config
    without its export (interrupted: resume); ("other", why) a run dir that is not this run (another config, or not
    a fastenc run dir): `study run` refuses rather than train next to it or overwrite it."""
    run_dir = RunDir.of(cfg)
    where = run_dir.root
    if not os.path.exists(where):
        return "new", f"no run dir {where} yet"
    try:
        recorded = read_config(run_dir)
    except ConfigError as e:
        return "other", f"{where} exists but is not a fastenc run dir of this study ({e}): move it away"
    if config_hash(recorded) != config_hash(cfg):
        keys = ", ".join(k for k, _, _ in diff_configs(recorded, cfg).differences) or "(formatting only)"
        return "other", (f"{where} holds a run of another config (differs in: {keys}): move it away, or give this "
                         "study's runs other names (run.name=... in the study's overrides)")
    history = metrics_history(run_dir.metrics) if os.path.isfile(run_dir.metrics) else []
    step = history[-1]["step"] if history else 0
    if run_dir.is_exported() and step >= cfg.schedule.steps:
        return "done", f"{where} is trained (step {step} of {cfg.schedule.steps}, exported)"
    tag = run_dir.latest_checkpoint()
    return "partial", f"{where} stopped at step {step} (checkpoint: {tag or 'none, so from step 0'})"


def launch_command(run: StudyRun, state: str, *, launcher: str | None = None,
                   max_steps: int | None = None) -> list[str]:
    """The command that trains one study run (launch/pretrain.py under `launcher`, default this Python); a
    "partial" run resumes from its run dir's last checkpoint."""
    import sys

    import fastenc

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(fastenc.__file__))), "launch",
                          "pretrain.py")
    options = ["--resume", RunDir.of(run.config).root] if state == "partial" else []
    if max_steps is not None:
        options += ["--max-steps", str(max_steps)]
    prefix = launcher.split() if launcher else [sys.executable]
    return [*prefix, script, *options, "--config", run.recipe, *run.overrides]


@dataclass
class RecordedRun:
    """What a study run left in its run dir: its config and fingerprint as recorded, its last metrics row."""

    name: str
    run_dir: RunDir
    config: Config
    fingerprint: dict | None
    last: dict


def recorded_runs(runs: list) -> list[RecordedRun]:
    """The StudyRuns `runs` as recorded in their run dirs; ConfigError naming the first one that has not run."""
    from fastenc.run.metrics import last_metrics

    out = []
    for run in runs:
        run_dir = RunDir.of(run.config)
        if not run_dir.is_run():
            raise ConfigError(f"{run_dir.root} is not a run dir yet: run the study first (`fastenc study run`)")
        out.append(RecordedRun(run.name, run_dir, read_config(run_dir), run_dir.read_fingerprint(),
                               last_metrics(run_dir)))
    return out


def uncontrolled_records(runs: list[RecordedRun], *, varying: tuple | None = None) -> list[str]:
    """Why the recorded runs are not a controlled comparison, one line per problem (empty: they are): their
    recorded configs differ outside `varying` (default: the objective section), or their fingerprints (with the
    shards on disk) differ."""
    labels = [r.name for r in runs]
    configs = [r.config for r in runs]
    problems = check_controlled(configs, labels) if varying is None else check_controlled(configs, labels,
                                                                                          varying=varying)
    if problems:
        return problems
    first = runs[0]
    keys0 = first.fingerprint["keys"] if first.fingerprint else {}
    for run in runs if first.fingerprint is None else runs[1:]:
        if run.fingerprint is None:
            problems.append(f"{run.run_dir.root}: no fingerprint recorded")
            continue
        keys = run.fingerprint["keys"]
        bad = sorted(k for k in set(keys0) | set(keys) if keys0.get(k) != keys.get(k))
        if bad:
            problems.append(f"{first.run_dir.root} vs {run.run_dir.root}: {', '.join(bad)}")
    return problems


def recorded_study(study: Study) -> tuple[list, list[str]]:
    """Every run of the study as recorded, in groups (the encoder runs, then each VLM stage), and why they are not
    controlled (empty: they are). ConfigError naming the first run that has not run."""
    groups = [recorded_runs(study.runs)] + [recorded_runs(stage) for stage in study.vlm_stages]
    problems = uncontrolled_records(groups[0])
    for group in groups[1:]:
        problems += uncontrolled_records(group, varying=VISION_TOWER)
    return groups, problems


# ----------------------------------------------------------------------------------------------------------------
# The study's own steps: prepare its data, time its runs, evaluate them into one report


def missing_prepared(study: Study) -> list[tuple[str, list[str]]]:
    """(path, fastenc argv) of every `prepare` entry whose file does not exist yet, or is the manifest.json of a
    synthetic set drawn by an older world (fastenc.datatools.synth.is_stale), in the study file's order."""
    import shlex

    from fastenc.datatools.synth import is_stale

    def missing(path):
        return not os.path.exists(path) or (os.path.basename(path) == "manifest.json"
                                            and is_stale(os.path.dirname(path)))

    return [(path, shlex.split(command)) for path, command in study.prepare.items() if missing(path)]


def prepare_command(argv: list[str]) -> list[str]:
    """The process that runs `fastenc ARGV` with this Python (a `prepare` entry's command)."""
    import sys

    return [sys.executable, "-c", "import sys; from fastenc.cli import main; sys.exit(main(sys.argv[1:]))", *argv]


def timings_path(study: Study) -> str | None:
    """Where `study run` records each run's training wall time: <eval.out>/timings.json (None without `eval`)."""
    return os.path.join(study.eval["out"], "timings.json") if study.eval else None


def record_timing(study: Study, key: str, seconds: float) -> None:
    """Add `seconds` to the wall time recorded for `key` (a run name, or "prepare" / "eval"): a run resumed by a
    later `study run` adds the time of each invocation that trained it."""
    import json

    from fastenc.utils import atomic

    path = timings_path(study)
    if path is None:
        return
    timings = {}
    if os.path.isfile(path):
        with open(path) as f:
            timings = json.load(f)
    timings[key] = round(timings.get(key, 0.0) + seconds, 1)
    atomic.write_json(path, timings)


def _newer_than(result: str, inputs: list[str]) -> bool:
    return os.path.isfile(result) and all(os.path.getmtime(result) >= os.path.getmtime(p) for p in inputs)


def evaluate_study(study: Study, *, device: str = "cpu", command: str | None = None) -> str:
    """The study's `eval`: the suite on the encoder runs (and init:<first run> unless eval.init is false) into
    <out>/encoders, VQA on the last VLM stage into <out>/vlm (each skipped when its results.json is newer than the
    runs' exports), then <out>/report.md with both and the runs' training times (the evaluation's own, "eval",
    recorded first). Returns the report's path."""
    import time

    from fastenc.eval.suite import run_suite
    from fastenc.eval.vqa import run_vqa
    from fastenc.utils import atomic

    ev = study.eval
    out = ev["out"]
    sections = []
    t0 = time.perf_counter()
    if ev.get("suite"):
        enc_out = os.path.join(out, "encoders")
        roots = [RunDir.of(r.config).root for r in study.runs]
        sources = [f"{r.name}={root}" for r, root in zip(study.runs, roots)]
        if ev.get("init", True):
            sources.append(f"init:{roots[0]}")
        if not _newer_than(os.path.join(enc_out, "results.json"), [RunDir(root).encoder for root in roots]):
            run_suite(sources, ev["suite"], enc_out, cache_dir=os.path.join(out, "feature_cache"), device=device,
                      command=command)
        sections.append(("Encoders", "encoders"))
    if ev.get("vqa"):
        vlm_out = os.path.join(out, "vlm")
        final = study.final_vlm_runs
        roots = [RunDir.of(r.config).root for r in final]
        if not _newer_than(os.path.join(vlm_out, "results.json"), [RunDir(root).encoder for root in roots]):
            args = dict(ev["vqa"])
            run_vqa([f"{r.encoder}={root}" for r, root in zip(final, roots)], args.pop("benchmark"), vlm_out,
                    device=device, command=command, **args)
        sections.append(("Vision-language models (one per encoder; the run is named by its encoder)", "vlm"))
    record_timing(study, "eval", time.perf_counter() - t0)
    path = os.path.join(out, "report.md")
    atomic.write_text(path, render_study_report(study, sections))
    return path


def render_study_report(study: Study, sections: list[tuple[str, str]]) -> str:
    """report.md of a study: its runs (objective, what a VLM is built on, steps, training time), then each
    section's own report.md (headings one level down, relative links rebased)."""
    import json
    import re

    from fastenc.run.fingerprint import fingerprint

    out = study.eval["out"]
    timings = {}
    if os.path.isfile(timings_path(study)):
        with open(timings_path(study)) as f:
            timings = json.load(f)
    lines = [f"# Study {study.name}", "",
             f"Study file `{study.path}`; the encoder runs share controlled fingerprint "
             f"{fingerprint(study.configs[0])['hash']}, and the VLM runs of each stage differ only in their vision "
             "tower (`fastenc study check`).", "",
             "| run | objective | built on | steps | training wall time |", "| --- | --- | --- | --- | --- |"]
    for run in study.all_runs:
        wall = timings.get(run.name)
        lines.append(f"| {run.name} | {run.config.objective.name}"
                     f"{f' stage {run.config.objective.stage}' if run.stage else ''} | {run.encoder or ''} | "
                     f"{run.config.schedule.steps} | {f'{wall / 60:.1f} min' if wall is not None else 'not recorded'} |")
    total = sum(timings.values())
    if timings:
        parts = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items() if k in ("prepare", "eval"))
        lines += ["", f"Recorded wall time in all: {total / 60:.1f} min ({parts or 'training only'})."]
    for title, folder in sections:
        with open(os.path.join(out, folder, "report.md")) as f:
            body = f.read()
        body = re.sub(r"^(#+) ", r"#\1 ", body, flags=re.M)
        body = re.sub(r"\]\((?!https?:|/|#)([^)]+)\)", lambda m: f"]({folder}/{m.group(1)})", body)
        lines += ["", f"## {title}", "", body.split("\n", 1)[1].lstrip("\n") if body.startswith("#") else body]
    return "\n".join(lines).rstrip("\n") + "\n"
