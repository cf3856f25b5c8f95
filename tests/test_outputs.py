"""What a run leaves for other tools and for the people who share a workdir: transforms.json files
that load the way nerfstudio and instant-ngp load them, the scene's textured mesh.obj with its
mtl and texture, 0644 file modes, a stage.log in every stage folder (also in the partial folder of
a failed stage), and manifests that record the versions the stage ran with.

One tiny run through every stage (the fault harness's 16-photo spot scene, shared with
test_faults and test_concurrent_runs, with a texture baked) serves the tests of this module."""
from __future__ import annotations

import html
import importlib.util
import json
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from pipeline import store
from pipeline.cameras import NGP_SCALE, Cameras, aabb_scale, frame_paths
from pipeline.dag import STAGES
from pipeline.version import version

import faults  # noqa: E402

SETTINGS = faults.TINY + [f"--set={kv}" for kv in (
    "train.iterations=30", "mesh.resolution=32", "mesh.block_res=16", "cleanup.texture=true",
    "cleanup.texture_size=128")]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The scene folder and the finished stage folders of one run through evaluate."""
    setup = faults.make_scene(tmp_path_factory.getbasetemp() / "faults_scene")
    setup.until, setup.settings = "evaluate", SETTINGS
    wd = tmp_path_factory.mktemp("outputs")
    log = wd.parent / f"{wd.name}.log"
    no_models = tmp_path_factory.mktemp("rembg_home")  # auto finds no rembg model: GrabCut masks
    proc = faults.start(setup, wd, log, env={"U2NET_HOME": str(no_models)})
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    keys = faults.scene_keys(wd)
    return {"scene": store.scene_dir(wd, faults.SCENE), "log": log, "rembg_home": no_models,
            "dirs": {stage: store.stage_dir(wd, faults.SCENE, stage, key) for stage, key in keys.items()}}


def nerfstudio_frames(path: Path) -> list[dict]:
    """The frames of a transforms.json as nerfstudio's dataparser resolves them: every path
    relative to the file's folder (``data_dir / file_path``)."""
    data = json.loads(path.read_text())
    out = []
    for frame in data["frames"]:
        item = {"image": path.parent / frame["file_path"], "c2w": np.asarray(frame["transform_matrix"])}
        if "mask_path" in frame:
            item["mask"] = path.parent / frame["mask_path"]
        out.append(item)
    return out


@pytest.mark.parametrize("stage", ["sfm", "sfm_points"])
def test_transforms_json_loads_like_nerfstudio_and_instant_ngp(run, stage):
    path = run["dirs"][stage] / "transforms.json"
    data = json.loads(path.read_text())
    scale = data["aabb_scale"]
    assert isinstance(scale, int) and 1 <= scale <= 128 and scale & (scale - 1) == 0
    frames = nerfstudio_frames(path)
    assert len(frames) == 16
    for frame in frames:
        with Image.open(frame["image"]) as img:
            assert img.size == (data["w"], data["h"])
        assert frame["c2w"].shape == (4, 4)
    masks = [f["mask"] for f in frames if "mask" in f]
    if stage == "sfm":
        assert masks == []  # photos bring no masks; the masks stage runs after sfm
        return
    assert len(masks) == len(frames)  # the masks stage's masks, one a frame
    for frame in frames:
        with Image.open(frame["mask"]) as mask:
            assert mask.mode == "L" and mask.size == (data["w"], data["h"])
        assert frame["mask"].stem == frame["image"].stem
    # instant-ngp maps units x NGP_SCALE about its cube's centre: the object sphere is inside the box
    center, radius = np.asarray(data["sphere_center"]), data["sphere_radius"]
    assert 2 * NGP_SCALE * (np.abs(center).max() + radius) <= scale


def test_aabb_scale_and_frame_paths(tmp_path):
    assert aabb_scale([0, 0, 0], 1.0) == 1  # 0.66 wide
    assert aabb_scale([2.0, -3.0, 0.5], 1.0) == 4  # 2 x 0.33 x 4 = 2.64 -> 4
    assert aabb_scale([0, 0, 0], 1e6) == 128 and aabb_scale([0, 0, 0], 1e-9) == 1
    cams = Cameras(["images/a.jpg", "images/b.jpg"], np.stack([np.eye(3)] * 2), np.stack([np.eye(4)] * 2), 4, 3)
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"")
    images, masks = frame_paths(cams, tmp_path / "sfm-1", tmp_path / "sfm_points-2", tmp_path / "masks")
    assert images == ["../sfm-1/images/a.jpg", "../sfm-1/images/b.jpg"] and masks == ["../masks/a.png", None]


def test_scene_mesh_obj_comes_with_its_mtl_and_texture(run):
    import trimesh

    scene = run["scene"]
    obj = (scene / "mesh.obj").read_text()
    assert "mtllib mesh.mtl" in obj.splitlines()
    mtl = (scene / "mesh.mtl").read_text().splitlines()
    assert "map_Kd mesh_texture.png" in mtl and "Kd 1.00000000 1.00000000 1.00000000" in mtl
    for name in ("mesh.mtl", "mesh_texture.png"):
        assert (scene / name).read_bytes() == (run["dirs"]["cleanup"] / name).read_bytes()
    mesh = trimesh.load(scene / "mesh.obj", force="mesh")
    assert mesh.visual.kind == "texture" and mesh.visual.material.image.size == (128, 128)
    assert mesh.visual.uv is not None and len(mesh.faces) > 1000
    glb = trimesh.load(scene / "mesh.glb", force="mesh")
    assert glb.visual.kind == "texture" and list(glb.visual.material.baseColorFactor) == [255] * 4  # not darkened


