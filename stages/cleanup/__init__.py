"""Stage 7, cleanup: ``mesh_raw.ply`` -> a clean, closed, outward, coloured mesh
(``mesh.ply``, ``mesh.obj``, ``mesh.glb``; a UV texture when asked) and ``cleanup.json``.

Steps: coincident vertices welded (as viewers weld them on load, see
``stages.cleanup.topology``), duplicates and null faces out; small components out (diagonal
below a share of the largest component's); faces culled that project outside the masks in
most views that see them, then small components again; faces at non-manifold edges and
vertices removed; holes up to ``max_hole_edges`` closed; faces oriented coherently and each
closed component outward (signed volume); optional quadric decimation and Taubin smoothing,
then a weld again; vertex colours from the images (``stages.cleanup.colour``), falling back to the
raw mesh colours. ``cleanup.json``'s topology is that of the welded mesh. With ``up_axis`` the
files are written turned upright (``stages.cleanup.upright``; ``cleanup.json`` ``upright`` holds
``world_from_export``, which takes them back to the cameras' frame).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dag import Context
from pipeline.errors import InputError, StageError
from pipeline.fsutil import atomic_write_json
from stages.cleanup import isolate
from stages.cleanup.topology import components, make_manifold, topology, weld

VERSION = "4"  # 2: topology measured after welding; 3: texture mesh_texture.png, white material, up_axis;
# 4: isolate (the object cut out of a scene-mode mesh)
TEXTURE = "mesh_texture"  # the OBJ's material: mesh.mtl names mesh_texture.png
# Copied to the scene folder: the OBJ with the files it references, under the names it uses
PUBLISH = ("mesh.ply", "mesh.obj", "mesh.mtl", f"{TEXTURE}.png", "mesh.glb")
MIN_SEEN_SHARE = 0.2  # after culling, a piece with fewer faces seen by enough views is dropped
GREY = 180  # colour of vertices no view sees and the raw mesh has no colour for
WHITE = (255, 255, 255, 255)


def load_raw(mesh_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Vertices, faces and vertex colours (uint8, or None) of ``mesh_dir/mesh_raw.ply``."""
    import trimesh

    path = Path(mesh_dir) / "mesh_raw.ply"
    try:
        m = trimesh.load(path, process=False, force="mesh")
    except Exception as exc:  # trimesh raises many types for bad files
        raise InputError(f"{path}: cannot read the raw mesh ({type(exc).__name__}: {exc}); "
                         "rerun the mesh stage") from None
    colours = None
    if getattr(m.visual, "kind", None) == "vertex":
        colours = np.asarray(m.visual.vertex_colors)[:, :3].copy()
    return np.asarray(m.vertices, np.float64), np.asarray(m.faces, np.int64), colours


def keep_faces(vertices: np.ndarray, faces: np.ndarray, keep: np.ndarray):
    """Drop faces not in ``keep`` and the vertices they leave unreferenced; also the old index
    of each kept vertex."""
    faces = faces[keep]
    used = np.unique(faces)
    remap = np.full(len(vertices), -1, np.int64)
    remap[used] = np.arange(len(used))
    return vertices[used], remap[faces], used


def remove_small_components(vertices, faces, ratio: float):
    """Remove components whose bounding-box diagonal is below ``ratio`` x the largest one's."""
    if len(faces) == 0:
        return vertices, faces, 0
    labels = components(vertices, faces)
    uniq, inv = np.unique(labels, return_inverse=True)
    lo = np.full((len(uniq), 3), np.inf)
    hi = np.full((len(uniq), 3), -np.inf)
    for k in range(3):
        pts = vertices[faces[:, k]]
        np.minimum.at(lo, inv, pts)
        np.maximum.at(hi, inv, pts)
    diag = np.linalg.norm(hi - lo, axis=1)
    small = diag < ratio * diag.max()
    vertices, faces, _ = keep_faces(vertices, faces, ~small[inv])
    return vertices, faces, int(small.sum())


