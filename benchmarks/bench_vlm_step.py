"""Stage-2 LLaVA training-step throughput (objective: llava, stage 2) on fastenc's engine, against two peers in the
same run: padding every batch to a fixed max_length, and the plain PyTorch loop over the same module.

    python benchmarks/bench_vlm_step.py                      # CPU: llama_tiny + vit_cpu_patch8_64 (64 image tokens)
    python benchmarks/bench_vlm_step.py --batch 8 --steps 4 --repeats 5 --zero-stage 1 --note "..."
    bash benchmarks/gpu_vlm_step.sh                          # GPU: llama_1b + ViT-B/16 at 384 px (576 image tokens)

What runs. The objective is built from a stage-2 config (--config, default configs/cpu/llava_tiny_stage2.yaml, with
this script's data, encoder and LM swapped in and any `section.key=value` overrides), exactly as the trainer builds
it; batches come from the objective's own sample_fn (JPEG decode, eval transform, Vicuna-v1 rendering, labels,
`<image>` expansion) and collate_fn over LLaVA-format records (fastenc.data.records), made before any clock starts
and cycled (--pool distinct batches).
  engine  `fastenc.engine.deepspeed_config.build_engine` (DeepSpeed, the config's ZeRO stage and precision) and the
          trainer's own step (`fastenc.engine.trainer.TrainLoop.step`: to device, normalize, forward, engine.backward,
          engine.step), with two padding policies, alternated repeat by repeat:
            longest     fastenc's ConversationCollate: each batch padded to its longest sequence, rounded up to 8
            max_length  the same batches padded further to a fixed length (Hugging Face's `padding="max_length"`;
                        --fixed-length, default the longest sample of the records rounded up to 64, the tightest
                        fixed length that cuts nothing)
  plain   the same objective module (same seed, same weights) without DeepSpeed: torch AdamW from the same parameter
          groups (fastenc.engine.optim, fused), gradient clipping at optim.clip_grad, bf16 autocast when
          --precision bf16, no LR schedule; pad-to-longest batches. Each impl runs in its own process.

Data. Synthetic LLaVA records (fastenc.datatools.synth_vqa's images and questions) whose text lengths are
controlled: each sample's text-token target is drawn uniformly from --text-tokens x [1 - spread, 1 + spread] and
its conversation gets question/answer turns about its image (color, shape, word, caption) until its length is
closest to that target. "Text tokens" are every non-image token of the sample (BOS, system prompt, roles, questions,
answers); the image adds the encoder's patch tokens. The tokenizer is a byte-level BPE fitted on the turns' texts
and the template's words once each (`train_chat_tokenizer`; words become single tokens, and the Vicuna system prompt
28 tokens, about what Llama's tokenizer makes of it, where the objective's own preset fits on whole rendered
conversations and merges the repeated prompt into a few tokens); the LM is a random-init Llama of --lm-preset
whose embedding and head have --lm-vocab rows (default the tokenizer's size; TinyLlama's 32000 on the GPU). The
vision encoder is a freshly initialized ViT (--model, --image-size) saved as .safetensors and loaded as a run's
encoder would be (frozen, as in LLaVA stage 2). Everything is cached under --work-dir by its settings.

Measured. Per (impl, padding): --warmup steps dropped, then --repeats timed blocks of --steps steps (CUDA: synchronized
at each block's end); medians over the repeats of samples/s, tokens/s (real tokens: attention_mask sum, image tokens
included), computed positions/s (batch x padded length) and the padding fraction (1 - real / computed positions).
Ratios in the same run: `vs_max_length` (engine, pad-to-longest tokens/s over pad-to-max_length tokens/s: the
same samples, so it is also the samples/s ratio) and `vs_plain` (engine samples/s over the plain loop's, both
pad-to-longest). model_tflops: 6 x (LM parameters without the input embedding + projector) x real tokens/s + 2 x ViT
parameters x patch tokens/s (the frozen encoder's forward), attention's quadratic term left out; on CUDA, MFU against
989 TFLOP/s (dense bf16 peak of an H100/H200 SXM). Rows are appended to --out (CSV, with the hardware, versions, git
revision and the CPU other processes used during each impl) and this run's table is written to --markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import harness  # noqa: E402

BENCH = "vlm_step"
PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
IMPLS = ("engine", "plain")
POLICIES = ("longest", "max_length")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "cpu", "llava_tiny_stage2.yaml"),
                   help="the stage-2 recipe the objective and engine are built from")
    p.add_argument("--lm-preset", default="llama_tiny", help="fastenc.models.language.LM_PRESETS name")
    p.add_argument("--lm-vocab", type=int, default=0,
                   help="rows of the LM's embedding and head (0: the fitted tokenizer's size; 32000: TinyLlama's)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size asked of the fitted BPE tokenizer")
    p.add_argument("--model", default="vit_cpu_patch8_64", help="ViT preset of the vision encoder")
    p.add_argument("--image-size", type=int, default=0, help="the ViT's image size (0: the preset's)")
    p.add_argument("--text-tokens", type=int, default=128, help="mean text (non-image) tokens per sample")
    p.add_argument("--text-spread", type=float, default=0.5,
                   help="text-token targets uniform in text_tokens x [1 - spread, 1 + spread]")
    p.add_argument("--batch", type=int, default=16, help="samples per step (one micro-batch, one rank)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=2, help="steps run and dropped first, per padding policy")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per (impl, padding); medians over them")
    p.add_argument("--pool", type=int, default=8, help="distinct batches, cycled")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--zero-stage", type=int, default=None, help="DeepSpeed ZeRO stage (default: the config's)")
    p.add_argument("--fixed-length", type=int, default=0,
                   help="the max_length peer's sequence length (0: the longest sample rounded up to 64)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list of engine, plain")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: usable cores)")
    p.add_argument("--out", default=None,
                   help="CSV to append to (default: results/vlm_step_cpu.csv; on CUDA results/gpu/vlm_step.csv)")
    p.add_argument("--markdown", default=None, help="this run's table (default: --out with .md)")
    p.add_argument("--work-dir", default=os.path.join(HERE, ".cache", BENCH),
                   help="cache of the synthetic records, encoder and LM (one folder per setting)")
    p.add_argument("--wait-idle", type=float, default=None,
                   help="before each impl, wait up to this many seconds for other processes to use < 0.3 cores "
                        "(default 600 on CPU, 0 on CUDA)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per impl process before it is an error")
    p.add_argument("--note", default="", help="free text for the rows and the markdown (what else was running)")
    p.add_argument("--run-impl", help=argparse.SUPPRESS)
    p.add_argument("--prep", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="fastenc dotted overrides of the config (section.key=value)")
    a = p.parse_args(argv)
    import torch

    a.cuda = torch.cuda.is_available()
    a.precision = a.precision or ("bf16" if a.cuda else "fp32")
    a.threads = a.threads or harness.usable_cores()
    if a.wait_idle is None:
        a.wait_idle = 0.0 if a.cuda else 600.0
    a.out = a.out or (os.path.join(harness.RESULTS_DIR, "gpu", f"{BENCH}.csv") if a.cuda
                      else os.path.join(harness.RESULTS_DIR, f"{BENCH}_cpu.csv"))
    a.markdown = a.markdown or os.path.splitext(a.out)[0] + ".md"
    a.impl_list = [i for i in a.impls.split(",") if i]
    if not a.impl_list or any(i not in IMPLS for i in a.impl_list):
        p.error(f"--impls: a comma list of {', '.join(IMPLS)}")
    if a.steps < 1 or a.repeats < 1 or a.batch < 1 or a.pool < 1 or a.warmup < 0:
        p.error("--steps, --repeats, --batch and --pool must be positive, --warmup non-negative")
    return a


# ----------------------------------------------------------------------------------------------------------------
# preparation (once per setting, cached): images, records of controlled length, the encoder, the LM


def prep_key(a) -> str:
    keys = {k: getattr(a, k) for k in ("lm_preset", "lm_vocab", "vocab", "model", "image_size", "text_tokens",
                                       "text_spread", "batch", "pool")}
    digest = hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:10]
    return f"{a.lm_preset}_{a.model}_{a.image_size or 'preset'}_{digest}"


def prepare(a) -> dict:
    """The work folder of this setting, made if absent; returns its manifest (paths and record statistics)."""
    work = os.path.join(os.path.abspath(a.work_dir), prep_key(a))
    manifest = os.path.join(work, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            return json.load(f)
    t0 = time.time()
    print(f"[{BENCH}] preparing {work} (records, encoder, {a.lm_preset})", flush=True)
    os.makedirs(work, exist_ok=True)
    out = _prepare(a, work)
    out["prepare_s"] = round(time.time() - t0, 1)
    with open(manifest, "w") as f:  # last: a half-made folder has no manifest and is made again
        json.dump(out, f, indent=1)
    return out


def _prepare(a, work: str) -> dict:
    import numpy as np
    import torch

    from fastenc.data.conversation import VICUNA_V1, ConversationEncoder
    from fastenc.datatools.synth_vqa import CAPTION_PROMPTS, write_synthetic_vqa
    from fastenc.models import create_vit
    from fastenc.models.language import IMAGE, train_chat_tokenizer
    from fastenc.utils import atomic

    image_size = a.image_size or create_vit(a.model).img_size
    num = a.batch * a.pool
    paths = write_synthetic_vqa(os.path.join(work, "data"), num, num_heldout=0, image_size=image_size, seed=0)
    with open(paths["instruct"]) as f:
        instruct = json.load(f)
    with open(paths["captions"]) as f:
        captions = json.load(f)

    def pairs(record):
        turns = [t["value"].replace("<image>\n", "") for t in record["conversations"]]
        return list(zip(turns[0::2], turns[1::2]))

    texts = [VICUNA_V1.system, VICUNA_V1.user_prefix, VICUNA_V1.assistant_prefix]
    for record in instruct + captions:
        texts += [t["value"] for t in record["conversations"]]
    tokenizer = train_chat_tokenizer(texts, vocab_size=a.vocab)
    # Text lengths: the image is one <image> token here, so len(ids) - 1 is the sample's text tokens.
    measure = ConversationEncoder(tokenizer, VICUNA_V1, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                                  num_image_tokens=1, max_length=10**9)
    rng = np.random.default_rng(0)
    lo, hi = a.text_tokens * (1 - a.text_spread), a.text_tokens * (1 + a.text_spread)
    records, lengths = [], []
    for ins, cap in zip(instruct, captions):
        caption = pairs(cap)[0][1]
        pool = pairs(ins) + [(prompt, caption) for prompt in CAPTION_PROMPTS]
        target = float(rng.uniform(lo, hi))
        chosen, best, order = [], None, []
        while True:
            if not order:  # each pair once before any comes again
                order = [int(j) for j in rng.permutation(len(pool))]
            chosen.append(pool[order.pop()])
            turns = []
            for i, (q, ans) in enumerate(chosen):
                turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q},
                          {"from": "gpt", "value": ans}]
            n = len(measure({"conversations": turns}, has_image=True)[0]) - 1
            if best is None or abs(n - target) <= abs(best[0] - target):
                best = (n, turns)
            if n >= target:
                break
        lengths.append(best[0])
        records.append({"id": ins["id"], "image": ins["image"], "conversations": best[1]})
    records_path = atomic.write_json(os.path.join(work, "records.json"), records, indent=None)

    lm_path, lm_params, lm_vocab = _create_lm(a, tokenizer, os.path.join(work, "lm"))
    encoder_path, vit_params, num_patches = _create_encoder(a, image_size, os.path.join(work, "encoder.safetensors"))
    del torch
    return {"work": work, "records": records_path, "image_folder": os.path.join(work, "data"), "lm": lm_path,
            "encoder": encoder_path, "image_size": image_size, "num_records": len(records),
            "tokenizer_size": len(tokenizer), "lm_vocab": lm_vocab, "lm_params": lm_params, "vit_params": vit_params,
            "image_tokens": num_patches, "text_tokens_mean": float(np.mean(lengths)),
            "text_tokens_min": int(min(lengths)), "text_tokens_max": int(max(lengths))}


def _create_lm(a, tokenizer, path: str) -> tuple[str, int, int]:
    """A random-init Llama of the preset (made on the GPU where there is one: 1B parameters initialize in
    seconds there), saved with the tokenizer as a Hugging Face directory (bf16 weights when large: half the bytes
    to write and read; the objective loads them as fp32 either way)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastenc.models.language import LM_PRESETS, save_lm

    vocab = max(len(tokenizer), a.lm_vocab)
    config = LlamaConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **LM_PRESETS[a.lm_preset])
    with torch.random.fork_rng(devices=[]), torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(0)
        lm = LlamaForCausalLM(config)
    params = sum(p.numel() for p in lm.parameters())
    dtype = torch.bfloat16 if params > 100e6 else torch.float32
    state = {k: v.detach().to("cpu", dtype) for k, v in lm.state_dict().items()}
    save_lm(lm, tokenizer, state, path)
    del lm, state
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the driver holds no GPU memory while the impls run
    return path, params, vocab


