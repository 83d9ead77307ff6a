"""One training loop for every model and recipe, on Lightning Fabric.

A recipe gives `Trainer.fit` a `step_fn(batch, step) -> {name: loss}`; the loop does the rest:
device placement, mixed precision, gradient accumulation and clipping, the learning-rate
schedule, NaN/inf checks, progress, metrics, checkpoints, best-model selection and resume::

    trainer = ctx.trainer("student")                       # or Trainer(cfg.train, run_dir, "student")
    optimizer = build_optimizer(student.parameters(), cfg.train)
    def step_fn(batch, step):
        out = student(batch["image"])
        return {"sup": sup_loss(out, batch), "log_n_boxes": n_boxes}   # "log_*": logged only
    result = trainer.fit(step_fn, {"student": student, "teacher": ema}, optimizer, loader,
                         cfg.train.max_steps, sampler=sampler, on_step_end=lambda s: ema.update(student),
                         evaluate=lambda: {"map50": ...})

The modules are moved to the device in place, so `step_fn` keeps calling the recipe's own
objects. `batches` is any iterable of batches (tensors inside are moved to the device); pass the
DataLoader itself rather than `iter(loader)`, so a resumed run restores the sampler position
before the first batch is drawn. Batches must not run out before `max_steps * accumulate`.

Checkpoints (`run_dir/checkpoints/<stage>/last.pt`) hold every module, the optimizer, the
schedule, the loss scaler, the sampler position, `extra_state`, the RNG states and the step. With
`train.resume` on (the default), a stage restarts from `last.pt`; a finished stage (`done.json`)
is skipped and its weights are loaded into `modules`. On CPU with a fixed seed, a killed and
resumed run ends with exactly the weights of an uninterrupted one (DataLoader workers that draw
random numbers of their own are the caller's to seed).

Several GPUs and nodes (DDP). Set `train.devices` / `train.strategy`, or launch with torchrun::

    torchrun --nproc_per_node=4 -m cxrdistill.cli train --config X.yaml train.devices=4 train.strategy=ddp
    # SLURM (one task per GPU): srun cxrdistill train --config X.yaml train.devices=4 train.strategy=ddp

`train.strategy` is any Fabric strategy name ("auto", "ddp", "ddp_spawn", "fsdp", "deepspeed", ...).
Every rank runs the same recipe. The modules whose parameters the optimizer trains are set up with
`fabric.setup_module` (DDP: bucketed gradient all-reduce overlapped with backward), and while the
stage runs the recipe's own object routes its grad-enabled forward through the wrapper
(`cxrdistill.engine.distributed`), so the recipe's references stay valid. Modules that do not
train (EMA or frozen teachers) stay unwrapped; every module's weights are broadcast from rank 0
once at a fresh start. `find_unused_parameters=True` is for a recipe whose trained module leaves
parameters without gradient in some steps. Under gradient accumulation, all micro-batches but the
last run in `fabric.no_backward_sync`. Give each rank its own batches
(`RatioBatchSampler(..., rank=fabric.global_rank, world_size=fabric.world_size)`). Rank 0 writes
checkpoints (the unwrapped modules' state dicts: a checkpoint written by N processes loads in one
and vice versa) and metrics.

Host syncs: on an accelerator the loss terms, `log_*` values and the gradient norm stay on the
device and are copied to the host once per `train.log_every` steps (one transfer), where the
NaN/inf check runs too (and always before a checkpoint or an evaluation, so no checkpoint holds
non-finite weights): a non-finite term raises (or rolls back) at the next log step, naming the step
it occurred in. On the CPU (no device to wait for) each step's terms are checked at once.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypedDict, TypeVar, runtime_checkable

import numpy as np
import torch
from lightning_fabric import Fabric
from lightning_fabric.strategies.parallel import ParallelStrategy
from lightning_fabric.wrappers import _FabricModule, _FabricOptimizer
from rich.console import Console
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from cxrdistill.atomic import write_json_atomic
from cxrdistill.config import TrainConfig
from cxrdistill.engine.checkpoint import load_checkpoint, save_checkpoint
from cxrdistill.engine.distributed import broadcast_module, ddp_options, route_forward, trained_modules, unroute
from cxrdistill.engine.logging import MetricsLogger
from cxrdistill.engine.optim import build_scheduler
from cxrdistill.engine.progress import StepProgress, progress_enabled
from cxrdistill.engine.run_dir import RunDirectory
from cxrdistill.errors import CheckpointError, ConfigError, CxrDistillError

CHECKPOINT_FORMAT = 1

BatchT = TypeVar("BatchT")
"""Whatever one element of `fit`'s `batches` is (a dict of tensors, a named semi-supervised batch ...):
the loop moves the tensors inside it to the device and hands it to `step_fn` unchanged."""
LossTerms = Mapping[str, Tensor | float]
"""`step_fn`'s result: scalar loss tensors, plus `log_*` values (tensors or numbers) logged only."""
StepFn = Callable[[BatchT, int], LossTerms]


