"""Cleanup stage on a synthetic scene: the ground-truth mesh plus planted junk, GT cameras,
masks and Lambertian renders (pipeline.synthetic)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import trimesh
from scipy.spatial import cKDTree

from pipeline.config import CleanupConfig
from pipeline.dag import Context
from pipeline.errors import StageError
from pipeline.synthetic import SceneSpec, generate
from stages import cleanup
from stages.mesh import write_ply


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scene")
    generate(out, SceneSpec(num_views=24, width=256, height=192, output="images", background=True, seed=0))
    return out / "gt"  # images/, masks/, transforms.json: what sfm/ and masks/ hold


def _junk() -> list[trimesh.Trimesh]:
    """A floater and two background slabs, finely tessellated like marching-cubes output."""
    parts = [trimesh.creation.icosphere(2, 0.03).apply_translation([0.35, -0.4, 0.5]),
             trimesh.creation.box([0.05, 0.5, 0.4]).apply_translation([0.45, 0.0, 0.2]),
             trimesh.creation.box([1.0, 0.04, 0.6]).apply_translation([0.0, -0.7, 0.3])]
    return [trimesh.Trimesh(*trimesh.remesh.subdivide_to_size(p.vertices, p.faces, 0.02)) for p in parts]


def _run(tmp_path: Path, mesh: trimesh.Trimesh, scene: Path, masks: bool = True, colours=None,
         **cfg) -> tuple[Path, dict]:
    mesh_dir, out = tmp_path / "mesh", tmp_path / "cleanup"
    mesh_dir.mkdir()
    out.mkdir()
    write_ply(mesh_dir / "mesh_raw.ply", np.asarray(mesh.vertices), np.asarray(mesh.faces), colours)
    inputs = {"mesh": mesh_dir, "sfm": scene, **({"masks": scene} if masks else {})}
    return out, cleanup.run(inputs, CleanupConfig(**cfg), out, Context(scene="t", progress=False))


@pytest.fixture(scope="module")
def cleaned(scene, tmp_path_factory) -> tuple[Path, dict]:
    gt = trimesh.load(scene / "gt_mesh.ply", process=False)
    return _run(tmp_path_factory.mktemp("junk"), trimesh.util.concatenate([gt, *_junk()]), scene)


def test_removes_floaters_and_slabs_keeps_object(scene, cleaned):
    out, report = cleaned
    gt = trimesh.load(scene / "gt_mesh.ply", process=False)
    mesh = trimesh.load(out / "mesh.ply", process=False)
    assert mesh.is_watertight and len(mesh.split(only_watertight=False)) == 1
    assert abs(mesh.volume / gt.volume - 1) < 0.01
    dist, _ = cKDTree(gt.vertices).query(mesh.vertices)
    assert dist.max() < 1e-6  # nothing of the junk is left
    assert len(mesh.faces) >= 0.99 * len(gt.faces)  # and the object is whole
    assert report["faces_culled"] > 10000 and report["components_removed"] >= 1
    info = json.loads((out / "cleanup.json").read_text())
    assert info["watertight"] and info["genus"] == 0 and info["components"] == 1
    for name in ("mesh.ply", "mesh.obj", "mesh.glb"):  # no texture asked: no mesh.mtl, no mesh_texture.png
        assert (out / name).stat().st_size > 0
    assert not (out / "mesh.mtl").exists() and set(report["files"]) == {"mesh.ply", "mesh.obj", "mesh.glb"}
    assert len(trimesh.load(out / "mesh.glb", force="mesh").faces) == len(mesh.faces)


def _expected_vertex_colours(vertices: np.ndarray) -> np.ndarray:
    """Ground-truth radiance at mesh vertices: texture colour x Lambertian shading, as rendered."""
    from pipeline.synthetic.mesh import prepare_object
    from pipeline.synthetic.render import AMBIENT, DIFFUSE, LIGHT_DIR

    obj = prepare_object(None, None, "y", 1.0, 0)  # the shipped Spot, as SceneSpec() renders it
    faces, attrs = obj.faces.numpy().reshape(-1), obj.corner_attrs.numpy().reshape(-1, 5)
    uv, normal = np.zeros((len(obj.vertices), 2)), np.zeros((len(obj.vertices), 3))
    uv[faces], normal[faces] = attrs[:, :2], attrs[:, 2:]
    grid = torch.tensor(np.stack([uv[:, 0] * 2 - 1, 1 - uv[:, 1] * 2], -1), dtype=torch.float32)[None, None]
    albedo = F.grid_sample(obj.texture, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T
    light = np.asarray(LIGHT_DIR) / np.linalg.norm(LIGHT_DIR)
    shade = AMBIENT + DIFFUSE * np.clip(normal / np.linalg.norm(normal, axis=1, keepdims=True) @ light, 0, None)
    dist, index = cKDTree(obj.vertices.numpy()).query(vertices)
    assert dist.max() < 1e-5
    return albedo.numpy()[index] * shade[index, None]


def test_vertex_colours_match_ground_truth(cleaned):
    """Measured: mean abs error 5.7/255 over all vertices (4.4/255 over the 79% that views
    see; the rest are filled from neighbours), median 1.3/255. The residual is texture detail
    finer than a pixel at 256x192 and shading variation within a pixel."""
    out, report = cleaned
    mesh = trimesh.load(out / "mesh.ply", process=False)
    colours = np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0
    err = np.abs(colours - _expected_vertex_colours(np.asarray(mesh.vertices))) * 255.0
    assert err.mean() < 8.0 and np.median(err) < 2.5, (err.mean(), np.median(err))
    assert 0.7 < report["vertices_seen_share"] < 0.95  # the underside is never filmed


def test_hole_closing_then_decimation_without_masks(scene, tmp_path):
    gt = trimesh.load(scene / "gt_mesh.ply", process=False)
    top = np.argsort(gt.triangles_center[:, 2])[-12:]  # cut a hole in the back
    holed = trimesh.Trimesh(gt.vertices, np.delete(gt.faces, top, axis=0), process=False)
    assert not holed.is_watertight
    red = np.tile(np.array([[250, 0, 0]], np.uint8), (len(gt.vertices), 1))  # "colour network" colours
    out, report = _run(tmp_path, holed, scene, masks=False, colours=red, target_faces=2000)
    mesh = trimesh.load(out / "mesh.ply", process=False)
    assert report["holes_closed"] >= 1 and report["cull"] == "skipped: no masks"
    assert mesh.is_watertight and len(mesh.faces) <= 2000 < report["faces_before_decimation"]
    assert abs(mesh.volume / gt.volume - 1) < 0.03 and mesh.volume > 0
    # Vertices no view sees (the underside) keep the raw mesh colours; the others get the images'.
    rgb = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(int)
    is_red = (rgb == [250, 0, 0]).all(1)
    assert 0.05 < is_red.mean() < 0.3 and (mesh.vertex_normals[is_red, 2] < 0).mean() > 0.9


def test_texture_atlas(scene, tmp_path):
    pytest.importorskip("xatlas")
    gt = trimesh.load(scene / "gt_mesh.ply", process=False)
    out, report = _run(tmp_path, gt, scene, target_faces=1500, texture=True, texture_size=256)
    assert report["textured"] and set(report["files"]) == set(cleanup.PUBLISH)  # the OBJ with its mtl and png
    mesh = trimesh.load(out / "mesh.obj", process=False)
    assert mesh.visual.kind == "texture" and len(mesh.faces) == report["faces"]
    texels = mesh.visual.material.to_color(mesh.visual.uv)[:, :3] / 255.0
    plain = trimesh.load(out / "mesh.ply", process=False)
    _, index = cKDTree(plain.vertices).query(mesh.vertices)
    vertex_colours = np.asarray(plain.visual.vertex_colors)[index, :3] / 255.0
    assert np.median(np.abs(texels - vertex_colours)) < 0.05  # texture and vertex colours agree


def test_large_holes_closed_only_when_asked():
    """A sphere with a 60-degree cap and a band of faces cut away: holes far above max_hole_edges.
    The default (close_all_holes) fills them all and the mesh is watertight with about the
    sphere's volume; without it they stay open."""
    sphere = trimesh.creation.icosphere(4)
    centres = sphere.triangles_center
    cut = (centres[:, 2] > 0.5) | (np.abs(centres[:, 0]) < 0.05) & (centres[:, 2] < -0.3)
    v, f = sphere.vertices, sphere.faces[~cut]
    kept_v, kept_f, info = cleanup.repair_and_close(v, f, max_hole_edges=20)
    assert info["holes_before"] == 2 and info["holes_closed"] == 0
    assert not cleanup.topology(kept_v, kept_f)["watertight"]
    v2, f2, info = cleanup.repair_and_close(v, f, max_hole_edges=20, close_all=True)
    topo = cleanup.topology(v2, cleanup.orient_outward(v2, f2)[0])
    assert info["holes_closed"] == 2 and topo["watertight"] and topo["genus"] == 0
    cap = np.pi * 0.5 ** 2 * (3 * 1.0 - 0.5) / 3  # a flat lid at z = 0.5 cuts this cap off
    assert abs(topo["volume"] / (sphere.volume - cap) - 1) < 0.02


