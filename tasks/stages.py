"""One Luigi task class per stage of ``pipeline.dag.STAGES``; each is requires / output / run and nothing else."""
from __future__ import annotations

import json
import os

import luigi

from pipeline import store
from pipeline.dag import GPU_STAGES, STAGES, UPSTREAM
from tasks.gpus import parse_gpus, resource_name, resource_units
from tasks.execute import run_stage

CLI_PID = os.getpid()  # Luigi's worker processes (--workers N > 1) are forks: they see this pid
INTERRUPTED = 130


class StageTask(luigi.Task):
    """A stage of one scene. Identity: workdir, scene, stage and key; the rest is operational."""

    stage = ""
    workdir = luigi.Parameter()
    scene = luigi.Parameter()
    key = luigi.Parameter()
    plan = luigi.Parameter(significant=False, visibility=luigi.parameter.ParameterVisibility.HIDDEN)
    op = luigi.Parameter(default="{}", significant=False, visibility=luigi.parameter.ParameterVisibility.HIDDEN)

    @property
    def resources(self):
        op = json.loads(self.op)
        gpus = parse_gpus(op.get("gpus"))
        if self.stage in GPU_STAGES and gpus and op.get("device") != "cpu":
            return {resource_name(): resource_units(json.loads(self.plan)["config"].get(self.stage), gpus)}
        return {}

    def requires(self):
        plan = json.loads(self.plan)
        return [task_for(up, self.workdir, plan, self.op) for up in UPSTREAM[self.stage]]

    def output(self):
        return luigi.LocalTarget(str(store.stage_dir(self.workdir, self.scene, self.stage, self.key) / store.MANIFEST))

    def complete(self):
        return store.is_done(store.stage_dir(self.workdir, self.scene, self.stage, self.key))

    def run(self):
        try:
            run_stage(json.loads(self.plan), self.stage, self.workdir, json.loads(self.op))
        except KeyboardInterrupt:
            if os.getpid() != CLI_PID:  # a forked worker: end quietly, the CLI prints the one line
                os._exit(INTERRUPTED)
            raise


def _task_class(stage: str) -> type:
    """``FramesTask``, ``SfmPointsTask``, ...: Luigi names a task by its class."""
    name = "".join(part.title() for part in stage.split("_")) + "Task"
    return type(name, (StageTask,), {"stage": stage, "__module__": __name__})


TASKS = {stage: _task_class(stage) for stage in STAGES}


def task_for(stage: str, workdir: str, plan: dict, op: str = "{}") -> StageTask:
    return TASKS[stage](workdir=str(workdir), scene=plan["scene"], key=plan["keys"][stage],
                        plan=json.dumps(plan, sort_keys=True), op=op)
