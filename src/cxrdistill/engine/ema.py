"""Exponential-moving-average teacher (mean teacher) of a student network.

Convention, after each student optimizer step::

    teacher = d * teacher + (1 - d) * student

with `d` the effective decay. With `warmup_steps = W > 0` the decay ramps up linearly over the
first W updates, `d_n = decay * n / W` for update number `n = 0, 1, ...` (so the first update
copies the student exactly and an early teacher is not stuck near its random initialisation),
and `d_n = decay` afterwards. With `W = 0`, `d_n = decay` from the start.

Buffers (BatchNorm running statistics) follow `bn_mode`:
  "ema"  — floating buffers are averaged like the parameters, integer ones copied;
  "copy" — all buffers copied from the student;
  "skip" — the teacher keeps its own buffers.

The teacher is always in eval mode (its BatchNorm uses running statistics) and its parameters
never require gradients. Being an `nn.Module`, it goes into `Trainer.fit(modules=...)` and its
weights and update count are checkpointed with the rest.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

BnMode = Literal["ema", "copy", "skip"]


class EMATeacher(nn.Module):
    """An EMA copy of `student`; call `update(student)` after every optimizer step."""

    num_updates: torch.Tensor  # () long buffer: updates done so far

    def __init__(self, student: nn.Module, decay: float = 0.999, bn_mode: BnMode = "ema", warmup_steps: int = 0) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if bn_mode not in ("ema", "copy", "skip"):
            raise ValueError(f"bn_mode must be 'ema', 'copy' or 'skip', got {bn_mode!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.decay = decay
        self.bn_mode = bn_mode
        self.warmup_steps = warmup_steps
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def effective_decay(self) -> float:
        """The decay the next `update` will use (see the module docstring)."""
        n = int(self.num_updates)
        if self.warmup_steps > 0 and n < self.warmup_steps:
            return self.decay * n / self.warmup_steps
        return self.decay

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """teacher = d·teacher + (1−d)·student for every parameter (and buffers per `bn_mode`)."""
        d = self.effective_decay()
        t_params = list(self.module.parameters())
        s_params = list(student.parameters())
        if len(t_params) != len(s_params):
            raise ValueError(
                f"EMA update: student has {len(s_params)} parameter tensors, teacher {len(t_params)}"
            )
        for t, s in zip(t_params, s_params):
            t.mul_(d).add_(s.detach().to(t.dtype), alpha=1.0 - d)
        if self.bn_mode != "skip":
            for t_buf, s_buf in zip(self.module.buffers(), student.buffers()):
                if self.bn_mode == "ema" and t_buf.is_floating_point():
                    t_buf.mul_(d).add_(s_buf.detach().to(t_buf.dtype), alpha=1.0 - d)
                else:
                    t_buf.copy_(s_buf)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMATeacher:
        """Keep the teacher in eval mode whatever the caller asks (its BatchNorm uses running stats)."""
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher network (call it under `torch.no_grad()`)."""
        return self.module(*args, **kwargs)