def test_orientation_components_topology():
    sphere = trimesh.creation.icosphere(3)
    torus = trimesh.creation.torus(1.0, 0.3).apply_translation([5.0, 0.0, 0.0])
    v = np.vstack([sphere.vertices, torus.vertices])
    f = np.vstack([sphere.faces[:, ::-1], torus.faces + len(sphere.vertices)])  # sphere inside-out
    faces, flipped = cleanup.orient_outward(v, f)
    assert flipped == 1 and trimesh.Trimesh(v, faces).volume > 0
    topo = cleanup.topology(v, faces)
    assert topo["components"] == 2 and topo["genus"] == 1 and topo["watertight"]
    tiny = trimesh.creation.icosphere(1, 0.05).apply_translation([0.0, 3.0, 0.0])
    v2, f2, removed = cleanup.remove_small_components(np.vstack([v, tiny.vertices]),
                                                      np.vstack([faces, tiny.faces + len(v)]), 0.1)
    assert removed == 1 and len(f2) == len(faces)


def test_diffuse_colours_fill_from_neighbours():
    m = trimesh.creation.icosphere(2)
    known = m.vertices[:, 2] > 0
    colours = np.where(known[:, None], [200, 10, 10], [0, 0, 0]).astype(np.uint8)
    filled = cleanup.diffuse_colours(colours, known, np.asarray(m.faces))
    assert (filled == [200, 10, 10]).all()


