"""Kill the whole pipeline (SIGKILL to its process group) at random moments, rerun it after each
kill, and check that it ends with the outputs of an uninterrupted run.

    PYTHONPATH=. python benchmarks/faults.py [--kills 20] [--seed 0] [--workdir /tmp/faults] [--out faults.json]

A tiny synthetic scene (spot, 16 photos of 160x120) goes through the real CLI (``run_pipeline.py
run --preset fast_cpu`` plus ``--set`` overrides that shrink training, meshing and evaluation)
once uninterrupted, then in a second workdir with N kills spread over the stages in order (kill i
at a random moment of stage ``STAGES[i * 8 // N]``, or of the first one not finished yet).
``PIPELINE_THREADS=1`` makes pycolmap's SfM repeatable, so the two runs compare file by file.
After every kill: each finished stage folder matches its manifest, every manifest parses, no
finished stage was computed again, a started stage read only finished inputs, and the next
attempt does not fail. At the end: the same stage keys and files (bitwise, or equal once times
and reuse counts are dropped), the same TensorBoard scalars and metrics, a mesh that loads, and
no ``.partial``, ``.*.tmp`` or ``*-luigi-tmp-*`` left. Prints a markdown table last ("kills
survived k/N") and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench_paths import ROOT  # noqa: E402,F401

from pipeline import store  # noqa: E402
from pipeline.dag import STAGES  # noqa: E402
from pipeline.fsutil import file_lock, read_json  # noqa: E402

SCENE = "spot"
TINY = [f"--set={kv}" for kv in (
    "train.iterations=60", "train.checkpoint_every=20", "train.batch_rays=128", "train.samples_per_ray=8",
    "train.ray_candidates=32", "train.occ_resolution=16", "train.grid_levels=4", "train.c2f_init_levels=2",
    "train.c2f_step=20", "train.grid_log2_table=12", "train.grid_max_res=64", "train.sdf_hidden=32",
    "train.color_hidden=32", "train.color_layers=1", "train.feature_dim=8", "train.holdout_eval_views=1",
    "train.views_per_batch=2", "train.log_every=10", "train.warmup_steps=10", "train.occ_warmup_steps=20",
    "masks.grabcut_rounds=1", "sfm_points.carve_resolution=32", "mesh.resolution=64", "mesh.block_res=32",
    "cleanup.max_views=8", "evaluate.num_samples=5000", "evaluate.iou_max_views=4", "evaluate.report_frames=8",
    "evaluate.render_max_side=160", "evaluate.icp_iterations=5")]
STAGE_DIR = re.compile(rf"^({'|'.join(STAGES)})-[0-9a-f]{{{store.KEY_LEN}}}$")  # finished folders
# Fields that record when, how long, or how much a run reused from a killed one (mesh blocks,
# masks): they differ between runs whose results are the same, so comparisons drop them.
RUN_KEYS = {"seconds", "wall_seconds", "eval_seconds", "elapsed", "samples_per_second", "seconds_per_frame",
            "stage_seconds", "finished", "time", "timings", "blocks_evaluated", "blocks_resumed",
            "samples_evaluated", "reused", "computed", "timeline"}
# report.html embeds the date and stage times (its numbers come from metrics.json); stage.log
# holds times, and a resumed stage's log has the killed attempt's lines too
UNCOMPARED = ("report.html", "stage.log")


@dataclass
class Setup:
    images: Path
    gt: Path
    until: str = "evaluate"
    settings: list[str] = field(default_factory=lambda: list(TINY))


def make_scene(folder: Path, views: int = 16, width: int = 160, height: int = 120) -> Setup:
    """The scene in ``folder``, generated unless there (several test modules share one)."""
    from pipeline.synthetic import SceneSpec, generate

    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.parent / f".{folder.name}.lock"):
        if not (folder / "gt" / "gt.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            generate(folder, SceneSpec(num_views=views, width=width, height=height, output="images", seed=0))
    return Setup(folder / "images", folder / "gt")


def command(setup: Setup, workdir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "run_pipeline.py"), "run", "--images", str(setup.images), "--gt",
            str(setup.gt), "--workdir", str(workdir), "--scene", SCENE, "--preset", "fast_cpu", "--no-progress",
            "--until", setup.until, *setup.settings]


def start(setup: Setup, workdir: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """The CLI in a new session (its own process group: one killpg reaches every process)."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), PIPELINE_THREADS="1", **(env or {}))
    with open(log, "ab") as out:
        return subprocess.Popen(command(setup, workdir), cwd=ROOT, env=full_env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)


