"""Acceptance tests of `objective: llava` (fastenc.objectives.llava): LLaVA's two stages on fastenc's engine.

A tiny setup made once per module: the synthetic LLaVA data (fastenc.datatools.synth_vqa, 32 px images), a
`vit_test` encoder exported as a .safetensors, and a 2-layer Llama of width 64 with a BPE tokenizer fitted on the
conversations, saved as a Hugging Face directory. The recipes are configs/cpu/llava_tiny_stage{1,2}.yaml.

1. Stage 1 trains the projector alone: the export keeps encoder and LM bit-identical, the optimizer holds only the
   projector.
2. Stage 2 starts from stage 1's projector and trains projector + LM (+ the encoder at its own lr with vision.train).
3. 2 gloo ranks under ZeRO-2 and ZeRO-3 equal 1 rank with gradient accumulation (losses, grad norms, weights).
4. Kill and resume continues the loss curve exactly (records JSON source, 0 and 2 loader workers).
5. The exported LM reloads with transformers and gives the trained weights' logits; under ZeRO-3 the
   frozen encoder is exported whole.
6. Corrupt records (malformed conversation, not a record, missing image) are skipped and counted.
7. A records file none of whose records is usable ends the stream with an error instead of cycling forever.
"""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers", reason="the vision-language stage needs transformers (make setup)")

from fastenc.run.metrics import read_metrics  # noqa: E402
from tests.engine.conftest import ROOT, train_isolated  # noqa: E402
from tests.gloo import run_ranks  # noqa: E402

STAGE1 = "configs/cpu/llava_tiny_stage1.yaml"
STAGE2 = "configs/cpu/llava_tiny_stage2.yaml"


# ---------------------------------------------------------------------------------------------------------------
# The tiny setup


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastenc.data.conversation import VICUNA_V1
    from fastenc.datatools.synth_vqa import write_synthetic_vqa
    from fastenc.models import create_vit
    from fastenc.models.language import save_lm, train_chat_tokenizer

    root = tmp_path_factory.mktemp("llava")
    data = root / "data"
    paths = write_synthetic_vqa(str(data), 96, num_heldout=8, image_size=32)
    texts = [VICUNA_V1.system, VICUNA_V1.user_prefix, VICUNA_V1.assistant_prefix]
    for key in ("captions", "instruct"):
        with open(paths[key]) as f:
            texts += [turn["value"] for record in json.load(f) for turn in record["conversations"]]
    # vocab_size 1024 asks for every merge these texts allow (~600 tokens): a conversation is then ~80 tokens with
    # its 16 image tokens, where a 300-token vocabulary makes it ~150.
    tokenizer = train_chat_tokenizer(texts, vocab_size=1024)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = create_vit("vit_test")
        lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    vision = str(root / "vit_test.safetensors")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, vision,
              metadata={"format": "pt", "model": "vit_test"})
    save_lm(lm, tokenizer, lm.state_dict(), str(root / "lm"))
    return SimpleNamespace(root=root, data=str(data), vision=vision, lm=str(root / "lm"), **paths)


def _overrides(assets, out_dir, *extra, records="captions"):
    return ["model.name=vit_test", f"data.train_shards={getattr(assets, records)}", f"data.image_folder={assets.data}",
            f"objective.vision.source={assets.vision}", f"objective.lm.path={assets.lm}", "objective.max_length=128",
            "data.batch_size=8", "data.num_workers=0", "engine.log_every=1", "engine.tensorboard=false",
            "schedule.warmup_steps=0", "engine.precision=fp32", f"run.output_dir={out_dir}", *extra]


def _config(recipe, overrides):
    from fastenc.config import load_config

    return load_config(os.path.join(ROOT, recipe), overrides)


def _objective(cfg):
    """The objective as the trainer builds it (seeded by run.seed), so its initial weights are the run's."""
    from fastenc.objectives import build_objective

    torch.manual_seed(cfg.run.seed)
    return build_objective(cfg)


def _optimizer(objective, cfg):
    """The optimizer the trainer gives the engine (fastenc.engine.deepspeed_config.build_engine)."""
    from fastenc.engine.optim import build_optimizer

    return build_optimizer(objective, cfg.optim, objective.no_weight_decay())