def test_shared_workdir_file_modes(run):
    dirs = run["dirs"]
    named = [dirs["train"] / "model.pt", next((dirs["train"] / "checkpoints").glob("step_*.pt")),
             dirs["mesh"] / "mesh_raw.ply", dirs["cleanup"] / "mesh.ply", run["scene"] / "mesh.ply"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in named} == {p.name: 0o644 for p in named}
    files = [p for d in [run["scene"], *dirs.values()] for p in d.rglob("*") if p.is_file()]
    unreadable = [str(p) for p in files if stat.S_IMODE(p.stat().st_mode) & 0o044 != 0o044]
    assert len(files) > 50 and unreadable == []  # nothing left private to its writer (mkstemp's 0600)


def test_every_stage_folder_has_its_log(run):
    assert list(run["dirs"]) == list(STAGES)
    for stage, folder in run["dirs"].items():
        lines = (folder / "stage.log").read_text().splitlines()
        assert f" INFO {stage} of scene 'spot' in {folder.name}.partial: started (pid " in lines[0], lines
        assert lines[-1].endswith(f" INFO {stage}: finished"), lines
        assert "stage.log" in store.load_manifest(folder)["files"]
    train = (run["dirs"]["train"] / "stage.log").read_text()  # --no-progress: a line every log_every (10) steps
    assert [int(line.split("step ")[1].split("/")[0]) for line in train.splitlines() if " train: step " in line] \
        == [10, 20, 30]
    assert "sfm: extract done" in (run["dirs"]["sfm"] / "stage.log").read_text()


def test_failed_stage_keeps_its_log_in_the_partial_folder(tiny_video, tmp_path):
    result = run_cli("run", "--video", str(tiny_video), "--workdir", str(tmp_path), "--until", "frames",
                     "--preset", "fast_cpu", "--no-progress", env={"PIPELINE_FAIL_STAGE": "frames"})
    assert result.returncode == 1
    (partial,) = tmp_path.glob("clip/frames-*.partial")
    lines = (partial / "stage.log").read_text().splitlines()
    assert "frames of scene 'clip'" in lines[0] and lines[-1].endswith(
        " ERROR failed: internal error: RuntimeError: injected failure in stage frames (PIPELINE_FAIL_STAGE)")
    assert " failed: " not in result.stderr  # the log file's own line: the CLI says it its way


def test_manifests_record_the_versions_of_the_stage_process(run):
    wanted = {"python", "meshpipe", "torch", "numpy", "scipy", "pycolmap", "luigi", "trimesh", "pymeshlab",
              "opencv", "av", "pillow"} | ({"rembg"} if importlib.util.find_spec("rembg") else set())
    project = version()  # this checkout's, as the stage processes saw it
    for stage, folder in run["dirs"].items():
        versions = store.load_manifest(folder)["versions"]
        assert wanted <= set(versions), (stage, sorted(wanted - set(versions)))
        assert versions["meshpipe"] == project and not (folder / store.VERSIONS).exists()
    assert "torch_cuda" in store.load_manifest(run["dirs"]["train"])["versions"]  # torch was loaded there


def test_publish_drops_a_stale_texture_copy(tmp_path):
    """A rerun without a texture: the scene folder must not keep the last run's mtl and png."""
    from tasks.build import publish

    key = "0" * store.KEY_LEN
    folder = store.stage_dir(tmp_path, "s", "cleanup", key)
    folder.mkdir(parents=True)
    for name in ("mesh.ply", "mesh.obj", "mesh.glb"):
        (folder / name).write_text(name)
    store.write_manifest(folder, "cleanup", key, {}, {}, 0.0)
    scene = store.scene_dir(tmp_path, "s")
    for name in ("mesh.mtl", "mesh_texture.png"):
        (scene / name).write_text("from an earlier run")
    assert publish(tmp_path, {"scene": "s", "keys": {"cleanup": key}}) == ["mesh.ply", "mesh.obj", "mesh.glb"]
    assert sorted(p.name for p in scene.iterdir()) == ["cleanup-" + key, "mesh.glb", "mesh.obj", "mesh.ply"]


def test_done_line_and_report_name_the_masks_fallback(run):
    expected = f"masks: no rembg model on disk ({run['rembg_home']}/models/"
    done = [line for line in run["log"].read_text().splitlines() if line.startswith("done: scene 'spot'")]
    assert len(done) == 1 and "; with fallbacks: " + expected in done[0], done
    summary = store.load_manifest(run["dirs"]["masks"])["summary"]
    assert summary["method"] == "grabcut" and summary["requested"] == "auto"
    assert summary["fallbacks"][0].startswith(expected[len("masks: "):])
    report = (run["scene"] / "report.html").read_text()
    assert "<h2>Fallbacks</h2>" in report and html.escape(expected) in report