def _create_encoder(a, image_size: int, path: str) -> tuple[str, int, int]:
    """A freshly initialized ViT as fastenc exports an encoder: timm names, {"format", "model"} metadata (and the
    image size in a fastenc_config when it is not the preset's, which fastenc.models.load_vit reads)."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from fastenc.models import create_vit

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = create_vit(a.model, img_size=image_size)
    meta = {"format": "pt", "model": a.model}
    if image_size != create_vit(a.model).img_size:
        meta["fastenc_config"] = yaml.safe_dump({"model": {"name": a.model, "img_size": image_size}})
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path, metadata=meta)
    grid = vit.grid_size
    return path, sum(p.numel() for p in vit.parameters()), grid[0] * grid[1]


def fixed_length(a, prep: dict) -> int:
    longest = prep["text_tokens_max"] + prep["image_tokens"]
    return a.fixed_length or -(-longest // 64) * 64


# ----------------------------------------------------------------------------------------------------------------
# one impl (its own process: `--run-impl NAME --prep FILE --result FILE`)


def bench_config(a, prep: dict, run_root: str):
    from fastenc.config import load_config

    forced = [
        f"data.train_shards={prep['records']}", f"data.image_folder={prep['image_folder']}", "data.backend=torch",
        f"data.batch_size={a.batch}", f"engine.micro_batch_size={a.batch}",
        f"objective.vision.source={prep['encoder']}", "objective.vision.model=", "objective.init_from=",
        f"objective.lm.path={prep['lm']}", "objective.lm.preset=", "objective.chat_format=vicuna_v1",
        f"objective.max_length={max(fixed_length(a, prep), 2048)}",
        f"engine.precision={a.precision}", "engine.checkpoint_every=0", "engine.tensorboard=false",
        "engine.detailed_timing=false",  # no per-phase CUDA syncs inside the step
        f"run.output_dir={run_root}", "schedule.steps=100000",
    ]
    if a.zero_stage is not None:
        forced.append(f"engine.zero_stage={a.zero_stage}")
    return load_config(a.config, forced + list(a.overrides))


def make_batches(obj, cfg, a, prep: dict, device) -> dict[str, list[dict]]:
    """{"longest": [batch], "max_length": [batch]}: the same samples, from the objective's sample_fn + collate_fn,
    and those batches padded on to the fixed length (input_ids with the pad id, labels IGNORE, mask 0)."""
    import torch

    from fastenc.data.conversation import IGNORE
    from fastenc.data.records import RecordTable, raw_sample

    table = RecordTable(prep["records"])
    sample_fn, collate_fn = obj.sample_fn(train=True), obj.collate_fn(train=True)
    length = fixed_length(a, prep)
    out = {"longest": [], "max_length": []}
    for b in range(a.pool):
        samples = [sample_fn(raw_sample(table, i, prep["image_folder"])) for i in range(b * a.batch, (b + 1) * a.batch)]
        batch = collate_fn(samples)
        pad = length - batch["input_ids"].shape[1]
        if pad < 0:
            raise RuntimeError(f"a batch of length {batch['input_ids'].shape[1]} exceeds --fixed-length {length}")
        fixed = dict(batch)
        for key, value in (("input_ids", collate_fn.pad_id), ("labels", IGNORE), ("attention_mask", 0)):
            fixed[key] = torch.nn.functional.pad(batch[key], (0, pad), value=value)
        for name, bt in (("longest", batch), ("max_length", fixed)):
            bt = {k: v.pin_memory() if device.type == "cuda" else v for k, v in bt.items()}
            out[name].append(bt)
    return out


def batch_stats(batches: list[dict]) -> dict:
    real = [int(b["attention_mask"].sum()) for b in batches]
    positions = [b["attention_mask"].numel() for b in batches]
    return {"real": real, "positions": positions, "seq_len_mean": sum(b["input_ids"].shape[1] for b in batches)
            / len(batches)}


def timed(step, batches: list[dict], a, cuda: bool, cursor: list[int]) -> tuple[float, int, int]:
    """Run --steps steps over the cycled batches; (seconds, real tokens, computed positions)."""
    import torch

    stats = batch_stats(batches)
    real = positions = 0
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        i = cursor[0] % len(batches)
        cursor[0] += 1
        step(batches[i])
        real, positions = real + stats["real"][i], positions + stats["positions"][i]
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, real, positions


def run_impl(impl: str, a, prep: dict) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    cuda = a.cuda
    with tempfile.TemporaryDirectory(prefix=f"fastenc_{BENCH}_") as run_root:
        cfg = bench_config(a, prep, run_root)
        if impl == "engine":
            return _run_engine(cfg, a, prep, cuda)
        return _run_plain(cfg, a, prep, cuda)


def _measure(step_of: dict, batches: dict, a, cuda: bool) -> dict:
    """Warmup per policy, then --repeats blocks alternating the policies; per policy the blocks' numbers."""
    import torch

    cursors = {p: [0] for p in step_of}
    for p, step in step_of.items():
        for i in range(a.warmup):
            step(batches[p][i % len(batches[p])])
        cursors[p][0] = a.warmup
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    harness.reset_peak_rss()
    blocks = {p: [] for p in step_of}
    for _ in range(a.repeats):
        for p, step in step_of.items():
            sec, real, positions = timed(step, batches[p], a, cuda, cursors[p])
            blocks[p].append({"s": sec, "real": real, "positions": positions})
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else harness.peak_rss_mb() / 1024
    return {p: {"blocks": blocks[p], "seq_len_mean": batch_stats(batches[p])["seq_len_mean"],
                "peak_mem_gib": peak} for p in step_of}