def orient_outward(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, int]:
    """Flip every component whose signed volume is negative (call after a coherent orientation)."""
    labels = components(vertices, faces)
    tri = vertices[faces]
    signed = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])) / 6.0
    vol = np.bincount(labels, weights=signed)
    flip = vol[labels] < 0
    faces = faces.copy()
    faces[flip] = faces[flip][:, ::-1]
    return faces, int((vol < 0).sum())


def _meshset(vertices, faces):
    import pymeshlab

    ms = pymeshlab.MeshSet()
    ms.add_mesh(pymeshlab.Mesh(vertex_matrix=vertices, face_matrix=faces.astype(np.int32)))
    return ms


def _arrays(ms) -> tuple[np.ndarray, np.ndarray]:
    m = ms.current_mesh()
    return np.asarray(m.vertex_matrix(), np.float64), np.asarray(m.face_matrix(), np.int64)


def remove_duplicates(vertices, faces):
    ms = _meshset(vertices, faces)
    ms.meshing_remove_duplicate_vertices()
    ms.meshing_remove_duplicate_faces()
    ms.meshing_remove_null_faces()
    ms.meshing_remove_unreferenced_vertices()
    return _arrays(ms)


def _close_holes(ms, max_hole_edges: int, close_all: bool) -> int:
    """Close holes (see ``repair_and_close``), then remove what of the patches is non-manifold.
    Returns the faces removed."""
    # newfaceselected=False: selected new faces would make a later decimation do nothing.
    removed = 0
    if max_hole_edges > 0:
        ms.meshing_close_holes(maxholesize=int(max_hole_edges), newfaceselected=False)
        ms.set_selection_none()
        removed += make_manifold(ms)
    if close_all and ms.get_topological_measures()["number_holes"] != 0:
        ms.meshing_close_holes(maxholesize=3 * ms.current_mesh().face_number() + 3, newfaceselected=False,
                               selfintersection=False)
        ms.set_selection_none()
        removed += make_manifold(ms)
    return removed


