"""Run one stage of one scene: lock, resume or start ``.partial/``, subprocess, manifest, rename.

No luigi here: the Luigi task calls ``run_stage`` and nothing else. ``PIPELINE_THREADS=N`` in
the environment sets the stage processes' thread count when ``op`` gives none (N=1 makes
pycolmap's SfM repeatable run to run; the fault-injection harness uses it).
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
from pipeline.errors import PipelineError, one_line
from pipeline.fsutil import atomic_write_json, file_lock, read_json, remove_stale_temp_files
from tasks.gpus import gpu_slot, gpus_wanted, parse_gpus

log = logging.getLogger("pipeline")
SUMMARY = ".summary.json"  # written by the stage process as it ends well
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class StageFailed(PipelineError):
    """A stage ended without its outputs; ``str()`` is the one-line reason."""

    def __init__(self, scene: str, stage: str, reason: str, traceback: str = ""):
        super().__init__(one_line(f"scene '{scene}', stage '{stage}': {reason}"))
        self.scene, self.stage, self.reason, self.traceback = scene, stage, reason, traceback


def error_file(workdir: Path, scene: str, stage: str, key: str) -> Path:
    return store.scene_dir(workdir, scene) / ".errors" / f"{stage}-{key}.json"


def _job(plan: dict, stage: str, workdir: Path, partial: Path, op: dict) -> dict:
    from pipeline.dag import UPSTREAM

    scene, keys = plan["scene"], plan["keys"]
    return {
        "stage": stage, "scene": scene, "out_dir": str(partial),
        "inputs": {up: str(store.stage_dir(workdir, scene, up, keys[up])) for up in UPSTREAM[stage]},
        "section": plan["config"][stage],
        "source": plan["source"] if not UPSTREAM[stage] else None,
        "device": op.get("device", "auto"), "progress": op.get("progress", True),
        "threads": op.get("threads") or int(os.environ.get("PIPELINE_THREADS", "0") or 0),
        "debug": op.get("debug", False), "started": time.time(),
    }


def _child_env(op: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    if not op.get("debug"):
        env.setdefault("GLOG_minloglevel", "1")  # COLMAP's INFO lines only with --debug
    if op.get("cuda_visible_devices") is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(op["cuda_visible_devices"])
    return env


def _inherited_fds(op: dict) -> tuple[int, ...]:
    """The stage lock's descriptor, for the stage process to inherit (``pass_fds``): the lock then
    stays held until the stage process ends too, even when this process is killed first."""
    return (op["lock_fd"],) if op.get("lock_fd") is not None else ()


def _call_stage(stage: str, job_path: Path, op: dict) -> int:
    """Run the stage process; a GPU stage holds as many GPU slots as its section's ``gpus``
    asks for (DDP training, meshing split over cards) and sees exactly those cards."""
    cmd = [sys.executable, "-m", "stages", str(job_path)]
    gpus = parse_gpus(op.get("gpus"))
    if stage not in GPU_STAGES or not gpus or op.get("device") == "cpu":
        return subprocess.call(cmd, cwd=PROJECT_ROOT, env=_child_env(op), pass_fds=_inherited_fds(op))
    count = gpus_wanted(read_json(job_path).get("section"))
    if count > len(gpus):
        atomic_write_json(job_path.parent / ".error.json", {
            "message": f"{stage}.gpus={count} but --gpus lists {len(gpus)} card(s) ({','.join(gpus)}); "
                       f"list more cards or set {stage}.gpus={len(gpus)}", "kind": "ConfigError", "traceback": ""})
        return 3
    with gpu_slot(gpus, count) as ids:
        log.info("%s: on GPU %s", stage, ids)
        return subprocess.call(cmd, cwd=PROJECT_ROOT, env=_child_env({**op, "cuda_visible_devices": ids}),
                               pass_fds=_inherited_fds(op))


def _fail(plan: dict, stage: str, workdir: Path, partial: Path, rc: int) -> StageFailed:
    err_path = partial / ".error.json"
    try:
        err = read_json(err_path)
    except (OSError, ValueError):
        from pipeline.disk import is_full

        full = " and the disk is full; free some space and rerun" if is_full(partial) else ""
        err = {"message": f"stage process exited with code {rc} and left no error report{full}",
               "kind": "Crash", "traceback": ""}
    scene, key = plan["scene"], plan["keys"][stage]
    target = error_file(workdir, scene, stage, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(target, {"scene": scene, "stage": stage, "key": key, **err})
    err_path.unlink(missing_ok=True)
    if err.get("kind") == "InputError":  # a rerun on the same input cannot do better: drop the work
        shutil.rmtree(partial, ignore_errors=True)
    log.error("%s", one_line(f"FAILED scene '{scene}', stage '{stage}': {err['message']}"))
    return StageFailed(scene, stage, err["message"], err.get("traceback", ""))


def run_stage(plan: dict, stage: str, workdir: Path, op: dict) -> None:
    """Produce ``<stage>-<key>/`` for the plan's scene unless it is already there.

    Under the stage's lock (so two runs never compute one stage at once): a finished folder
    is kept; a ``.partial/`` with a manifest (killed before the rename) is renamed; one whose
    stage process finished (``.summary.json``, its parent killed before the manifest) gets its
    manifest; any other is resumed or started by a new stage process.
    """
    workdir = Path(workdir)
    scene, key = plan["scene"], plan["keys"][stage]
    final = store.stage_dir(workdir, scene, stage, key)
    lock = store.lock_file(workdir, scene, stage, key)

    def waiting(holder: str) -> None:
        log.info("[%s] %s: waiting for %s (%s)", scene, stage, lock, holder)

    with file_lock(lock, on_wait=waiting) as fd:
        if store.is_done(final):
            return
        partial = store.partial_dir(final)
        if store.is_done(partial):  # killed between manifest and rename
            store.commit(partial, final)
            return
        if not (partial / SUMMARY).is_file():
            _compute(plan, stage, workdir, partial, {**op, "lock_fd": fd})
        _finish(plan, stage, partial, final)


def _compute(plan: dict, stage: str, workdir: Path, partial: Path, op: dict) -> None:
    """Run the stage process in ``partial`` (resuming what a killed run left there)."""
    scene, key = plan["scene"], plan["keys"][stage]
    partial.mkdir(parents=True, exist_ok=True)
    for path in remove_stale_temp_files(partial):  # nobody else writes here: we hold the lock
        log.info("[%s] %s: removed %s, left by a killed write", scene, stage, path.relative_to(partial))
    error_file(workdir, scene, stage, key).unlink(missing_ok=True)
    (partial / ".error.json").unlink(missing_ok=True)
    job_path = partial / ".job.json"
    atomic_write_json(job_path, _job(plan, stage, workdir, partial, op))
    log.info("[%s] %s: start (%s)", scene, stage, partial.name.removesuffix(".partial"))
    rc = _call_stage(stage, job_path, op)
    if rc != 0:
        raise _fail(plan, stage, workdir, partial, rc)


def _finish(plan: dict, stage: str, partial: Path, final: Path) -> None:
    """Manifest and rename of a folder whose stage process wrote its summary."""
    summary = read_json(partial / SUMMARY)
    try:
        started = float(read_json(partial / ".job.json")["started"])
    except (OSError, ValueError, KeyError, TypeError):
        started = (partial / SUMMARY).stat().st_mtime
    seconds = max(0.0, (partial / SUMMARY).stat().st_mtime - started)
    atomic_write_json(partial / "config.json", plan["config"])
    store.write_manifest(partial, stage, plan["keys"][stage], plan["config"], summary, seconds)
    store.commit(partial, final)
    log.info("[%s] %s: done in %.1f s", plan["scene"], stage, seconds)
