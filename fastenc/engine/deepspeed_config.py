"""DeepSpeed glue: the engine config from the typed fastenc config (every value concrete, no "auto", which only HF
resolves), and the engine itself, built the one way the trainer and the tests use."""

from __future__ import annotations

import logging

log = logging.getLogger("fastenc")


def build_ds_config(cfg, micro_batch_size: int, grad_accum: int, world_size: int) -> dict:
    e = cfg.engine
    ds = {
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(cfg.optim.clip_grad),
        "steps_per_print": 10**9,  # fastenc logs itself
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "zero_optimization": {"stage": int(e.zero_stage)},
        "bf16": {"enabled": e.precision == "bf16"},
        "fp16": {"enabled": False},
    }
    if e.zero_stage >= 2:
        ds["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True, reduce_scatter=True)
    if e.zero_stage == 3:
        # Small models on CPU: keep every parameter persistent below this size to avoid gather churn.
        ds["zero_optimization"].update(stage3_param_persistence_threshold=10_000, stage3_gather_16bit_weights_on_model_save=False)
    if e.precision == "bf16":
        # Accumulate and reduce gradients in fp32 (the bf16 optimizer's fp32 master copy holds them).
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds


def build_engine(cfg, objective, world_size: int):
    """(DeepSpeed engine, lr scheduler) for `objective` under cfg's optimizer, schedule, ZeRO stage and precision.

    The optimizer's parameter groups keep every flattened parameter 16-byte aligned (fastenc.engine.optim); a
    DeepSpeed whose layout breaks that anyway is reported here, since it costs cuBLAS's fast GEMMs on a GPU.
    """
    import deepspeed

    from fastenc.config import batch_layout
    from fastenc.engine.optim import build_optimizer, misaligned_parameters, order_parameters_for_alignment
    from fastenc.engine.schedules import PrecomputedLR, warmup_cosine

    micro, accum = batch_layout(cfg, world_size)
    order_parameters_for_alignment(objective)
    optimizer = build_optimizer(objective, cfg.optim, objective.no_weight_decay())
    lr_table = warmup_cosine(cfg.optim.lr, cfg.schedule.steps, cfg.schedule.warmup_steps,
                             final=cfg.optim.lr * cfg.schedule.min_lr_ratio)
    scheduler = PrecomputedLR(optimizer, lr_table)
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_ds_config(cfg, micro, accum, world_size),
                                           dist_init_required=False)
    bad = misaligned_parameters(engine.module)
    if bad:
        log.warning("%d parameters are not 16-byte aligned after deepspeed.initialize (cuBLAS falls back to slow "
                    "GEMMs on them): %s", len(bad), ", ".join(f"{n} (+{off})" for n, off in bad[:5]))
    return engine, scheduler