def _groups(optimizer) -> dict[int, dict]:
    """{id(parameter): its param group}."""
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def _ids(module):
    return {id(p) for p in module.parameters()}


def _hf_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def stage1(assets, tmp_path_factory):
    """3 stage-1 trainer steps under ZeRO-2 fp32, exported."""
    out = tmp_path_factory.mktemp("stage1")
    overrides = _overrides(assets, out, "schedule.steps=3", "engine.zero_stage=2", "run.name=s1")
    return SimpleNamespace(result=train_isolated(STAGE1, overrides), overrides=overrides)


def _stage2_overrides(assets, stage1, out_dir, *extra):
    return _overrides(assets, out_dir, f"objective.init_from={stage1.result.run_dir}", "engine.zero_stage=3",
                      "optim.lr=1e-3", "schedule.steps=6", "engine.checkpoint_every=3", *extra, records="instruct")


@pytest.fixture(scope="module")
def stage2(assets, stage1, tmp_path_factory):
    """6 stage-2 trainer steps under ZeRO-3 fp32 without interruption (checkpoints at 3 and 6), exported."""
    overrides = _stage2_overrides(assets, stage1, tmp_path_factory.mktemp("stage2"), "run.name=straight")
    return train_isolated(STAGE2, overrides)


# ---------------------------------------------------------------------------------------------------------------
# 1. Stage 1 trains the projector alone


def test_stage1_export_keeps_encoder_and_lm_bit_identical_and_moves_the_projector(assets, stage1):
    from safetensors.torch import load_file

    from fastenc.engine.schedules import warmup_cosine

    export = stage1.result.export_paths
    encoder, initial_encoder = load_file(export["encoder"]), load_file(assets.vision)
    assert encoder.keys() == initial_encoder.keys()
    assert [k for k, v in initial_encoder.items() if not torch.equal(encoder[k], v)] == []
    lm, initial_lm = _hf_lm(export["lm"]).state_dict(), _hf_lm(assets.lm).state_dict()
    assert lm.keys() == initial_lm.keys()
    assert [k for k, v in initial_lm.items() if not torch.equal(lm[k], v)] == []

    cfg = _config(STAGE1, stage1.overrides)
    initial = _objective(cfg).projector.state_dict()
    projector = load_file(export["projector"])
    assert projector.keys() == initial.keys()
    # Every projector tensor moved, and by no more than AdamW's steps can move it (each step changes a weight by
    # about lr at most; 2x margin): the export is the trained projector, grown from this initial one.
    lrs = warmup_cosine(cfg.optim.lr, cfg.schedule.steps, cfg.schedule.warmup_steps)[:cfg.schedule.steps]
    for k, v in initial.items():
        moved = (projector[k] - v).abs().max().item()
        assert 0 < moved <= 2 * float(sum(lrs)), (k, moved)


def test_stage1_optimizer_holds_only_the_projector(assets, tmp_path):
    cfg = _config(STAGE1, _overrides(assets, tmp_path))
    objective = _objective(cfg)
    assert set(_groups(_optimizer(objective, cfg))) == _ids(objective.projector)
    assert not any(p.requires_grad for p in [*objective.encoder.parameters(), *objective.lm.parameters()])
    objective.train()  # the frozen towers stay in eval mode (no dropout in a tower that does not learn)
    assert objective.projector.training and not objective.encoder.training and not objective.lm.training


# ---------------------------------------------------------------------------------------------------------------
# 2. Stage 2 starts from stage 1's projector


def test_stage2_starts_from_stage1_projector_and_trains_it_with_the_lm(assets, stage1, tmp_path):
    from safetensors.torch import load_file

    cfg = _config(STAGE2, _stage2_overrides(assets, stage1, tmp_path))
    objective = _objective(cfg)
    want = load_file(stage1.result.export_paths["projector"])
    got = objective.projector.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
    groups = _groups(_optimizer(objective, cfg))
    assert set(groups) == _ids(objective.projector) | _ids(objective.lm)  # the encoder is not (vision.train false)
    assert all(p.requires_grad for p in objective.lm.parameters())
    assert all("lr_scale" not in g for g in groups.values())


