"""`RunContext`: what the `train` command hands to a recipe's `run(cfg, params, ctx)`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from lightning_fabric import Fabric
from rich.console import Console

from cxrdistill.config import RunConfig
from cxrdistill.engine.loop import Trainer, make_fabric
from cxrdistill.engine.run_dir import RunDirectory


@dataclass
class RunContext:
    """The run directory, the (launched) Fabric, a console for messages and a logger.

    One Fabric per process: every stage's `Trainer` from `ctx.trainer(stage)` shares it.
    """

    cfg: RunConfig
    run_dir: RunDirectory
    fabric: Fabric
    console: Console = field(default_factory=Console)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("cxrdistill"))

    @classmethod
    def create(cls, cfg: RunConfig, run_dir: RunDirectory, console: Console | None = None) -> RunContext:
        """Make and launch the Fabric from `cfg.train` (devices, strategy, precision)."""
        return cls(cfg, run_dir, make_fabric(cfg.train), console or Console())

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @property
    def rank(self) -> int:
        return self.fabric.global_rank

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    def trainer(self, stage: str) -> Trainer:
        """A `Trainer` for one named stage of the recipe, writing into this run directory."""
        return Trainer(self.cfg.train, self.run_dir, stage, fabric=self.fabric, console=self.console)
