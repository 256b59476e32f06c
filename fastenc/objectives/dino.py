"""DINO (Caron et al. 2021, v1 as facebookresearch/dino trains it) on the shared ViT.

Student = the shared encoder (`self.encoder`, drop-path from `model.drop_path_rate`) + DINOHead; teacher = the
same architecture without drop-path, an EMA of the student, never trained by the optimizer. Batch keys:
"global" [B, G, 3, S, S] and (with local crops) "local" [B, N, 3, s, s] (fastenc.data.spec.MultiCropSpec).

Per step: one student backbone pass per crop resolution (global crops, then local crops), one student head pass
over all C = G + N crops; one teacher pass over the G global crops (no grad); dino_loss; after the optimizer
step (on_step_end) the teacher EMA with a cosine momentum schedule and the center update.

Where the teacher and center live. They are not registered submodules / buffers: DeepSpeed would cast them to
bf16, partition them under ZeRO-3 and hand them to the optimizer. They are a plain fp32 module and tensor on every
rank, identical everywhere because every rank applies the same update. They are saved with each checkpoint (one
safetensors file, see Objective.extra_state) and the teacher's backbone is what gets exported as the encoder.

EMA under ZeRO-3: the student's parameters are partitioned, so the update gathers them one submodule (one block)
at a time with deepspeed.zero.GatheredParameters; no rank holds the whole student at once. Under ZeRO-0/1/2 the
gather is a no-op. With bf16 the student's module parameters are bf16 copies of DeepSpeed's fp32 master weights;
the EMA reads those copies into the fp32 teacher (the reference reads fp32 parameters under AMP), a rounding of
the student that the momentum averages out; fp32 runs are exact.

Center: c <- m c + (1 - m) * mean of the teacher outputs over the global batch (every rank, every micro-batch of
the step). Each micro-batch's teacher sum is all-reduced asynchronously on a dedicated process group right after
the teacher pass, so it overlaps the student's forward and backward; on_step_end waits and applies it. The loss
of the step uses the center from before the step, as the reference does.

Schedules are per optimizer step (the reference's are per iteration, from epoch counts): teacher temperature
warms up linearly from warmup_teacher_temp to teacher_temp over warmup_teacher_temp_steps; momentum follows a
cosine from momentum_teacher to 1 over schedule.steps; the prototype layer gets no gradient for the first
freeze_last_layer_steps steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from fastenc.losses.dino import center_ema, dino_loss, teacher_batch_sum
from fastenc.objectives.registry import register_objective
from fastenc.objectives.base import Objective, build_encoder


@dataclass
class DinoConfig:
    name: str = "dino"
    """Registered objective name."""
    out_dim: int = 65536
    """Prototypes K (head output)."""
    hidden_dim: int = 2048
    """Head MLP hidden width."""
    bottleneck_dim: int = 256
    """Head bottleneck before the L2-normalization and the prototype layer."""
    head_layers: int = 3
    """Linear layers in the head MLP."""
    norm_last_layer: bool = True
    """Fix the prototype layer's weight-norm gain to 1 (the reference's default, more stable for ViTs)."""
    num_global_crops: int = 2
    """Global crops (teacher views)."""
    global_crop_scale: list = field(default_factory=lambda: [0.25, 1.0])
    """RandomResizedCrop area range of the global crops (official ViT-B/16: 0.25-1)."""
    local_crops: int = 10
    """Local crops per image (official ViT-B/16: 10)."""
    local_crop_size: int = 96
    """Local crop resolution in px (a multiple of the patch size); global crops use the model's img_size."""
    local_crop_scale: list = field(default_factory=lambda: [0.05, 0.25])
    """RandomResizedCrop area range of the local crops."""
    blur_radius: list = field(default_factory=lambda: [0.1, 2.0])
    """Gaussian-blur radius range in output pixels (the reference's 0.1-2.0 px are for 224 px global / 96 px local
    crops; scale it with the resolution to blur the same fraction of the image)."""
    student_temp: float = 0.1
    """Student softmax temperature."""
    teacher_temp: float = 0.07
    """Teacher temperature after warmup."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at step 0."""
    warmup_teacher_temp_steps: int = 0
    """Steps of the linear teacher-temperature warmup (0: teacher_temp from the start)."""
    momentum_teacher: float = 0.996
    """Teacher EMA momentum at step 0; cosine to 1.0 at schedule.steps."""
    center_momentum: float = 0.9
    """Center EMA momentum."""
    freeze_last_layer_steps: int = 0
    """The prototype layer gets no gradient for this many steps (the reference freezes it for the first epoch)."""
    loss_impl: Literal["auto", "reference", "chunked", "native", "triton"] = "auto"
    """Loss implementation (fastenc.losses.LOSS_IMPLS): auto (the fastest one for the device: triton on CUDA, the
    native extension on CPU, else reference), reference, chunked, native or triton. All give the same values and
    gradients (tests/losses, tests/kernels, tests/engine/test_loss_impl_parity.py)."""


