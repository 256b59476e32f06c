"""The controlled-comparison guarantee: fingerprints, `fastenc config diff`, study files and `fastenc study`."""

import json
import os

import pytest

from fastenc.cli import main
from fastenc.config import ConfigError, config_to_yaml, load_config
from fastenc.data.shards import expand_shards
from fastenc.run.fingerprint import diff_configs, fingerprint
from fastenc.study import load_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = os.path.join(ROOT, "configs", "cpu")


def _recipe(tmp_path, name, base, **sections):
    """A recipe deriving from `base` with a few changed keys."""
    lines = [f"base: {base}"] + [f"{k}" for k in []]
    for section, values in sections.items():
        lines.append(f"{section}:")
        lines += [f"  {k}: {v}" for k, v in values.items()]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_cpu_recipes_are_controlled(capsys):
    for other in ("siglip_tiny", "dino_tiny"):
        assert main(["config", "diff", f"{CPU}/clip_tiny.yaml", f"{CPU}/{other}.yaml"]) == 0
        out = capsys.readouterr().out
        assert "controlled: yes" in out and "objective.name: 'clip' -> " in out
    hashes = {fingerprint(load_config(f"{CPU}/{n}.yaml"))["hash"] for n in ("clip_tiny", "siglip_tiny", "dino_tiny")}
    assert len(hashes) == 1


def test_paper_recipes_are_controlled():
    paper = os.path.join(ROOT, "configs", "paper")
    cfgs = [load_config(f"{paper}/{n}.yaml") for n in ("clip_vit_b16", "siglip_vit_b16", "dino_vit_b16")]
    assert all(diff_configs(cfgs[0], c).controlled for c in cfgs[1:])


def test_changed_lr_is_not_controlled_and_named(tmp_path, capsys):
    changed = _recipe(tmp_path, "dino_lr", f"{CPU}/dino_tiny.yaml", optim={"lr": "1.0e-3"})
    assert main(["config", "diff", f"{CPU}/clip_tiny.yaml", changed]) == 1
    out = capsys.readouterr().out
    assert "controlled: NO" in out and "optim.lr" in out.splitlines()[-1]
    assert "! optim.lr: 0.0003 -> 0.001" in out


def test_keys_that_do_not_change_training_are_ignored(tmp_path):
    base = load_config(f"{CPU}/clip_tiny.yaml")
    same = load_config(f"{CPU}/clip_tiny.yaml", ["run.name=x", "engine.log_every=1", "engine.zero_stage=3",
                                                   "engine.checkpoint_every=7", "run.output_dir=/tmp/elsewhere"])
    assert diff_configs(base, same).controlled and fingerprint(base)["hash"] == fingerprint(same)["hash"]
    for change in ("engine.precision=bf16", "data.batch_size=64", "run.seed=1", "schedule.steps=100",
                   "model.drop_path_rate=0.1", "data.train_shards=elsewhere"):
        cfg = load_config(f"{CPU}/clip_tiny.yaml", [change] + (["engine.zero_stage=2"] if "bf16" in change else []))
        d = diff_configs(base, cfg)
        assert not d.controlled and d.uncontrolled[0][0] == change.split("=")[0], change
        assert fingerprint(cfg)["hash"] != fingerprint(base)["hash"], change


def test_diff_reads_run_dirs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(load_config(f"{CPU}/dino_tiny.yaml", ["optim.lr=5e-4"])))
    assert main(["config", "diff", f"{CPU}/clip_tiny.yaml", str(run)]) == 1
    assert "optim.lr" in capsys.readouterr().out
    assert main(["config", "diff", f"{CPU}/clip_tiny.yaml", str(tmp_path)]) == 2  # a dir without config.yaml
    assert "not a fastenc run dir" in capsys.readouterr().err


def test_study_check(tmp_path, capsys):
    assert main(["study", "check", f"{CPU}/study.yaml"]) == 0
    assert "controlled" in capsys.readouterr().out
    changed = _recipe(tmp_path, "dino_lr", f"{CPU}/dino_tiny.yaml", optim={"lr": "1.0e-3"},
                      run={"name": "dino_lr"})
    study = tmp_path / "study.yaml"
    study.write_text(f"name: s\nruns: [{CPU}/clip_tiny.yaml, {changed}]\n")
    assert main(["study", "check", str(study)]) == 1
    err = capsys.readouterr().err
    assert "NOT controlled" in err and "optim.lr (0.0003 vs 0.001)" in err
    assert main(["study", "run", str(study)]) == 1  # refuses to start