# ---------------------------------------------------------------- processes (Linux /proc)

def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (zombies, dead but not yet reaped, do not count)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def stage_job(pid: int) -> dict | None:
    """The job of a ``python -m stages JOB.json`` process, else None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        i = argv.index(b"stages")
        return json.loads(Path(argv[i + 1].decode()).read_text()) if argv[i - 1] == b"-m" else None
    except (OSError, ValueError, IndexError):
        return None


def running_jobs(pgid: int) -> list[dict]:
    return [job for pid in group_members(pgid) if (job := stage_job(pid))]


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.time() + 10  # SIGKILL is asynchronous: wait until no member is left
    while group_members(proc.pid) and time.time() < deadline:
        time.sleep(0.02)


# ---------------------------------------------------------------- checks on the store

def scene_keys(workdir: Path) -> dict[str, str]:
    """The scene's stage keys in pipeline order."""
    keys = read_json(store.scene_dir(workdir, SCENE) / store.PLAN)["keys"]
    return {stage: keys[stage] for stage in STAGES if stage in keys}


def check_store(workdir: Path) -> list[str]:
    """Every finished stage folder matches its manifest; every manifest anywhere parses; the
    inputs of every started stage (``.job.json`` in a ``.partial``) are finished folders."""
    folder = store.scene_dir(workdir, SCENE)
    if not folder.is_dir():
        return []
    problems = []
    for path in sorted(folder.iterdir()):
        if STAGE_DIR.match(path.name):
            problems += store.verify(path)
    for path in folder.rglob(store.MANIFEST):
        try:
            read_json(path)
        except ValueError:
            problems.append(f"{path}: corrupt manifest")
    for job_path in folder.glob("*.partial/.job.json"):
        try:
            inputs = read_json(job_path)["inputs"].values()
        except (OSError, ValueError, KeyError):
            continue  # the parent was killed while writing it: it never started a stage
        problems += [f"{job_path.parent.name} read an unfinished input {p}" for p in inputs
                     if p.endswith(".partial") or not store.is_done(Path(p))]
    return problems


def finished(workdir: Path) -> dict[str, bytes]:
    """Manifest bytes of every finished stage folder (a recomputed stage gets a new manifest)."""
    folder = store.scene_dir(workdir, SCENE)
    return {p.name: (p / store.MANIFEST).read_bytes() for p in sorted(folder.glob("*-*"))
            if STAGE_DIR.match(p.name) and (p / store.MANIFEST).is_file()}


def leftovers(workdir: Path) -> dict[str, int]:
    folder = store.scene_dir(workdir, SCENE)
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {"partial": len(list(folder.glob("*.partial"))),
            "tmp": sum(p.name.startswith(".") and p.name.endswith(".tmp") for p in files),
            "luigi_tmp": sum("-luigi-tmp-" in p.name for p in files)}


# ---------------------------------------------------------------- comparing two workdirs

def _strip_run_keys(obj):
    if isinstance(obj, dict):
        return {k: _strip_run_keys(v) for k, v in obj.items() if k not in RUN_KEYS}
    if isinstance(obj, list):
        return [_strip_run_keys(v) for v in obj]
    return obj


def _same_file(a: Path, b: Path) -> str:
    """'bitwise', 'run_records' (JSON or checkpoint equal once ``RUN_KEYS`` are dropped) or
    'differs'."""
    if a.read_bytes() == b.read_bytes():
        return "bitwise"
    try:
        if a.suffix == ".json" and _strip_run_keys(read_json(a)) == _strip_run_keys(read_json(b)):
            return "run_records"
        if a.suffix == ".pt" and _same_checkpoint(a, b):
            return "run_records"
    except ValueError:
        pass
    return "differs"


