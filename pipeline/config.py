"""Typed pipeline configuration: one frozen dataclass per stage, YAML presets, --set overrides.

Each field carries a one-line doc in its metadata (``opt(default, doc)``), and every numeric
field its allowed range (``bounds="[1, 100]"``, interval notation; ``(`` / ``)`` exclude the end).
Presets in ``pipeline/presets/<name>.yaml`` (package data, read with ``importlib.resources``, so
they work from a checkout and from an installed wheel alike) only override defaults and may name
a ``base:`` preset.
Unknown keys, badly typed values and values out of range (NaN and infinities included) raise
``ConfigError`` naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.dag import STAGES
from pipeline.errors import ConfigError

PRESETS = importlib.resources.files("pipeline") / "presets"  # the named presets, <name>.yaml


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric field, from interval notation: ``[1, 100]``, ``(0, 10]``."""
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    @classmethod
    def parse(cls, text: str) -> Bounds:
        m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*", text)
        if not m:
            raise ValueError(f"bounds {text!r}: expected interval notation such as '[1, 100]' or '(0, 1]'")
        lo, hi = float(m.group(2)), float(m.group(3))
        if not lo <= hi:
            raise ValueError(f"bounds {text!r}: the lower end is above the upper one")
        return cls(lo, hi, m.group(1) == "(", m.group(4) == ")")

    def __contains__(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return _finite(value) and above and below

    def describe(self) -> str:
        lo, hi = _number(self.lo), _number(self.hi)
        if math.isinf(self.hi):
            return f"{'>' if self.lo_open else '>='} {lo}"
        if math.isinf(self.lo):
            return f"{'<' if self.hi_open else '<='} {hi}"
        return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


def _finite(x: float) -> bool:
    return not isinstance(x, float) or math.isfinite(x)  # an int of any size is finite


def _number(x: float) -> str:
    return str(int(x)) if _finite(x) and x == int(x) and abs(x) < 1e16 else repr(x)


def opt(default: Any, doc: str, path: bool = False, bounds: str | None = None) -> Any:
    """A dataclass field with a default and a one-line doc. ``path=True`` marks a file path:
    the cache key then uses the file's content fingerprint, never the path itself. ``bounds``
    is the allowed range of a numeric field (of each item of a tuple), e.g. ``"(0, 1]"``."""
    meta = {"doc": doc, "path": path, "bounds": Bounds.parse(bounds) if bounds else None}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class FramesConfig:
    target_count: int = opt(100, "number of frames to keep from a video, spread over its length (the sharpest of each window); 100 views of an orbit register as accurately as 150 for 60 % of the SfM time", bounds="[2, 100000]")
    max_side: int = opt(1600, "downscale so the long image side is at most this many pixels", bounds="[16, 65536]")
    min_side: int = opt(32, "reject images whose short side is smaller than this", bounds="[1, 65536]")
    dedup_threshold: float = opt(0.01, "drop a frame whose mean abs difference to the last kept one is below this (0..1)", bounds="[0, 1]")
    mixed_sizes: Literal["resize", "reject"] = opt("resize", "photos of different sizes: resize to the most common size, or fail")
    jpeg_quality: int = opt(95, "JPEG quality of the extracted frames", bounds="[1, 100]")


@dataclass(frozen=True)
class SfmConfig:
    camera_model: Literal["SIMPLE_RADIAL", "OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "RADIAL"] = opt(
        "SIMPLE_RADIAL", "COLMAP camera model shared by all frames")
    matcher: Literal["auto", "sequential", "exhaustive"] = opt(
        "auto", "feature matching: auto = sequential for video, exhaustive for photo sets")
    mapper: Literal["incremental", "global"] = opt("global", "pycolmap mapper: global (GLOMAP; parallel, as accurate on orbits) or incremental")
    fallback_mapper: bool = opt(True, "when the mapper leaves frames out, also run the other one and keep the model with more frames")
    min_registered_ratio: float = opt(0.6, "fail when fewer than this share of frames register", bounds="[0, 1]")
    max_image_size: int = opt(1600, "SIFT extraction downscales images to this long side", bounds="[16, 65536]")
    max_num_features: int = opt(8192, "SIFT features per image", bounds="[16, 1000000]")
    peak_threshold: float = opt(0.004, "SIFT peak threshold; lower finds more features on low-contrast surfaces (COLMAP: 0.0067)", bounds="(0, 1]")
    sift_upsample_below: int = opt(1000, "SIFT doubles the image first (COLMAP's first octave -1) only when its long side is below this; larger images start at full size, ~4x faster", bounds="[0, 65536]")
    min_num_inliers: int = opt(15, "incremental mapper: fewest 2D-3D inliers to register an image (COLMAP: 30)", bounds="[1, 100000]")
    sequential_overlap: int = opt(5, "sequential matcher: match each frame with this many neighbours (and with those 2^k ahead up to 2^(N-1))", bounds="[1, 100000]")
    loop_closure_stride: int = opt(10, "sequential matcher: exhaustive matching among every Nth frame", bounds="[0, 100000]")
    refine_principal_point: bool = opt(True, "refine the principal point in a final bundle adjustment")
    ba_max_iterations: int = opt(50, "final bundle adjustment: at most this many Ceres iterations per solve (it also stops when the cost stops dropping)", bounds="[1, 100000]")


@dataclass(frozen=True)
class MaskConfig:
    method: Literal["auto", "rembg", "grabcut", "provided", "none"] = opt("auto", "how object masks are made")
    model: str = opt("isnet-general-use", "rembg model name; with model_path: u2net_custom (default), dis_custom or ben_custom")
    model_path: str = opt("", "path of a custom ONNX segmentation model, anywhere on disk (u2net signature unless masks.model says otherwise)", path=True)
    download: bool = opt(True, "download a missing rembg model on first use (auto and rembg); false, or the env var MESHPIPE_OFFLINE=1, never downloads")
    model_url: str = opt("", "download masks.model from this URL (a mirror) instead of rembg's own release URL; needs masks.model_sha256")
    model_sha256: str = opt("", "sha256 of the file at masks.model_url (64 hex digits), or skip to use it unverified (a warning says so)")
    dilate_px: int = opt(0, "dilate masks by this many pixels after clean-up", bounds="[0, 1000]")
    keep_components: int = opt(1, "keep this many largest connected components", bounds="[0, 1000]")
    fill_holes: bool = opt(True, "fill holes inside the mask")
    seed: Literal["auto", "freespace", "points"] = opt("auto", "grabcut: seed from the free-space hull (the space the views see through, carved by plane-sweep stereo: no texture on the object needed) or from the SfM points on the object; auto: the hull, else what the stereo sees through (the ground and background are background; an object filling the frame), else the points; masks from either of the last two that are implausible are redone from the other")
    grabcut_rounds: int = opt(2, "grabcut: passes; 1 = seeded pass only, each more redoes masks that spill outside the multi-view consensus", bounds="[1, 100]")
    grabcut_iters: int = opt(5, "grabcut: GrabCut iterations per pass", bounds="[1, 100]")
    grabcut_max_side: int = opt(640, "grabcut: downscale the object's region to at most this many pixels for GrabCut", bounds="[16, 65536]")
    grabcut_hull_res: int = opt(96, "grabcut: voxel resolution of the consensus visual hull", bounds="[8, 1024]")
    consistency_res: int = opt(64, "voxel resolution of the visual hull that flags masks disagreeing with the others", bounds="[8, 1024]")
    implausible: Literal["fail", "scene"] = opt("fail", "computed masks that fail the multi-view check: fail the stage in one line, or set them aside and train in scene mode (the mesh then holds the surroundings too)")


@dataclass(frozen=True)
class SfmPointsConfig:
    min_track_length: int = opt(3, "keep SfM points seen by at least this many images", bounds="[2, 100000]")
    max_error_px: float = opt(2.0, "keep SfM points with reprojection error at most this", bounds="(0, inf)")
    carve_resolution: int = opt(96, "voxel grid resolution of the visual-hull carving for the bounds", bounds="[8, 1024]")
    sphere_margin: float = opt(1.15, "bounding sphere radius = this x the radius of the smallest ball around hull + points", bounds="[1, 10]")
    mask_vote: float = opt(0.5, "keep a point when it lies inside the masks of at least this share of the views observing it", bounds="[0, 1]")
    export_legacy: bool = opt(False, "also write the Geo-NeuS-style points_legacy.npy + object-array view_id.npy (never read back)")


@dataclass(frozen=True)
class TrainConfig:
    """Neural SDF training (stages/train). Defaults are the quality preset for one GPU."""
    iterations: int = opt(4000, "optimisation steps (4000 met the spot targets in 57-80 s on one H100: benchmarks/RESULTS.md)", bounds="[1, inf)")
    seed: int = opt(0, "random seed (torch, numpy, python)", bounds="[0, 4294967295]")
    mode: Literal["auto", "object", "scene"] = opt(
        "auto", "object: masks, background colour, mask loss; scene: no masks, background field; auto: object when masks exist")
    holdout_every: int = opt(8, "hold out every Nth view from training (0 = train on all); train.json reports their PSNR", bounds="[0, inf)")
    holdout_eval_views: int = opt(4, "render at most this many held-out views at the end for train.json (0 = none)", bounds="[0, 100000]")
    # rays and sampling
    batch_rays: int = opt(8192, "rays per step", bounds="[1, 67108864]")
    views_per_batch: int = opt(16, "views the rays of one step come from (the SfM loss uses their points)", bounds="[1, 100000]")
    mask_ray_fraction: float = opt(0.5, "object mode: share of rays drawn inside the masks (the rest anywhere)", bounds="[0, 1]")
    samples_per_ray: int = opt(16, "foreground samples per ray, placed by the occupancy grid", bounds="[1, 4096]")
    ray_candidates: int = opt(256, "occupancy look-ups per ray that decide where the samples go", bounds="[1, 65536]")
    occ_resolution: int = opt(128, "occupancy grid resolution over [-1, 1]^3", bounds="[4, 1024]")
    occ_update_every: int = opt(16, "refresh the occupancy grid from the SDF every this many steps", bounds="[1, inf)")
    occ_warmup_steps: int = opt(500, "no empty-space skipping (uniform samples) for this many steps", bounds="[0, inf)")
    occ_margin_cells: float = opt(1.5, "a cell is occupied when |SDF| < this x half its diagonal + occ_margin_s / inv_s", bounds="[0, 1000]")
    occ_margin_s: float = opt(6.0, "NeuS density width term of the occupancy threshold (in 1/inv_s)", bounds="[0, 1000]")
    occ_empty_weight: float = opt(0.02, "sample density of empty space relative to occupied space", bounds="[0, 1]")
    bg_samples: int = opt(32, "scene mode: background samples per ray outside the unit sphere", bounds="[1, 4096]")
    bg_max_res: int = opt(128, "scene mode: finest level of the background hash grid (contracted space); "
                          "kept coarse so the background cannot fake what lies inside the sphere", bounds="[1, 1048576]")
    background_color: Literal["random", "white", "black"] = opt(
        "random", "object mode: colour behind the object (target pixels outside the mask are replaced by it)")
    # hash grid
    grid_levels: int = opt(16, "hash grid levels", bounds="[1, 64]")
    grid_features: int = opt(2, "features per level", bounds="[1, 32]")
    grid_log2_table: int = opt(19, "log2 of the hash table entries per level", bounds="[4, 30]")
    grid_base_res: int = opt(16, "coarsest grid resolution", bounds="[1, 1048576]")
    grid_max_res: int = opt(2048, "finest grid resolution", bounds="[1, 1048576]")
    grid_bound: float = opt(1.0, "the grid covers [-bound, bound]^3 in unit-sphere coordinates", bounds="(0, 100]")
    grid_backend: Literal["auto", "torch", "triton", "tcnn"] = opt(
        "auto", "hash grid backend (auto on CUDA: tcnn when it imports, else triton, else torch; torch on CPU); checkpoints load in any")
    compile: Literal["auto", "on", "off"] = opt(
        "auto", "torch.compile rendering + losses as one graph and the networks (auto: on CUDA only)")
    cuda_graphs: Literal["auto", "on", "off"] = opt(
        "auto", "replay that compiled step as CUDA graphs on CUDA (steps 14% faster on spot, but ~10 s more "
        "compile: benchmarks/RESULTS.md); auto: on for runs of 10000 steps or more")
    amp: Literal["auto", "bf16", "fp16", "off"] = opt("auto", "autocast of the colour/background MLPs on CUDA (the SDF stays fp32); auto = bf16 on CUDA")
    sdf_matmul: Literal["fp32", "tf32"] = opt(
        "fp32", "the SDF MLP's matmuls on CUDA: fp32, or TF32 tensor cores (faster steps; finite-difference "
        "normals ~1 deg noisier: benchmarks/RESULTS.md)")
    # coarse-to-fine and numerical gradients
    c2f_init_levels: int = opt(4, "hash levels active at the start", bounds="[1, 64]")
    c2f_step: int = opt(700, "activate one more level every this many steps (0 = all levels from the start)", bounds="[0, inf)")
    gradient_mode: Literal["tetra4", "central6", "analytic"] = opt(
        "tetra4", "normals: 4-tap tetrahedral (Neuralangelo), 6-tap central differences, or autograd")
    eps_start_cells: float = opt(1.0, "finite-difference step in cells of the finest active level at the start", bounds="(0, 100]")
    eps_end_cells: float = opt(0.25, "finite-difference step in cells of the finest level once all levels are active", bounds="(0, 100]")
    # networks
    sdf_layers: int = opt(1, "hidden layers of the SDF MLP", bounds="[1, 64]")
    sdf_hidden: int = opt(128, "width of the SDF MLP", bounds="[1, 65536]")
    feature_dim: int = opt(64, "SDF MLP feature vector passed to the colour MLP", bounds="[1, 65536]")
    init_radius: float = opt(0.5, "geometric init: the SDF starts as a sphere of this radius", bounds="(0, 10]")
    weight_norm: bool = opt(True, "weight normalisation in the SDF and colour MLPs")
    color_layers: int = opt(4, "hidden layers of the colour MLP (IDR style: x, view dir, normal, feature)", bounds="[1, 64]")
    color_hidden: int = opt(256, "width of the colour MLP", bounds="[1, 65536]")
    appearance_dim: int = opt(0, "per-photo appearance code fed to the colour MLP (NeRF-W / nerfstudio style: exposure and white balance that change between photos; 0 = off); held-out views and mesh colours use the training views' mean code", bounds="[0, 1024]")
    sh_levels: int = opt(4, "spherical-harmonics levels of the view direction (levels^2 values, at most 4)", bounds="[1, 4]")
    inv_s_init: float = opt(20.0, "initial NeuS inverse standard deviation (learned)", bounds="(0, inf)")
    cos_anneal_steps: int = opt(2000, "NeuS cos annealing from 0 to 1 over this many steps (0 = off)", bounds="[0, inf)")
    # losses
    rgb_weight: float = opt(1.0, "weight of the RGB L1 loss", bounds="[0, inf)")
    eikonal_weight: float = opt(0.1, "weight of the eikonal loss (|grad SDF| - 1)^2", bounds="[0, inf)")
    curvature_weight: float = opt(0.0, "weight of the curvature loss mean |laplacian SDF| after warm-up (0 = off: off measured 10-30 % less surface error on four shapes with exact masks and cameras, benchmarks/RESULTS.md; Neuralangelo uses 5e-4)", bounds="[0, inf)")
    curvature_warmup_steps: int = opt(1000, "curvature weight ramps linearly from 0 over this many steps", bounds="[0, inf)")
    curvature_decay: float = opt(0.0, "curvature weight divides by this per newly active level (0 = the grid's per-level scale)", bounds="[0, inf)")
    curvature_fade_start: float = opt(1.0, "share of the iterations after which the curvature weight falls linearly to 0 at the last step (1 = no fade)", bounds="[0, 1]")
    mask_weight: float = opt(0.1, "object mode: weight of the BCE between rendered opacity and the mask", bounds="[0, inf)")
    sfm_weight: float = opt(0.1, "weight of the SfM-point loss mean |SDF| at the points the batch's views see", bounds="[0, inf)")
    sfm_loss_steps: int = opt(5000, "the SfM-point loss weight decays linearly to 0 over this many steps", bounds="[0, inf)")
    sfm_points_per_view: int = opt(64, "SfM points drawn per batch view for the SfM-point loss", bounds="[1, 1000000]")
    # optimiser
    lr: float = opt(2e-3, "AdamW learning rate of the MLPs (and base of the other groups)", bounds="(0, 10]")
    lr_grid_mult: float = opt(5.0, "hash grid learning rate = lr x this", bounds="(0, 10000]")
    lr_inv_s_mult: float = opt(1.0, "learning rate of the NeuS inverse standard deviation = lr x this (no weight decay)", bounds="[0, 10000]")
    weight_decay: float = opt(1e-2, "AdamW weight decay (every parameter but inv_s)", bounds="[0, 10]")
    adam_eps: float = opt(1e-15, "AdamW epsilon", bounds="(0, 1]")
    warmup_steps: int = opt(500, "linear learning-rate warm-up", bounds="[0, inf)")
    lr_decay: Literal["exp", "two_steps"] = opt(
        "exp", "exp: decay to lr x lr_final_ratio at the end; two_steps: divide by lr_gamma at 60% and 80%")
    lr_final_ratio: float = opt(0.1, "exp decay: final learning rate / initial", bounds="(0, 1]")
    lr_gamma: float = opt(10.0, "two_steps decay: divide the learning rate by this at each step", bounds="[1, inf)")
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0 = off)", bounds="[0, inf)")
    # camera refinement
    refine_cameras: bool = opt(
        False, "optimise a small pose correction per training view with the SDF (rotation about the camera "
               "centre + translation, nerfstudio's SO3xR3; zero at the start); held-out views keep their input "
               "poses; train.json reports the corrections. Off until it measures better: benchmarks/refine_cameras.py")
    camera_lr: float = opt(1e-3, "refine_cameras: AdamW learning rate of the pose corrections (their own group, no "
                                 "weight decay; the warm-up and decay of lr apply)", bounds="(0, 1]")
    camera_start_step: int = opt(0, "refine_cameras: the pose corrections stay at zero before this step",
                                 bounds="[0, inf)")
    # bookkeeping
    checkpoint_every: int = opt(2000, "write a checkpoint every this many steps (and on SIGTERM)", bounds="[1, inf)")
    log_every: int = opt(100, "TensorBoard scalars, the loss curve in train.json and (without progress bars) a log line every this many steps", bounds="[1, inf)")
    eval_chunk: int = opt(4096, "rays per chunk when rendering held-out views", bounds="[1, 67108864]")
    gpus: int = opt(1, "GPUs that train this scene together (torchrun DDP; with --device cpu: gloo processes); "
                       "each draws batch_rays / gpus rays per step, so results match 1 GPU within noise", bounds="[1, 1024]")


