"""DeepSpeed config from the typed fastenc config: every value concrete (no "auto", which only HF resolves)."""

from __future__ import annotations


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
