"""Fabric's distributed strategies behind the recipe's own module references.

`Trainer.fit` sets up every module whose parameters the optimizer trains with `fabric.setup_module`
(DDP: gradient bucketing, all-reduce overlapped with backward; FSDP / DeepSpeed as Fabric does).
A recipe's `step_fn` keeps calling its own object (`model(images)`), so while the stage runs,
:func:`route_forward` points that object's ``forward`` at the wrapper: a call from the recipe goes
through DDP (which arms the gradient hooks and broadcasts buffers), and DDP's inner call reaches the
original ``forward``. Forwards without gradients (a teacher pass, evaluation) or in eval mode skip
the wrapper, so they start no collective and may run on one rank only. :func:`unroute` restores the
module when the stage ends (the module is then plain again: saved, deep-copied, set up anew).

Modules that do not train (an EMA teacher, a frozen teacher) stay unwrapped; their weights are
broadcast from rank 0 once, at a fresh start (:func:`broadcast_module`).
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from lightning_fabric.strategies.strategy import Strategy
from torch import Tensor, nn

_ROUTED = "_cxrdistill_routed_forward"


def route_forward(module: nn.Module, wrapper: Callable[..., Any]) -> None:
    """Make ``module(...)`` go through ``wrapper`` (whose own call of ``module`` reaches the original)."""
    owner = module.__dict__.get(_ROUTED)
    if owner is not None and owner() is module:  # (a deep copy made during a stage holds a stale marker)
        raise RuntimeError(f"{type(module).__name__} is already set up by another running Trainer.fit")
    inside = [False]

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # a deep copy made during the stage (bound to the copy) or DDP's own inner call: plain forward
        if self is not module or inside[0] or not (self.training and torch.is_grad_enabled()):
            return type(self).forward(self, *args, **kwargs)
        inside[0] = True
        try:
            return wrapper(*args, **kwargs)
        finally:
            inside[0] = False

    module.__dict__["forward"] = types.MethodType(forward, module)
    module.__dict__[_ROUTED] = weakref.ref(module)


def unroute(module: nn.Module) -> None:
    """Undo :func:`route_forward` (no-op on a plain module)."""
    if module.__dict__.pop(_ROUTED, None) is not None:
        module.__dict__.pop("forward", None)


def trained_modules(modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the modules holding parameters the optimizer updates, outermost only.

    A module inside another trained module of ``modules`` is left to the outer one (DDP must not
    wrap a parameter twice); two trained modules sharing only some parameters are an error.
    """
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = {n: {id(p) for p in m.parameters()} for n, m in modules.items()}
    candidates = sorted((n for n in modules if params[n] & optimized), key=lambda n: -len(params[n]))
    kept: list[str] = []
    for name in candidates:
        inside = [k for k in kept if params[name] <= params[k]]
        overlap = [k for k in kept if params[name] & params[k]]
        if inside:
            continue
        if overlap:
            raise ValueError(f"modules {name!r} and {overlap[0]!r} share some parameters but neither contains "
                             f"the other; pass the module that holds both")
        kept.append(name)
    return [n for n in modules if n in kept]


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (one collective per tensor)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    for tensor in module.state_dict().values():
        torch.distributed.broadcast(tensor, src=src)


def world_size() -> int:
    """Processes of the default process group (1 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def global_mean(value: Tensor) -> Tensor:
    """Mean of ``value`` over the ranks (a differentiation-free all-reduce; ``value`` itself with one rank).

    For loss normalisers (e.g. RetinaNet's positive-anchor count): dividing every rank's sum by
    the *global* mean count makes DDP's averaged gradient that of one process on the whole batch.
    Every rank must call it in the same order (as every rank runs the same training step).
    """
    world = world_size()
    if world == 1:
        return value
    out = value.detach().clone()
    torch.distributed.all_reduce(out)
    return out / world


@contextmanager
def ddp_options(strategy: Strategy, **options: Any) -> Iterator[None]:
    """Temporarily set DistributedDataParallel keyword arguments of a Fabric DDP strategy."""
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if kwargs is None or not options:
        yield
        return
    saved = dict(kwargs)
    kwargs.update(options)
    try:
        yield
    finally:
        kwargs.clear()
        kwargs.update(saved)


__all__ = ["broadcast_module", "ddp_options", "global_mean", "route_forward", "trained_modules", "unroute",
           "world_size"]