def _run_engine(cfg, a, prep: dict, cuda: bool) -> dict:
    import torch

    from fastenc.engine.deepspeed_config import build_engine
    from fastenc.engine.distributed import init_distributed
    from fastenc.engine.trainer import Interval, TrainLoop
    from fastenc.objectives import build_objective

    dist = init_distributed()
    torch.manual_seed(cfg.run.seed)
    obj = build_objective(cfg)
    trainable = _param_counts(obj)
    engine, scheduler = build_engine(cfg, obj, dist.world_size)
    batches = make_batches(engine.module, cfg, a, prep, dist.device)
    loop = TrainLoop(cfg, dist, engine, scheduler, stream=None, logger=None, run_dir=None)
    engine.train()
    intervals = {p: Interval() for p in POLICIES}
    counter = [0]

    def step_with(policy):
        def step(batch):
            loop.stream = iter([batch])  # the trainer's step reads its micro-batch from the stream
            loop.step(counter[0], intervals[policy])
            counter[0] += 1
        return step

    out = _measure({p: step_with(p) for p in POLICIES}, batches, a, cuda)
    for p in POLICIES:
        metrics, _ = intervals[p].reduce(dist)
        out[p].update(loss=metrics["loss"], padding_frac_metric=metrics["padding_frac"])
    note = f"fastenc engine: DeepSpeed ZeRO-{cfg.engine.zero_stage} {cfg.engine.precision}, TrainLoop.step"
    return {"policies": out, "zero_stage": cfg.engine.zero_stage, "note": note, **trainable}


