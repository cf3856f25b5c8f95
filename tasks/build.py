"""Run Luigi over scene plans and turn its result into an exit status and one-line reasons."""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import luigi
import luigi.rpc
from luigi.execution_summary import LuigiStatusCode

from pipeline import store
from pipeline.dag import stage_module_name
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_copy, read_json, same_content
from tasks.execute import error_file
from tasks.gpus import parse_gpus, resource_name
from tasks.scheduler import ping
from tasks.stages import task_for

OK_STATUSES = (LuigiStatusCode.SUCCESS, LuigiStatusCode.SUCCESS_WITH_RETRY)


@dataclass
class BuildResult:
    ok: bool
    status: str
    failures: list[dict] = field(default_factory=list)  # {"scene", "stage", "message", "traceback"}
    summary: str = ""


def _clear_errors(workdir: Path, plan: dict) -> None:
    for stage, key in plan["keys"].items():
        error_file(workdir, plan["scene"], stage, key).unlink(missing_ok=True)


def _collect_errors(workdir: Path, plan: dict) -> list[dict]:
    out = []
    for stage, key in plan["keys"].items():
        path = error_file(workdir, plan["scene"], stage, key)
        if path.exists():
            try:
                out.append(read_json(path))
            except (OSError, ValueError):
                out.append({"scene": plan["scene"], "stage": stage, "message": "unreadable error report"})
    return out


def publish(workdir: Path, plan: dict) -> list[str]:
    """Copy the main outputs of the plan's finished stages (``PUBLISH``) to ``<workdir>/<scene>/``;
    a published name the stage folder lacks (a texture of an earlier run) is removed there, so
    the copies stay a consistent set (mesh.obj with the mtl and texture it names)."""
    done = []
    for stage, key in plan["keys"].items():
        module = importlib.import_module(stage_module_name(stage))
        folder = store.stage_dir(workdir, plan["scene"], stage, key)
        if not store.is_done(folder):
            continue
        for name in getattr(module, "PUBLISH", ()):
            src, dst = folder / name, store.scene_dir(workdir, plan["scene"]) / Path(name).name
            if src.is_file():
                if not same_content(src, dst):
                    atomic_copy(src, dst)
                done.append(Path(name).name)
            elif dst.is_file():
                dst.unlink()
    return done


def _declare_gpus(op: dict, scheduler_host: str | None, scheduler_port: int | None) -> None:
    """Tell the scheduler how many GPU slots this host has (a per-host Luigi resource)."""
    count = len(parse_gpus(op.get("gpus")))
    if not count:
        return
    name = resource_name()
    if scheduler_host:
        from luigi.rpc import RemoteScheduler
        RemoteScheduler(f"http://{scheduler_host}:{scheduler_port or 8082}").update_resource(name, count)
    else:
        config = luigi.configuration.get_config()
        if not config.has_section("resources"):
            config.add_section("resources")
        config.set("resources", name, str(count))


def _check_folders(workdir: Path, plans: list[dict]) -> None:
    """Before anything is written: the workdir and scene folders are folders, and a scene with a
    stage still to compute can be written to (a finished scene is only read: no locks, and its
    plan, published copies and done plan are rewritten only when they differ)."""
    store.check_workdir(workdir)
    for plan in plans:
        store.check_scene_folder(workdir, plan["scene"])
        if not all(store.is_done(store.stage_dir(workdir, plan["scene"], s, k)) for s, k in plan["keys"].items()):
            store.check_writable(store.scene_dir(workdir, plan["scene"]))


def build(plans: list[dict], workdir: Path, workers: int = 1, scheduler_host: str | None = None,
          scheduler_port: int | None = None, op: dict | None = None, debug: bool = False) -> BuildResult:
    workdir = Path(workdir).resolve()
    op_json = json.dumps(op or {}, sort_keys=True)
    _check_folders(workdir, plans)
    with store.writing(workdir):
        for plan in plans:
            store.save_plan(workdir, plan)
            _clear_errors(workdir, plan)
    tasks = [task_for(plan["until"], str(workdir), plan, op_json) for plan in plans]
    params = {"workers": workers, "log_level": "DEBUG" if debug else "CRITICAL", "no_lock": True}
    if scheduler_host:
        params.update(scheduler_host=scheduler_host, local_scheduler=False)
        if scheduler_port:
            params["scheduler_port"] = scheduler_port
    else:
        params["local_scheduler"] = True
    if scheduler_host and not ping(scheduler_host, scheduler_port or 8082):
        raise PipelineError(f"cannot reach the Luigi scheduler at {scheduler_host}:{scheduler_port or 8082}; "
                            "start it with 'run_pipeline.py scheduler start' or drop --scheduler-host")
    try:
        _declare_gpus(op or {}, scheduler_host, scheduler_port)
        result = luigi.build(tasks, detailed_summary=True, **params)
    except luigi.rpc.RPCError as exc:
        raise PipelineError(f"cannot reach the Luigi scheduler at {scheduler_host}:{scheduler_port or 8082} "
                            f"({str(exc).splitlines()[0]}); start it with "
                            "'run_pipeline.py scheduler start' or drop --scheduler-host") from None
    failures = [err for plan in plans for err in _collect_errors(workdir, plan)]
    ok = result.status in OK_STATUSES and not failures
    with store.writing(workdir):
        for plan in plans:
            if store.is_done(store.stage_dir(workdir, plan["scene"], plan["until"], plan["keys"][plan["until"]])):
                publish(workdir, plan)
                store.save_done_plan(workdir, plan)
    return BuildResult(ok=ok, status=result.status.name, failures=failures, summary=result.summary_text)