def test_stage2_vision_train_puts_the_encoder_in_at_its_own_lr(assets, stage1, tmp_path):
    from fastenc.engine.schedules import PrecomputedLR, warmup_cosine

    cfg = _config(STAGE2, _stage2_overrides(assets, stage1, tmp_path, "objective.vision.train=true",
                                            "objective.vision.lr=2.5e-5"))
    objective = _objective(cfg)
    optimizer = _optimizer(objective, cfg)
    groups = _groups(optimizer)
    encoder = _ids(objective.encoder)
    assert set(groups) == _ids(objective.projector) | _ids(objective.lm) | encoder
    scale = 2.5e-5 / cfg.optim.lr
    for pid, group in groups.items():
        assert group.get("lr_scale", 1.0) == pytest.approx(scale if pid in encoder else 1.0)
    # and the schedule applies it: the encoder's groups run at vision.lr where the others run at optim.lr
    PrecomputedLR(optimizer, warmup_cosine(cfg.optim.lr, cfg.schedule.steps, cfg.schedule.warmup_steps))
    for group in optimizer.param_groups:
        is_encoder = {id(p) for p in group["params"]} <= encoder
        assert group["lr"] == pytest.approx(2.5e-5 if is_encoder else cfg.optim.lr)


# ---------------------------------------------------------------------------------------------------------------
# 3. Data parallelism: 2 gloo ranks equal 1 rank with gradient accumulation

MICRO, PARITY_STEPS = 2, 3


def _parity_rank(rank, world, overrides, records, image_folder):
    """PARITY_STEPS engine steps of stage 2 on fixed micro-batches; step s's global batch is micro-batches 2s (a)
    and 2s + 1 (b) of consecutive records: one rank accumulates a then b, two ranks take one each."""
    import torch.distributed as dist

    from fastenc.data.records import RecordTable, raw_sample
    from fastenc.data.spec import ImageNormalizer
    from fastenc.engine.checkpoint import fp32_state_dict
    from fastenc.engine.deepspeed_config import build_engine
    from fastenc.engine.distributed import init_distributed

    init_distributed(None)  # from the env run_ranks sets, as under the deepspeed launcher
    cfg = _config(STAGE2, overrides)
    engine, _ = build_engine(cfg, _objective(cfg), world)
    objective = engine.module
    sample, collate = objective.sample_fn(train=True), objective.collate_fn(train=True)
    normalize = ImageNormalizer.of(objective.data_spec(train=True))  # as the trainer does, on the device
    table = RecordTable(records)

    def micro_batch(i):
        return normalize(collate([sample(raw_sample(table, j, image_folder))
                                  for j in range(i * MICRO, (i + 1) * MICRO)]))

    losses, grad_norms = [], []
    for step in range(PARITY_STEPS):
        mine = [2 * step, 2 * step + 1] if world == 1 else [2 * step + rank]
        step_loss = torch.zeros(())
        for i in mine:
            loss, _ = engine(micro_batch(i))
            engine.backward(loss)
            engine.step()  # the optimizer steps at the accumulation boundary only
            step_loss += loss.detach() / len(mine)
        if world > 1:
            dist.all_reduce(step_loss)
            step_loss /= world
        losses.append(step_loss)
        grad_norms.append(float(engine.get_global_grad_norm()))
    return {"losses": torch.stack(losses), "grad_norms": torch.tensor(grad_norms), "state": fp32_state_dict(engine)}


def _parity(assets, out_dir, world, zero_stage):
    overrides = _overrides(assets, out_dir, f"engine.zero_stage={zero_stage}", f"data.batch_size={2 * MICRO}",
                           f"engine.micro_batch_size={MICRO}", "objective.init_from=", "optim.lr=1e-3",
                           "schedule.steps=10", records="instruct")
    return run_ranks(_parity_rank, world, out_dir, overrides, assets.instruct, assets.data, start_method="spawn",
                     timeout_s=300, init_process_group=False)


@pytest.fixture(scope="module")
def one_rank(assets, tmp_path_factory):
    return _parity(assets, tmp_path_factory.mktemp("one_rank"), 1, 2)[0]