def _run_plain(cfg, a, prep: dict, cuda: bool) -> dict:
    import torch

    from fastenc.data.spec import ImageNormalizer
    from fastenc.engine.optim import build_optimizer
    from fastenc.engine.trainer import _to_device
    from fastenc.objectives import build_objective

    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(cfg.run.seed)
    obj = build_objective(cfg)
    trainable = _param_counts(obj)
    obj = obj.to(device).train()
    opt = build_optimizer(obj, cfg.optim, obj.no_weight_decay())  # torch AdamW, fused
    params = [p for p in obj.parameters() if p.requires_grad]
    normalize = ImageNormalizer.of(obj.data_spec(train=True))
    batches = make_batches(obj, cfg, a, prep, device)
    bf16 = a.precision == "bf16"
    losses = []

    def step(batch):
        b = _to_device(batch, device, torch.float32, normalize)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = obj(b)
        loss.backward()
        if cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    out = _measure({"longest": step}, batches, a, cuda)
    out["longest"]["loss"] = float(torch.stack(losses[-a.steps:]).float().mean())
    note = (f"plain PyTorch loop: torch AdamW (fused), clip_grad_norm_ {cfg.optim.clip_grad}, "
            + ("bf16 autocast" if bf16 else "fp32") + ", no DeepSpeed")
    return {"policies": out, "zero_stage": "", "note": note, **trainable}


