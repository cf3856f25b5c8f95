"""The training loop: set up, step (rays -> render -> losses -> AdamW), checkpoint, resume,
recover from non-finite losses. State lives in :class:`Run`, which ``stages.train.state`` holds
with the checkpoints' payload, restore and recovery and the loss record; schedules are pure functions.
With several ranks (``Run.comm``, see ``stages.train.ddp``) each draws its share of the rays,
gradients are averaged, rank 0 computes the occupancy grid and writes the checkpoints.
With ``train.refine_cameras`` each batch's rays are first moved by per-view pose corrections
(``stages.train.cameras``, eagerly) and enter the step as inputs with gradients.

Speed (benchmarks/step_profile.py): on CUDA rendering + losses are one ``torch.compile`` graph
(``render_losses``; a step used to be host-bound, 570 small kernels), replayed as CUDA graphs in
long runs (``step_mode``), and ``train`` reads each step's metrics only after launching the
next, so the host never waits for the GPU."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.errors import StageError
from pipeline.log import progress_bar
from stages.train import checkpoint, losses, schedule
from stages.train.cameras import CameraCorrections
from stages.train.data import SceneData
from stages.train.fields import NeuSModel
from stages.train.render import OccupancyGrid, RenderOptions, render_rays
from stages.train.rays import RaySampler
from stages.train.state import Progress, Run, recover, record, restore, save_checkpoint, tb_writer


def amp_dtype(cfg, device: torch.device):
    if device.type != "cuda" or cfg.amp == "off":
        return None
    return torch.float16 if cfg.amp == "fp16" else torch.bfloat16


def resolve_backend(cfg, device: torch.device) -> str:
    from stages.train.external import tcnn_available, triton_available

    if cfg.grid_backend in ("tcnn", "triton"):
        return cfg.grid_backend
    if cfg.grid_backend == "auto" and device.type == "cuda":
        if tcnn_available():
            return "tcnn"
        if triton_available():  # 17% faster steps, a third of the memory of torch.compile (RESULTS.md)
            return "triton"
    return "torch"


COMPILE_STEP = True  # compile rendering + losses as one graph (else only the networks)
FUSED_ADAMW = True  # on CUDA


def maybe_compile(model: NeuSModel, cfg, device: torch.device, log) -> bool:
    if cfg.compile == "off" or (cfg.compile == "auto" and device.type != "cuda"):
        return False
    for part in (model.sdf, model.color):  # alone for the occupancy grid and evaluation
        part.compile(dynamic=False)
    log.info("train: torch.compile on for the SDF and colour networks%s",
             " and for rendering + losses as a whole" if COMPILE_STEP else "")
    return True


def uncompile(model: NeuSModel) -> None:
    for part in (model.sdf, model.color):
        part._compiled_call_impl = None


def fall_back(run: Run, exc: Exception, log) -> None:
    """A compiled graph failed on first use: drop the whole-step graph, then the networks'."""
    log.warning("train: torch.compile failed (%s: %s); continuing %s", type(exc).__name__,
                str(exc).splitlines()[0][:200] if str(exc) else "",
                "with the networks compiled alone" if run.loss_fn is not None else "eagerly")
    if run.loss_fn is not None:
        run.loss_fn = None
        return
    uncompile(run.model)
    run.compiled, run.compile_checked = False, True


