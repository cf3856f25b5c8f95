"""One training process: load inputs, train (resuming), write ``model.pt`` and ``train.json``.
Each rank of a DDP run (``stages.train.ddp``) runs it too, with a ``comm``."""
from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.fsutil import atomic_write_json
from stages.train import checkpoint, compile_cache, loop
from stages.train.data import load_scene, split_views
from stages.train.losses import psnr
from stages.train.query import render_image


@contextlib.contextmanager
def sigterm_flag():
    """Yield a callable that turns True once SIGTERM arrived (handler only in the main thread)."""
    flag = {"stop": False}
    previous = None
    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            flag["stop"] = True
        previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield lambda: flag["stop"]
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def save_model(run: loop.Run, scene, out_dir: Path, version: str) -> None:
    payload = {"model": run.model.state_dict(), "config": dataclasses.asdict(run.cfg),
               "object_mode": run.object_mode, "occupancy": run.occ.state_dict(),
               "active_levels": int(run.model.sdf.level_mask.sum().item()) // run.model.sdf.grid.spec.features,
               "eps": float(run.opts.eps), "scene": {k: scene.scene[k] for k in
                                                     ("sphere_center", "sphere_radius", "world_to_unit", "unit_to_world")},
               "names": list(scene.names), "version": version}
    if run.cameras is not None:  # the refined poses of the training views: their input poses and these
        payload["cameras"] = {"views": run.sampler.view_ids.tolist(), "delta": run.cameras.delta.detach().cpu()}
    checkpoint.atomic_torch_save(payload, out_dir / "model.pt")


def evaluate_holdout(run: loop.Run, scene, held: np.ndarray, cfg) -> dict:
    """PSNR of up to ``holdout_eval_views`` held-out views (object mode: on black, object only)."""
    views = held[: max(0, cfg.holdout_eval_views)]
    if run.compiled and len(views):  # new shapes would compile again: a few views run faster eagerly
        loop.uncompile(run.model)
    scores = []
    for v in views:
        img = render_image(run.model, run.occ, scene.K[v], scene.c2w[v], scene.width, scene.height, run.opts,
                           cfg.eval_chunk, bg=0.0 if run.object_mode else None)
        target = scene.images[v].astype(np.float32) / 255.0
        if run.object_mode:
            target = target * scene.masks[v][..., None]
        scores.append(psnr(torch.from_numpy(img), torch.from_numpy(target)))
    return {"holdout_psnr": float(np.mean(scores)) if scores else None,
            "holdout_psnr_views": [scene.names[v] for v in views]}


def run_stage(inputs: dict, cfg, out_dir: Path, ctx, hook=None, comm=None, version: str = "") -> dict:
    """Train into ``out_dir``. ``comm``: this process is one rank of a DDP run (only rank 0
    writes files and returns the summary; the others return {}). ``version``: the stage's code
    version, recorded in ``model.pt``."""
    out_dir = Path(out_dir)
    log, device = ctx.log, resolve_device(ctx.device)
    compile_cache.configure(log)  # before the first compile, in every rank
    if ctx.threads and device.type == "cpu":
        torch.set_num_threads(int(ctx.threads))
    seed_everything(cfg.seed)
    scene = load_scene(inputs, log)
    train_views, held = split_views(len(scene.names), cfg.holdout_every)
    run = loop.setup(scene, train_views, cfg, device, log, comm)
    if comm is not None:
        comm.start(run.model, cfg.seed)  # rank 0's initial parameters everywhere, a ray seed per rank
    log.info("train: %d views (%d held out), %s mode, backend %s, device %s%s", len(run.sampler.view_ids),
             len(held), "object" if run.object_mode else "scene", run.backend, device,
             "" if comm is None else f", {comm.world} ranks")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with sigterm_flag() as should_stop:
        stop = should_stop if comm is None else (lambda: comm.any(should_stop()))
        progress = loop.train(run, out_dir, log, ctx.progress and run.main, stop, hook)
    ddp = comm.finish(run) if comm is not None else None
    if not run.main:
        return {}
    save_model(run, scene, out_dir, version)
    t0 = time.perf_counter()
    holdout = evaluate_holdout(run, scene, held, cfg)
    summary = summarise(run, progress, holdout, held, scene, device)
    summary["ddp"] = ddp
    summary["eval_seconds"] = time.perf_counter() - t0
    atomic_write_json(out_dir / "train.json", summary)
    log.info("train: %d steps in %.0f s, PSNR %.2f (held-out %s), inv_s %.0f", progress.step, progress.elapsed,
             summary["train_psnr"], summary["holdout_psnr"], summary["final"].get("inv_s", 0))
    if run.cameras is not None:
        cams = summary["camera_refinement"]
        log.info("train: camera corrections: rotation mean %.3f / max %.3f deg, translation mean %.4f / max %.4f "
                 "(unit sphere)", cams["rotation_deg_mean"], cams["rotation_deg_max"], cams["translation_mean"],
                 cams["translation_max"])
    return {k: summary[k] for k in ("iterations", "wall_seconds", "train_psnr", "holdout_psnr", "backend",
                                    "peak_gpu_memory_gb", "samples_per_second", "gpus")}


def summarise(run: loop.Run, progress: loop.Progress, holdout: dict, held, scene, device) -> dict:
    hist = progress.history
    tail = hist[-max(1, len(hist) // 10):] if hist else []
    final = {k: float(np.mean([h[k] for h in tail])) for k in (tail[0] if tail else {}) if k != "step"}
    samples = progress.step * run.cfg.batch_rays * run.cfg.samples_per_ray
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return {"iterations": progress.step, "wall_seconds": progress.elapsed, "final": final, "gpus": run.cfg.gpus,
            "train_psnr": final.get("psnr"), "peak_gpu_memory_gb": peak,
            "samples_per_second": samples / max(progress.elapsed, 1e-9), "backend": run.backend,
            "compiled": run.compiled, "device": str(device), "mode": "object" if run.object_mode else "scene",
            "nonfinite_recoveries": progress.nonfinite, "lr_scale": progress.lr_scale,
            "train_views": len(run.sampler.view_ids), "holdout_views": [scene.names[v] for v in held],
            "history": hist, "timeline": progress.timeline, **holdout,
            "compile_cache": compile_cache.stats() if run.compiled else None,
            "camera_refinement": None if run.cameras is None else
            run.cameras.summary([scene.names[v] for v in run.sampler.view_ids.tolist()])}