def _param_counts(obj) -> dict:
    """Parameters for the FLOP count: trained LM + projector weights (input embedding excluded: a lookup), ViT."""
    emb = obj.lm.get_input_embeddings().weight
    lm = sum(p.numel() for p in obj.lm.parameters()) - emb.numel()
    return {"lm_flop_params": lm + sum(p.numel() for p in obj.projector.parameters()),
            "vit_params": sum(p.numel() for p in obj.encoder.parameters()),
            "trainable_params": sum(p.numel() for p in obj.parameters() if p.requires_grad)}


def child_main(a) -> int:
    with open(a.prep) as f:
        prep = json.load(f)
    try:
        out = run_impl(a.run_impl, a, prep)
    except Exception as e:  # noqa: BLE001 - recorded as the rows' error, the parent goes on
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}"[:400]}
    with open(a.result, "w") as f:
        json.dump(out, f)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# the driver


def busy_processes(window_s: float = 2.0, min_cores: float = 0.05) -> str:
    """Other processes that used more than min_cores over the next window_s seconds: "cmd (cores), ..." (what else
    was running, for the record; "" where /proc is missing)."""
    def snapshot():
        tick, out = os.sysconf("SC_CLK_TCK"), {}
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != os.getpid():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    continue
                out[name] = ((int(fields[11]) + int(fields[12])) / tick, cmd)
        return out

    try:
        first = snapshot()
        time.sleep(window_s)
        second = snapshot()
    except OSError:
        return ""
    busy = sorted(((second[p][0] - first[p][0]) / window_s, second[p][1]) for p in second if p in first)
    return ", ".join(f"{cmd[:90]} ({cores:.2f} cores)" for cores, cmd in reversed(busy) if cores > min_cores)