class _Teacher(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


@register_objective("dino")
class DINOObjective(Objective):
    config_cls = DinoConfig
    export_prefix = "teacher.encoder."

    def __init__(self, cfg):
        super().__init__(cfg)
        from fastenc.models.dino_head import DINOHead

        ocfg = cfg.objective
        if ocfg.local_crops and ocfg.local_crop_size % self.encoder.patch_size:
            from fastenc.errors import ConfigError

            raise ConfigError(f"objective.local_crop_size={ocfg.local_crop_size} is not a multiple of the patch size "
                              f"{self.encoder.patch_size}")
        width = self.encoder.embed_dim

        def head():
            return DINOHead(width, ocfg.out_dim, hidden_dim=ocfg.hidden_dim, bottleneck_dim=ocfg.bottleneck_dim,
                            nlayers=ocfg.head_layers, norm_last_layer=ocfg.norm_last_layer)

        self.head = head()
        teacher_model_cfg = type(cfg.model)(**{**cfg.model.__dict__, "drop_path_rate": 0.0})
        teacher = _Teacher(build_encoder(teacher_model_cfg), head())
        teacher.load_state_dict({**{f"encoder.{k}": v for k, v in self.encoder.state_dict().items()},
                                 **{f"head.{k}": v for k, v in self.head.state_dict().items()}})
        teacher.requires_grad_(False).eval()
        # object.__setattr__: not registered, so DeepSpeed neither casts, partitions nor optimizes them.
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "center", torch.zeros(1, ocfg.out_dim))
        self._step = 0
        self._pending: list = []  # (work handle or None, [1 + K] tensor: count, teacher sum) per micro-batch
        self._center_group = None
        if _distributed():
            self._center_group = torch.distributed.new_group()  # all ranks: its own queue, overlaps DeepSpeed's

    # ----- schedules (pure functions of the step) -----
    def teacher_temp(self, step: int) -> float:
        o = self.cfg.objective
        if step < o.warmup_teacher_temp_steps:
            return o.warmup_teacher_temp + (o.teacher_temp - o.warmup_teacher_temp) * step / o.warmup_teacher_temp_steps
        return o.teacher_temp

    def teacher_momentum(self, step: int) -> float:
        """Cosine from momentum_teacher at step 0 to 1 at schedule.steps (momentum used after step `step`)."""
        m0, total = self.cfg.objective.momentum_teacher, self.cfg.schedule.steps
        return 1.0 - (1.0 - m0) * (math.cos(math.pi * step / total) + 1) / 2

    # ----- data -----
    def data_spec(self, train: bool = True):
        from fastenc.data.spec import MultiCropSpec

        o = self.cfg.objective
        return MultiCropSpec(global_size=self.image_size, local_size=o.local_crop_size, num_global=o.num_global_crops,
                             num_local=o.local_crops, global_scale=tuple(o.global_crop_scale),
                             local_scale=tuple(o.local_crop_scale), blur_radius=tuple(o.blur_radius))

    # ----- training -----
    def on_step_start(self, step: int) -> None:
        self._step = step

    def _teacher_device(self, device) -> None:
        if self.center.device != device:
            self.teacher.to(device)
            object.__setattr__(self, "center", self.center.to(device))

    def forward(self, batch):
        o = self.cfg.objective
        glob = batch["global"]  # [B, G, 3, S, S]
        B, G = glob.shape[:2]
        if G != o.num_global_crops:
            raise ValueError(f"batch has {G} global crops, objective.num_global_crops={o.num_global_crops}")
        glob = glob.transpose(0, 1).reshape(G * B, *glob.shape[2:])  # crop-major, as the reference orders crops
        self._teacher_device(glob.device)

        with torch.no_grad():
            # The teacher stays fp32 (it is not DeepSpeed's module): run it in autocast where the student is bf16.
            dtype = glob.dtype
            with torch.autocast(glob.device.type, dtype=dtype, enabled=dtype != torch.float32):
                teacher_out = self.teacher.head(self.teacher.encoder(glob.float() if dtype == torch.float32 else glob))
            teacher_out = teacher_out.float()
            packed = torch.cat([torch.tensor([teacher_out.shape[0]], dtype=torch.float32, device=glob.device),
                                teacher_batch_sum(teacher_out).flatten()])
            work = None
            if self._center_group is not None:
                work = torch.distributed.all_reduce(packed, group=self._center_group, async_op=True)
            self._pending.append((work, packed))

        feats = [self.encoder(glob)]
        if "local" in batch:
            loc = batch["local"]
            N = loc.shape[1]
            feats.append(self.encoder(loc.transpose(0, 1).reshape(N * B, *loc.shape[2:])))
        student_out = self._student_head(torch.cat(feats))
        temp = self.teacher_temp(self._step)
        loss = dino_loss(student_out, teacher_out, self.center, o.student_temp, temp, G, impl=o.loss_impl)

        with torch.no_grad():
            q = torch.softmax((teacher_out - self.center) / temp, dim=-1)
            mean_q = q.mean(0)
            metrics = {
                # Collapse monitors: H(mean q) -> 0 when one prototype wins everything; mean H(q) -> log K when
                # the teacher goes uniform. Healthy training keeps the first high and the second well below log K.
                "teacher_mean_entropy": -(mean_q * mean_q.clamp_min(1e-12).log()).sum(),
                "teacher_entropy": -(q * q.clamp_min(1e-12).log()).sum(-1).mean(),
                "teacher_temp": torch.tensor(temp, device=q.device),
                "teacher_momentum": torch.tensor(self.teacher_momentum(self._step), device=q.device),
            }
        return loss, metrics

    def _student_head(self, x):
        # Frozen prototype layer: no gradient reaches it. Its weight decay then only rescales V, which the weight
        # norm divides out, and Adam's moments stay zero: frozen, as with the reference's grad = None.
        return self.head(x, freeze_last_layer=self._step < self.cfg.objective.freeze_last_layer_steps)

    @torch.no_grad()
    def on_step_end(self, step: int) -> None:
        # Center: finish the all-reduces started in forward, then one EMA with the step's global mean.
        if self._pending:
            total = torch.zeros_like(self._pending[0][1])
            for work, packed in self._pending:
                if work is not None:
                    work.wait()
                total += packed
            self._pending.clear()
            object.__setattr__(self, "center", center_ema(self.center, total[1:], total[:1],
                                                          self.cfg.objective.center_momentum))
        self.update_teacher(self.teacher_momentum(step))

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, one unit (a block, the embeddings, ...) at a time; under
        ZeRO-3 each unit's parameters are gathered for the update and released after it."""
        import deepspeed

        for student, teacher in ((self.encoder, self.teacher.encoder), (self.head, self.teacher.head)):
            t_params = dict(teacher.named_parameters())
            for names, s_params in _ema_units(student):
                with deepspeed.zero.GatheredParameters(s_params, modifier_rank=None):
                    # One multi-tensor kernel per op and unit instead of two per parameter (~300 launches per step
                    # for a ViT-B); the same arithmetic. The .to() is a no-op for an fp32 student.
                    t_list = [t_params[name] for name in names]
                    s_list = [ps.detach().to(device=pt.device, dtype=torch.float32) for ps, pt in zip(s_params, t_list)]
                    torch._foreach_mul_(t_list, momentum)
                    torch._foreach_add_(t_list, s_list, alpha=1 - momentum)

    # ----- state -----
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"teacher.{k}": v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}
        state["center"] = self.center.detach().cpu().clone()
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        teacher = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
        self.teacher.load_state_dict(teacher, strict=True)
        if "center" not in state:
            raise KeyError("DINO extra state has no 'center'")
        object.__setattr__(self, "center", state["center"].to(self.center.device, torch.float32).clone())


def _ema_units(module: nn.Module, prefix: str = ""):
    """(names, parameters) per unit: the module's own parameters, then each child whole, except that containers
    (ModuleList / Sequential, e.g. the ViT's blocks) are split into their children."""
    own = list(module.named_parameters(recurse=False))
    if own:
        yield [prefix + n for n, _ in own], [p for _, p in own]
    for name, child in module.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            yield from _ema_units(child, f"{prefix}{name}.")
        else:
            named = list(child.named_parameters())
            if named:
                yield [f"{prefix}{name}.{n}" for n, _ in named], [p for _, p in named]
