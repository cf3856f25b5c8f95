"""Several GPUs for one scene: the train stage under ``torchrun`` (DDP by hand).

``launch`` runs in the stage process when ``train.gpus`` = N > 1: it starts
``python -m torch.distributed.run --standalone --nproc-per-node N -m stages.train.ddp JOB``
and waits (a SIGTERM is passed on; torchrun passes it to the ranks). Every rank runs
``stages.train.stage.run_stage`` with a :class:`Comm`:

- The batch is split, not multiplied: each rank draws ``batch_rays / N`` rays from
  ``views_per_batch / N`` views with its own seed, and the gradients are averaged (one
  all-reduce of a flat buffer per step). A step thus optimises the same loss over the same
  number of rays as on one GPU, so learning rates, schedules and results stay those of one GPU
  (within noise) and a step costs about 1/N. For more rays per step raise ``train.batch_rays``.
  The camera corrections of ``train.refine_cameras`` are parameters like the others: in the
  same all-reduce, stepped alike on every rank.
- The ranks start from rank 0's parameters and apply the same averaged gradients with the same
  optimiser, so the parameters stay bitwise equal (``train.json`` reports the largest difference
  seen at the end); rank 0 computes the occupancy grid and broadcasts it; whether a loss was
  non-finite and whether SIGTERM arrived are decided for all ranks at once.
- Rank 0 alone writes checkpoints (holding every rank's RNG state, so a resume is exact),
  TensorBoard, ``model.pt`` and ``train.json``.
- NCCL on CUDA (rank r uses ``cuda:r`` of CUDA_VISIBLE_DEVICES), gloo on the CPU (N processes).

Files in ``out_dir`` while it runs, removed after: ``.ddp_job.json`` (what the ranks run),
``.ddp_summary.json`` (rank 0's summary), ``.ddp_error_<rank>.json`` (a rank's failure).
For tests: ``PIPELINE_DDP_DUMP=DIR`` makes every rank save its final parameters to
``DIR/rank<r>.pt``; ``PIPELINE_DDP_SAME_RAYS=1`` gives every rank rank 0's ray stream, so N
ranks must reproduce one process with ``batch_rays / N`` bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import torch

from pipeline.devices import require_visible_gpus
from pipeline.errors import ConfigError, InputError, PipelineError, StageError
from pipeline.fsutil import atomic_write_json

ROOT = Path(__file__).resolve().parents[2]
JOB, SUMMARY, ERROR = ".ddp_job.json", ".ddp_summary.json", ".ddp_error_{}.json"
SCHEDULE_KEYS = ("active_levels", "eps", "lr")  # metrics equal on every rank: not averaged
RANK_SEED = 1_000_003


class Comm:
    """This process's rank in the group, and the few collectives the training loop needs."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _dist(self):
        import torch.distributed as dist

        return dist

    def _broadcast(self, t: torch.Tensor) -> None:
        if t.dtype == torch.bool:  # gloo has no bool collectives
            u = t.to(torch.uint8)
            self._dist().broadcast(u, 0)
            t.copy_(u.bool())
        else:
            self._dist().broadcast(t, 0)

    def start(self, model: torch.nn.Module, seed: int) -> None:
        """Rank 0's parameters and buffers everywhere; then a ray-sampling seed per rank."""
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                self._broadcast(t.data)
        self.reseed(seed, 0)

    def reseed(self, seed: int, step: int) -> None:
        from stages.train.stage import seed_everything

        if self.rank and not os.environ.get("PIPELINE_DDP_SAME_RAYS"):
            seed_everything(seed + RANK_SEED * self.rank + step)

    def average_grads(self, params: list[torch.Tensor], finite: bool) -> bool:
        """Average the gradients over the ranks in place (one all-reduce). Returns False when
        any rank's loss was not finite. A parameter without a gradient on every rank keeps
        none, so AdamW skips it on every rank alike."""
        sizes = [p.numel() for p in params]
        parts = [p.grad.reshape(-1).float() if p.grad is not None else p.new_zeros(n, dtype=torch.float32)
                 for p, n in zip(params, sizes)]
        flags = torch.tensor([float(p.grad is not None) for p in params] + [float(not finite)],
                             device=self.device)
        flat = torch.cat(parts + [flags])
        self._dist().all_reduce(flat)
        total = sum(sizes)
        tail = flat[total:].tolist()
        if tail[-1] > 0:
            return False
        flat = flat[:total].div_(self.world)
        for p, g, present in zip(params, flat.split(sizes), tail[:-1]):
            p.grad = g.view_as(p).to(p.dtype) if present > 0 else None
        return True

    def any(self, flag: bool) -> bool:
        t = torch.tensor([float(flag)], device=self.device)
        self._dist().all_reduce(t)
        return bool(t.item() > 0)

    def mean_metrics(self, metrics: dict) -> dict:
        """Loss terms averaged over the ranks (the whole batch's values)."""
        keys = sorted(k for k in metrics if k not in SCHEDULE_KEYS)
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        self._dist().all_reduce(t)
        return {**metrics, **dict(zip(keys, (t / self.world).tolist()))}

    def broadcast_occupancy(self, occ) -> None:
        self._broadcast(occ.occ)

    def gather(self, obj) -> list:
        out = [None] * self.world
        self._dist().all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.device.type == "cuda":
            self._dist().barrier(device_ids=[self.device.index])
        else:
            self._dist().barrier()

    def restore_rng(self, state: dict, device: torch.device) -> None:
        """This rank's RNG state from a checkpoint; a checkpoint of another rank count (or of one
        process) gives rank 0 the saved state and the others a fresh seed."""
        from stages.train import checkpoint

        ranks = state.get("rng_ranks") or []
        if len(ranks) == self.world:
            checkpoint.set_rng_state(ranks[self.rank], device)
            return
        checkpoint.set_rng_state(state["rng"], device)
        self.reseed(int(state["config"]["seed"]), int(state["progress"]["step"]))

    def finish(self, run) -> dict:
        """Collective check that the ranks ended with the same parameters and occupancy grid."""
        dist = self._dist()
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).float() for p in run.parameters()])
            ref = flat.clone()
            dist.broadcast(ref, 0)
            diff = (flat - ref).abs().max().reshape(1).double()
            occ = run.occ.occ.to(torch.uint8)
            occ_ref = occ.clone()
            self._broadcast(occ_ref)
            diff = torch.cat([diff, (occ != occ_ref).sum().reshape(1).double()])
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        dump = os.environ.get("PIPELINE_DDP_DUMP")
        if dump:
            torch.save({"model": run.model.state_dict(), "occupancy": run.occ.occ.cpu()},
                       Path(dump) / f"rank{self.rank}.pt")
        return {"ranks": self.world, "backend": dist.get_backend(),
                "max_param_diff_across_ranks": float(diff[0]), "occupancy_cells_differing": int(diff[1])}