def test_study_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\nrun: [a.yaml]\n")
    with pytest.raises(ConfigError, match="unknown keys \\['run'\\]"):
        load_study(str(bad))
    bad.write_text(f"runs: [{CPU}/clip_tiny.yaml]\n")
    with pytest.raises(ConfigError, match="at least two"):
        load_study(str(bad))
    bad.write_text(f"runs: [{CPU}/clip_tiny.yaml, {CPU}/clip_tiny.yaml]\n")
    with pytest.raises(ConfigError, match="distinct run.name"):
        load_study(str(bad))


def _fake_run(out_dir, recipe, shards, overrides=(), shard_listing=None):
    cfg = load_config(recipe, [f"run.output_dir={out_dir}", f"data.train_shards={shards}", *overrides])
    run = os.path.join(out_dir, cfg.run.name)
    os.makedirs(run)
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(config_to_yaml(cfg))
    fp = fingerprint(cfg, shards=expand_shards(cfg.data.train_shards, check=False))
    if shard_listing is not None:
        fp["hash"] = "0" * 16
        fp["keys"]["data.shard_listing"] = shard_listing
    with open(os.path.join(run, "fingerprint.json"), "w") as f:
        json.dump(fp, f)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 5, "loss": 1.5, "samples_seen": 640}) + "\n")


def test_study_report(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(b"x" * 10)
    out = tmp_path / "runs"
    study = tmp_path / "study.yaml"
    study.write_text(f"name: s\nruns: [{CPU}/clip_tiny.yaml, {CPU}/dino_tiny.yaml]\n"
                     f"overrides: [run.output_dir={out}, data.train_shards={shards}]\n")
    assert main(["study", "report", str(study)]) == 2  # never run
    assert "run the study first" in capsys.readouterr().err
    _fake_run(out, f"{CPU}/clip_tiny.yaml", shards)
    _fake_run(out, f"{CPU}/dino_tiny.yaml", shards)
    assert main(["study", "report", str(study)]) == 0
    text = capsys.readouterr().out
    assert "controlled" in text and "dino_tiny" in text and "1.5000" in text
    # Same configs, but the dino run saw other shard files: refused, naming the shard listing.
    import shutil

    shutil.rmtree(out / "dino_tiny")
    _fake_run(out, f"{CPU}/dino_tiny.yaml", shards, shard_listing=[["b.tar", 10]])
    assert main(["study", "report", str(study)]) == 1
    assert "data.shard_listing" in capsys.readouterr().err


def test_study_run_skips_finished_runs_resumes_interrupted_ones_and_refuses_strangers(tmp_path, capsys, monkeypatch):
    """`study run` again after an interruption: a run trained to schedule.steps and exported is skipped, one that
    stopped part-way is resumed from its run dir, and a run dir holding another config stops the study (exit 1)
    before anything is launched."""
    import subprocess

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(b"x" * 10)
    out = tmp_path / "runs"
    study = tmp_path / "study.yaml"
    steps = ["schedule.steps=5", "schedule.warmup_steps=1"]
    study.write_text(f"name: s\nruns: [{CPU}/clip_tiny.yaml, {CPU}/siglip_tiny.yaml, {CPU}/dino_tiny.yaml]\n"
                     f"overrides: [run.output_dir={out}, data.train_shards={shards}, {', '.join(steps)}]\n")
    launched = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: launched.append(cmd) or 0)
    _fake_run(out, f"{CPU}/clip_tiny.yaml", shards, steps)  # metrics reach step 5 ...
    (out / "clip_tiny" / "export").mkdir()
    (out / "clip_tiny" / "export" / "encoder.safetensors").write_bytes(b"")  # ... and it exported: done
    _fake_run(out, f"{CPU}/siglip_tiny.yaml", shards, steps)
    with open(out / "siglip_tiny" / "metrics.jsonl", "w") as f:  # stopped at step 3
        f.write(json.dumps({"step": 3, "loss": 2.0, "samples_seen": 384}) + "\n")
    assert main(["study", "run", str(study)]) == 0
    text = capsys.readouterr().out
    assert "clip_tiny" in text and "is trained (step 5 of 5, exported); skipped" in text
    assert "stopped at step 3" in text and "resuming" in text
    assert len(launched) == 2  # siglip (resumed) and dino (new); clip not relaunched
    assert launched[0][launched[0].index("--resume") + 1] == str(out / "siglip_tiny")
    assert "--resume" not in launched[1] and launched[1][launched[1].index("--config") + 1].endswith("dino_tiny.yaml")
    # a run dir of the same name but another config: refused before anything starts
    launched.clear()
    import shutil

    shutil.rmtree(out / "siglip_tiny")
    _fake_run(out, f"{CPU}/siglip_tiny.yaml", shards, [*steps, "optim.lr=0.5"])
    assert main(["study", "run", str(study)]) == 1
    err = capsys.readouterr().err
    assert "holds a run of another config (differs in: optim.lr)" in err and not launched


# ----------------------------------------------------------------------------------------------------------------
# Vision-language runs in a study


