"""What a training run holds and keeps: its state (:class:`Run`, with the plain-typed
:class:`Progress` that every checkpoint saves), the checkpoint payload, the restore on a resume
and the reload after a non-finite loss, and the record of the loss curve (the progress history,
TensorBoard scalars, a log line). ``stages.train.loop`` drives them."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import StageError
from stages.train import checkpoint
from stages.train.cameras import CameraCorrections
from stages.train.fields import NeuSModel
from stages.train.rays import RaySampler
from stages.train.render import OccupancyGrid, RenderOptions

MAX_NONFINITE = 3


@dataclass
class Progress:
    """Plain-typed training state saved in every checkpoint."""

    step: int = 0
    lr_scale: float = 1.0
    nonfinite: int = 0
    elapsed: float = 0.0
    history: list = field(default_factory=list)
    timeline: list = field(default_factory=list)  # [step, training seconds so far] at each history entry


@dataclass
class Run:
    cfg: object
    device: torch.device
    model: NeuSModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    sampler: RaySampler
    occ: OccupancyGrid
    opts: RenderOptions
    points: torch.Tensor  # (M, 3) unit coordinates
    offsets: torch.Tensor
    indices: torch.Tensor
    object_mode: bool
    backend: str
    compiled: bool
    progress: Progress = field(default_factory=Progress)
    compile_checked: bool = False
    comm: object | None = None  # stages.train.ddp.Comm when several ranks train together
    loss_fn: Callable | None = None  # render_losses compiled whole (see setup); None: as it is
    cameras: CameraCorrections | None = None  # train.refine_cameras: per-view pose corrections

    @property
    def main(self) -> bool:
        """True on the rank that writes files (the only one without DDP)."""
        return self.comm is None or self.comm.is_main

    def parameters(self) -> list[torch.Tensor]:
        """Everything the optimiser steps: the model's parameters, then the camera corrections'."""
        return list(self.model.parameters()) + (list(self.cameras.parameters()) if self.cameras is not None else [])


def state_payload(run: Run) -> dict:
    """The checkpoint; with several ranks every rank's RNG state too (``rng_ranks``), so that a
    resume continues each rank's ray stream. Collective: call it on every rank."""
    rng = checkpoint.rng_state(run.device)
    payload = {"rng": rng}
    if run.comm is not None:
        payload["rng_ranks"] = run.comm.gather(rng)
    if not run.main:
        return {}
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else {},
            "occupancy": run.occ.state_dict(), **payload,
            "progress": dataclasses.asdict(run.progress), "config": dataclasses.asdict(run.cfg),
            "object_mode": run.object_mode,
            **({"cameras": run.cameras.state_dict()} if run.cameras is not None else {})}


def save_checkpoint(run: Run, ckpt_dir: Path, step: int) -> None:
    """Rank 0 writes; the others wait until the file is there (a later reload reads it)."""
    payload = state_payload(run)
    if run.main:
        checkpoint.save(ckpt_dir, step, payload)
    if run.comm is not None:
        run.comm.barrier()


def restore(run: Run, path: Path, keep_counters: bool = False) -> None:
    state = checkpoint.load(path, run.device)
    if bool(state["object_mode"]) != run.object_mode:
        raise StageError(f"{path}: checkpoint is from a {'object' if state['object_mode'] else 'scene'}-mode "
                         "run; delete the checkpoints folder to start over")
    if ("cameras" in state) != (run.cameras is not None):
        raise StageError(f"{path}: checkpoint is from a run {'with' if 'cameras' in state else 'without'} "
                         "train.refine_cameras; delete the checkpoints folder to start over")
    try:
        if run.cameras is not None:
            run.cameras.load_state_dict(state["cameras"])
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise StageError(f"{path}: checkpoint does not fit this model ({str(exc).splitlines()[0][:160]}); "
                         "delete the checkpoints folder to start over") from None
    if run.scaler is not None and state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    run.occ.load_state_dict(state["occupancy"])
    if run.comm is None:
        checkpoint.set_rng_state(state["rng"], run.device)
    else:
        run.comm.restore_rng(state, run.device)
    old = run.progress
    run.progress = Progress(**state["progress"])
    if keep_counters:
        run.progress.nonfinite, run.progress.lr_scale = old.nonfinite, old.lr_scale


def recover(run: Run, ckpt_dir: Path, step: int, log) -> None:
    """Non-finite loss: reload the last checkpoint with half the learning rate; fail the third time."""
    run.progress.nonfinite += 1
    if run.progress.nonfinite >= MAX_NONFINITE:
        raise StageError(f"train: the loss became non-finite {run.progress.nonfinite} times (last at step {step}), "
                         "even after halving the learning rate; try a lower train.lr, train.amp=off, "
                         "or check the cameras and images")
    run.progress.lr_scale *= 0.5
    last = checkpoint.latest(ckpt_dir)
    restore(run, last, keep_counters=True)
    log.warning("train: non-finite loss at step %d; reloaded %s, learning rate x%.3g", step, last.name,
                run.progress.lr_scale)


def tb_writer(tb_dir: Path, log):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # tensorboard missing: keep training, just without event files
        log.warning("train: no TensorBoard logs (%s)", exc)
        return None
    return SummaryWriter(log_dir=str(tb_dir))


def record(run: Run, step: int, metrics: dict, writer, log=None, rate: float = 0.0) -> None:
    """Every ``log_every`` steps (and the last): the loss curve, TensorBoard scalars and, given
    ``log`` (no progress bar), one log line."""
    if step % max(1, run.cfg.log_every) and step != run.cfg.iterations:
        return
    if run.comm is not None:
        metrics = run.comm.mean_metrics(metrics)
    run.progress.history.append({"step": step, **{k: metrics[k] for k in sorted(metrics)}})
    run.progress.timeline.append([step, round(run.progress.elapsed, 3)])
    if writer is not None:
        for key, value in metrics.items():
            writer.add_scalar(f"train/{key}", value, step)
    if log is not None:
        log.info("train: step %d/%d, loss %.4f, PSNR %.2f, %.1f steps/s", step, run.cfg.iterations,
                 metrics["loss"], metrics["psnr"], rate)
