"""Weights & Biases logging: one run per executed stage (group = sweep, job_type = stage).

`logger.backend=wandb` with `logger.mode=offline` (default: files under `<sweep>/wandb`, synced
later with `wandb sync`) or `online`; `logger.backend=none` disables it. The run is always
finished, also when the stage fails (its state then says so)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


class NullRun:
    def log(self, metrics: dict) -> None:
        pass

    def table(self, name: str, rows: list[dict]) -> None:
        pass


class WandbRun:
    def __init__(self, run):
        self.run = run

    def log(self, metrics: dict) -> None:
        if metrics:
            self.run.log(dict(metrics))
            for k, v in metrics.items():
                self.run.summary[k] = v

    def table(self, name: str, rows: list[dict]) -> None:
        import wandb
        if not rows:
            return
        cols = list(rows[0])
        self.run.log({name: wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})


class Tracker:
    def __init__(self, backend: str = "wandb", mode: str = "offline", project: str = "spikellm",
                 entity: str | None = None, directory: str | os.PathLike = "outputs",
                 group: str | None = None):
        self.backend, self.mode, self.project, self.entity = backend, mode, project, entity
        self.dir, self.group = Path(directory), group

    @contextlib.contextmanager
    def stage_run(self, stage: str, name: str, config: dict):
        if self.backend == "none":
            yield NullRun()
            return
        import wandb
        self.dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=self.project, entity=self.entity, mode=self.mode,
                         dir=str(self.dir), group=self.group, job_type=stage, name=name,
                         config=config, reinit="finish_previous",
                         settings=wandb.Settings(silent=True, console="off"))
        failed = True
        try:
            yield WandbRun(run)
            failed = False
        finally:
            run.finish(exit_code=1 if failed else 0)
