"""Weights & Biases logging: one run per executed stage (group = sweep, job_type = stage,
named by what it serves) and one run per sweep point (job_type = point) that carries the point's
whole result, also when every stage was cached.

`logger.backend=wandb` with `logger.mode=offline` (default: files under `<sweep>/wandb`, synced
later with `wandb sync`) or `online`; `logger.backend=none` disables it. The run is always
finished, also when the stage fails (its state then says so)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


#: headline metrics and how a dashboard summarises them (W&B define_metric)
METRIC_GOALS = (("ppl/*", "min"), ("acc/*", "max"), ("acc_norm/*", "max"), ("cost/*", "last"))


class NullRun:
    def log(self, metrics: dict) -> None:
        pass

    def log_block(self, row: dict) -> None:
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

    def log_block(self, row: dict) -> None:
        """One finished block of a long stage (block index, loss, seconds, memory), logged as it
        happens so a 70B stage can be watched (x axis: block/index)."""
        self.run.log({f"block/{k}": v for k, v in row.items()})

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
    def stage_run(self, stage: str, name: str, config: dict, tags: list[str] | None = None):
        if self.backend == "none":
            yield NullRun()
            return
        import wandb
        self.dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=self.project, entity=self.entity, mode=self.mode,
                         dir=str(self.dir), group=self.group, job_type=stage, name=name,
                         config=config, tags=tags, reinit="finish_previous",
                         settings=wandb.Settings(silent=True, console="off"))
        run.define_metric("block/index")
        run.define_metric("block/*", step_metric="block/index")
        for pattern, goal in METRIC_GOALS:
            run.define_metric(pattern, summary=goal)
        failed = True
        try:
            yield WandbRun(run)
            failed = False
        finally:
            run.finish(exit_code=1 if failed else 0)


    def point_run(self, name: str, config: dict, metrics: dict, tags: list[str]) -> None:
        """One run per sweep point (job_type `point`): the point's config (its swept keys also as
        top-level `key.path` columns) and every metric of its manifest (perplexities, the FP
        baseline, zero-shot, cost, energy), so a dashboard plots ppl against cost/ace or
        spiking.ratio without joining runs."""
        with self.stage_run("point", name, config, tags) as run:
            run.log(metrics)
