"""The training engine: DeepSpeed step, schedules, checkpoints, logging. Objective-agnostic."""