def test_everything_culled_is_an_error(scene, tmp_path):
    slab = _junk()[2]
    with pytest.raises(StageError, match="nothing is left of the mesh"):
        _run(tmp_path, slab, scene)


# ---------------------------------------------------------------- welded topology

def _touching_blobs(contact: str) -> trimesh.Trimesh:
    """skimage marching cubes of two blobs whose surfaces touch exactly on the grid: two spheres
    at one grid vertex, or two capped cylinders along a grid line (the SDF is exactly 0 there).
    Each sheet gets its own vertices at the contact: closed by index, not once welded. Scaled
    to about 0.6 across, centred on the origin."""
    from skimage.measure import marching_cubes

    n, c, r = 21, 10, 3.7
    g = np.mgrid[0:n, 0:n, 0:n].astype(np.float64)
    if contact == "vertex":
        sdf = [np.linalg.norm(g - np.array([c + s * r, c, c])[:, None, None, None], axis=0) - r for s in (-1, 1)]
    else:
        sdf = [np.maximum(np.hypot(g[0] - c - s * r, g[1] - c) - r, np.abs(g[2] - c) - 4.5) for s in (-1, 1)]
    vol = np.minimum(*sdf)
    vol[c, c, c] = 0.0
    if contact == "edge":
        vol[c, c, c - 4:c + 5] = 0.0
    v, f, _, _ = marching_cubes(vol, 0.0)
    return trimesh.Trimesh((v - c) * 0.03, f, process=False)


