"""Schedules as pure functions of the step: coarse-to-fine levels, finite-difference epsilon,
curvature weight (warm-up, decay per new level, fade to 0), learning rate (warm-up, decay), SfM-loss
decay and NeuS cos annealing."""
from __future__ import annotations

from stages.train.hashgrid import GridSpec


def active_levels(step: int, cfg, spec: GridSpec) -> int:
    if cfg.c2f_step <= 0:
        return spec.levels
    return int(min(spec.levels, max(1, cfg.c2f_init_levels) + step // cfg.c2f_step))


def epsilon(step: int, cfg, spec: GridSpec) -> float:
    """Finite-difference step in unit coordinates: a fraction of the finest active level's cell,
    the fraction moving from eps_start_cells to eps_end_cells as levels switch on."""
    active = active_levels(step, cfg, spec)
    first = min(max(1, cfg.c2f_init_levels), spec.levels) if cfg.c2f_step > 0 else spec.levels
    progress = 1.0 if spec.levels == first else (active - first) / (spec.levels - first)
    cells = cfg.eps_start_cells + (cfg.eps_end_cells - cfg.eps_start_cells) * progress
    return cells * spec.cell_size(active - 1, cfg.grid_bound)


def curvature_weight(step: int, cfg, spec: GridSpec) -> float:
    if cfg.curvature_weight == 0:
        return 0.0
    ramp = min(1.0, step / cfg.curvature_warmup_steps) if cfg.curvature_warmup_steps > 0 else 1.0
    decay = cfg.curvature_decay if cfg.curvature_decay > 0 else spec.per_level_scale
    first = min(max(1, cfg.c2f_init_levels), spec.levels) if cfg.c2f_step > 0 else spec.levels
    fade_from = cfg.curvature_fade_start * cfg.iterations
    fade = 1.0 if step <= fade_from else max(0.0, (cfg.iterations - step) / max(1.0, cfg.iterations - fade_from))
    return cfg.curvature_weight * ramp * fade / decay ** (active_levels(step, cfg, spec) - first)


def lr_factor(step: int, cfg) -> float:
    """Multiplier of every group's base learning rate."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "two_steps":
        passed = sum(step >= frac * cfg.iterations for frac in (0.6, 0.8))
        return cfg.lr_gamma ** -passed
    span = max(1, cfg.iterations - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    return cfg.lr_final_ratio ** progress


def sfm_weight(step: int, cfg) -> float:
    if cfg.sfm_weight == 0 or cfg.sfm_loss_steps <= 0:
        return 0.0
    return cfg.sfm_weight * max(0.0, 1.0 - step / cfg.sfm_loss_steps)


def cos_anneal(step: int, cfg) -> float:
    if cfg.cos_anneal_steps <= 0:
        return 1.0
    return min(1.0, step / cfg.cos_anneal_steps)