def _same_checkpoint(a: Path, b: Path) -> bool:
    import torch

    def flat(obj, prefix=""):
        if isinstance(obj, dict):
            return {k: v for key, val in obj.items() if key not in RUN_KEYS
                    for k, v in flat(val, f"{prefix}/{key}").items()}
        if isinstance(obj, (list, tuple)):
            return {k: v for i, val in enumerate(obj) for k, v in flat(val, f"{prefix}[{i}]").items()}
        return {prefix: obj}
    fa, fb = (flat(torch.load(p, map_location="cpu", weights_only=True)) for p in (a, b))
    return fa.keys() == fb.keys() and all(
        torch.equal(fa[k], fb[k]) if torch.is_tensor(fa[k]) else fa[k] == fb[k] for k in fa)


def tb_scalars(folder: Path) -> dict[tuple[str, int], float]:
    """TensorBoard scalars of every event file in ``folder`` (oldest file first, so a step that a
    resumed run logged again keeps its last value)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = {}
    for path in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: (int(p.name.split(".")[3]), p.name)):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                number = value.simple_value if value.HasField("simple_value") else \
                    (value.tensor.float_val[0] if value.tensor.float_val else None)
                out[(value.tag, event.step)] = number
    return out


def compare(reference: Path, workdir: Path) -> dict:
    """Stage folders, files and metrics of ``workdir`` against the uninterrupted ``reference``.
    TensorBoard folders are compared by their scalars (a resumed run writes one more file)."""
    ref_keys = scene_keys(reference)
    out = {"same_keys": ref_keys == scene_keys(workdir), "bitwise": 0, "run_records": [], "differs": [],
           "missing": [], "extra": [], "not_compared": []}
    for stage, key in ref_keys.items():
        a, b = store.stage_dir(reference, SCENE, stage, key), store.stage_dir(workdir, SCENE, stage, key)
        fa, fb = ({f for f in (store.load_manifest(d) or {"files": {}})["files"] if not f.startswith("tb/")}
                  for d in (a, b))
        out["missing"] += [f"{a.name}/{f}" for f in sorted(fa - fb)]
        out["extra"] += [f"{b.name}/{f}" for f in sorted(fb - fa)]
        if (a / "tb").is_dir() and tb_scalars(a / "tb") != tb_scalars(b / "tb"):
            out["differs"].append(f"{a.name}/tb (scalars)")
        for rel in sorted(fa & fb):
            verdict = "not_compared" if Path(rel).name in UNCOMPARED else _same_file(a / rel, b / rel)
            if verdict == "bitwise":
                out["bitwise"] += 1
            else:
                out[verdict].append(f"{a.name}/{rel}")
    out["metrics_equal"] = _metrics(reference) == _metrics(workdir)  # both None: no evaluate stage
    out["mesh"] = _mesh_faces(reference), _mesh_faces(workdir)
    return out


def _metrics(workdir: Path) -> dict | None:
    path = store.scene_dir(workdir, SCENE) / "metrics.json"
    return _strip_run_keys(read_json(path)) if path.is_file() else None


def _mesh_faces(workdir: Path) -> int:
    """Faces of the published mesh (the raw one when the run ended with the mesh stage)."""
    import trimesh

    path = store.scene_dir(workdir, SCENE) / "mesh.ply"
    if not path.is_file():
        keys = scene_keys(workdir)
        path = store.stage_dir(workdir, SCENE, "mesh", keys.get("mesh", "none")) / "mesh_raw.ply"
    return len(trimesh.load(path, force="mesh").faces) if path.is_file() else 0


# ---------------------------------------------------------------- kills

@dataclass
class Moment:
    """Kill once ``stage`` runs (or the first unfinished stage after it) and ``ready(partial)``
    holds, ``delay`` seconds later plus ``fraction`` of that stage's ``seconds``."""
    stage: str
    delay: float = 0.0
    ready: Callable[[Path], bool] = lambda partial: True
    fraction: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)