def check_config(cfg) -> None:
    if cfg.batch_rays % cfg.gpus:
        raise ConfigError(f"train.batch_rays ({cfg.batch_rays}) must be a multiple of train.gpus ({cfg.gpus}): "
                          "each GPU draws an equal share of the rays")


def launch(inputs: dict, cfg, out_dir: Path, ctx, version: str = "") -> dict:
    """Run the train stage on ``cfg.gpus`` ranks with torchrun; returns rank 0's summary."""
    check_config(cfg)
    n = int(cfg.gpus)
    cuda = str(ctx.device).startswith("cuda")
    if cuda:
        require_visible_gpus("train", n)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (int(ctx.threads) or os.cpu_count() or 1) // n)
    job = {"inputs": {k: str(v) for k, v in inputs.items()}, "section": dataclasses.asdict(cfg),
           "out_dir": str(out_dir), "device": "cuda" if cuda else "cpu", "threads": 0 if cuda else threads,
           "progress": bool(ctx.progress), "scene": ctx.scene, "version": version,
           "debug": ctx.log.getEffectiveLevel() <= logging.DEBUG}
    _clear(out_dir)
    atomic_write_json(out_dir / JOB, job)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = str(threads)
    if not cuda and sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: loopback, whatever the host name resolves to
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={n}",
           "-m", "stages.train.ddp", str(out_dir / JOB)]
    ctx.log.info("train: %d ranks (%s) with torchrun", n, "NCCL" if cuda else "gloo on the CPU")
    try:
        rc = _run_passing_sigterm(cmd, env)
        return _result(out_dir, rc)
    finally:
        _clear(out_dir)