def setup(scene: SceneData, train_views: np.ndarray, cfg, device: torch.device, log, comm=None) -> Run:
    object_mode = cfg.mode == "object" or (cfg.mode == "auto" and scene.masks is not None)
    if object_mode and scene.masks is None:
        raise StageError("train.mode=object needs masks, but the masks stage made none; "
                         "set masks.method or train.mode=scene")
    if object_mode and scene.views_with_masks is not None:
        train_views = train_views[scene.views_with_masks[train_views]]
    if len(train_views) == 0:
        raise StageError("train: no views left to train on (all held out or without masks)")
    backend = resolve_backend(cfg, device)
    model = NeuSModel(cfg, scene_mode=not object_mode, backend=backend, num_views=len(train_views)).to(device)
    groups = model.param_groups(cfg.lr, cfg.lr_grid_mult, cfg.lr_inv_s_mult)
    masks = scene.masks[train_views] if object_mode else None
    sampler = RaySampler(scene.images[train_views], masks, scene.K[train_views], scene.c2w[train_views],
                         train_views, device)
    cameras = CameraCorrections(sampler.c2w) if cfg.refine_cameras else None
    if cameras is not None:
        groups.append(cameras.param_group(cfg.camera_lr))
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                            fused=FUSED_ADAMW and device.type == "cuda")  # one kernel per group, not a dozen
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    opts = RenderOptions(samples=cfg.samples_per_ray, candidates=cfg.ray_candidates,
                         empty_weight=cfg.occ_empty_weight, grad_mode=cfg.gradient_mode,
                         bg_samples=cfg.bg_samples, amp_dtype=dtype)
    compiled = maybe_compile(model, cfg, device, log)
    t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return Run(cfg, device, model, opt, scaler, sampler, OccupancyGrid(cfg.occ_resolution, device), opts,
               t(scene.points, torch.float32), t(scene.view_offsets, torch.long), t(scene.view_indices, torch.long),
               object_mode, backend, compiled, comm=comm,
               loss_fn=torch.compile(render_losses, dynamic=False, mode=step_mode(cfg, device))
               if compiled and COMPILE_STEP else None, cameras=cameras)


GRAPH_MIN_STEPS = 10000  # cuda_graphs=auto: capture pays off from ~5500 steps on spot (RESULTS.md)


def step_mode(cfg, device: torch.device) -> str | None:
    """``torch.compile`` mode of the whole step: "reduce-overhead" (CUDA graphs) on CUDA when
    ``cuda_graphs`` says so. A step launches ~290 kernels and is host-bound
    (benchmarks/step_profile.py); a graph replays them in one call, but capturing costs ~10 s
    once. The step's scalar inputs then live on the device (``step_scalars``) and its outputs are
    copied before the next replay overwrites them (``launch_step``)."""
    on = cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and cfg.iterations >= GRAPH_MIN_STEPS)
    return "reduce-overhead" if on and device.type == "cuda" else None


def step_scalars(device: torch.device, values: dict[str, float]) -> dict[str, torch.Tensor]:
    """Per-step scalars (schedule values, loss weights) as 0-d tensors: inputs of the compiled
    step, not constants baked into it. On CPU plain tensors; on CUDA one copy from pinned memory
    that does not wait for the GPU (a pageable copy would), split into views."""
    if device.type != "cuda":
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}
    packed = torch.tensor(list(values.values()), dtype=torch.float32).pin_memory()
    return dict(zip(values, packed.to(device, non_blocking=True).unbind()))