def _target(workdir: Path, keys: dict, stage: str) -> str | None:
    order = list(keys)
    for name in order[order.index(stage):]:
        if not store.is_done(store.stage_dir(workdir, SCENE, name, keys[name])):
            return name
    return None


def _moment_reached(workdir: Path, keys: dict, moment: Moment, since: float) -> str | None:
    """The target stage (or the first unfinished one after it) when this attempt started it and
    its ``ready`` test holds, else None."""
    stage = _target(workdir, keys, moment.stage)
    if stage is None:
        return None
    partial = store.partial_dir(store.stage_dir(workdir, SCENE, stage, keys[stage]))
    try:
        started = (partial / ".job.json").stat().st_mtime >= since
    except FileNotFoundError:
        return None
    return stage if started and moment.ready(partial) else None


def _sleep_within(proc: subprocess.Popen, partial: Path, seconds: float) -> None:
    """Sleep ``seconds``, or less if the stage in ``partial`` ends first (its process wrote the
    summary, or the folder is committed): the kill then lands as the run records the stage,
    not after the run has ended."""
    final = partial.with_name(partial.name.removesuffix(".partial"))
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not (partial / ".summary.json").exists() \
            and not (final / store.MANIFEST).exists():
        time.sleep(0.01)


def attempt(setup: Setup, workdir: Path, keys: dict, moment: Moment | None, log: Path,
            timeout: float = 900) -> dict:
    """One run of the CLI, killed at ``moment`` (None: let it finish)."""
    t0 = time.time()
    proc = start(setup, workdir, log)
    record = {"target": moment.stage if moment else "none", "killed": False}
    try:
        while proc.poll() is None and time.time() - t0 < timeout:
            stage = _moment_reached(workdir, keys, moment, t0) if moment else None
            if stage:
                _sleep_within(proc, store.partial_dir(store.stage_dir(workdir, SCENE, stage, keys[stage])),
                              moment.delay + moment.fraction * moment.seconds.get(stage, 0.0))
                jobs = running_jobs(proc.pid)
                if proc.poll() is None:
                    record.update(killed=True, after_s=round(time.time() - t0, 2),
                                  stage=jobs[0]["stage"] if jobs else "(between stages)")
                    kill_group(proc)
                break
            time.sleep(0.02)
        record["timed_out"] = proc.poll() is None
    finally:
        kill_group(proc)
    record.update(rc=proc.returncode, wall_s=round(time.time() - t0, 1))
    return record


def reference_run(setup: Setup, workdir: Path, log: Path) -> dict:
    t0 = time.time()
    rc = start(setup, workdir, log).wait()
    seconds = {}
    if rc == 0:
        for stage, key in scene_keys(workdir).items():
            seconds[stage] = (store.load_manifest(store.stage_dir(workdir, SCENE, stage, key)) or {}).get("seconds", 0)
    return {"rc": rc, "wall_s": round(time.time() - t0, 1), "stage_seconds": seconds}


def run_with_kills(setup: Setup, workdir: Path, keys: dict, moments: list[Moment], log: Path) -> dict:
    """Attempts killed at ``moments`` in turn, then one that must finish; checks after each."""
    kills, peak = [], {"partial": 0, "tmp": 0, "luigi_tmp": 0}
    for moment in [*moments, None]:
        before = finished(workdir) if workdir.is_dir() else {}
        rec = attempt(setup, workdir, keys, moment, log)
        after = finished(workdir)
        rec["problems"] = check_store(workdir) + [f"{name} was computed again" for name in before
                                                  if after.get(name) != before[name]]
        rec["leftovers"] = leftovers(workdir)
        peak = {k: max(v, rec["leftovers"][k]) for k, v in peak.items()}
        if kills:  # the attempt after a kill must not fail on what the kill left
            kills[-1]["next_ok"] = (rec["killed"] or rec["rc"] == 0) and not rec["problems"]
        kills.append(rec)
    final = kills.pop()
    for rec in kills:
        rec["survived"] = rec["killed"] and not rec["problems"] and rec["next_ok"]
    return {"kills": kills, "final": final, "final_problems": final["problems"],
            "final_leftovers": final["leftovers"], "peak_leftovers": peak}


