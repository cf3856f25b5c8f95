"""Run one stage in its own process: ``python -m stages JOB.json``.

The job file (written by tasks/execute.py) names the stage, its upstream folders, its config
section, the output folder and the operational context. The summary goes to
``<out_dir>/.summary.json``; a failure writes ``<out_dir>/.error.json`` ({"message",
"kind", "traceback"}) and exits non-zero. CUDA is only ever initialised here, never in the
Luigi parent. When ``PIPELINE_TRACE_FILE`` is set, the process appends one JSON line to that
file as it ends: stage, scene, pid, start, end, rc, CUDA_VISIBLE_DEVICES (tests of GPU slots).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from pipeline.config import section_from_dict
from pipeline.dag import GPU_STAGES, Context, Source
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write_json
from pipeline.log import setup_logging


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
    out_dir = Path(job["out_dir"])
    log = setup_logging(job.get("debug", False))
    try:
        if job.get("threads"):
            os.environ.setdefault("OMP_NUM_THREADS", str(job["threads"]))
        stage = job["stage"]
        if os.environ.get("PIPELINE_FAIL_STAGE") == stage:  # fault injection for tests
            raise RuntimeError(f"injected failure in stage {stage} (PIPELINE_FAIL_STAGE)")
        module = importlib.import_module(f"stages.{stage}")
        cfg = section_from_dict(stage, job["section"])
        source = Source(**job["source"]) if job.get("source") else None
        ctx = Context(scene=job["scene"], device=resolve_device(job.get("device", "auto"), stage),
                      progress=job.get("progress", True), source=source,
                      threads=job.get("threads", 0), log=log)
        inputs = {name: Path(p) for name, p in job["inputs"].items()}
        summary = module.run(inputs, cfg, out_dir, ctx) or {}
        atomic_write_json(out_dir / ".summary.json", summary)
        return 0
    except PipelineError as exc:
        atomic_write_json(out_dir / ".error.json", {"message": str(exc), "kind": type(exc).__name__,
                                                     "traceback": traceback.format_exc()})
        return 3
    except BaseException as exc:  # a bug or an interrupt: keep the traceback for --debug
        msg = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0]
        atomic_write_json(out_dir / ".error.json", {"message": msg, "kind": type(exc).__name__,
                                                     "traceback": traceback.format_exc()})
        return 4


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
