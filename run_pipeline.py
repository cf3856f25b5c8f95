#!/usr/bin/env python3
"""meshpipe: reconstruct a mesh from a video, a photo folder or a dataset scene.

    meshpipe run (--video FILE | --images DIR | --dataset DIR --format FMT) --workdir DIR
    meshpipe plan (the same arguments as run)   what run would do; runs and writes nothing
    meshpipe config [--preset NAME] [--set SECTION.KEY=VALUE ...]
    meshpipe demo [--workdir DIR]
    meshpipe status --workdir DIR [--json]
    meshpipe gc --workdir DIR

``meshpipe`` is the console script of an installed package; from a checkout,
``python run_pipeline.py`` is the same command. Exit codes: 0 success, 1 a stage failed or could
not run, 2 bad usage, input or config, 130 interrupted (Ctrl-C; rerun the same command to resume).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

from pipeline import dryrun, store
from pipeline.config import load_config, preset_names
from pipeline.config_dump import config_yaml
from pipeline.dag import DATASET_FORMATS, STAGES, Source
from pipeline.errors import InputError, PipelineError, one_line
from pipeline.fsutil import file_lock
from pipeline.log import setup_logging
from pipeline.version import version

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C


def _scene_name(path: Path) -> str:
    name = path.stem if path.is_file() else path.name
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "scene"


def _source_from_args(args) -> Source:
    given = [a for a in (args.video, args.images, args.dataset) if a]
    if len(given) != 1:
        raise PipelineError("give exactly one of --video FILE, --images DIR, --dataset DIR")
    gt = _gt_folder(args.gt)
    if args.video:
        path = Path(args.video).expanduser()
        if not path.is_file():
            raise PipelineError(f"{path}: no such video file")
        return Source("video", str(path.resolve()), gt=gt)
    if args.images:
        path = Path(args.images).expanduser()
        if not path.is_dir():
            raise PipelineError(f"{path}: no such photo folder")
        return Source("images", str(path.resolve()), gt=gt)
    path = Path(args.dataset).expanduser()
    if not args.format:
        raise PipelineError(f"--dataset needs --format ({', '.join(DATASET_FORMATS)})")
    if not path.is_dir():
        raise PipelineError(f"{path}: no such dataset folder")
    return Source("dataset", str(path.resolve()), format=args.format, gt=gt)


def _gt_folder(text: str | None) -> str:
    """The --gt folder, checked before any stage runs (the frames stage copies it)."""
    if not text:
        return ""
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path.resolve())
    what = "is a file, not a folder" if path.exists() else "no such folder"
    raise InputError(f"--gt {path}: {what}; give the ground-truth folder (gt.json, gt_mesh.ply, ...)")


def _op(args) -> dict:
    return {"device": args.device, "progress": not args.no_progress, "debug": args.debug,
            "gpus": args.gpus or ""}


def _say(line: str, err: bool = False) -> None:
    """Print one message as exactly one line: names in it (files, scenes) cannot break it up."""
    print(one_line(line), file=sys.stderr if err else sys.stdout)


def _failed(fail: dict) -> None:
    _say(f"FAILED scene '{fail['scene']}', stage '{fail['stage']}': {fail['message']}", err=True)


def _report(result, debug: bool) -> int:
    if result.ok:
        return 0
    if result.failures:
        for fail in result.failures:
            _failed(fail)
        if debug:
            for f in result.failures:
                print(f.get("traceback", ""), file=sys.stderr)
    else:
        print(f"FAILED: Luigi finished with status {result.status}", file=sys.stderr)
        print(result.summary, file=sys.stderr)
    return 1


def _scene_plan(source: Source, scene: str, args, prepare: bool = False) -> tuple[Path, dict]:
    """The workdir and the plan (every stage key up to --until) a run of ``scene`` works from;
    computing it reads the input and the workdir and writes nothing (``prepare``: a run first
    lets the stages fetch what they read from this machine, such as a masks model)."""
    workdir = Path(args.workdir).expanduser()
    store.check_workdir(workdir)
    store.check_scene_folder(workdir, scene)
    cfg = load_config(args.preset, args.set)
    until = args.until or store.available_stages()[-1]
    if prepare:
        store.prepare_stages(cfg, until, logging.getLogger("pipeline"))
    return workdir, store.make_plan(scene, source, cfg, until)


def run_scene(source: Source, scene: str, args) -> int:
    from tasks.build import build

    workdir, plan = _scene_plan(source, scene, args, prepare=True)
    result = build([plan], workdir, workers=args.workers, scheduler_host=args.scheduler_host,
                   scheduler_port=args.scheduler_port, op=_op(args), debug=args.debug)
    code = _report(result, args.debug)
    if code == 0:
        notes = store.plan_fallbacks(workdir, plan)
        _say(f"done: scene '{scene}' up to stage '{plan['until']}' in {store.scene_dir(workdir.resolve(), scene)}"
             + (f"; with fallbacks: {'; '.join(notes)}" if notes else ""))
    return code


def _scene_source(args) -> tuple[Source, str]:
    if args.scene is not None:
        store.check_scene_name(args.scene)
    store.check_workdir(Path(args.workdir).expanduser())
    source = _source_from_args(args)
    return source, args.scene or _scene_name(Path(source.path))


def cmd_run(args) -> int:
    if args.dry_run:
        return cmd_plan(args)
    return run_scene(*_scene_source(args), args)


def cmd_plan(args) -> int:
    """Print each stage's key and state and what a run with these arguments would do; nothing
    runs and nothing is written (not even plan.json)."""
    workdir, plan = _scene_plan(*_scene_source(args), args)
    rows = dryrun.stage_states(workdir.resolve(), plan)
    todo = [r["stage"] for r in rows if r["action"] in ("run", "resume")]
    folder = store.scene_dir(workdir.resolve(), plan["scene"])
    if getattr(args, "json", False):
        print(json.dumps({"scene": plan["scene"], "dir": str(folder), "preset": args.preset, "until": plan["until"],
                          "stages": rows, "would_run": todo}, indent=1))
        return 0
    _say(f"plan: scene '{plan['scene']}' in {folder}, preset '{args.preset}', until '{plan['until']}'")
    print(f"  {'stage':12s} {'key':13s} {'state':8s} action")
    for r in rows:
        print(f"  {r['stage']:12s} {r['key']:13s} {r['state']:8s} {r['action']}")
    print(f"would run {len(todo)} of {len(rows)} stage(s): {', '.join(todo)}" if todo else
          "nothing to run: every stage needed is done")
    return 0


def cmd_config(args) -> int:
    """Print the resolved config as YAML (a valid preset), each key under its one-line doc."""
    cfg = load_config(args.preset, args.set)
    given = f"preset '{args.preset}'" + "".join(f", --set {item}" for item in args.set)
    sys.stdout.write(config_yaml(cfg, [
        f"meshpipe {version()}: the resolved config ({one_line(given)})",
        "saved to a file, this is a preset: --preset FILE.yaml; one value: --set SECTION.KEY=VALUE"]))
    return 0


def cmd_batch(args) -> int:
    from tasks.batch import discover, plan_all, scene_rows, write_summary
    from tasks.build import build

    if args.format != "omniobject3d":
        raise PipelineError(f"batch --format {args.format}: only omniobject3d is supported")
    workdir = Path(args.workdir).expanduser().resolve()
    store.check_workdir(workdir)
    cfg = load_config(args.preset or "default", args.set)
    until = args.until or store.available_stages()[-1]
    store.prepare_stages(cfg, until, logging.getLogger("pipeline"))
    scenes = discover(Path(args.root), args.split, args.include, args.limit)
    plans, failures = plan_all(scenes, cfg, until)
    for plan in list(plans):  # a scene whose folder is a file fails alone
        try:
            store.check_scene_folder(workdir, plan["scene"])
        except PipelineError as exc:
            plans.remove(plan)
            failures.append({"scene": plan["scene"], "stage": "input", "message": str(exc)})
    for fail in failures:
        _failed(fail)
    result = build(plans, workdir, workers=args.workers, scheduler_host=args.scheduler_host,
                   scheduler_port=args.scheduler_port, op=_op(args), debug=args.debug) if plans else None
    failures += result.failures if result else []
    rows = scene_rows(workdir, plans, failures)
    csv_path, html_path = write_summary(workdir, rows)
    ok = sum(r["status"] == "done" for r in rows)
    code = 0 if ok == len(rows) else 1
    if result and code:
        _report(result, args.debug)
    _say(f"batch: {ok}/{len(rows)} scenes done; summary {csv_path}, report {html_path}")
    return code


def _has_cuda() -> bool:
    """Ask a child process, so that CUDA is never initialised in this (Luigi) process."""
    probe = "import torch; print(torch.cuda.is_available())"
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "True"


def cmd_demo(args) -> int:
    from pipeline.synthetic import SceneSpec, generate

    workdir = Path(args.workdir).expanduser()
    store.check_workdir(workdir)
    gpu = args.device != "cpu" and _has_cuda()
    args.preset = args.preset or ("default" if gpu else "fast_cpu")
    spec = SceneSpec(num_views=150, width=1920, height=1080, output="video") if gpu else \
        SceneSpec(num_views=80, width=640, height=480, output="video")
    data = workdir / "demo_input"
    ready = data / "gt" / "gt.json"  # written last: once there, nothing is written here
    if not ready.is_file():
        with store.writing(workdir), file_lock(workdir / ".demo.lock"):
            if not ready.is_file():
                shutil.rmtree(data, ignore_errors=True)
                print(f"generating the synthetic spot video ({spec.num_views} frames, "
                      f"{spec.width}x{spec.height}) in {data}", file=sys.stderr)
                generate(data, spec)
    source = Source("video", str((data / "video.mp4").resolve()), gt=str((data / "gt").resolve()))
    return run_scene(source, "spot", args)


def _warn(message: str) -> None:
    _say(f"warning: {message}", err=True)


def _check_workdir_exists(workdir: Path) -> None:
    if not workdir.is_dir():
        raise InputError(f"{workdir}: {'not a folder' if workdir.exists() else 'no such workdir'}")


def cmd_status(args) -> int:
    workdir = Path(args.workdir)
    _check_workdir_exists(workdir)
    status = store.scene_status(workdir, on_bad=_warn)
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    complete = 0
    for scene, stages in status["scenes"].items():
        cells = "  ".join(f"{s}:{v['state']}" for s, v in stages.items())
        complete += all(v["state"] == "done" for v in stages.values())
        _say(f"{scene:24s} {cells}")
    print(f"{len(status['scenes'])} scene(s), {complete} complete")
    return 0


def cmd_gc(args) -> int:
    """Remove stage folders no plan points to (see ``store.collect_garbage``); a damaged plan
    file stops it (exit 2) before it removes anything."""
    workdir = Path(args.workdir)
    _check_workdir_exists(workdir)
    removed, temps = store.collect_garbage(workdir, on_removed=lambda path: _say(f"removed {path}"))
    print(f"gc: removed {removed} folder(s), {temps} temporary file(s)")
    return 0


def cmd_scheduler(args) -> int:
    from tasks import scheduler

    workdir = Path(args.workdir)
    if args.action == "start":
        info = scheduler.start(workdir, port=args.port, address=args.address)
    elif args.action == "stop":
        info = scheduler.stop(workdir)
    else:
        info = scheduler.status(workdir)
    print(json.dumps(info))
    return 0 if args.action != "status" or info["answering"] else 1


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ``error: ...`` (exit 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, one_line(f"error: {message} (see '{self.prog} --help')") + "\n")


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            allowed = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be an integer {allowed}, got {text!r}")
        return value
    return parse


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", help="a video file")
    p.add_argument("--images", help="a folder of photos")
    p.add_argument("--dataset", help="a dataset scene folder (with --format)")
    p.add_argument("--format", choices=DATASET_FORMATS, help="dataset format")
    p.add_argument("--gt", help="ground-truth folder (gt.json, gt_mesh.ply, ...) for evaluation")


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help=f"config preset ({', '.join(preset_names())}) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")


def _add_scene_options(p: argparse.ArgumentParser, workdir_required: bool = True) -> None:
    p.add_argument("--workdir", required=workdir_required, default=None if workdir_required else "demo_workdir",
                   help="where stage folders are kept")
    p.add_argument("--scene", help="scene name (default: the input's file or folder name)")
    _add_config_options(p)
    p.add_argument("--until", choices=STAGES, help="stop after this stage")


def _add_run_options(p: argparse.ArgumentParser, workdir_required: bool = True) -> None:
    _add_scene_options(p, workdir_required)
    p.add_argument("--workers", type=_int_in(1), default=1, help="Luigi worker processes")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--gpus", help="GPU ids for GPU stages, e.g. 0,1: one stage per card at a time")
    p.add_argument("--scheduler-host", help="use a running luigid at this host")
    p.add_argument("--scheduler-port", type=_int_in(1, 65535), help="port of that luigid (default 8082)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks and Luigi's log")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="meshpipe", description=__doc__.split("\n")[0].partition(": ")[2],
                 epilog="From a checkout, 'python run_pipeline.py ...' is the same command. Exit codes: 0 success, "
                        "1 a stage failed, 2 bad usage, input or config, 130 interrupted (rerun to resume).")
    ap.add_argument("--version", action="version", version=f"meshpipe {version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="reconstruct one scene")
    _add_input_options(p)
    _add_run_options(p)
    p.add_argument("--dry-run", action="store_true", help="only print what would run (as 'plan'), then stop")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("plan", help="print each stage's key and state and what 'run' would do; runs nothing")
    _add_input_options(p)
    _add_scene_options(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("config", help="print the resolved config as YAML, each key with its doc")
    _add_config_options(p)
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("demo", help="generate a synthetic scene and reconstruct it")
    _add_run_options(p, workdir_required=False)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("status", help="show what is done for each scene")
    p.add_argument("--workdir", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("gc", help="remove stage folders no scene's current plan points to")
    p.add_argument("--workdir", required=True)
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_gc)
    p = sub.add_parser("batch", help="reconstruct every scene of a dataset")
    p.add_argument("--root", required=True, help="dataset root (OmniObject3D layout)")
    p.add_argument("--format", required=True, choices=("omniobject3d",))
    p.add_argument("--split", choices=("blender", "video"), default="blender")
    p.add_argument("--include", default="*", help="only scenes whose name (or category/name) matches")
    p.add_argument("--limit", type=_int_in(0), default=0, help="at most this many scenes (0 = all)")
    _add_run_options(p)
    p.set_defaults(func=cmd_batch)
    p = sub.add_parser("scheduler", help="run a luigid central scheduler in the background")
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--workdir", required=True, help="its state, pid file, logs and history go here")
    p.add_argument("--port", type=_int_in(1, 65535), default=8082)
    p.add_argument("--address", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_scheduler)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.debug)
    if getattr(args, "preset", "") is None and args.command in ("run", "plan", "config"):
        args.preset = "default"
    try:
        return args.func(args)
    except PipelineError as exc:
        return _bad_input(str(exc), args.debug)
    except OSError as exc:  # a file or folder the user gave cannot be read or written: not a bug
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        return _bad_input(f"{exc.filename or args.workdir}: {exc.strerror}", args.debug)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        _say("interrupted: finished stages are kept and the stage in flight resumes; rerun the same command "
             "to continue", err=True)
        return INTERRUPTED


def _bad_input(message: str, debug: bool) -> int:
    """The one ``error:`` line of exit code 2 (called while the exception is being handled)."""
    _say(f"error: {message}", err=True)
    if debug:
        traceback.print_exc()
    return 2


if __name__ == "__main__":
    sys.exit(main())