@dataclass(frozen=True)
class MeshConfig:
    resolution: int = opt(512, "marching-cubes cells per axis over the unit cube [-1, 1]^3 (up to 2048)", bounds="[2, 2048]")
    block_res: int = opt(128, "cells per axis of a block evaluated and marched at once; bounds memory", bounds="[2, 2048]")
    coarse_factor: int = opt(8, "coarse pass samples every Nth grid point; resolution and block_res must be multiples", bounds="[1, 256]")
    skip_margin: float = opt(2.0, "skip coarse cells whose |SDF| exceeds this x their half-diagonal at all corners (0 = evaluate all)", bounds="[0, 1000]")
    eval_chunk: int = opt(262144, "points per SDF call (fixed size, padded, so seam samples get identical values)", bounds="[1, 67108864]")
    vertex_colors: bool = opt(True, "colour vertices with the colour network when the model has one")
    gpus: int = opt(1, "processes (one per GPU; with --device cpu: CPU processes) that share the blocks; "
                       "the mesh is identical for any number", bounds="[1, 1024]")


@dataclass(frozen=True)
class CleanupConfig:
    min_component_ratio: float = opt(0.1, "drop components whose diagonal is below this share of the largest", bounds="[0, 1]")
    max_hole_edges: int = opt(100, "close holes with at most this many boundary edges (patches that cut the surface are refused)", bounds="[0, inf)")
    close_all_holes: bool = opt(True, "then close every hole still open, of any size, so the mesh is watertight")
    target_faces: int = opt(0, "decimate to this many faces (0 = keep)", bounds="[0, 2000000000]")
    cull: bool = opt(True, "cull faces that project outside the masks in most views that see them")
    cull_min_views: int = opt(3, "cull a face only when at least this many views see it", bounds="[1, 100000]")
    cull_ratio: float = opt(0.5, "cull a face when more than this share of the views that see it put it outside the mask", bounds="[0, 1]")
    cull_dilate_px: int = opt(2, "dilate masks by this many pixels before culling (protects silhouettes)", bounds="[0, 1000]")
    max_views: int = opt(60, "use at most this many views (evenly spread) for culling and colouring", bounds="[1, 100000]")
    taubin_steps: int = opt(0, "Taubin smoothing iterations after decimation (0 = none)", bounds="[0, 10000]")
    colour: bool = opt(True, "colour vertices from the images (visible views, frontal ones weighted up)")
    texture: bool = opt(False, "also bake a UV texture atlas (needs the xatlas package)")
    texture_size: int = opt(2048, "texture atlas side in pixels", bounds="[64, 16384]")
    isolate: Literal["fallback", "always", "never"] = opt("fallback", "without masks, cut the object out in 3D (the ground plane of the SfM points cut, the pieces near the sphere's centre kept, the bottom closed): when the masks stage fell back to scene mode, always, or never")
    up_axis: Literal["none", "z", "y"] = opt("none", "export the meshes turned so the up of the (level-held) cameras is this axis, the object standing at height 0 on the origin (none = the SfM frame; cleanup.json has the transform)")


