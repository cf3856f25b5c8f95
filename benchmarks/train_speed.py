"""Training speed: steps/s, samples/s and time to reach a Chamfer-L1 target on the synthetic spot scene.

Each schedule length in ``--iterations`` is a full training run (warm-up, coarse-to-fine and
decay all scaled to it, as a user would set ``train.iterations``) through
``benchmarks/train_quality.py``; the time to the target is the training time of the shortest
schedule that reaches it. Runs go to the GPUs of ``--gpus`` in parallel (one run per GPU at a
time); give one GPU for timings that do not share the host's CPU.

    PYTHONPATH=. python benchmarks/train_speed.py --iterations 1000,2000,3000,4000 --gpus 0,1 --out speed.json
    PYTHONPATH=. python benchmarks/train_speed.py --preset fast_cpu --views 12 --width 96 --height 72 \\
        --iterations 100,200 --device cpu --target 3.0     # a CPU smoke run

Prints a markdown table last; JSON to --out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job_argv(args, iterations: int, out: Path) -> list[str]:
    argv = [sys.executable, str(ROOT / "benchmarks" / "train_quality.py"), "--preset", args.preset,
            "--views", str(args.views), "--width", str(args.width), "--height", str(args.height),
            "--workdir", str(args.workdir), "--iterations", str(iterations), "--mc-res", str(args.mc_res),
            "--name", f"speed_{args.preset}_{iterations}", "--fresh", "--out", str(out)]
    if args.device:
        argv += ["--device", args.device]
    for item in args.set:
        argv += ["--set", item]
    return argv


def run_all(args) -> list[dict]:
    """Run every schedule, at most one per GPU at a time; returns train_quality's JSON per run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_quality.py"), "--generate-only",
                    "--views", str(args.views), "--width", str(args.width), "--height", str(args.height),
                    "--workdir", str(args.workdir)], env=env, check=True)
    todo = sorted(args.iterations)
    slots = args.gpus.split(",") if args.gpus else [None]
    running: dict[str, tuple[subprocess.Popen, int, Path]] = {}
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="train_speed_"))
    while todo or running:
        for slot in slots:
            key = str(slot)
            if key in running or not todo:
                continue
            iters = todo.pop(0)
            out = tmp / f"{iters}.json"
            job_env = dict(env) if slot is None else dict(env, CUDA_VISIBLE_DEVICES=slot)
            log = open(tmp / f"{iters}.log", "w")
            running[key] = (subprocess.Popen(job_argv(args, iters, out), env=job_env, stdout=log,
                                             stderr=subprocess.STDOUT), iters, out)
        time.sleep(1.0)
        for key, (proc, iters, out) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            if proc.returncode != 0 or not out.exists():
                results.append({"iterations": iters, "failed": True, "log": str(tmp / f"{iters}.log")})
                continue
            results.append({"iterations": iters, **json.loads(out.read_text())})
    return sorted(results, key=lambda r: r["iterations"])


def phases(result: dict) -> dict:
    """Seconds to the first logged step (compile, warm-up, CUDA-graph capture) and ms per step
    after it, from the run's timeline ([step, seconds] at each logged step)."""
    line = result.get("timeline") or []
    if len(line) < 2:
        return {}
    (s0, t0), (s1, t1) = line[0], line[-1]
    return {"first_log_step": s0, "seconds_to_first_log": t0, "ms_per_step_after": 1000 * (t1 - t0) / max(s1 - s0, 1)}


def summarise(results: list[dict], target: float) -> dict:
    rows = []
    for r in results:
        if r.get("failed"):
            rows.append({"iterations": r["iterations"], "failed": True, "log": r["log"]})
            continue
        q = r["quality"]["raw"]
        rows.append({"iterations": r["iterations"], "train_seconds": r["train_seconds"], **phases(r),
                     "steps_per_second": r["iterations"] / max(r["train_seconds"], 1e-9),
                     "samples_per_second": r["samples_per_second"], "peak_gpu_memory_gb": r["peak_gpu_memory_gb"],
                     "chamfer_pct": q["chamfer_pct"], "fscore": q["fscore"], "gpu": r["gpu"],
                     "backend": r["summary"].get("backend")})
    reached = [row for row in rows if not row.get("failed") and row["chamfer_pct"] <= target]
    best = min(reached, key=lambda row: row["train_seconds"]) if reached else None
    return {"target_chamfer_pct": target, "rows": rows,
            "time_to_target_seconds": best["train_seconds"] if best else None,
            "iterations_to_target": best["iterations"] if best else None}


def print_table(summary: dict) -> None:
    print("\n| steps | train s | s to first log | ms/step after | steps/s | samples/s | peak GB | Chamfer-L1 % | "
          "F@0.5% | backend | device |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in summary["rows"]:
        if row.get("failed"):
            print(f"| {row['iterations']} | failed (see {row['log']}) | | | | | | | | | |")
            continue
        mem = "-" if row["peak_gpu_memory_gb"] is None else f"{row['peak_gpu_memory_gb']:.2f}"
        first = f"{row['seconds_to_first_log']:.1f} (step {row['first_log_step']})" if "first_log_step" in row else "-"
        after = f"{row['ms_per_step_after']:.2f}" if "ms_per_step_after" in row else "-"
        print(f"| {row['iterations']} | {row['train_seconds']:.0f} | {first} | {after} | {row['steps_per_second']:.1f} | "
              f"{row['samples_per_second']:.3g} | {mem} | {row['chamfer_pct']:.3f} | {row['fscore']:.3f} | "
              f"{row['backend']} | {row['gpu'] or 'cpu'} |")
    t = summary["time_to_target_seconds"]
    print(f"\ntime to Chamfer-L1 <= {summary['target_chamfer_pct']}%: "
          + (f"{t:.0f} s of training ({summary['iterations_to_target']} steps)" if t is not None else "not reached"))


def main(argv=None) -> int:
    from train_quality import scene_parser

    ap = scene_parser(__doc__, "default", 100, 800, 600)
    ap.add_argument("--iterations", default="1000,2000,3000,4000", help="schedule lengths, comma-separated")
    ap.add_argument("--target", type=float, default=0.3, help="Chamfer-L1 target in %% of the GT diagonal")
    ap.add_argument("--mc-res", type=int, default=512)
    ap.add_argument("--gpus", default="", help="GPU ids to spread the runs over (empty: one run at a time)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--set", action="append", default=[], help="train overrides passed on")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/train_speed"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.iterations = [int(x) for x in args.iterations.split(",") if x.strip()]
    summary = summarise(run_all(args), args.target)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    print_table(summary)
    return 0 if summary["time_to_target_seconds"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