def _clear(out_dir: Path) -> None:
    for path in [out_dir / JOB, out_dir / SUMMARY, *out_dir.glob(ERROR.format("*"))]:
        path.unlink(missing_ok=True)


def _run_passing_sigterm(cmd: list[str], env: dict) -> int:
    """Run torchrun; the first SIGTERM this process gets goes on to it (it then stops the
    ranks, which checkpoint); if this process dies otherwise, torchrun is stopped too."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    previous, sent = None, []

    def forward(signum, frame):
        if not sent:
            sent.append(signum)
            proc.send_signal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, forward)
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait(timeout=60)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _result(out_dir: Path, rc: int) -> dict:
    """Rank 0's summary, or the ranks' failure raised here: a user-facing error first, else the
    earliest report (the others are usually a lost connection to the rank that failed)."""
    kinds = {"InputError": InputError, "ConfigError": ConfigError, "StageError": StageError}
    reports = [(p, json.loads(p.read_text())) for p in out_dir.glob(ERROR.format("*"))]
    if reports:
        path, err = min(reports, key=lambda r: (r[1]["kind"] not in kinds, r[0].stat().st_mtime))
        if err["kind"] in kinds:
            raise kinds[err["kind"]](err["message"])
        raise StageError(f"train: DDP rank {path.stem.rsplit('_', 1)[1]} failed: {err['message']}")
    if rc != 0 or not (out_dir / SUMMARY).is_file():
        raise StageError(f"train: torchrun exited with code {rc} and no rank reported why; see the log above")
    return json.loads((out_dir / SUMMARY).read_text())


def worker(job_path: Path) -> int:
    """One rank (started by torchrun): join the group, train, report."""
    import torch.distributed as dist

    from pipeline.config import section_from_dict
    from pipeline.dag import Context
    from pipeline.log import STAGE_LOG, log_to_file, setup_logging
    from stages.train.stage import run_stage

    job = json.loads(Path(job_path).read_text())
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    out_dir = Path(job["out_dir"])
    log = setup_logging(job.get("debug", False))
    if rank:
        log.setLevel(logging.WARNING)
    log_to_file(log, out_dir / STAGE_LOG)  # beside the stage process's lines (rank 0's, others' warnings)
    try:
        device = torch.device("cuda", local) if job["device"] == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        ctx = Context(scene=job["scene"], device=str(device), progress=job["progress"] and rank == 0,
                      threads=job["threads"], log=log)
        summary = run_stage({k: Path(v) for k, v in job["inputs"].items()}, section_from_dict("train", job["section"]),
                            out_dir, ctx, comm=Comm(rank, world, device), version=job.get("version", ""))
        if rank == 0:
            atomic_write_json(out_dir / SUMMARY, summary)
        # leave together: a rank that tears its group down while another is still inside a
        # collective makes gloo abort that one at exit ("terminate called without an active exception")
        dist.barrier()
        return 0
    except BaseException as exc:  # report it to the launcher, which raises it in the stage process
        known = isinstance(exc, PipelineError)
        message = str(exc) if known else f"internal error: {type(exc).__name__}: {exc}".splitlines()[0]
        atomic_write_json(out_dir / ERROR.format(rank), {"message": message, "kind": type(exc).__name__,
                                                         "traceback": traceback.format_exc()})
        return 3 if known else 4
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(worker(Path(sys.argv[1])))