def _vlm_study(tmp_path, evaluation=""):
    study = tmp_path / "study.yaml"
    study.write_text(f"name: s\nruns: [{CPU}/clip_tiny.yaml, {CPU}/dino_tiny.yaml]\n"
                     f"overrides: [run.output_dir={tmp_path / 'runs'}]\n"
                     f"vlm:\n  stages: [{CPU}/llava_tiny_stage1.yaml, {CPU}/llava_tiny_stage2.yaml]\n"
                     f"  overrides: [run.output_dir={tmp_path / 'runs'}]\n" + evaluation)
    return str(study)


def test_study_builds_one_vlm_per_encoder_that_differ_only_in_the_vision_tower(tmp_path, capsys):
    study = load_study(_vlm_study(tmp_path))
    assert [[r.name for r in stage] for stage in study.vlm_stages] == [
        ["llava_tiny_stage1-clip_tiny", "llava_tiny_stage1-dino_tiny"],
        ["llava_tiny_stage2-clip_tiny", "llava_tiny_stage2-dino_tiny"]]
    s1, s2 = study.vlm_stages
    runs = tmp_path / "runs"
    assert s1[1].config.objective.vision.source == str(runs / "dino_tiny") and s1[1].encoder == "dino_tiny"
    assert s2[1].config.objective.init_from == str(runs / "llava_tiny_stage1-dino_tiny")
    assert s2[0].config.objective.vision.source == str(runs / "clip_tiny")
    assert main(["study", "check", _vlm_study(tmp_path)]) == 0
    assert "VLM stage 2" in capsys.readouterr().out
    # the VLM comparison allows the vision tower to differ, and nothing else of the objective
    from fastenc.run.fingerprint import VISION_TOWER, check_controlled

    a = s1[0].config
    b = load_config(s1[1].recipe, [*s1[1].overrides, "objective.lm.preset=llama_small"])
    assert check_controlled([a, s1[1].config], ["a", "b"], varying=VISION_TOWER) == []
    problems = check_controlled([a, b], ["a", "b"], varying=VISION_TOWER)
    assert len(problems) == 1 and "objective.lm.preset" in problems[0]
    assert check_controlled([a, b], ["a", "b"]) == []  # as encoder runs they would count as controlled


