"""Config loading: base inheritance, overrides, and errors that name the key."""

import pytest

from fastenc.config import ConfigError, apply_overrides, batch_layout, load_config, load_yaml

RECIPES = ["configs/cpu/clip_tiny.yaml", "configs/cpu/siglip_tiny.yaml", "configs/paper/clip_vit_b16.yaml",
           "configs/paper/siglip_vit_b16.yaml"]


@pytest.mark.parametrize("path", RECIPES)
def test_recipes_load(path):
    cfg = load_config(path)
    assert cfg.objective.name in ("clip", "siglip")
    assert cfg.data.batch_size > 0


def test_cpu_recipes_share_base_and_differ_only_in_objective():
    a, b = load_config(RECIPES[0]).to_dict(), load_config(RECIPES[1]).to_dict()
    diff = {k for k in a if a[k] != b[k]}
    assert diff <= {"objective", "run"}, diff
    assert a["run"]["seed"] == b["run"]["seed"]


def test_siglip_defaults_are_siglip_init():
    cfg = load_config("configs/cpu/siglip_tiny.yaml")
    assert cfg.objective.init_logit_bias == -10.0
    assert abs(cfg.objective.init_logit_scale - 2.302585) < 1e-5


def test_overrides_typed_and_applied():
    cfg = load_config(RECIPES[0], ["optim.lr=5e-4", "engine.zero_stage=3", "objective.text.overrides={layers: 2}"])
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.engine.zero_stage == 3
    assert cfg.objective.text.overrides == {"layers": 2}


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'lr'"),
        ("engine.zero_stage=4", "engine.zero_stage: 4 is not one of"),
        ("data.batch_size=abc", "data.batch_size: expected an integer"),
        ("objective.embed_dimm=3", "unknown config key 'objective.embed_dimm'; did you mean 'embed_dim'"),
        ("objective.name=clipp", "unknown objective 'clipp'; did you mean 'clip'"),
        ("modle.name=x", "unknown config key 'modle'; did you mean 'model'"),
        ("schedule.warmup_steps=100000", "warmup_steps must lie in"),
        ("optim.lr", "must look like section.key=value"),
        ("engine.precision=bf16 engine.zero_stage=0", "bf16 needs engine.zero_stage >= 1"),
    ],
)
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPES[0], override.split(" "))
    assert needle in str(e.value)


def test_missing_file_and_circular_base(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_yaml(tmp_path / "a.yaml")


def test_apply_overrides_creates_nested():
    assert apply_overrides({}, ["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


def test_batch_layout():
    cfg = load_config(RECIPES[0], ["data.batch_size=64"])
    assert batch_layout(cfg, 2) == (32, 1)
    cfg = load_config(RECIPES[0], ["data.batch_size=64", "engine.micro_batch_size=8"])
    assert batch_layout(cfg, 2) == (8, 4)
    cfg = load_config(RECIPES[0], ["data.batch_size=63"])
    with pytest.raises(ConfigError, match="not divisible"):
        batch_layout(cfg, 2)
