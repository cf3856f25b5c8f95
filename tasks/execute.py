"""Run one stage of one scene: lock, resume or start ``.partial/``, subprocess, manifest, rename.

No luigi here: the Luigi task calls ``run_stage`` and nothing else.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline import store
from pipeline.dag import GPU_STAGES
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write_json, file_lock, read_json
from tasks.gpus import gpu_slot, parse_gpus

log = logging.getLogger("pipeline")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class StageFailed(PipelineError):
    """A stage ended without its outputs; ``str()`` is the one-line reason."""

    def __init__(self, scene: str, stage: str, reason: str, traceback: str = ""):
        super().__init__(f"scene '{scene}', stage '{stage}': {reason}")
        self.scene, self.stage, self.reason, self.traceback = scene, stage, reason, traceback


def error_file(workdir: Path, scene: str, stage: str, key: str) -> Path:
    return store.scene_dir(workdir, scene) / ".errors" / f"{stage}-{key}.json"


def lock_file(workdir: Path, scene: str, stage: str, key: str) -> Path:
    return store.scene_dir(workdir, scene) / ".locks" / f"{stage}-{key}.lock"


def _job(plan: dict, stage: str, workdir: Path, partial: Path, op: dict) -> dict:
    from pipeline.dag import UPSTREAM

    scene, keys = plan["scene"], plan["keys"]
    return {
        "stage": stage, "scene": scene, "out_dir": str(partial),
        "inputs": {up: str(store.stage_dir(workdir, scene, up, keys[up])) for up in UPSTREAM[stage]},
        "section": plan["config"][stage],
        "source": plan["source"] if not UPSTREAM[stage] else None,
        "device": op.get("device", "auto"), "progress": op.get("progress", True),
        "threads": op.get("threads", 0), "debug": op.get("debug", False),
    }


def _child_env(op: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    if not op.get("debug"):
        env.setdefault("GLOG_minloglevel", "1")  # COLMAP's INFO lines only with --debug
    if op.get("cuda_visible_devices") is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(op["cuda_visible_devices"])
    return env


def _call_stage(stage: str, job_path: Path, op: dict) -> int:
    cmd = [sys.executable, "-m", "stages", str(job_path)]
    gpus = parse_gpus(op.get("gpus"))
    if stage not in GPU_STAGES or not gpus or op.get("device") == "cpu":
        return subprocess.call(cmd, cwd=PROJECT_ROOT, env=_child_env(op))
    with gpu_slot(gpus) as gpu:
        log.info("%s: on GPU %s", stage, gpu)
        return subprocess.call(cmd, cwd=PROJECT_ROOT, env=_child_env({**op, "cuda_visible_devices": gpu}))


def _fail(plan: dict, stage: str, workdir: Path, partial: Path, rc: int) -> StageFailed:
    err_path = partial / ".error.json"
    try:
        err = read_json(err_path)
    except (OSError, ValueError):
        err = {"message": f"stage process exited with code {rc} and left no error report",
               "kind": "Crash", "traceback": ""}
    scene, key = plan["scene"], plan["keys"][stage]
    target = error_file(workdir, scene, stage, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(target, {"scene": scene, "stage": stage, "key": key, **err})
    err_path.unlink(missing_ok=True)
    if err.get("kind") == "InputError":  # a rerun on the same input cannot do better: drop the work
        shutil.rmtree(partial, ignore_errors=True)
    log.error("FAILED scene '%s', stage '%s': %s", scene, stage, err["message"])
    return StageFailed(scene, stage, err["message"], err.get("traceback", ""))


def run_stage(plan: dict, stage: str, workdir: Path, op: dict) -> None:
    """Produce ``<stage>-<key>/`` for the plan's scene unless it is already there."""
    workdir = Path(workdir)
    scene, key = plan["scene"], plan["keys"][stage]
    final = store.stage_dir(workdir, scene, stage, key)
    with file_lock(lock_file(workdir, scene, stage, key)):
        if store.is_done(final):
            return
        partial = store.partial_dir(final)
        if store.is_done(partial):  # killed between manifest and rename
            store.commit(partial, final)
            return
        partial.mkdir(parents=True, exist_ok=True)
        error_file(workdir, scene, stage, key).unlink(missing_ok=True)
        (partial / ".error.json").unlink(missing_ok=True)
        job_path = partial / ".job.json"
        atomic_write_json(job_path, _job(plan, stage, workdir, partial, op))
        log.info("[%s] %s: start (%s)", scene, stage, final.name)
        t0 = time.time()
        rc = _call_stage(stage, job_path, op)
        if rc != 0:
            raise _fail(plan, stage, workdir, partial, rc)
        summary = read_json(partial / ".summary.json")
        seconds = time.time() - t0
        atomic_write_json(partial / "config.json", plan["config"])
        store.write_manifest(partial, stage, key, plan["config"], summary, seconds)
        store.commit(partial, final)
        log.info("[%s] %s: done in %.1f s", scene, stage, seconds)