def random_moments(n: int, seconds: dict[str, float], rng: random.Random) -> list[Moment]:
    """Kill i at a uniformly random moment of stage STAGES[i * 8 // n] (or of the first stage not
    finished after it): up to 80% of that stage's uninterrupted time (a stage can run faster
    when the machine is less busy, and a kill after the last stage would find nothing to stop)."""
    stages = list(seconds)
    return [Moment(stages[i * len(stages) // n], fraction=rng.uniform(0.0, 0.8), seconds=seconds)
            for i in range(n)]


def report(result: dict) -> str:
    lines = ["| # | aimed at | killed in | after s | left: partial/tmp/luigi-tmp | checks | next run |",
             "|---|---|---|---|---|---|---|"]
    for i, k in enumerate(result["kills"], 1):
        left = k["leftovers"]
        lines.append(f"| {i} | {k['target']} | {k.get('stage', 'not killed')} | {k.get('after_s', '-')} | "
                     f"{left['partial']}/{left['tmp']}/{left['luigi_tmp']} | "
                     f"{'; '.join(k['problems'])[:120] or 'ok'} | {'ok' if k.get('next_ok') else 'FAILED'} |")
    cmp, ref, left = result["compare"], result["reference"], result["final_leftovers"]
    survived = sum(k["survived"] for k in result["kills"])
    tb_equal = not any("(scalars)" in d for d in cmp["differs"])
    lines += ["", f"kills survived {survived}/{len(result['kills'])}; uninterrupted run {ref['wall_s']} s, "
              f"with the kills {result['total_wall_s']} s over {len(result['kills']) + 1} attempts",
              f"final outputs: same stage keys {cmp['same_keys']}; {cmp['bitwise']} files bitwise, "
              f"{len(cmp['run_records'])} equal once times and reuse counts are dropped, not compared "
              f"{cmp['not_compared'] or 'none'}, differing {cmp['differs'] or 'none'}, missing "
              f"{cmp['missing'] or 'none'}, extra {cmp['extra'] or 'none'}; TensorBoard scalars equal {tb_equal}; "
              f"metrics equal {cmp['metrics_equal']}; mesh faces {cmp['mesh'][1]} (uninterrupted {cmp['mesh'][0]})",
              f"left at the end: {left['partial']} .partial, {left['tmp']} .tmp, {left['luigi_tmp']} luigi-tmp "
              f"(most at once after a kill: {result['peak_leftovers']})"]
    return "\n".join(lines)


def passed(result: dict) -> bool:
    cmp = result["compare"]
    return (all(k["survived"] for k in result["kills"]) and result["final"]["rc"] == 0
            and not result["final_problems"] and not any(result["final_leftovers"].values())
            and cmp["same_keys"] and not cmp["differs"] and not cmp["missing"] and not cmp["extra"]
            and cmp["metrics_equal"]
            and cmp["mesh"][0] == cmp["mesh"][1] > 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/faults"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    setup = make_scene(args.workdir / "scene")
    ref_dir, work = args.workdir / "reference", args.workdir / f"killed_{args.seed}_{args.kills}"
    for old in (ref_dir, work):
        shutil.rmtree(old, ignore_errors=True)
    log = args.workdir / "runs.log"
    ref = reference_run(setup, ref_dir, log)
    if ref["rc"] != 0:
        print(f"the uninterrupted run failed (exit code {ref['rc']}); see {log}", file=sys.stderr)
        return 1
    t0 = time.time()
    moments = random_moments(args.kills, ref["stage_seconds"], rng)
    result = run_with_kills(setup, work, scene_keys(ref_dir), moments, log)
    result.update(reference=ref, total_wall_s=round(time.time() - t0, 1), compare=compare(ref_dir, work),
                  load_average=os.getloadavg(), cpus=os.cpu_count())
    result["passed"] = passed(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(report(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