def rows_of(impl: str, out: dict, a, prep: dict, mon: dict, wall_s: float) -> list[dict]:
    base = {"timestamp": harness.utc_now(), "bench": BENCH, "impl": impl, "lm_preset": a.lm_preset,
            "lm_vocab": prep["lm_vocab"], "lm_params": prep["lm_params"], "vit": a.model,
            "image_size": prep["image_size"], "image_tokens": prep["image_tokens"],
            "text_tokens_mean": round(prep["text_tokens_mean"], 1), "text_tokens_min": prep["text_tokens_min"],
            "text_tokens_max": prep["text_tokens_max"], "batch": a.batch, "steps": a.steps, "warmup": a.warmup,
            "repeats": a.repeats, "pool": a.pool, "precision": a.precision, "threads": a.threads,
            "fixed_length": fixed_length(a, prep), "wall_s": round(wall_s, 1), **mon}
    if "error" in out:
        return [{**base, "padding": "", "status": "error", "error": out["error"], "note": a.note}]
    rows = []
    for policy, res in out["policies"].items():
        blocks = res["blocks"]
        sps = [a.steps * a.batch / b["s"] for b in blocks]
        tps = [b["real"] / b["s"] for b in blocks]
        pps = [b["positions"] / b["s"] for b in blocks]
        real, positions = sum(b["real"] for b in blocks), sum(b["positions"] for b in blocks)
        sps_spread = harness.spread(sps)
        tokens = harness.median(tps)
        tflops = (6 * out["lm_flop_params"] * tokens
                  + 2 * out["vit_params"] * prep["image_tokens"] * harness.median(sps)) / 1e12
        rows.append({**base, "padding": policy, "status": "ok", "zero_stage": out["zero_stage"],
                     "samples_per_s": sps_spread["median"], "samples_per_s_p10": sps_spread["p10"],
                     "samples_per_s_p90": sps_spread["p90"], "tokens_per_s": tokens,
                     "positions_per_s": harness.median(pps), "padding_frac": 1 - real / positions,
                     "padding_frac_metric": res.get("padding_frac_metric", ""),
                     "seq_len_mean": res["seq_len_mean"], "step_ms": 1e3 * a.batch / sps_spread["median"],
                     "model_tflops": tflops, "mfu": tflops * 1e12 / PEAK_FLOPS if a.cuda else "",
                     "peak_mem_gib": res["peak_mem_gib"], "loss": res.get("loss", ""),
                     "trainable_params": out["trainable_params"],
                     "note": out["note"] + (f"; {a.note}" if a.note else "")})
    return rows