def test_vlm_stage_must_train_a_vision_language_objective(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(f"runs: [{CPU}/clip_tiny.yaml, {CPU}/dino_tiny.yaml]\nvlm:\n  stages: [{CPU}/siglip_tiny.yaml]\n")
    with pytest.raises(ConfigError, match="a VLM stage trains a vision-language objective"):
        load_study(str(study))
    study.write_text(f"runs: [{CPU}/clip_tiny.yaml, {CPU}/dino_tiny.yaml]\neval: {{vqa: {{benchmark: b.jsonl}}, "
                     "out: e}\n")
    with pytest.raises(ConfigError, match="no `vlm` stages"):
        load_study(str(study))
    study.write_text(f"runs: [{CPU}/clip_tiny.yaml, {CPU}/dino_tiny.yaml]\nvlm: {{stage: [a.yaml]}}\n")
    with pytest.raises(ConfigError, match="unknown keys \\['stage'\\] in `vlm`"):
        load_study(str(study))


def test_study_run_prepares_trains_encoders_then_vlm_stages_and_skips_done_ones(tmp_path, capsys, monkeypatch):
    import subprocess

    monkeypatch.chdir(tmp_path)
    path = _vlm_study(tmp_path, "prepare:\n  made.txt: data synth-vqa --out somewhere\n")
    launched, prepared = [], []

    def call(cmd):
        if cmd[1] == "-c":  # a prepare command: `fastenc ARGV` in this Python
            prepared.append(cmd[3:])
            (tmp_path / "made.txt").touch()
        else:
            launched.append(cmd)
        return 0

    monkeypatch.setattr(subprocess, "call", call)
    assert main(["study", "run", path]) == 0
    assert prepared == [["data", "synth-vqa", "--out", "somewhere"]]
    names = [cmd[cmd.index("--config") + 1].rsplit("/", 1)[1] for cmd in launched]
    assert names == ["clip_tiny.yaml", "dino_tiny.yaml", "llava_tiny_stage1.yaml", "llava_tiny_stage1.yaml",
                     "llava_tiny_stage2.yaml", "llava_tiny_stage2.yaml"]
    assert f"objective.init_from={tmp_path / 'runs' / 'llava_tiny_stage1-dino_tiny'}" in launched[5]
    # a second run: the prepared file exists, and a finished VLM run is skipped
    study = load_study(path)
    done = study.vlm_stages[0][0]
    os.makedirs(tmp_path / "runs" / done.name)
    (tmp_path / "runs" / done.name / "config.yaml").write_text(config_to_yaml(done.config))
    with open(tmp_path / "runs" / done.name / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": done.config.schedule.steps, "loss": 1.0}) + "\n")
    (tmp_path / "runs" / done.name / "export").mkdir()
    (tmp_path / "runs" / done.name / "export" / "encoder.safetensors").write_bytes(b"")
    launched.clear()
    prepared.clear()
    capsys.readouterr()
    assert main(["study", "run", path]) == 0
    assert not prepared and len(launched) == 5 and all(f"run.name={done.name}" not in c for c in launched)
    assert f"{done.name}: {tmp_path / 'runs' / done.name} is trained" in capsys.readouterr().out


def test_study_report_joins_the_encoder_and_vlm_reports(tmp_path):
    from fastenc.study import record_timing, render_study_report

    study = load_study(_vlm_study(tmp_path, f"eval: {{out: {tmp_path / 'ev'}, suite: eval_synth.yaml, vqa: "
                                            "{benchmark: b.jsonl}}\n"))
    for folder, body in (("encoders", "# Evaluation\n\n![a](attributes.png)\n\n## knn\n\n| x |\n"),
                         ("vlm", "# VQA\n\n## overall\n\n| clip_tiny | 50.0 |\n")):
        os.makedirs(tmp_path / "ev" / folder)
        (tmp_path / "ev" / folder / "report.md").write_text(body)
    record_timing(study, "clip_tiny", 60.0)
    record_timing(study, "clip_tiny", 30.0)  # a resumed run adds up
    record_timing(study, "eval", 120.0)
    text = render_study_report(study, [("Encoders", "encoders"), ("VLMs", "vlm")])
    assert "| clip_tiny | clip |  | 600 | 1.5 min |" in text
    assert "| llava_tiny_stage2-dino_tiny | llava stage 2 | dino_tiny | 600 | not recorded |" in text
    assert "Recorded wall time in all: 3.5 min (eval 2.0 min)" in text
    assert "![a](encoders/attributes.png)" in text and "\n### knn\n" in text and "\n### overall\n" in text
    assert "# Evaluation" not in text


@pytest.mark.slow
def test_a_tiny_study_end_to_end_trains_encoders_and_vlms_and_writes_one_report(tmp_path, monkeypatch):
    """`fastenc study run` on the CPU recipes cut to a few steps and small data: prepare, 2 encoders, 2 x 2 VLM
    stages, the encoder suite and VQA into one report; a second run trains and evaluates nothing again."""
    import subprocess

    monkeypatch.chdir(tmp_path)
    study = tmp_path / "study.yaml"
    study.write_text(
        f"name: tiny\nruns: [{CPU}/clip_tiny.yaml, {CPU}/dino_tiny.yaml]\n"
        "overrides: [schedule.steps=3, schedule.warmup_steps=1, data.synth.num_samples=256, "
        "data.synth.samples_per_shard=128, data.batch_size=32, engine.checkpoint_every=0]\n"
        f"vlm:\n  stages: [{CPU}/llava_tiny_stage1.yaml, {CPU}/llava_tiny_stage2.yaml]\n"
        "  overrides: [schedule.steps=3, schedule.warmup_steps=1, data.batch_size=8, engine.checkpoint_every=0]\n"
        "prepare:\n"
        "  data/synth_eval/manifest.json: data synth --out data/synth_eval --num-samples 300 --samples-per-shard 50 "
        "--seed 1\n"
        "  data/synth_vqa/manifest.json: data synth-vqa --out data/synth_vqa --num-samples 48 --num-heldout 6\n"
        f"eval:\n  out: eval/tiny\n  suite: {CPU}/eval_synth.yaml\n"
        "  vqa: {benchmark: data/synth_vqa/benchmark.jsonl, by: [type], bootstrap: 50, mode: \"likelihood,cloze\"}\n")
    assert main(["study", "run", str(study)]) == 0
    text = (tmp_path / "eval" / "tiny" / "report.md").read_text()
    assert "| llava_tiny_stage2-dino_tiny | llava stage 2 | dino_tiny | 3 |" in text
    assert "## Encoders" in text and "### knn" in text and "num_marks" in text
    assert "## Vision-language models" in text and "count" in text and "clip_tiny" in text.split("## Vision")[1]
    results = json.loads((tmp_path / "eval" / "tiny" / "vlm" / "results.json").read_text())
    assert set(results["results"]) == {"clip_tiny", "dino_tiny"}
    stamp = os.path.getmtime(tmp_path / "eval" / "tiny" / "vlm" / "results.json")
    launched = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: launched.append(cmd) or 0)
    assert main(["study", "run", str(study)]) == 0
    assert launched == [] and os.path.getmtime(tmp_path / "eval" / "tiny" / "vlm" / "results.json") == stamp