@dataclass(frozen=True)
class EvaluateConfig:
    holdout: bool = opt(True, "hold out every 8th frame from training and report its PSNR")
    num_samples: int = opt(200000, "surface samples for Chamfer and F-score", bounds="[100, 100000000]")
    fscore_thresholds: tuple[float, ...] = opt((0.005, 0.01), "F-score distance thresholds as fractions of the GT bounding-box diagonal", bounds="(0, 1]")
    icp_iterations: int = opt(20, "trimmed rigid ICP steps after aligning SfM cameras to GT cameras (0 = off)", bounds="[0, 10000]")
    iou_max_views: int = opt(24, "silhouette IoU over at most this many views spread over the sequence (0 = all)", bounds="[0, 100000]")
    render_max_side: int = opt(640, "IoU and report renders use the images scaled to at most this long side", bounds="[16, 65536]")
    report_frames: int = opt(48, "thumbnails in the report's input contact sheet", bounds="[0, 10000]")
    viewer_faces: int = opt(200000, "faces of the mesh in the report's 3D view (a decimated copy; the full mesh stays on disk; 0 = no 3D view)", bounds="[0, 20000000]")
    seed: int = opt(0, "seed of the surface sampling", bounds="[0, 4294967295]")
    region_margin: float = opt(0.02, "object-region scores: GT bounds grown by this fraction of the GT diagonal", bounds="[0, 1]")
    floor_margin: float = opt(0.01, "object-region scores: a GT support plane (gt.json support_plane_z) and this fraction of the diagonal above it are left out", bounds="[0, 1]")