@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_equal_one_rank_with_accumulation(assets, one_rank, zero_stage, tmp_path):
    initial = _objective(_config(STAGE2, _overrides(assets, tmp_path, "objective.init_from="))).state_dict()
    want = one_rank["state"]
    assert want.keys() == initial.keys()
    moved = {k for k, v in initial.items() if not torch.equal(want[k], v)}
    assert moved and all(k.startswith(("projector.", "lm.")) for k in moved)  # the comparison means something
    # Tolerances: fp32 throughout, the same micro-batches, and DeepSpeed divides by accumulation steps and by ranks
    # alike, so the only difference allowed is the order of float sums (gradients reduced across ranks, ZeRO-3's
    # partitioned optimizer step), a few ulps that AdamW's normalized updates carry into the weights. Measured:
    # ZeRO-2 is bit-identical to one rank; ZeRO-3 is 2e-6 of a tensor's largest entry off (1.4e-7 absolute), against
    # 1e-5 allowed. A wrong average (a sum over ranks) shows in the grad norms (clipping is active: they are ~3 with
    # optim.clip_grad 1) and a rank training on other data in everything, by ~lr = 1e-3.
    for rank, got in enumerate(_parity(assets, tmp_path, 2, zero_stage)):
        torch.testing.assert_close(got["losses"], one_rank["losses"], rtol=1e-5, atol=0)
        torch.testing.assert_close(got["grad_norms"], one_rank["grad_norms"], rtol=1e-4, atol=0)
        assert got["state"].keys() == want.keys()
        for k, w in want.items():
            atol = 1e-5 * w.abs().max().item() + 1e-7
            torch.testing.assert_close(got["state"][k], w, rtol=1e-4, atol=atol,
                                       msg=lambda m: f"ZeRO-{zero_stage} rank {rank} {k}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# 4. Kill and resume


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_and_resume_continues_the_loss_curve_exactly(assets, stage1, stage2, workers, tmp_path):
    """The stage-2 run of the `stage2` fixture (6 steps straight, 0 workers) against the same run stopped after
    step 3 and resumed from its checkpoint, both halves with `workers` loader workers. The records stream resumes at
    the exact next batch, for any number of workers (fastenc.data.records), and the checkpoint holds the fp32 master
    weights, AdamW's moments and the schedule's position: every step computes the same numbers in the same order on
    the same thread count, so the losses are equal, not merely close."""
    overrides = _stage2_overrides(assets, stage1, tmp_path, "run.name=resumed", f"data.num_workers={workers}")
    first = train_isolated(STAGE2, overrides, max_steps=3, export=False, plot=False)
    assert first.steps == 3
    second = train_isolated(STAGE2, overrides, resume=first.run_dir, export=False, plot=False)
    assert second.run_dir == first.run_dir and second.steps == 6
    want = read_metrics(stage2.metrics_path)
    rows = read_metrics(second.metrics_path)
    assert [r["step"] for r in rows] == [r["step"] for r in want] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [r["loss"] for r in want]
    assert [r["tokens_per_sample"] for r in rows] == [r["tokens_per_sample"] for r in want]  # the same batches


# ---------------------------------------------------------------------------------------------------------------
# 5. The exported LM is a Hugging Face model with the trained weights


def test_exported_lm_reloads_with_transformers_and_gives_the_trained_logits(assets, stage2):
    """export/lm (written from the ZeRO-3 fp32 state) against the weights of the run's last checkpoint, read by
    DeepSpeed's own zero_to_fp32 (no fastenc code on that side)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoTokenizer

    from fastenc.models.language import IMAGE

    path = stage2.export_paths["lm"]
    exported, tokenizer = _hf_lm(path), AutoTokenizer.from_pretrained(path, local_files_only=True)
    source = AutoTokenizer.from_pretrained(assets.lm, local_files_only=True)
    text = "USER: What color is the shape? ASSISTANT: red</s>"
    assert tokenizer(text)["input_ids"] == source(text)["input_ids"]
    assert tokenizer.convert_tokens_to_ids(IMAGE) == source.convert_tokens_to_ids(IMAGE) != tokenizer.unk_token_id

    ckpt = os.path.join(stage2.run_dir, "checkpoints")
    state = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="step00000006")
    trained = _hf_lm(assets.lm)
    initial = {k: v.clone() for k, v in trained.state_dict().items()}
    trained.load_state_dict({k[len("lm."):]: v.float() for k, v in state.items() if k.startswith("lm.")}, strict=True)
    assert not all(torch.equal(v, initial[k]) for k, v in trained.state_dict().items())  # stage 2 trained the LM

    real = torch.tensor(source(text)["input_ids"])
    ids = torch.stack([real, torch.randint(len(source), real.shape, generator=torch.Generator().manual_seed(0))])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, trained(ids).logits)


def test_stage2_zero3_export_holds_the_frozen_encoder_whole(assets, stage2):
    """ZeRO-3 partitions the frozen encoder too (its larger tensors are over the persistence threshold) and keeps
    no fp32 master copy of it: the export must gather it, not write the rank's empty partition."""
    from safetensors.torch import load_file

    encoder, initial = load_file(stage2.export_paths["encoder"]), load_file(assets.vision)
    assert encoder.keys() == initial.keys()
    assert [k for k, v in initial.items() if not torch.equal(encoder[k], v)] == []


# ---------------------------------------------------------------------------------------------------------------
# 6. Corrupt records are skipped and counted


def test_corrupt_records_are_skipped_and_counted(assets, tmp_path):
    """13 good caption records and 3 bad ones: a conversation that starts with the assistant, an entry that is not
    a record, and a record whose image file is missing. Two steps of 8 are one epoch: every record is met once."""
    with open(assets.captions) as f:
        good = json.load(f)[:13]
    first = good[0]
    bad = [{**first, "id": "gpt-first", "conversations": first["conversations"][::-1]},
           "not a record",
           {**first, "id": "no-image", "image": "images/missing.jpg"}]
    records = str(tmp_path / "with_corrupt.json")
    with open(records, "w") as f:
        json.dump(good + bad, f)
    overrides = _overrides(assets, tmp_path, f"data.train_shards={records}", "schedule.steps=2", "run.name=corrupt")
    result = train_isolated(STAGE1, overrides, export=False, plot=False)
    rows = read_metrics(result.metrics_path)
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["num_skipped"] == 3


@pytest.mark.timeout(120)
def test_records_that_all_fail_end_the_stream_with_an_error_not_a_hang(assets, tmp_path):
    """max_length 16 cuts through every sample's 16 image tokens: no record of the file is usable. The stream
    says so after an epoch, where it used to go round its epochs forever (a file of fewer records than
    max_consecutive_skips never reaches that limit, which restarts with every epoch)."""
    from fastenc.data.records import RecordStream

    objective = _objective(_config(STAGE1, _overrides(assets, tmp_path, "objective.max_length=16")))
    stream = RecordStream(assets.captions, assets.data, sample_fn=objective.sample_fn(), batch_size=8,
                          collate_fn=objective.collate_fn(), num_workers=0, seed=0, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="96 records .* in a row could not be used"):
        next(stream)


def test_preset_tokenizer_is_fitted_on_fit_on_too(assets, tmp_path):
    """lm.fit_on: the later stages' words become whole tokens of a preset LM's vocabulary; a missing file is an
    error that names it, before anything is created."""
    from transformers import AutoTokenizer

    from fastenc.errors import ConfigError
    from fastenc.objectives.llava import LlavaObjective

    def prepared(name, *extra):
        cfg = _config(STAGE1, _overrides(assets, tmp_path, f"objective.lm.path={tmp_path / name}",
                                         "objective.lm.preset=llama_tiny", "objective.lm.vocab_size=1024", *extra))
        LlavaObjective.prepare(cfg)
        return AutoTokenizer.from_pretrained(str(tmp_path / name))

    word = "Options"  # in every multiple-choice prompt of instruct.json, in no caption
    assert len(prepared("captions_only", "objective.lm.fit_on=[]").tokenize(word)) > 1
    assert len(prepared("both", f"objective.lm.fit_on=[{assets.instruct}]").tokenize(word)) == 1
    with pytest.raises(ConfigError, match="nowhere.json"):
        prepared("missing", f"objective.lm.fit_on=[{tmp_path / 'nowhere.json'}]")
    assert not os.path.exists(tmp_path / "missing")