class NonFiniteLossError(CxrDistillError, FloatingPointError):
    """A loss term became NaN or infinite; the message names the step and the terms."""


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class BestRecord(TypedDict):
    """Which evaluation `best.pt` holds: `train.best_metric`, its value and the step."""

    metric: str
    value: float
    step: int


@dataclass
class FitResult:
    """What a finished stage returns (and what `done.json` holds)."""

    stage: str
    step: int
    metrics: dict[str, float]
    """The last `evaluate()` result, or the last logged loss means when there is no `evaluate`."""
    best: BestRecord | None = None
    """`{"metric", "value", "step"}` of `best.pt`, when `train.best_metric` is set."""
    resumed_from: int | None = None
    skipped: bool = False
    """True when the stage was already done and fit only loaded its weights."""
    checkpoint: str | None = None


def make_fabric(cfg: TrainConfig) -> Fabric:
    """A launched Fabric for `cfg.devices`, `cfg.strategy`, `cfg.precision` (accelerator auto)."""
    fabric = Fabric(accelerator="auto", devices=cfg.devices, strategy=cfg.strategy, precision=cfg.precision)
    fabric.launch()
    return fabric


class Trainer:
    """Runs one named stage of a recipe (e.g. "teacher", "student_gen1") inside a run directory."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: RunDirectory,
        stage: str,
        *,
        fabric: Fabric | None = None,
        console: Console | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.stage = stage
        self.fabric = fabric if fabric is not None else make_fabric(cfg)
        self.console = console
        self.stage_dir = run_dir.stage_dir(stage)
        self.last_path = self.stage_dir / "last.pt"
        self.best_path = self.stage_dir / "best.pt"
        self.done_path = self.stage_dir / "done.json"
        self.step = 0
        self._window: dict[str, list[float | Tensor]] = {}
        self._pending: list[tuple[int, list[str], Tensor]] = []
        """Per step since the last check: (step, term names, their values on the device)."""
        self._logger: MetricsLogger | None = None
        self._last_losses: dict[str, float] = {}
        self._wrapped: list[_FabricModule] = []
        self.check_every_step: bool | None = None
        """Check the loss terms for NaN/inf every step (a host sync) rather than at each flush;
        None: on the CPU only."""

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    def is_done(self) -> bool:
        """True when this stage finished in an earlier run (and resume is on)."""
        return self.cfg.resume and self.done_path.is_file()

    def log_counts(self, name: str, counts: Mapping[str, int | float]) -> None:
        """Log per-class counts (e.g. pseudo-labels kept) for this step as columns `<name>/<class>`."""
        self.log_metrics({f"{name}/{key}": float(value) for key, value in counts.items()})

    def log_metrics(self, values: Mapping[str, float | Tensor]) -> None:
        """Add scalars to this step's log; averaged over the `log_every` window like the losses.

        Tensors stay on the device until the window is flushed (no host sync per step)."""
        for key, value in values.items():
            value = value.detach().reshape(()) if isinstance(value, Tensor) else float(value)
            self._window.setdefault(key, []).append(value)

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        step_fn: StepFn[BatchT],
        modules: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        batches: Iterable[BatchT],
        max_steps: int,
        *,
        sampler: Stateful | None = None,
        extra_state: Mapping[str, Stateful] | None = None,
        on_step_end: Callable[[int], None] | None = None,
        evaluate: Callable[[], Mapping[str, float]] | None = None,
        find_unused_parameters: bool = False,
    ) -> FitResult:
        """Train until `max_steps` optimizer steps (resuming from `last.pt` when allowed).

        step_fn(batch, step) -> {name: scalar loss}; the terms not starting with "log_" are summed
        and back-propagated. `on_step_end(step)` runs after each optimizer step (e.g. EMA update);
        `evaluate()` every `train.eval_every` steps and at the end. `find_unused_parameters`: DDP's
        option, for a recipe whose trained modules leave parameters without a gradient in a step.
        """
        extra = dict(extra_state or {})
        fabric = self.fabric
        for module in modules.values():
            module.to(fabric.device)

        if self.is_done():
            return self._load_finished(modules, extra)

        self._logger = self._open_logger()
        resumed_from: int | None = None
        best: BestRecord | None = None
        last_metrics: dict[str, float] = {}
        self.step = 0
        scheduler = build_scheduler(optimizer, self.cfg, max_steps)
        if self.cfg.resume and self.last_path.is_file():
            state = load_checkpoint(self.last_path)
            self._restore(state, modules, optimizer, scheduler, sampler, extra)
            resumed_from = self.step = int(state["step"])
            best = state.get("best")
            last_metrics = dict(state.get("last_metrics") or {})
            self._logger.truncate_after(self.step)
        else:  # a fresh start: nothing of an earlier run of this stage may be resumed or reported later
            for stale in (self.done_path, self.last_path, self.best_path):
                stale.unlink(missing_ok=True)
            self._logger.truncate_after(-1)
            self._broadcast_weights(modules)
        self._setup_modules(modules, optimizer, find_unused_parameters)
        opt = fabric.setup_optimizers(optimizer)
        assert not isinstance(opt, tuple)  # one optimizer in, one wrapper out
        modes = {name: m.training for name, m in modules.items()}

        batch_iter = iter(batches)  # may draw a DataLoader seed: before the RNG states are restored
        if resumed_from is not None:
            _set_rng_state(state["rng"])
        consumed = getattr(sampler, "position", 0) if sampler is not None else 0
        self._window, self._pending = {}, []
        start_time = time.perf_counter()
        shown: dict[str, float] = {}
        try:
            with StepProgress(
                self.stage, max_steps, self.step, console=self.console,
                enabled=progress_enabled(self.cfg.progress) and fabric.is_global_zero,
            ) as bar:
                rollbacks = 0
                while self.step < max_steps:
                    try:
                        consumed += self._optimizer_step(step_fn, batch_iter, optimizer, opt, scheduler)
                        final = self.step == max_steps
                        saving = final or self.step % self.cfg.checkpoint_every == 0
                        evaluating = evaluate is not None and (
                            final or bool(self.cfg.eval_every and self.step % self.cfg.eval_every == 0))
                        if self.step % self.cfg.log_every == 0 or final:  # both raise on a non-finite term
                            shown = {"loss": self._flush_window(optimizer).get("loss", math.nan)}
                        elif saving or evaluating:
                            self._check_pending()
                    except NonFiniteLossError as err:
                        if not self._may_roll_back(rollbacks):
                            raise
                        rollbacks += 1
                        best, last_metrics = self._roll_back(err, modules, optimizer, scheduler, sampler, extra)
                        continue
                    if on_step_end is not None:
                        on_step_end(self.step)
                    bar.update(self.step, **shown)
                    if evaluating and evaluate is not None:
                        last_metrics, best = self._evaluate(evaluate, modules, modes, best)
                    elif evaluate is None and final:
                        last_metrics = self._last_losses
                    if saving:
                        self._save_last(modules, optimizer, scheduler, sampler, consumed, extra, best,
                                        last_metrics, max_steps)
            if resumed_from is not None and resumed_from >= max_steps and evaluate is not None:
                last_metrics, best = self._evaluate(evaluate, modules, modes, best)
            result = FitResult(self.stage, self.step, last_metrics, best, resumed_from, False, str(self.last_path))
            if fabric.is_global_zero:
                elapsed = time.perf_counter() - start_time
                write_json_atomic(self.done_path, {**asdict(result), "seconds": elapsed, "max_steps": max_steps})
            fabric.barrier()
        finally:
            self._logger.close()
            self._teardown_modules(modules)
        return result

    # ------------------------------------------------------------------ NaN rollback

    def _may_roll_back(self, done: int) -> bool:
        return (self.cfg.nan_policy == "rollback" and done < self.cfg.max_rollbacks
                and self.last_path.is_file())

    def _roll_back(
        self,
        err: NonFiniteLossError,
        modules: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        scheduler: LambdaLR,
        sampler: Stateful | None,
        extra: Mapping[str, Stateful],
    ) -> tuple[BestRecord | None, dict[str, float]]:
        """Reload `last.pt` and lower the learning rate; training goes on with the next batches."""
        state = load_checkpoint(self.last_path)
        self._restore(state, modules, optimizer, scheduler, sampler, extra)
        self.step = int(state["step"])
        factor = self.cfg.rollback_lr_factor
        for group in optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        self._window, self._pending = {}, []
        message = (f"{err} Rolled back to step {self.step} ({self.last_path.name}) with the learning rate "
                   f"multiplied by {factor:g}.")
        (self.console or Console(stderr=True)).print(f"[yellow]warning:[/] {message}", highlight=False,
                                                    soft_wrap=True)
        self.log_metrics({"rollback": float(self.step)})
        return state.get("best"), dict(state.get("last_metrics") or {})

    # ------------------------------------------------------------------ pieces of a step

    def _optimizer_step(
        self,
        step_fn: StepFn[BatchT],
        batch_iter: Iterator[BatchT],
        optimizer: torch.optim.Optimizer,
        opt: _FabricOptimizer,
        scheduler: LambdaLR,
    ) -> int:
        """One optimizer step over `accumulate` micro-batches; returns the number of batches used."""
        fabric, step, accumulate = self.fabric, self.step, self.cfg.accumulate
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accumulate):
            batch = self._next_batch(batch_iter, step)
            with ExitStack() as no_sync:
                if micro < accumulate - 1:  # gradients are all-reduced once, after the last micro-batch
                    for wrapper in self._wrapped:
                        no_sync.enter_context(fabric.no_backward_sync(wrapper))
                with fabric.autocast():
                    losses = step_fn(fabric.to_device(batch), step)
                total = self._total_loss(losses, step)
                fabric.backward(total / accumulate)
        if self.cfg.grad_clip is not None:
            grad_norm = fabric.clip_gradients(self._wrapped[0] if self._wrapped else nn.Module(), opt,
                                              max_norm=self.cfg.grad_clip, error_if_nonfinite=False)
            if grad_norm is not None:  # None only for clip_val, which is not used here
                self.log_metrics({"grad_norm": grad_norm})
        opt.step()
        scheduler.step()
        self.step = step + 1
        return accumulate

    def _next_batch(self, batch_iter: Iterator[BatchT], step: int) -> BatchT:
        try:
            return next(batch_iter)
        except StopIteration:
            raise CxrDistillError(
                f"stage {self.stage!r}: the batches ran out at step {step}; give fit an infinite iterable "
                f"(e.g. a DataLoader over RatioBatchSampler) or lower max_steps"
            ) from None

    def _total_loss(self, losses: Mapping[str, object], step: int) -> Tensor:
        """Sum of the non-`log_` terms; raises `NonFiniteLossError` naming any NaN/inf term."""
        if not isinstance(losses, Mapping) or not losses:
            raise TypeError(f"step_fn must return a non-empty dict of loss tensors, got {type(losses).__name__}")
        terms: list[Tensor] = []
        for name, value in losses.items():
            if name.startswith("log_"):
                continue
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise TypeError(f"loss term {name!r} must be a scalar tensor, got {_describe_value(value)}")
            terms.append(value)
        if not terms:
            raise ValueError(f"step_fn returned only log_ terms ({', '.join(losses)}); nothing to back-propagate")
        names = list(losses)
        values = torch.stack([torch.as_tensor(losses[k], device=self.device).detach().to(torch.float32).reshape(())
                              for k in names])
        self._pending.append((step, names, values))
        check_now = self.check_every_step if self.check_every_step is not None else self.device.type == "cpu"
        if check_now:
            self._check_pending()
        total = terms[0]
        for term in terms[1:]:  # = sum(terms), in the same order
            total = total + term
        return total

    def _check_pending(self) -> None:
        """Copy the pending loss values to the host (one transfer), raise on the first non-finite
        term, and add the terms plus their non-`log_` sum as "loss" to the window."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flat = torch.cat([values for _, _, values in pending]).cpu().tolist()
        offset = 0
        for step, names, _ in pending:
            record = dict(zip(names, flat[offset: offset + len(names)]))
            offset += len(names)
            bad = [(n, v) for n, v in record.items() if not math.isfinite(v)]
            if bad:
                detail = ", ".join(f"{n}={v}" for n, v in bad)
                raise NonFiniteLossError(
                    f"stage {self.stage!r}, step {step}: non-finite loss term(s): {detail}. Lower train.lr, set "
                    f"train.grad_clip, or check the inputs and targets of this batch."
                )
            record["loss"] = float(sum(v for n, v in record.items() if not n.startswith("log_")))
            for key, value in record.items():
                self._window.setdefault(key, []).append(value)

    def _setup_modules(self, modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
                       find_unused_parameters: bool) -> None:
        """`fabric.setup_module` for the trained modules; route their forward through the wrapper."""
        self._wrapped = []
        if not isinstance(self.fabric.strategy, ParallelStrategy):
            return  # one device, no process group: nothing to synchronise, the module runs as it is
        unused = {"find_unused_parameters": True} if find_unused_parameters else {}  # else the strategy's own
        with ddp_options(self.fabric.strategy, **unused):
            for name in trained_modules(modules, optimizer):
                module = modules[name]
                wrapper = self.fabric.setup_module(module)
                route_forward(module, wrapper._forward_module)
                self._wrapped.append(wrapper)

    def _teardown_modules(self, modules: Mapping[str, nn.Module]) -> None:
        for module in modules.values():
            unroute(module)
        self._wrapped = []

    def _broadcast_weights(self, modules: Mapping[str, nn.Module]) -> None:
        """Rank 0's initial weights everywhere (trained and untrained modules alike), once."""
        if self.fabric.world_size == 1:
            return
        for module in modules.values():
            broadcast_module(module)

    def _flush_window(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Log the means of this window's values (plus the learning rate) at the current step.

        The one host transfer of the window: pending loss terms (checked for NaN/inf here) and
        every tensor logged since the last flush."""
        self._check_pending()
        tensors = [v for values in self._window.values() for v in values if isinstance(v, Tensor)]
        host: Iterator[float] = iter(
            torch.stack([t.to(self.device, torch.float32) for t in tensors]).cpu().tolist() if tensors else [])
        window = {k: [next(host) if isinstance(v, Tensor) else v for v in values] for k, values in self._window.items()}
        logged = {k: sum(v) / len(v) for k, v in window.items() if v}
        logged["lr"] = optimizer.param_groups[0]["lr"]
        self._window = {}
        self._last_losses = {k: v for k, v in logged.items() if k == "loss" or not k.startswith(("lr",))}
        if self.fabric.is_global_zero and self._logger is not None:
            self._logger.log(self.step, logged)
        return logged

    def _evaluate(
        self,
        evaluate: Callable[[], Mapping[str, float]],
        modules: Mapping[str, nn.Module],
        modes: dict[str, bool],
        best: BestRecord | None,
    ) -> tuple[dict[str, float], BestRecord | None]:
        """Run `evaluate()`, log it, restore train/eval modes, save `best.pt` when it improved."""
        metrics = {k: float(v) for k, v in evaluate().items()}
        for name, module in modules.items():
            module.train(modes[name])
        if self.fabric.is_global_zero and self._logger is not None:
            self._logger.log(self.step, {f"eval/{k}": v for k, v in metrics.items()})
        key = self.cfg.best_metric
        if key is None:
            return metrics, best
        if key not in metrics:
            raise ConfigError(
                f"train.best_metric: {key!r} is not among the metrics evaluate() returned ({', '.join(metrics)})"
            )
        value = metrics[key]
        better = best is None or (value > best["value"] if self.cfg.best_mode == "max" else value < best["value"])
        if better and math.isfinite(value):
            best = {"metric": key, "value": value, "step": self.step}
            if self.fabric.is_global_zero:
                save_checkpoint(self.best_path, {"format": CHECKPOINT_FORMAT, "stage": self.stage, "step": self.step,
                                                 "best": best, "modules": _module_states(modules)})
        return metrics, best

    # ------------------------------------------------------------------ checkpoints

    def _save_last(
        self,
        modules: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        scheduler: LambdaLR,
        sampler: Stateful | None,
        consumed: int,
        extra: Mapping[str, Stateful],
        best: BestRecord | None,
        last_metrics: Mapping[str, float],
        max_steps: int,
    ) -> None:
        if self.fabric.is_global_zero:
            sampler_state = None
            if sampler is not None:
                # Position by batches consumed, not drawn: DataLoader workers prefetch ahead.
                sampler_state = {**sampler.state_dict(), "position": consumed} if hasattr(sampler, "position") \
                    else sampler.state_dict()
            state = {
                "format": CHECKPOINT_FORMAT,
                "stage": self.stage,
                "step": self.step,
                "max_steps": max_steps,
                "modules": _module_states(modules),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "precision": self.fabric.strategy.precision.state_dict(),
                "sampler": sampler_state,
                "extra": {name: obj.state_dict() for name, obj in extra.items()},
                "rng": _rng_state(),
                "best": best,
                "last_metrics": last_metrics,
            }
            save_checkpoint(self.last_path, state)
        self.fabric.barrier()

    def _restore(
        self,
        state: dict[str, Any],
        modules: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        scheduler: LambdaLR,
        sampler: Stateful | None,
        extra: Mapping[str, Stateful],
    ) -> None:
        where = self.last_path
        try:
            self._load_modules(state, modules)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("precision"):
                self.fabric.strategy.precision.load_state_dict(state["precision"])
            if sampler is not None:
                if state.get("sampler") is None:
                    raise CheckpointError(f"{where}: holds no sampler state, but fit was given a sampler")
                sampler.load_state_dict(state["sampler"])
            for name, obj in extra.items():
                if name not in state["extra"]:
                    raise CheckpointError(f"{where}: holds no state for extra_state[{name!r}]")
                obj.load_state_dict(state["extra"][name])
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"{where}: does not match this run ({type(err).__name__}: {err}). The model or config changed "
                f"since it was written: resume with the same config, or pass --no-resume to start the stage over."
            ) from err

    def _load_modules(self, state: dict[str, Any], modules: Mapping[str, nn.Module]) -> None:
        saved = state["modules"]
        missing = [n for n in modules if n not in saved]
        if missing:
            raise KeyError(f"no weights for module(s) {', '.join(missing)} (saved: {', '.join(saved)})")
        for name, module in modules.items():
            try:
                module.load_state_dict(saved[name])
            except RuntimeError as err:
                raise RuntimeError(f"module {name!r}: {err}") from err

    def _load_finished(self, modules: Mapping[str, nn.Module], extra: dict[str, Stateful]) -> FitResult:
        """A done stage: load its final weights (and extra state) and return its saved result."""
        state = load_checkpoint(self.last_path)
        try:
            self._load_modules(state, modules)
            for name, obj in extra.items():
                obj.load_state_dict(state["extra"][name])
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"{self.last_path}: does not match this run's modules ({err})") from err
        saved = json.loads(self.done_path.read_text(encoding="utf-8"))
        self.step = int(saved["step"])
        return FitResult(self.stage, self.step, saved.get("metrics", {}), saved.get("best"),
                         saved.get("resumed_from"), True, str(self.last_path))

    def _open_logger(self) -> MetricsLogger:
        tb_dir = self.run_dir.logs / "tensorboard" / self.stage if self.cfg.tensorboard else None
        if not self.fabric.is_global_zero:
            tb_dir = None
        trackers = []
        if self.fabric.is_global_zero and getattr(self.cfg, "loggers", None):
            from cxrdistill.engine.trackers import make_trackers

            trackers = make_trackers(self.cfg.loggers, self.run_dir.path)
        return MetricsLogger(self.run_dir.metrics_csv, self.stage, tb_dir, trackers)


# ---------------------------------------------------------------------- helpers


def _module_states(modules: Mapping[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    return {name: module.state_dict() for name, module in modules.items()}


def _describe_value(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"


def _rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA), NumPy and Python RNG states, as tensors and plain values."""
    np_state = np.random.get_state(legacy=True)
    if isinstance(np_state, dict):  # legacy=True gives the tuple for NumPy's global MT19937
        raise TypeError(f"unexpected NumPy RNG state: {sorted(np_state)}")
    _, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": [py_version, list(py_internal), py_gauss],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


__all__ = ["BestRecord", "FitResult", "NonFiniteLossError", "Stateful", "Trainer", "make_fabric"]