@dataclass(frozen=True)
class PipelineConfig:
    frames: FramesConfig = field(default_factory=FramesConfig)
    sfm: SfmConfig = field(default_factory=SfmConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    sfm_points: SfmPointsConfig = field(default_factory=SfmPointsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    cleanup: CleanupConfig = field(default_factory=CleanupConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def section(self, name: str) -> Any:
        return getattr(self, name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        return apply_overrides(cls(), data, source="config")


# One section per stage, in the DAG's order (pipeline.dag.STAGES is the one list of stages).
SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(PipelineConfig)}
if tuple(SECTIONS) != STAGES:
    raise ImportError(f"PipelineConfig's sections {tuple(SECTIONS)} are not the stages {STAGES}")


def canonical_json(obj: Any) -> str:
    """Stable JSON used for hashing: sorted keys, no whitespace."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def path_fields(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section]) if f.metadata.get("path")]


def field_docs(section: str) -> dict[str, str]:
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(SECTIONS[section])}


def _is_numeric(tp: Any) -> bool:
    """int or float, alone, optional or as the items of a tuple (bool is not a number here)."""
    if tp in (int, float):
        return True
    return typing.get_origin(tp) in (tuple, typing.Union, types.UnionType) and \
        any(_is_numeric(a) for a in typing.get_args(tp) if a is not Ellipsis)


def numeric_fields(section: str) -> dict[str, Bounds | None]:
    """{name: its bounds (None when undeclared)} of every numeric field of a section."""
    hints = typing.get_type_hints(SECTIONS[section])
    return {f.name: f.metadata.get("bounds") for f in dataclasses.fields(SECTIONS[section])
            if _is_numeric(hints[f.name])}


def _check_bounds(value: Any, bounds: Bounds | None, where: str) -> None:
    """Raise ConfigError when a number (or an item of a tuple) lies outside ``bounds``."""
    if bounds is None or value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            _check_bounds(item, bounds, f"{where}[{i}]")
        return
    if value not in bounds:
        shown, finite = (_number(value), "") if _finite(value) else (repr(value), "a finite number ")
        raise ConfigError(f"{where}={shown}: must be {finite}{bounds.describe()}")


def _nearest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` when that is lossless, else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):  # YAML 1.1 reads on/off as booleans
            value = "on" if value else "off"
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 1 << 63:  # numpy and torch take 64-bit integers
                raise ConfigError(f"{where}: {str(value)[:20]}... is too large a number")
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # a string too: YAML 1.1 reads 1e-3 (no dot) and nan as strings
                return float(value)
            except OverflowError:
                raise ConfigError(f"{where}: {str(value)[:20]}... is too large a number") from None
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _replace_section(section_obj: Any, section: str, values: dict, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(section_obj))
    fields = {f.name: f for f in dataclasses.fields(section_obj)}
    changes = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{section}.{key}'{_nearest(str(key), list(fields))}")
        changes[key] = _check_type(value, hints[key], f"{source}: {section}.{key}")
        _check_bounds(changes[key], fields[key].metadata.get("bounds"), f"{source}: {section}.{key}")
    return dataclasses.replace(section_obj, **changes)


def section_from_dict(section: str, values: dict) -> Any:
    """Rebuild a config section (type-checked) from its dict form, e.g. in a stage subprocess."""
    return _replace_section(SECTIONS[section](), section, values, source=f"section {section}")


def apply_overrides(cfg: PipelineConfig, data: dict, source: str) -> PipelineConfig:
    """Return a new config with the nested mapping ``data`` ({section: {key: value}}) applied."""
    changes = {}
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}'{_nearest(str(section), list(SECTIONS))}")
        changes[section] = _replace_section(cfg.section(section), section, values, source)
    return dataclasses.replace(cfg, **changes)


def preset_names() -> list[str]:
    if not PRESETS.is_dir():
        return []
    return sorted(p.name.removesuffix(".yaml") for p in PRESETS.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}); a preset is a YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where} ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_preset(name_or_path: str, _seen: tuple = ()) -> PipelineConfig:
    """Resolve a preset by name (``pipeline/presets/<name>.yaml``) or by the path of a YAML
    file, following ``base:``."""
    names = preset_names()
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESETS / f"{name_or_path}.yaml" if name_or_path in names else None
    if path is None or not path.is_file():
        raise ConfigError(f"unknown preset '{name_or_path}'{_nearest(name_or_path, names)} "
                          f"(available: {', '.join(names)})")
    seen = str(path.resolve()) if isinstance(path, Path) else str(path)
    if seen in _seen:
        raise ConfigError(f"{path}: 'base:' presets form a cycle")
    data = _read_yaml(path)
    base = data.pop("base", None)
    cfg = load_preset(str(base), _seen + (seen,)) if base else PipelineConfig()
    return apply_overrides(cfg, data, source=str(path))


def parse_set(items: list[str]) -> dict:
    """Turn ['train.iterations=20000', ...] into {'train': {'iterations': 20000}}; values are YAML."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        section, _, name = key.strip().partition(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def load_config(preset: str = "default", overrides: list[str] | None = None) -> PipelineConfig:
    cfg = load_preset(preset)
    return apply_overrides(cfg, parse_set(overrides or []), source="--set")