def add_ratios(rows: list[dict]) -> None:
    ok = {(r["impl"], r["padding"]): r for r in rows if r["status"] == "ok"}
    eng, fixed, plain = ok.get(("engine", "longest")), ok.get(("engine", "max_length")), ok.get(("plain", "longest"))
    if eng and fixed:
        eng["vs_max_length"] = eng["tokens_per_s"] / fixed["tokens_per_s"]
    if eng and plain:
        eng["vs_plain"] = eng["samples_per_s"] / plain["samples_per_s"]


def _fmt(v, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return ""
    return f"{f:,.0f}" if abs(f) >= 1000 else f"{f:.{digits}g}"


def write_markdown(path: str, rows: list[dict], a, prep: dict, env: dict, cfg, command: str) -> None:
    from fastenc.config import config_to_yaml

    zero_stage = cfg.engine.zero_stage
    ok = [r for r in rows if r["status"] == "ok"]
    mem = "peak GiB (CUDA allocated)" if a.cuda else "peak RSS GiB"
    lines = [f"# {BENCH}: stage-2 LLaVA training step ({'GPU' if a.cuda else 'CPU'})", "",
             f"Written by `benchmarks/bench_vlm_step.py` at {harness.utc_now()}; the rows are also in "
             f"`{os.path.relpath(a.out, ROOT)}`.", "",
             "```bash", command, "```", "",
             "| impl | padding | samples/s (p10-p90) | tokens/s (real) | positions/s (computed) | padding fraction | "
             f"mean length | step ms | {mem} | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in ok:
        ratios = []
        if r.get("vs_max_length"):
            ratios.append(f"{r['vs_max_length']:.2f}x tokens/s vs max_length")
        if r.get("vs_plain"):
            ratios.append(f"{r['vs_plain']:.2f}x samples/s vs plain loop")
        lines.append(f"| {r['impl']} | {r['padding']} | {_fmt(r['samples_per_s'])} ({_fmt(r['samples_per_s_p10'])}-"
                     f"{_fmt(r['samples_per_s_p90'])}) | {_fmt(r['tokens_per_s'])} | {_fmt(r['positions_per_s'])} | "
                     f"{r['padding_frac']:.3f} | {r['seq_len_mean']:.0f} | {_fmt(r['step_ms'])} | "
                     f"{_fmt(r['peak_mem_gib'])} | {'; '.join(ratios)} |")
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['impl']} | | error: {r['error']} | | | | | | | |")
    lines += ["", "Setup:", "",
              f"- machine: {env['cpu']}, {env['cores']} usable cores" + (f", {env['gpu']}" if env["gpu"] else
                                                                         ", no GPU"),
              f"- python {env['python']}, torch {env['torch']}, deepspeed {env['deepspeed']}, transformers "
              f"{env.get('transformers', '')}; git {env['git_rev']}; {a.threads} intra-op threads",
              f"- LM: random-init {a.lm_preset} ({prep['lm_params'] / 1e6:.1f} M parameters, {prep['lm_vocab']} "
              f"vocabulary rows; tokenizer: byte-level BPE of {prep['tokenizer_size']} tokens fitted on the records), "
              f"trained{' with gradient checkpointing' if cfg.objective.lm.grad_checkpointing else ''}; vision: "
              f"{a.model} at {prep['image_size']} px ({prep['vit_params'] / 1e6:.1f} M parameters, "
              f"{prep['image_tokens']} image tokens), frozen; projector mlp2x_gelu, trained",
              f"- samples: {prep['image_tokens']} image tokens + text tokens mean {prep['text_tokens_mean']:.1f} "
              f"(min {prep['text_tokens_min']}, max {prep['text_tokens_max']}; targets uniform in "
              f"{a.text_tokens} x [{1 - a.text_spread:g}, {1 + a.text_spread:g}]); batch {a.batch}, "
              f"{a.pool} distinct batches cycled; max_length peer pads to {fixed_length(a, prep)}",
              f"- timing: {a.warmup} warmup steps per policy dropped, then {a.repeats} repeats x {a.steps} steps "
              "per (impl, padding), the engine's two policies alternated; medians over repeats",
              f"- precision {a.precision}; engine: DeepSpeed ZeRO-{zero_stage}",
              ]
    for r in harness.latest_by(rows, lambda r: r["impl"]):
        lines.append(f"- other processes while `{r['impl']}` ran: {_fmt(r.get('foreign_cpu_cores', ''), 2)} cores "
                     f"(the machine's busy time minus this benchmark's, /proc); just before it: "
                     f"{r.get('others_before') or 'none using over 0.05 cores'}")
    if a.note:
        lines.append(f"- note: {a.note}")
    lines += ["", "Config (the stage-2 recipe with this benchmark's overrides):", "", "```yaml",
              config_to_yaml(cfg).rstrip(),
              "```", ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.run_impl:
        return child_main(a)
    prep = prepare(a)
    env = harness.env_fields(["transformers"])
    rows, status = [], 0
    with tempfile.TemporaryDirectory(prefix=f"fastenc_{BENCH}_driver_") as tmp:
        prep_path = os.path.join(tmp, "prep.json")
        with open(prep_path, "w") as f:
            json.dump(prep, f)
        cfg = bench_config(a, prep, "<temp dir>")
        for impl in a.impl_list:
            result = os.path.join(tmp, f"{impl}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--run-impl", impl, "--prep", prep_path,
                   "--result", result] + (list(argv) if argv is not None else sys.argv[1:])
            before = harness.wait_for_idle(a.wait_idle) if a.wait_idle > 0 else float("nan")
            others = busy_processes()
            print(f"[{BENCH}] {impl} ...", flush=True)
            t0 = time.time()
            with harness.CpuMonitor() as mon:
                out = harness.run_json_subprocess(cmd, result, a.timeout)
            fields = {"foreign_cpu_cores": mon.fields()["foreign_cpu_cores"], "busy_cores_before": before,
                      "others_before": others}
            new = rows_of(impl, out, a, prep, fields, time.time() - t0)
            rows += new
            status |= any(r["status"] != "ok" for r in new)
            for r in new:
                print(f"[{BENCH}] {impl} {r['padding']}: " + (
                    f"{r['samples_per_s']:.2f} samples/s, {r['tokens_per_s']:.0f} tokens/s, padding "
                    f"{r['padding_frac']:.3f}" if r["status"] == "ok" else r["error"]), flush=True)
    add_ratios(rows)
    harness.append_rows(a.out, [{**r, **env} for r in rows])
    command = "python benchmarks/bench_vlm_step.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    write_markdown(a.markdown, rows, a, prep, env, cfg, command.strip())
    harness.print_table(rows, ["impl", "padding", "samples_per_s", "tokens_per_s", "positions_per_s",
                               "padding_frac", "step_ms", "vs_max_length", "vs_plain", "status"])
    print(f"[{BENCH}] rows: {a.out}; table: {a.markdown}")
    return status


if __name__ == "__main__":
    sys.exit(main())
