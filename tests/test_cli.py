"""The `fastenc` console command's subcommands (called through fastenc.cli.main)."""

import json
import os

import pytest

from fastenc.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_data_synth_and_tokenizer_train(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "--num-samples", "60", "--image-size", "32", "--seed", "3",
                 "--samples-per-shard", "30"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 60 and manifest["num_shards"] == 2
    assert main(["tokenizer", "train", "--shards", str(out), "--out", str(tmp_path / "tok"), "--vocab-size", "50"]) == 0
    assert (tmp_path / "tok.model").exists()
    assert "wrote" in capsys.readouterr().out


def test_config_show_resolves_and_reports_errors(capsys):
    assert main(["config", "show", "--config", os.path.join(ROOT, "configs/cpu/clip_tiny.yaml"), "optim.lr=3e-4"]) == 0
    text = capsys.readouterr().out
    assert "lr: 0.0003" in text and "name: clip" in text
    assert main(["config", "show", "--config", os.path.join(ROOT, "configs/cpu/clip_tiny.yaml"), "optim.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


def test_listings(capsys):
    assert main(["objectives"]) == 0
    assert capsys.readouterr().out.split() == ["clip", "dino", "llava", "siglip"]
    assert main(["models"]) == 0
    assert "vit_base_patch16_224" in capsys.readouterr().out


def test_train_config_error_exit_code(capsys):
    assert main(["train", "--config", os.path.join(ROOT, "configs/cpu/clip_tiny.yaml"), "data.batch_size=x"]) == 2
    assert "data.batch_size: expected an integer" in capsys.readouterr().err


def test_unknown_subcommand():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_every_command_has_help(capsys):
    from fastenc.cli import COMMANDS

    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([*cmd.name.split(), "--help"])
        assert e.value.code == 0, cmd.name
        assert f"usage: fastenc {cmd.name}" in capsys.readouterr().out


def test_eval_suite_is_the_default_eval_subcommand():
    from fastenc.cli import build_parser
    from fastenc.cli.evaluate import run_eval_suite, run_knn

    parser = build_parser()
    plain = parser.parse_args(["eval", "runs/a", "init:runs/a", "--suite", "eval_synth", "--out", "o"])
    named = parser.parse_args(["eval", "suite", "runs/a", "init:runs/a", "--suite", "eval_synth", "--out", "o"])
    assert plain.run is named.run is run_eval_suite and plain.runs == named.runs == ["runs/a", "init:runs/a"]
    knn = parser.parse_args(["eval", "knn", "--encoder", "e", "--train-shards", "t", "--val-shards", "v"])
    assert knn.run is run_knn and knn.encoder == "e"