def repair_and_close(vertices, faces, max_hole_edges: int, log=None, close_all: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Weld coincident vertices; make the mesh two-manifold by removing faces at non-manifold
    edges and vertices (never splitting a vertex into coincident copies: see
    ``stages.cleanup.topology``); close holes; orient coherently (pymeshlab). Holes up to
    ``max_hole_edges`` are filled with patches that may not cut the surface; with ``close_all``
    every hole still open afterwards is filled too, without that check (a watertight result).
    Hole patches that come out non-manifold are removed and their holes closed again."""
    import logging

    import pymeshlab

    log = log or logging.getLogger("pipeline")
    ms = _meshset(*weld(vertices, faces)[:2])
    removed = make_manifold(ms)
    before = ms.get_topological_measures()
    reopened = 0
    try:
        for _ in range(3):  # a patch removed as non-manifold leaves a hole to close again
            more = _close_holes(ms, max_hole_edges, close_all)
            reopened += more
            if not more:
                break
        ms.meshing_re_orient_faces_coherently()
    except pymeshlab.PyMeshLabException as exc:  # e.g. a non-orientable piece: keep what we have
        log.warning("cleanup: hole closing / orientation stopped early (%s)", str(exc).splitlines()[0])
    after = ms.get_topological_measures()
    holes = max(int(before["number_holes"]) - int(after["number_holes"]), 0)
    added = int(after["faces_number"]) - int(before["faces_number"]) + reopened
    return *_arrays(ms), {"holes_before": int(before["number_holes"]), "holes_closed": holes,
                          "faces_removed_by_repair": removed + reopened, "faces_added_by_hole_closing": added}


def decimate_and_smooth(vertices, faces, target_faces: int, taubin_steps: int):
    ms = _meshset(vertices, faces)
    if 0 < target_faces < len(faces):
        ms.meshing_decimation_quadric_edge_collapse(targetfacenum=int(target_faces), preservetopology=True,
                                                    preservenormal=True, autoclean=True)
    if taubin_steps > 0:
        ms.apply_coord_taubin_smoothing(lambda_=0.5, mu=-0.53, stepsmoothnum=int(taubin_steps))
    ms.meshing_remove_unreferenced_vertices()
    return _arrays(ms)


def weld_again(vertices, faces, cfg, log) -> tuple[np.ndarray, np.ndarray, int]:
    """Weld as the saved file is welded on load (decimation and smoothing move vertices); when
    that merges vertices or leaves the mesh not two-manifold, repair and close once more.
    Returns vertices, faces and the vertices merged."""
    v, f, merged = weld(vertices, faces)
    manifold = bool(_meshset(v, f).get_topological_measures()["is_mesh_two_manifold"])
    if merged == 0 and manifold:
        return v, f, 0
    log.info("cleanup: after decimation/smoothing %d vertices merged, two-manifold=%s; repairing again",
             merged, manifold)
    v, f = remove_duplicates(v, f)
    v, f, _ = repair_and_close(v, f, cfg.max_hole_edges, log, cfg.close_all_holes)
    f, _ = orient_outward(v, f)
    v, f, _ = weld(v, f)
    return v, f, merged


def colour_vertices(vertices, faces, views, raw_vertices, raw_colours, progress: bool):
    """Vertex colours (V, 3) uint8 from the images; unseen vertices take the nearest raw
    vertex's colour (or grey). Returns the colours and the share of vertices seen."""
    from scipy.spatial import cKDTree

    from stages.cleanup.colour import blend_colours, vertex_normals

    rgb, weight = blend_colours(vertices, vertex_normals(vertices, faces), vertices, faces, views, progress)
    colours = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
    unseen = weight <= 0
    if unseen.any() and raw_colours is not None:
        _, nearest = cKDTree(raw_vertices).query(vertices[unseen])
        colours[unseen] = raw_colours[nearest]
    elif unseen.any():
        colours = diffuse_colours(colours, ~unseen, faces)
    return colours, float(1.0 - unseen.mean())


def diffuse_colours(colours: np.ndarray, known: np.ndarray, faces: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Give unknown vertices the mean colour of their known neighbours, growing ring by ring;
    vertices no ring reaches get GREY."""
    import scipy.sparse as sp

    n = len(colours)
    e = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    adj = sp.coo_matrix((np.ones(len(e) * 2), (np.r_[e[:, 0], e[:, 1]], np.r_[e[:, 1], e[:, 0]])), shape=(n, n)).tocsr()
    col = colours.astype(np.float64) * known[:, None]
    known = known.copy()
    for _ in range(iterations):
        if known.all():
            break
        count = adj @ known.astype(np.float64)
        grow = ~known & (count > 0)
        if not grow.any():
            break
        col[grow] = (adj @ col)[grow] / count[grow, None]
        known |= grow
    col[~known] = GREY
    return (col + 0.5).astype(np.uint8)


def cull_by_masks(vertices, faces, views, cfg, ctx):
    """Remove faces that fall outside the masks in more than ``cull_ratio`` of the (at least
    ``cull_min_views``) views that see them; then the pieces left that the views barely see
    (e.g. the undersides of culled background slabs)."""
    from stages.cleanup.colour import mask_votes

    seen, outside = mask_votes(vertices, faces, views, cfg.cull_dilate_px, ctx.progress)
    cull = (seen >= cfg.cull_min_views) & (outside > cfg.cull_ratio * seen)
    keep = ~cull
    labels = components(vertices, faces[keep]) if keep.any() else np.zeros(0, np.int64)
    _, inv = np.unique(labels, return_inverse=True)
    supported = np.bincount(inv, weights=seen[keep] >= cfg.cull_min_views)
    share = supported / np.bincount(inv)
    unseen_piece = share < MIN_SEEN_SHARE
    keep[np.flatnonzero(keep)[unseen_piece[inv]]] = False
    vertices, faces, _ = keep_faces(vertices, faces, keep)
    return vertices, faces, {"faces_culled": int(cull.sum()), "faces_unseen": int((seen == 0).sum()),
                             "unseen_pieces_removed": int(unseen_piece.sum())}


def _isolate(v, f, views, sfm_points_dir, ctx):
    """``stages.cleanup.isolate`` on the mesh: (vertices, faces, info or None when no plane)."""
    if sfm_points_dir is None or not (Path(sfm_points_dir) / "scene.json").is_file():
        ctx.log.warning("cleanup: no sfm_points/scene.json: the object is not cut out of the scene")
        return v, f, None
    scene = json.loads((Path(sfm_points_dir) / "scene.json").read_text())
    plane = isolate.ground_plane(sfm_points_dir, views.cams)
    if plane is None:
        ctx.log.warning("cleanup: no masks and no supporting plane in the SfM points: the mesh keeps the "
                        "surroundings inside the bounding sphere (cleanup.isolate found nothing to cut at)")
        return v, f, None
    keep, info = isolate.cut(v, f, plane, scene["sphere_center"], scene["sphere_radius"])
    v, f, _ = keep_faces(v, f, keep)
    ctx.log.info("cleanup: no masks: the object cut out in 3D at the supporting plane (%d faces at or below it "
                 "cut, %d of %d pieces kept near the centre)", info["faces_below_plane"], info["pieces_kept"],
                 info["pieces"])
    return v, f, info


def write_outputs(out_dir: Path, vertices, faces, colours, texture=None) -> list[str]:
    """``mesh.ply`` (vertex colours), ``mesh.obj`` and ``mesh.glb`` (textured when ``texture`` =
    (vmapping, faces, uvs, image) is given, else vertex colours; a textured OBJ comes with
    ``mesh.mtl`` and ``mesh_texture.png``)."""
    import trimesh
    from PIL import Image
    from trimesh.exchange.obj import export_obj

    coloured = trimesh.Trimesh(vertices, faces, vertex_colors=colours, process=False)
    coloured.export(out_dir / "mesh.ply")
    shown = coloured
    if texture is not None:
        vmapping, tex_faces, uvs, image = texture
        # white diffuse, no specular: viewers multiply the texture by Kd (OBJ) / baseColorFactor
        # (glTF), which trimesh's default grey of 0.4 darkened 2.5 times
        material = trimesh.visual.material.SimpleMaterial(image=Image.fromarray(image), name=TEXTURE,
                                                          diffuse=WHITE, ambient=WHITE, specular=(0, 0, 0, 255))
        shown = trimesh.Trimesh(vertices[vmapping], tex_faces, process=False,
                                visual=trimesh.visual.TextureVisuals(uv=uvs, material=material))
    text, files = export_obj(shown, return_texture=True, mtl_name="mesh.mtl")
    (out_dir / "mesh.obj").write_text(text)
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    shown.export(out_dir / "mesh.glb")
    return ["mesh.ply", "mesh.obj", "mesh.glb", *sorted(files)]


def _colours(v, f, views, raw_v, raw_colours, cfg, ctx) -> tuple[np.ndarray, float]:
    """Vertex colours from the images (``cleanup.colour``) or else the raw mesh's, or grey."""
    if cfg.colour:
        return colour_vertices(v, f, views, raw_v, raw_colours, ctx.progress)
    if raw_colours is not None:
        from scipy.spatial import cKDTree

        return raw_colours[cKDTree(raw_v).query(v)[1]], 0.0
    return np.full((len(v), 3), GREY, np.uint8), 0.0


def _texture(vertices, faces, views, colours, cfg, ctx):
    try:
        import xatlas  # noqa: F401
    except ImportError:
        ctx.log.warning("cleanup: texture=true but the xatlas package is not installed; vertex colours only")
        return None
    from stages.cleanup.colour import bake_texture

    return bake_texture(vertices, faces, views, cfg.texture_size, colours, ctx.progress)


def run(inputs: dict[str, Path], cfg: Any, out_dir: Path, ctx: Context) -> dict:
    """Clean ``inputs["mesh"]/mesh_raw.ply`` into ``out_dir``; masks and images from
    ``inputs["masks"]`` (optional) and ``inputs["sfm"]``."""
    from stages.cleanup.colour import load_views

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    raw_v, raw_f, raw_colours = load_raw(inputs["mesh"])
    report: dict = {"input_vertices": len(raw_v), "input_faces": len(raw_f)}
    views = load_views(inputs["sfm"], inputs.get("masks"), cfg.max_views)
    v, f, welded = weld(raw_v, raw_f)  # coincident vertices would merge on load: repair what that breaks
    v, f = remove_duplicates(v, f)
    isolated = None  # before small pieces go: next to the ground, the object may be one
    if isolate.wanted(cfg.isolate, views.mask_dir is not None, inputs.get("masks")):
        v, f, isolated = _isolate(v, f, views, inputs.get("sfm_points"), ctx)
    v, f, removed = remove_small_components(v, f, cfg.min_component_ratio)
    report.update(vertices_welded=welded, faces_culled=0, faces_unseen=None, cull="off", isolated=isolated)
    if cfg.cull and views.mask_dir is None:
        report["cull"] = "skipped: no masks"
        ctx.log.info("cleanup: no masks, faces are not culled")
    elif cfg.cull:
        v, f, votes = cull_by_masks(v, f, views, cfg, ctx)
        report.update(votes, cull=f"{len(views.cams)} views")
    if len(f) == 0:
        raise StageError("cleanup: nothing is left of the mesh after removing components and culling; "
                         "check the masks (masks stage) or set cleanup.cull=false")
    v, f, holes = repair_and_close(v, f, cfg.max_hole_edges, ctx.log, cfg.close_all_holes or bool(isolated))
    v, f, more = remove_small_components(v, f, cfg.min_component_ratio)  # culling and repair split pieces
    removed += more
    f, flipped = orient_outward(v, f)
    faces_before = len(f)
    v, f = decimate_and_smooth(v, f, cfg.target_faces, cfg.taubin_steps)
    f, more_flipped = orient_outward(v, f)
    v, f, welded_late = weld_again(v, f, cfg, ctx.log)
    report.update(holes, components_removed=removed, components_flipped=flipped + more_flipped,
                  faces_before_decimation=faces_before, vertices_welded_after_decimation=welded_late)
    colours, seen_share = _colours(v, f, views, raw_v, raw_colours, cfg, ctx)
    texture = _texture(v, f, views, colours, cfg, ctx) if cfg.texture else None
    exported, up = v, None
    if cfg.up_axis != "none":
        from stages.cleanup.upright import upright

        exported, up = upright(v, views.cams, cfg.up_axis)
        ctx.log.info("cleanup: exported with +%s up (%s)", cfg.up_axis, up["method"])
    files = write_outputs(out_dir, exported, f, colours, texture)
    report.update(topology(v, f), vertices=len(v), faces=len(f), vertices_seen_share=round(seen_share, 4),
                  textured=texture is not None, files=files, upright=up, seconds=round(time.perf_counter() - t0, 3))
    atomic_write_json(out_dir / "cleanup.json", report)
    ctx.log.info("cleanup: %d faces, %d components removed, %d culled, %d holes closed, watertight=%s, manifold=%s",
                 len(f), removed, report["faces_culled"], report["holes_closed"], report["watertight"],
                 report["manifold"])
    if not report["manifold"]:
        ctx.log.warning("cleanup: %s is not two-manifold after welding (%d non-manifold edges, %d vertices); "
                        "tools that weld on load (trimesh, MeshLab, Blender) will see it so",
                        out_dir / "mesh.ply", report["non_manifold_edges"], report["non_manifold_vertices"])
    return report
