"""Run one stage in its own process: ``python -m stages JOB.json``.

The job file (written by tasks/execute.py) names the stage, its upstream folders, its config
section, the output folder and the operational context. The summary goes to
``<out_dir>/.summary.json``; a failure writes ``<out_dir>/.error.json`` ({"message",
"kind", "traceback"}) and exits non-zero. CUDA is only ever initialised here, never in the
Luigi parent. Before the stage starts, ``pipeline.disk.check_free`` compares its estimated output
size with the free space of the workdir's disk; a disk that fills up midway (ENOSPC, EDQUOT, or
almost nothing free after any failure) becomes a one-line StageError and the ``.partial`` folder
is kept for the resume. A small reserve file keeps room for the error report on a full disk.
Once the space check passed, the stage's log records (INFO and above) also go to
``<out_dir>/stage.log`` as they come, with a first line naming the stage and a last one saying how
it ended, so the file stays with the ``.partial`` folder of a failed stage. Before the summary, ``<out_dir>/.versions.json`` records
the versions of the project and its dependencies as this process sees them (the manifest takes
them from there). When ``PIPELINE_TRACE_FILE`` is set, the process appends one JSON line to that file as it ends:
stage, scene, pid, start, end, rc, CUDA_VISIBLE_DEVICES (tests of GPU slots).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import socket
import shutil
import sys
import time
import traceback
from pathlib import Path

from pipeline import disk, store
from pipeline.config import section_from_dict
from pipeline.dag import GPU_STAGES, Context, Source, stage_module_name
from pipeline.errors import PipelineError, StageError, one_line
from pipeline.fsutil import atomic_write_json
from pipeline.log import STAGE_LOG, log_to_file, setup_logging

RESERVE = ".space_reserve"  # freed just before an error report is written (a full disk)
RESERVE_BYTES = 64 << 10
INTERRUPTED = 130  # exit status after SIGINT (128 + 2)
FILE_ONLY = "pipeline.stage_log"  # lines for stage.log alone (the runner prints the outcome itself)


def resolve_device(requested: str, stage: str) -> str:
    if stage not in GPU_STAGES or requested == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise PipelineError("--device cuda was asked for but no CUDA device is visible")
    return "cpu"


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    log = setup_logging(job.get("debug", False))
    try:
        return _run_job(job, Path(job["out_dir"]), log)
    finally:  # the stage log is closed and detached (main may run in a test's process)
        note = logging.getLogger(FILE_ONLY)
        for handler in note.handlers:
            log.removeHandler(handler)
            handler.close()
        note.handlers.clear()


def _run_job(job: dict, out_dir: Path, log: logging.Logger) -> int:
    stage = job["stage"]
    try:
        if job.get("threads"):
            os.environ.setdefault("OMP_NUM_THREADS", str(job["threads"]))
        inputs = {name: Path(p) for name, p in job["inputs"].items()}
        cfg = section_from_dict(stage, job["section"])
        disk.check_free(stage, dataclasses.asdict(cfg), inputs, job.get("source"), out_dir)
        _open_stage_log(log, out_dir, job)
        if os.environ.get("PIPELINE_FAIL_STAGE") == stage:  # fault injection for tests
            raise RuntimeError(f"injected failure in stage {stage} (PIPELINE_FAIL_STAGE)")
        _reserve(out_dir)
        module = importlib.import_module(stage_module_name(stage))
        source = Source(**job["source"]) if job.get("source") else None
        ctx = Context(scene=job["scene"], device=resolve_device(job.get("device", "auto"), stage),
                      progress=job.get("progress", True), source=source,
                      threads=job.get("threads", 0), log=log)
        summary = module.run(inputs, cfg, out_dir, ctx) or {}
        (out_dir / RESERVE).unlink(missing_ok=True)
        atomic_write_json(out_dir / store.VERSIONS, store.dependency_versions())
        atomic_write_json(out_dir / ".summary.json", summary)
        logging.getLogger(FILE_ONLY).info("%s: finished", stage)
        return 0
    except PipelineError as exc:
        return _report(out_dir, str(exc), type(exc).__name__, 3)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the CLI prints the line
        return _report(out_dir, f"{stage}: interrupted; rerun to resume", "Interrupted", INTERRUPTED)
    except BaseException as exc:  # a bug or an interrupt: keep the traceback for --debug
        where = disk.space_error_path(exc)
        if where is not None or (isinstance(exc, Exception) and disk.is_full(out_dir)):
            return _report(out_dir, _space_message(stage, where or out_dir, out_dir), StageError.__name__, 3)
        msg = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0]
        return _report(out_dir, msg, type(exc).__name__, 4)


def _open_stage_log(log: logging.Logger, out_dir: Path, job: dict) -> None:
    """``stage.log`` gets the stage's records and, through a logger of its own, its first line."""
    handler = log_to_file(log, out_dir / STAGE_LOG)
    note = logging.getLogger(FILE_ONLY)
    note.handlers[:], note.propagate = [handler], False
    note.setLevel(logging.INFO)
    note.info("%s of scene '%s' in %s: started (pid %d on host %s)", job["stage"], job["scene"], out_dir.name,
              os.getpid(), socket.gethostname())


def _reserve(out_dir: Path) -> None:
    """A few kB held on disk so that the error report still fits when the disk fills up."""
    with open(out_dir / RESERVE, "wb") as f:
        f.write(bytes(RESERVE_BYTES))


def _space_message(stage: str, where, out_dir: Path) -> str:
    try:
        free = disk.human(shutil.disk_usage(out_dir).free)
    except OSError:
        free = "?"
    return (f"{stage}: no space left on device while writing {where} ({free} free); free some space and "
            f"rerun: the finished part in {out_dir.name} is kept and the stage resumes")


def _report(out_dir: Path, message: str, kind: str, code: int) -> int:
    """Write ``.error.json`` (after freeing the reserve); if even that fails, print the line."""
    (out_dir / RESERVE).unlink(missing_ok=True)
    note = logging.getLogger(FILE_ONLY)
    if note.handlers:
        note.error("%s", f"failed: {message}")
    try:
        atomic_write_json(out_dir / ".error.json", {"message": message, "kind": kind,
                                                     "traceback": traceback.format_exc()})
    except OSError:
        print(one_line(f"error: {message}"), file=sys.stderr)
    return code


def trace(job_path: str, start: float, rc: int) -> None:
    """Append this process's JSON line to ``$PIPELINE_TRACE_FILE`` (one short O_APPEND write)."""
    path = os.environ.get("PIPELINE_TRACE_FILE")
    if not path:
        return
    try:
        job = json.loads(Path(job_path).read_text())
    except (OSError, ValueError):
        job = {}
    line = json.dumps({"stage": job.get("stage"), "scene": job.get("scene"), "pid": os.getpid(), "start": start,
                       "end": time.time(), "rc": rc, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})
    with open(path, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    started = time.time()
    code = main(sys.argv[1])
    trace(sys.argv[1], started, code)
    sys.exit(code)