def _edge_face_counts(mesh: trimesh.Trimesh) -> np.ndarray:
    edges = np.sort(mesh.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    return np.unique(edges, axis=0, return_counts=True)[1]


def _assert_report_measured_on(info: dict, mesh: trimesh.Trimesh) -> None:
    """``cleanup.json``'s topology equals what the welded, loaded ``mesh`` shows."""
    assert mesh.is_watertight and (_edge_face_counts(mesh) == 2).all()
    assert info["watertight"] and info["manifold"] and info["non_manifold_edges"] == 0
    assert info["non_manifold_vertices"] == 0 and info["boundary_loops"] == 0
    assert len(mesh.split(only_watertight=False)) == mesh.body_count == info["components"]
    assert mesh.euler_number == info["euler_characteristic"] == 2 * info["components"] - 2 * info["genus"]
    assert len(mesh.vertices) == info["vertices"] == info["welded_vertices"] and len(mesh.faces) == info["faces"]
    assert mesh.volume == pytest.approx(info["volume"], rel=1e-6)
    measured = cleanup.topology(mesh.vertices, mesh.faces)
    assert {k: v for k, v in measured.items() if not isinstance(v, float)} == \
        {k: info[k] for k, v in measured.items() if not isinstance(v, float)}


@pytest.mark.parametrize("contact", ["edge", "vertex"])
def test_touching_blobs_are_manifold_once_welded(scene, tmp_path, contact):
    raw = _touching_blobs(contact)
    assert raw.is_watertight and (_edge_face_counts(raw) == 2).all()  # closed by index...
    welded = trimesh.Trimesh(raw.vertices, raw.faces)  # ...but trimesh's default weld merges the contact
    assert len(welded.vertices) < len(raw.vertices) and _edge_face_counts(welded).max() >= 4
    out, report = _run(tmp_path, raw, scene, masks=False)
    info = json.loads((out / "cleanup.json").read_text())
    assert report["vertices_welded"] == len(raw.vertices) - len(welded.vertices)
    assert info["components"] == 2 and info["genus"] == 0  # the contact cut out, each blob closed
    for name in ("mesh.ply", "mesh.obj"):
        mesh = trimesh.load(out / name, process=True, force="mesh")
        _assert_report_measured_on(info, mesh)
        assert abs(mesh.volume / welded.volume - 1) < 0.02  # patches over the contact, nothing lost
    assert len(trimesh.load(out / "mesh.glb", force="mesh").faces) == info["faces"]


def test_topology_is_measured_welded():
    """Two cubes sharing one corner vertex by position only: closed and two pieces by index,
    one piece with a non-manifold vertex once welded."""
    a = trimesh.creation.box()
    b = a.copy().apply_translation([1.0, 1.0, 1.0])
    v, f = np.vstack([a.vertices, b.vertices]), np.vstack([a.faces, b.faces + len(a.vertices)])
    topo = cleanup.topology(v, f)
    assert topo["watertight"] and topo["components"] == 1 and topo["non_manifold_vertices"] == 1
    assert not topo["manifold"] and topo["genus"] is None and topo["welded_vertices"] == 15
    fixed_v, fixed_f, _ = cleanup.repair_and_close(v, f, max_hole_edges=20, close_all=True)
    fixed = cleanup.topology(fixed_v, cleanup.orient_outward(fixed_v, fixed_f)[0])
    assert fixed["manifold"] and fixed["watertight"] and fixed["components"] == 2 and fixed["genus"] == 0


def test_weld_again_repairs_what_a_late_weld_breaks():
    """Vertices that come to coincide after decimation/smoothing: the last weld merges them and
    repairs the non-manifold edges that leaves."""
    import logging

    raw = _touching_blobs("edge")
    cfg = CleanupConfig()
    v, f, merged = cleanup.weld_again(np.asarray(raw.vertices), np.asarray(raw.faces), cfg, logging.getLogger("t"))
    assert merged == len(raw.vertices) - len(trimesh.Trimesh(raw.vertices, raw.faces).vertices) > 0
    topo = cleanup.topology(v, f)
    assert topo["watertight"] and topo["manifold"] and topo["components"] == 2 and topo["welded_vertices"] == len(v)
    same_v, same_f, none = cleanup.weld_again(v, f, cfg, logging.getLogger("t"))
    assert none == 0 and np.array_equal(same_f, f) and np.array_equal(same_v, v)


def test_cleaned_files_are_manifold_once_welded(cleaned):
    out, _ = cleaned
    info = json.loads((out / "cleanup.json").read_text())
    for name in ("mesh.ply", "mesh.obj"):
        _assert_report_measured_on(info, trimesh.load(out / name, process=True, force="mesh"))


def test_textured_obj_welds_to_the_cleaned_mesh(scene, tmp_path):
    """The UV'd OBJ splits vertices along seams; welded regardless of UVs and normals it is the
    same closed manifold mesh as ``mesh.ply``."""
    pytest.importorskip("xatlas")
    out, report = _run(tmp_path, _touching_blobs("edge"), scene, masks=False, texture=True, texture_size=256)
    assert report["textured"]
    info = json.loads((out / "cleanup.json").read_text())
    obj = trimesh.load(out / "mesh.obj", process=True, force="mesh")
    assert obj.visual.kind == "texture" and len(obj.vertices) > info["vertices"]
    obj.merge_vertices(merge_tex=True, merge_norm=True)
    _assert_report_measured_on(info, obj)
    ply = trimesh.load(out / "mesh.ply", process=True, force="mesh")
    assert np.allclose(np.sort(obj.vertices, axis=0), np.sort(ply.vertices, axis=0), atol=1e-7)


@pytest.mark.parametrize("axis,views", [("z", slice(None)), ("y", slice(0, 7))])  # a whole orbit, a 90 deg arc
def test_up_axis_exports_the_ground_horizontal(scene, tmp_path, axis, views):
    """The synthetic world is z up with the ground at z = 0. Moved into a random SfM frame (a
    similarity), the cameras still tell up: the exported mesh stands on height 0 with ``axis`` up."""
    from pipeline.cameras import load_transforms, save_transforms
    from stages.evaluate.scene import in_world

    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    S = np.eye(4)
    S[:3, :3], S[:3, 3] = 0.7 * q * np.sign(np.linalg.det(q)), [0.4, -1.2, 2.0]
    cams = load_transforms(scene / "transforms.json")
    cams = cams.subset(np.arange(len(cams))[views])
    cams.c2w = S @ cams.c2w
    cams.c2w[:, :3, :3] /= 0.7
    sfm = tmp_path / "sfm"
    sfm.mkdir()
    save_transforms(sfm / "transforms.json", cams)
    gt = trimesh.load(scene / "gt_mesh.ply", process=False)
    moved = gt.copy().apply_transform(S)
    out, report = _run(tmp_path, moved, sfm, masks=False, cull=False, colour=False, up_axis=axis)
    exported = trimesh.load(out / "mesh.ply", process=False).vertices
    up = np.eye(3)["xyz".index(axis)]
    M = np.asarray(report["upright"]["export_from_world"]) @ S  # GT world -> exported
    assert np.degrees(np.arccos(np.clip(M[:3, :3] @ [0, 0, 1] / 0.7 @ up, -1, 1))) < 0.01
    height = exported @ up
    assert height.min() == pytest.approx(0, abs=1e-9)
    ground = gt.vertices[:, 2] < 1e-3  # the GT mesh rests on z = 0: all of that is at height 0 now
    assert ground.any() and np.abs(trimesh.transform_points(gt.vertices[ground], M) @ up).max() < 1e-3
    footprint = exported - np.outer(height, up)
    assert np.allclose(0.5 * (footprint.min(0) + footprint.max(0)), 0, atol=1e-9)
    back = in_world(exported, out)  # what evaluate compares with the cameras
    assert cKDTree(moved.vertices).query(back)[0].max() < 1e-6
    for name in ("mesh.obj", "mesh.glb"):  # every exported file is turned alike
        bounds = trimesh.load(out / name, force="mesh", process=False).bounds
        assert np.allclose(bounds, [exported.min(0), exported.max(0)], atol=1e-6)


def _scene_mode_inputs(tmp_path: Path, scene: Path, fallback: bool) -> tuple[dict, dict]:
    """sfm_points/ (points on the ground disc and on the object, the GT sphere) and a masks/
    folder without masks whose masks.json says whether the masks stage fell back to scene mode."""
    gt = json.loads((scene / "gt.json").read_text())
    rng = np.random.default_rng(0)
    ring = rng.uniform(0, 2 * np.pi, 3000), 1.2 * gt["sphere_radius"] * np.sqrt(rng.uniform(0, 1, 3000))
    ground = np.stack([ring[1] * np.cos(ring[0]), ring[1] * np.sin(ring[0]), np.zeros(3000)], 1)
    obj = trimesh.load(scene / "gt_mesh.ply", process=False).sample(1500, seed=0)
    sfm_points, masks = tmp_path / "sfm_points", tmp_path / "masks"
    sfm_points.mkdir()
    masks.mkdir()
    np.save(sfm_points / "points.npy", np.concatenate([ground, obj]).astype(np.float32))
    (sfm_points / "scene.json").write_text(json.dumps({"sphere_center": gt["sphere_center"],
                                                       "sphere_radius": 1.3 * gt["sphere_radius"]}))
    summary = {"method": "none", **({"fallback": {"from": "grabcut", "reason": "test"}} if fallback else {})}
    (masks / "masks.json").write_text(json.dumps(summary))
    return {"sfm_points": sfm_points, "masks": masks}, gt


@pytest.mark.parametrize("fallback", [True, False])
def test_scene_mode_fallback_cuts_the_object_out(scene, tmp_path, fallback):
    """A scene-mode mesh (the object, the ground slab it stands on, a floater near the sphere's
    edge): after a masks fallback the object alone is kept, closed at the cut; after an asked-for
    scene mode (masks.method=none) the ground stays."""
    gt_mesh = trimesh.load(scene / "gt_mesh.ply", process=False)
    ground = trimesh.creation.box([1.6, 1.6, 0.1]).apply_translation([0, 0, -0.045])  # top 5 mm above z = 0
    floater = trimesh.creation.icosphere(2, 0.04).apply_translation([0.4, 0.3, 0.15])
    parts = [trimesh.Trimesh(*trimesh.remesh.subdivide_to_size(p.vertices, p.faces, 0.03)) for p in (ground, floater)]
    inputs, gt = _scene_mode_inputs(tmp_path, scene, fallback)
    mesh_dir, out = tmp_path / "mesh", tmp_path / "cleanup"
    mesh_dir.mkdir()
    out.mkdir()
    raw = trimesh.util.concatenate([gt_mesh, *parts])
    write_ply(mesh_dir / "mesh_raw.ply", np.asarray(raw.vertices), np.asarray(raw.faces))
    report = cleanup.run({"mesh": mesh_dir, "sfm": scene, **inputs}, CleanupConfig(), out,
                         Context(scene="t", progress=False))
    mesh = trimesh.load(out / "mesh.ply", process=False)
    if not fallback:
        assert report["isolated"] is None and mesh.bounds[1][0] > 0.75  # the ground is kept
        return
    info = report["isolated"]
    assert info["method"] == "support_plane" and info["pieces_kept"] == 1 and info["faces_below_plane"] > 1000
    assert abs(abs(info["plane"][2]) - 1) < 1e-3 and abs(info["plane"][3]) < 0.01  # z = 0 found in the points
    assert mesh.is_watertight and report["components"] == 1
    cut_z = mesh.vertices[:, 2].min()
    assert 0.0 < cut_z < 0.02 * 1.3 * gt["sphere_radius"] + 0.01
    lo, hi = np.asarray(gt["object_bounds"])
    assert (mesh.vertices[:, :2] >= lo[:2] - 0.01).all() and (mesh.vertices[:, :2] <= hi[:2] + 0.01).all()
    dist, _ = cKDTree(gt_mesh.vertices).query(mesh.vertices)
    assert dist.max() < 1e-6  # nothing of the ground or the floater; the cap closes the cut without new vertices
    assert 0.97 < mesh.volume / gt_mesh.volume < 1.0  # only the soles of the feet are cut


def test_isolate_cut_fails_in_one_line_when_nothing_stands_near_the_centre():
    from stages.cleanup import isolate

    ground = trimesh.creation.box([2.0, 2.0, 0.1]).apply_translation([0, 0, -0.05])
    far = trimesh.creation.icosphere(2, 0.1).apply_translation([0.9, 0.0, 0.3])  # above the plane, off centre
    mesh = trimesh.util.concatenate([ground, far])
    plane = (np.array([0.0, 0.0, 1.0]), 0.0)
    keep, info = isolate.cut(np.asarray(mesh.vertices), np.asarray(mesh.faces), plane, [0.9, 0, 0.3], 1.0)
    assert keep.sum() == len(far.faces) and info["pieces_kept"] == 1
    with pytest.raises(StageError, match=r"^cleanup: no surface within 0.5 sphere radii") as err:
        isolate.cut(np.asarray(mesh.vertices), np.asarray(mesh.faces), plane, [0, 0, 0.3], 1.0)
    assert "\n" not in str(err.value)
    assert isolate.wanted("fallback", False, None) is False and isolate.wanted("always", False, None) is True
    assert isolate.wanted("always", True, None) is False and isolate.wanted("never", False, None) is False
