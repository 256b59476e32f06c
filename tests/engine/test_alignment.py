"""Every parameter of the engine's module starts on a 16-byte boundary, for every registered objective under every
valid ZeRO stage and precision: after deepspeed.initialize and while each module runs its forward (ZeRO-3 gathers
parameters only then). A misaligned bias sends cuBLAS to a generic GEMM on a GPU (fastenc.engine.optim explains);
the addresses are the same on a CPU, so this guard runs in the default tier."""

import os

import pytest

from tests.engine.conftest import ROOT, run_isolated, tiny_overrides

PRECISION_STAGES = [("fp32", 0), ("fp32", 1), ("fp32", 2), ("fp32", 3), ("bf16", 1), ("bf16", 2), ("bf16", 3)]


# The VLM stage trains around another run's encoder and a Hugging Face LM, so the shared tiny shards and overrides
# cannot build it; its engine tests (ZeRO-2/3, resume, export) are tests/objectives/test_llava.py.
VLM_OBJECTIVES = {"llava": "llava_tiny_stage1.yaml"}


def recipe_of(objective: str) -> str:
    return os.path.join(ROOT, "configs", "cpu", VLM_OBJECTIVES.get(objective, f"{objective}_tiny.yaml"))


def encoder_objectives() -> list[str]:
    from fastenc.objectives import list_objectives

    return sorted(set(list_objectives()) - set(VLM_OBJECTIVES))


def own_overrides(objective: str, overrides: list[str]) -> list[str]:
    """The shared tiny overrides, less the objective.* keys this objective's config does not have."""
    import dataclasses

    from fastenc.objectives import objective_config_class

    fields = {f.name for f in dataclasses.fields(objective_config_class(objective))}
    return [o for o in overrides if not o.startswith("objective.") or o.split(".")[1].split("=")[0] in fields]


def alignment_report(objectives, overrides) -> dict:
    """In a child process: {(objective, precision, stage): {"built": [...], "forward": [...]}} of misaligned
    parameters (name, address % 16), after the engine is built and as each module's forward starts."""
    import torch

    from fastenc.config import load_config
    from fastenc.data.loader import build_dataset
    from fastenc.engine.deepspeed_config import build_engine
    from fastenc.engine.distributed import init_distributed
    from fastenc.data.spec import ImageNormalizer
    from fastenc.engine.trainer import _to_device
    from fastenc.objectives import build_objective

    dist = init_distributed(None)
    report = {}
    for objective in objectives:
        for precision, stage in PRECISION_STAGES:
            cfg = load_config(recipe_of(objective), own_overrides(objective, overrides)
                              + [f"engine.zero_stage={stage}", f"engine.precision={precision}"])
            torch.manual_seed(0)
            obj = build_objective(cfg)
            engine, _ = build_engine(cfg, obj, dist.world_size)
            seen = {"built": [(n, p.data_ptr() % 16) for n, p in engine.module.named_parameters()
                              if p.numel() and p.data_ptr() % 16], "forward": []}

            def check(module, _inputs, seen=seen, stage=stage):
                # ZeRO-3 gathers a module's own parameters into one buffer as it runs: two one-element ones on one
                # module (SigLIP's logit scale and bias) cannot both be aligned; a scalar never reaches a GEMM.
                seen["forward"] += [(n, p.data_ptr() % 16) for n, p in module.named_parameters(recurse=False)
                                    if p.numel() and p.data_ptr() % 16 and not (stage == 3 and p.numel() == 1)]

            hooks = [m.register_forward_pre_hook(check) for m in engine.module.modules()]
            batch = next(iter(build_dataset(cfg.data.train_shards, sample_fn=obj.sample_fn(train=True),
                                            batch_size=cfg.data.batch_size, num_workers=0, shuffle_buffer=0,
                                            collate_fn=obj.collate_fn(train=True))))
            batch.pop("num_skipped")
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            loss, _ = engine(_to_device(batch, dist.device, dtype, ImageNormalizer.of(obj.data_spec(train=True))))
            engine.backward(loss)
            engine.step()
            for h in hooks:
                h.remove()
            report[(objective, precision, stage)] = seen
            engine.destroy()
    return report


def test_every_objective_has_a_cpu_recipe():
    from fastenc.objectives import list_objectives

    for name in list_objectives():
        assert os.path.exists(recipe_of(name)), f"objective {name!r} needs configs/cpu/{name}_tiny.yaml"


def test_parameters_are_16_byte_aligned_under_every_stage_and_precision(tiny_data, tmp_path):
    objectives = encoder_objectives()
    report = run_isolated(alignment_report, objectives,
                          tiny_overrides(tiny_data, tmp_path, "data.batch_size=4", "schedule.steps=4"))
    assert set(report) == {(o, p, s) for o in objectives for p, s in PRECISION_STAGES}
    bad = {case: seen for case, seen in report.items() if seen["built"] or seen["forward"]}
    assert not bad, "misaligned parameters:\n" + "\n".join(
        f"  {case}: after build {seen['built'][:4]}, in forward {seen['forward'][:4]}" for case, seen in bad.items())