def sfm_points_of(run: Run, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``sfm_points_per_view`` random SfM points (with replacement) seen by each batch view, and
    which of them are real (views that see no point give placeholders): a fixed shape."""
    k = run.cfg.sfm_points_per_view
    if k <= 0 or run.indices.numel() == 0:
        return None
    start, count = run.offsets[views], run.offsets[views + 1] - run.offsets[views]
    pick = start[:, None] + torch.floor(torch.rand(len(views), k, device=run.device) * count[:, None]).long()
    pick = pick.clamp(max=run.indices.numel() - 1)
    valid = (count > 0)[:, None].expand(-1, k).reshape(-1)
    return run.points[run.indices[pick.reshape(-1)]], valid


def apply_schedules(run: Run, step: int) -> dict[str, float]:
    cfg, spec = run.cfg, run.model.sdf.grid.spec
    active = schedule.active_levels(step, cfg, spec)
    run.model.sdf.set_active_levels(active)
    eps, cos_anneal = schedule.epsilon(step, cfg, spec), schedule.cos_anneal(step, cfg)
    # for rendering outside a step (held-out views after a resume); a step passes its own (step_scalars).
    # fp32 tensors, as a step's: model.pt stores float(eps), equal whether or not a step came after
    run.opts.eps, run.opts.cos_anneal = torch.tensor(eps), torch.tensor(cos_anneal)
    factor = schedule.lr_factor(step, cfg) * run.progress.lr_scale
    for group in run.optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
        if group["name"] == "cameras" and step < cfg.camera_start_step:
            group["lr"] = 0.0
    return {"rgb": cfg.rgb_weight, "eikonal": cfg.eikonal_weight,
            "curvature": schedule.curvature_weight(step, cfg, spec) if cfg.gradient_mode != "analytic" else 0.0,
            "mask": cfg.mask_weight if run.object_mode else 0.0, "sfm": schedule.sfm_weight(step, cfg),
            "active_levels": active, "eps": eps, "cos_anneal": cos_anneal}


def loss_terms(run: Run) -> tuple[str, ...]:
    """The terms in the total loss, fixed for the whole run (a term whose scheduled weight is 0
    for a while stays in, weighted 0), so the compiled step keeps one graph."""
    cfg = run.cfg
    on = {"rgb": cfg.rgb_weight != 0, "eikonal": cfg.eikonal_weight != 0,
          "curvature": cfg.curvature_weight != 0 and cfg.gradient_mode != "analytic",
          "mask": run.object_mode and cfg.mask_weight != 0,
          "sfm": cfg.sfm_weight > 0 and cfg.sfm_loss_steps > 0 and cfg.sfm_points_per_view > 0
          and run.indices.numel() > 0}
    return tuple(k for k, v in on.items() if v)


def render_losses(model, o, d, target, mask, bg, sfm_points, sfm_valid, grid, opts: RenderOptions,
                  weights: dict, codes: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Render the batch and weigh the loss terms: the part of a step that ``torch.compile``
    takes whole (``Run.loss_fn``). ``weights`` holds the terms in the total, and ``opts`` epsilon
    and cos annealing, as 0-d tensors (``step_scalars``), so a changing schedule value is an input
    and not a recompile."""
    out = render_rays(model, o, d, grid, opts, bg, extra_points=sfm_points, codes=codes)
    terms = {"rgb": losses.rgb_l1(out["rgb"], target),
             "eikonal": losses.eikonal(out["grad"], out["valid"]),
             "curvature": losses.curvature(out["lap"], out["valid"])}
    if mask is not None:
        terms["mask"] = losses.mask_bce(out["opacity"], mask)
    if sfm_points is not None:
        terms["sfm"] = losses.masked_mean(out["extra_sdf"].abs(), sfm_valid)
    total = losses.total(terms, weights)
    info = {"psnr": losses.psnr_tensor(out["rgb"].detach(), target), "inv_s": out["inv_s"]}
    return total, {**{k: v.detach() for k, v in terms.items()}, **info}


def compute_losses(run: Run, weights: dict) -> tuple[torch.Tensor, dict]:
    """Loss and its terms (device tensors: nothing here waits for the GPU)."""
    cfg, ranks = run.cfg, 1 if run.comm is None else run.comm.world
    batch = run.sampler.sample(cfg.batch_rays // ranks, max(1, cfg.views_per_batch // ranks), cfg.mask_ray_fraction)
    bg, target = None, batch.rgb
    if run.object_mode:
        if cfg.background_color == "random":
            bg = torch.rand(batch.rgb.shape, device=run.device)
        else:
            bg = torch.full_like(batch.rgb, 1.0 if cfg.background_color == "white" else 0.0)
        target = torch.where(batch.mask[:, None], batch.rgb, bg)
    names = loss_terms(run)
    sfm = sfm_points_of(run, batch.views) if "sfm" in names else None
    live = step_scalars(run.device, {k: float(weights[k]) for k in (*names, "eps", "cos_anneal")})
    run.opts.eps, run.opts.cos_anneal = live.pop("eps"), live.pop("cos_anneal")
    mask = batch.mask if run.object_mode else None
    origins, dirs = batch.origins, batch.dirs
    if run.cameras is not None:  # eager, before the compiled step: the rays are its inputs, with gradients
        origins, dirs = run.cameras(origins, dirs, batch.ray_views)
    if run.loss_fn is not None and step_mode(cfg, run.device):
        torch.compiler.cudagraph_mark_step_begin()
    # the occupancy grid is all occupied until its first update (occ_warmup_steps): uniform samples
    codes = run.model.codes(batch.ray_views, batch.ray_views.shape[0])  # eager lookup, as the cameras
    return (run.loss_fn or render_losses)(run.model, origins, dirs, target, mask, bg,
                                          *(sfm if sfm is not None else (None, None)), run.occ, run.opts, live, codes)


def optimise(run: Run, loss: torch.Tensor, finite: bool = True) -> bool:
    """Backward and AdamW step; with several ranks the gradients are averaged first. Returns
    False, without a step, when the loss was not finite here or on another rank."""
    if run.comm is None and not finite:
        return False
    run.optimizer.zero_grad(set_to_none=True)
    if finite:
        (loss if run.scaler is None else run.scaler.scale(loss)).backward()
    if run.comm is not None and not run.comm.average_grads(run.parameters(), finite):
        return False
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    if run.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    return True


def update_occupancy(run: Run, step: int) -> None:
    if step >= run.cfg.occ_warmup_steps and step % max(1, run.cfg.occ_update_every) == 0 or \
            step == run.cfg.occ_warmup_steps:
        if run.main:
            inv_s = float(run.model.inv_s().detach())
            run.occ.update(run.model.sdf, inv_s, run.cfg.occ_margin_cells, run.cfg.occ_margin_s)
        if run.comm is not None:
            run.comm.broadcast_occupancy(run.occ)


@contextlib.contextmanager
def tf32_matmuls(on: bool):
    """fp32 matmuls on CUDA as TF32 (``on``) or fp32 inside the block; the flag as it was after.
    The colour and background MLPs run under autocast, so in a step this is the SDF MLP."""
    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was


@dataclass
class Launched:
    """A step whose GPU work is queued: its metrics (``names``) as one device tensor, read by
    :func:`resolve`. A copy: a CUDA-graph replay overwrites the step's own outputs."""

    step: int
    names: tuple
    values: torch.Tensor
    extra: dict
    stepped: bool = True  # False: a rank saw a non-finite loss and no rank stepped (DDP)


def launch_step(run: Run, step: int, hook: Callable | None = None) -> Launched:
    """Queue one optimisation step without waiting for the GPU. Alone, the step is taken even
    when its loss turns out non-finite: :func:`resolve` finds that out a step later and the
    caller reloads the last checkpoint, which undoes it. With several ranks the ranks must agree
    before stepping, so this waits for the loss."""
    with tf32_matmuls(run.cfg.sdf_matmul == "tf32"):  # a step's fp32 matmuls are the SDF MLP's
        weights = apply_schedules(run, step)
        update_occupancy(run, step)
        loss, terms = compute_losses(run, weights)
        if hook is not None:
            loss = hook(step, loss)
        terms["loss"] = loss.detach()
        if run.cameras is not None:
            terms.update(run.cameras.metrics())  # before the step: the corrections this loss saw
        values = torch.stack([v.float().reshape(()) for v in terms.values()])
        finite = True if run.comm is None else math.isfinite(float(terms["loss"]))
        stepped = optimise(run, loss, finite)
        extra = {"active_levels": weights["active_levels"], "eps": weights["eps"],
                 "lr": mlp_lr(run.optimizer)}
    return Launched(step, tuple(terms), values, extra, stepped)


def mlp_lr(optimizer: torch.optim.Optimizer) -> float:
    """The MLPs' learning rate now (the one the loss curve records as ``lr``)."""
    return next(g["lr"] for g in optimizer.param_groups if g["name"] == "mlp")


def resolve(launched: Launched) -> dict | None:
    """Float metrics of a launched step (waits for its GPU work), or None if its loss was not finite."""
    metrics = dict(zip(launched.names, launched.values.tolist()))
    if not launched.stepped or not math.isfinite(metrics["loss"]):
        return None
    return {**metrics, **launched.extra}


def _launch_once(run: Run, step: int, hook, log) -> Launched:
    """Launch a training step; if a compiled graph fails on first use, fall back (``fall_back``)
    and launch it again."""
    while True:
        try:
            launched = launch_step(run, step, hook)
            run.compile_checked = True
            return launched
        except Exception as exc:  # torch._dynamo / inductor errors have many types
            if not run.compiled or run.compile_checked or isinstance(exc, StageError):
                raise
            fall_back(run, exc, log)


def _ends_a_stretch(cfg, done: int, stopping: bool) -> bool:
    """After ``done`` steps a checkpoint is due (or training ends): nothing may run ahead of it."""
    return stopping or done % max(1, cfg.checkpoint_every) == 0 or done == cfg.iterations


def train(run: Run, out_dir: Path, log, show_progress: bool, should_stop: Callable[[], bool],
          hook: Callable | None = None) -> Progress:
    """Train from the latest checkpoint in ``out_dir/checkpoints`` (or from scratch) to the end,
    or until ``should_stop()`` turns True (then checkpoint and raise StageError). ``hook(step,
    loss) -> loss`` lets tests inject failures."""
    cfg, ckpt_dir = run.cfg, out_dir / "checkpoints"
    last = checkpoint.latest(ckpt_dir)
    if run.comm is not None:
        run.comm.barrier()  # every rank has looked before rank 0 writes step 0
    if last is not None:
        restore(run, last)
        apply_schedules(run, max(0, run.progress.step - 1))  # eps, levels, anneal even when no step is left
        log.info("train: resuming from %s (step %d)", last.name, run.progress.step)
    else:
        save_checkpoint(run, ckpt_dir, 0)
    writer = tb_writer(out_dir / "tb", log) if run.main else None
    bar = None
    if show_progress:
        bar = progress_bar(total=cfg.iterations, initial=run.progress.step, desc="train")
    t0, base, initial = time.perf_counter(), run.progress.elapsed, run.progress.step
    # the step before the one being launched: read one step late, so the host never waits for the GPU
    pending: Launched | None = None
    try:
        while run.progress.step < cfg.iterations:
            following = pending.step + 1 if pending else run.progress.step
            ahead = pending is None or not _ends_a_stretch(cfg, following, should_stop())
            nxt = _launch_once(run, following, hook, log) if ahead and following < cfg.iterations else None
            if pending is None:
                pending = nxt
                continue
            step, metrics = pending.step, resolve(pending)
            if metrics is None:  # also drops ``nxt``: the reload undoes both
                recover(run, ckpt_dir, step, log)
                pending, t0, base, initial = None, time.perf_counter(), run.progress.elapsed, run.progress.step
                continue
            pending = nxt
            run.progress.step = step + 1
            run.progress.elapsed = base + time.perf_counter() - t0
            rate = (step + 1 - initial) / max(run.progress.elapsed - base, 1e-9)
            record(run, step + 1, metrics, writer, log if bar is None and run.main else None, rate)
            if bar is not None:  # the postfix is drawn with the next redraw, not one line a step
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", psnr=f"{metrics['psnr']:.2f}", refresh=False,
                                it_s=f"{rate:.1f}")
                bar.update(1)
            stopping = should_stop()
            if nxt is None and _ends_a_stretch(cfg, step + 1, stopping):
                save_checkpoint(run, ckpt_dir, step + 1)
                if stopping:
                    raise StageError(f"train: stopped by SIGTERM at step {step + 1}; checkpoint saved, "
                                     "rerun to resume")
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    return run.progress
