"""Hostile inputs, second round (frames stage and dataset importers): each case a user reproduced
ends in one clear line naming the file, a non-zero exit and an untouched workdir, or, where the
input is legitimate, is read right (16-bit and float images, a video with a damaged packet, a
second path to a folder). Bombs (images, .npz members) are refused on their headers, in little memory.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, panning_frames, run_cli, write_video
from pipeline import store
from pipeline.cameras import Cameras, look_at, save_neus_npz
from pipeline.errors import InputError
from test_frames import run_stage
from test_hostile import first_error, neuralangelo, photos, seed_wd, snapshot, wd  # noqa: F401 (fixtures)

W, H = 64, 48


# ---------------------------------------------------------------- inputs made in the test

def neus_scene(root: Path, grey16: bool = False) -> Path:
    """A 3-view NeuS scene: image/00000i.png, mask/00i.png (a box), cameras_sphere.npz.

    ``grey16``: 16-bit grey images (image 0 all 0x8000, the others a texture * 257) and masks."""
    (root / "image").mkdir(parents=True)
    (root / "mask").mkdir()
    views = panning_frames(n=3, w=W, h=H)
    for i, img in enumerate(views):
        mask = np.zeros((H, W), np.uint16 if grey16 else np.uint8)
        mask[8:40, 16:48] = 65535 if grey16 else 255
        if grey16:
            img = np.full((H, W), 0x8000, np.uint16) if i == 0 else img[..., 0].astype(np.uint16) * 257
        Image.fromarray(img).save(root / "image" / f"{i:06d}.png")
        Image.fromarray(mask).save(root / "mask" / f"{i:03d}.png")
    c2w = np.stack([look_at(np.array([np.sin(a), 0.2, -np.cos(a)]) * 3, np.zeros(3), np.array([0, -1.0, 0]))
                    for a in (0.0, 0.3, 0.6)])
    K = np.tile(np.array([[60.0, 0, W / 2], [0, 60, H / 2], [0, 0, 1]]), (3, 1, 1))
    save_neus_npz(root / "cameras_sphere.npz", Cameras([f"{i:06d}.png" for i in range(3)], K, c2w, W, H), np.eye(4))
    return root


def rewrite_npz(path: Path, bomb: tuple | None = None, **arrays) -> None:
    """Replace arrays of an .npz; ``bomb`` = (key, shape, dtype, bytes of zeros to deflate after the header)."""
    merged = {**dict(np.load(path)), **arrays}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, arr in merged.items():
            if bomb and key == bomb[0]:
                continue
            with archive.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(arr))
        if bomb:
            key, shape, dtype, size = bomb
            with archive.open(f"{key}.npy", "w", force_zip64=True) as f:
                header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(f, header)
                block = bytes(1 << 24)
                for start in range(0, size, len(block)):
                    f.write(block[:size - start])


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grey16_png_of_zeros(path: Path, side: int, rows: int | None = None) -> Path:
    """A valid side x side 16-bit grey PNG of zeros (deflated to ~side^2 / 500 bytes); ``rows``
    cuts its pixel data short (a header that lies about the rest)."""
    comp, row, rows = zlib.compressobj(9), bytes(1 + 2 * side), rows or side
    body = b"".join(comp.compress(row * min(500, rows - r)) for r in range(0, rows, 500)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) +
                     png_chunk(b"IEND", b""))
    return path


def blender_scene(root: Path, edit) -> Path:
    """test_hostile's 3-view scene, read as NeRF-synthetic (camera_angle_x instead of fl_x)."""
    def spoil(d):
        d.pop("fl_x"), d.pop("fl_y")
        edit(d)
    return neuralangelo(root, lambda d: (d.update(camera_angle_x=0.9), spoil(d)))


def case_inputs(case: str, tmp: Path) -> tuple[list[str], str]:
    """(CLI input arguments, regex of the first error line) of one case; all exit 1 in the frames stage."""
    neus = ["--format", "neus"]
    if case in ("world_mat_1d", "world_mat_strings", "scale_mat_1d"):
        root = neus_scene(tmp / "dtu")
        bad = {"world_mat_1d": {"world_mat_1": np.arange(16.0)}, "scale_mat_1d": {"scale_mat_0": np.ones(4)},
               "world_mat_strings": {"world_mat_0": np.array([["a"] * 4] * 4)}}[case]
        rewrite_npz(root / "cameras_sphere.npz", **bad)
        return ["--dataset", str(root), *neus], {
            "world_mat_1d": r"cameras_sphere\.npz: world_mat_1 has shape \(16,\), expected 4x4",
            "scale_mat_1d": r"cameras_sphere\.npz: scale_mat_0 has shape \(4,\), expected 4x4",
            "world_mat_strings": r"cameras_sphere\.npz: world_mat_0 is not numeric \(dtype <U1\)"}[case]
    if case == "mask_is_html":
        root = neus_scene(tmp / "dtu")
        (root / "mask" / "001.png").write_text("<!DOCTYPE html><html><body>Not found</body></html>\n")
        return ["--dataset", str(root), *neus], r"dtu/mask/001\.png: mask is not a readable image \(cannot identify"
    if case == "dataset_png_bomb":
        root = neus_scene(tmp / "dtu")
        grey16_png_of_zeros(root / "image" / "000001.png", 15000, rows=10)
        return ["--dataset", str(root), *neus], \
            r"image/000001\.png: image is a 15000x15000 16-bit PNG, too large to decode in memory \(429 MB"
    if case == "camera_angle_x_zero":
        root = blender_scene(tmp / "nerf", lambda d: d.update(camera_angle_x=0))
        return ["--dataset", str(root), "--format", "blender"], \
            r"nerf/transforms\.json: camera_angle_x is 0; expected the field of view in radians"
    if case == "json_nested_deep":
        root = blender_scene(tmp / "nerf", lambda d: None)
        (root / "transforms.json").write_text('{"frames": ' + "[" * 100000 + "]" * 100000 + "}")
        return ["--dataset", str(root), "--format", "blender"], \
            r"nerf/transforms\.json: not valid JSON \(nested too deeply\)$"
    if case == "image_links_outside":
        root = neuralangelo(tmp / "scene")
        shutil.move(root / "images" / "1.png", tmp / "outside.png")
        (root / "images" / "1.png").symlink_to(tmp / "outside.png")
        return ["--dataset", str(root), "--format", "neuralangelo"], \
            r"scene/images/1\.png: a symbolic link to .*/outside\.png, outside the dataset folder .*scene; copy"
    if case == "float_tiff_nan":
        folder = float_tiffs(tmp / "shots")
        arr = np.asarray(Image.open(folder / "p1.tif")).copy()
        arr[3, 5] = np.nan
        Image.fromarray(arr).save(folder / "p1.tif")
        return ["--images", str(folder)], r"shots/p1\.tif: float image holds NaN or infinite values"
    assert case == "repeated_photos"
    folder = tmp / "shots"
    folder.mkdir()
    two = panning_frames(n=2, w=160, h=120, seed=4)
    for i in range(60):  # a burst copied 30 times: A B A B ...
        Image.fromarray(two[i % 2]).save(folder / f"img{i:02d}.jpg", quality=95)
    return ["--images", str(folder)], r"shots: fewer than 3 distinct photos \(2 distinct of 60; the others"


def float_tiffs(folder: Path, n: int = 3) -> Path:
    """float32 grey TIFFs with values in 0..1 (a panning texture / 255)."""
    folder.mkdir(parents=True)
    for i, img in enumerate(panning_frames(n=n, w=160, h=120, seed=6)):
        Image.fromarray(img[..., 1].astype(np.float32) / 255.0).save(folder / f"p{i}.tif")
    return folder


CASES = ["world_mat_1d", "world_mat_strings", "scale_mat_1d", "mask_is_html", "dataset_png_bomb",
         "camera_angle_x_zero", "json_nested_deep", "image_links_outside", "float_tiff_nan", "repeated_photos"]


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_fails_in_one_line_and_keeps_the_workdir(case, wd, tmp_path):
    args, pattern = case_inputs(case, tmp_path)
    before = snapshot(wd)
    result = run_cli("run", *args, "--workdir", str(wd), "--until", "frames", "--scene", "clip",
                     "--preset", "fast_cpu", "--no-progress")
    assert result.returncode == 1, result.stderr
    line = first_error(result.stderr)
    assert line.startswith("FAILED scene 'clip', stage 'frames': ") and re.search(pattern, line), line
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert snapshot(wd) == before and not list(wd.glob("clip/*.partial"))
    assert len(list(wd.glob("*/*/manifest.json"))) == 1


# ---------------------------------------------------------------- bombs, in little memory

MEASURE = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
           " print(json.dumps([r.returncode, r.stderr, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))")


def run_measured(*args: str) -> tuple[int, str, int]:
    """(exit code, stderr, peak resident kB of the run's processes) of a frames-only CLI run."""
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "run", *args, "--until", "frames", "--preset",
           "fast_cpu", "--no-progress"]
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=300)
    rc, stderr, peak_kb = json.loads(out.stdout)
    return rc, stderr, peak_kb


PEAK_KB = 250_000  # the bombs below take 1.2 GB (npz) to 2.9 GB (16-bit PNG) when decoded


def test_16bit_png_bomb_is_skipped_on_its_header(tmp_path):
    folder = photos(tmp_path / "shots", n=3)
    grey16_png_of_zeros(folder / "bomb.png", 15000)  # 437 kB, 429 MB of samples
    rc, stderr, peak_kb = run_measured("--images", str(folder), "--workdir", str(tmp_path / "wd"))
    assert rc == 0, stderr
    assert "skipped bomb.png: 15000x15000 16-bit PNG is too large to decode in memory (429 MB decoded" in stderr
    assert peak_kb < PEAK_KB, f"peak {peak_kb >> 10} MB"
    (frames_dir,) = (tmp_path / "wd" / "shots").glob("frames-*")
    assert json.loads((frames_dir / "frames.json").read_text())["num_source_frames"] == 4


@pytest.mark.parametrize("bomb,message", [
    (("world_mat_0", (12000, 12000), "u1", 12000 * 12000), r"world_mat_0 has shape \(12000, 12000\), expected 4x4"),
    (("world_mat_2", (10**6, 10**6), "<f8", 0), r"world_mat_2 has shape \(1000000, 1000000\), expected 4x4")])
def test_npz_bomb_is_refused_on_its_header(tmp_path, bomb, message):
    root = neus_scene(tmp_path / "dtu")
    rewrite_npz(root / "cameras_sphere.npz", bomb=bomb)
    assert (root / "cameras_sphere.npz").stat().st_size < 400_000
    rc, stderr, peak_kb = run_measured("--dataset", str(root), "--format", "neus", "--workdir", str(tmp_path / "wd"))
    assert rc == 1, stderr
    assert re.search(r"stage 'frames': .*dtu/cameras_sphere\.npz: " + message, first_error(stderr)), stderr
    assert "Traceback" not in stderr and "MemoryError" not in stderr
    assert peak_kb < PEAK_KB, f"peak {peak_kb >> 10} MB"
    assert not list((tmp_path / "wd" / "dtu").glob("frames-*"))


# ---------------------------------------------------------------- legitimate inputs, read right

def test_neus_16bit_images_and_masks_import_right(tmp_path):
    from stages.frames import importers
    from test_importers import ctx

    root = neus_scene(tmp_path / "dtu", grey16=True)
    out = tmp_path / "frames"
    out.mkdir()
    summary = importers.run("neus", root, out, ctx())
    assert summary["num_frames"] == 3 and summary["masks"] == 3
    first = np.asarray(Image.open(out / "images" / "000000.png").convert("L"))
    assert np.all(first == 128)  # 0x8000 of 0xffff, not clipped to white
    textured = np.asarray(Image.open(out / "images" / "000001.png").convert("L")).astype(int)
    assert np.array_equal(textured, panning_frames(n=3, w=W, h=H)[1][..., 0])
    mask = np.asarray(Image.open(out / "masks" / "000002.png"))
    assert mask[20, 30] == 255 and mask[2, 2] == 0 and mask.sum() == 255 * 32 * 32


def test_float_tiff_photos_are_read_right(tmp_path):
    folder = float_tiffs(tmp_path / "shots")
    summary, meta = run_stage(tmp_path, "images", folder)
    assert summary["num_frames"] == 3
    got = np.asarray(Image.open(tmp_path / "out" / meta["frames"][2]["file"]).convert("L")).astype(float)
    want = panning_frames(n=3, w=160, h=120, seed=6)[2][..., 1]
    assert abs(got.mean() - want.mean()) < 1.0 and np.abs(got - want).mean() < 4  # JPEG, not black


@pytest.mark.parametrize("mode,values,expect", [
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]), ("F", [-0.005, 1.004], [0, 255]),
    ("I;16", [0, 0x8000, 0xFFFF], [0, 128, 255]), ("I", [0, 257, 65535], [0, 1, 255]),
    ("F", [0.0, 255.0], "float image with values 0..255; only floats in 0..1"),
    ("F", [0.2, float("inf")], "float image holds NaN or infinite values"),
    ("I", [0, 70000], "32-bit integer image with values 0..70000; expected 0..65535")])
def test_to_8bit_scales_or_refuses(mode, values, expect):
    from pipeline.images import to_8bit

    dtype = {"F": np.float32, "I;16": np.uint16, "I": np.int32}[mode]
    im = Image.fromarray(np.array([values], dtype))
    assert im.mode == mode
    if isinstance(expect, str):
        with pytest.raises(InputError, match=re.escape(f"x.tif: {expect}")):
            to_8bit(im, Path("x.tif"))
    else:
        assert np.asarray(to_8bit(im, Path("x.tif"))).tolist() == [expect]


def test_video_with_garbage_in_the_middle_keeps_its_frames(tmp_path, caplog):
    video = write_video(tmp_path / "clip.mp4", panning_frames(n=40))
    data = bytearray(video.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 2048] = np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    (tmp_path / "bad.mp4").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="test_frames"):
        summary, _ = run_stage(tmp_path, "video", tmp_path / "bad.mp4", target_count=40)
    assert summary["num_frames"] >= 30, caplog.text  # one bad packet used to end the video (13 of 40)
    assert re.search(r"bad\.mp4: skipped \d+ damaged packets that failed to decode", caplog.text), caplog.text


def test_repeated_photos_are_dropped_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "shots"
    folder.mkdir()
    views = panning_frames(n=4, w=160, h=120, seed=7)
    for name, k in [("a", 0), ("b", 1), ("c", 2), ("d", 0), ("e", 3), ("f", 1)]:
        Image.fromarray(views[k]).save(folder / f"{name}.jpg", quality=95)
    with caplog.at_level(logging.WARNING, logger="test_frames"):
        summary, meta = run_stage(tmp_path, "images", folder)
    assert [f["source_file"] for f in meta["frames"]] == ["a.jpg", "b.jpg", "c.jpg", "e.jpg"]
    assert "dropped 2 photos that repeat an earlier one (frames.dedup_threshold=0.01): d.jpg (= a.jpg), " \
           "f.jpg (= b.jpg)" in caplog.text


# ---------------------------------------------------------------- symbolic links and the fingerprint

def test_fingerprint_and_copies_leave_out_links_out_of_the_input(tmp_path, caplog):
    from stages.frames.images import copy_ground_truth

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(b"x" * 1000)
    plain = photos(tmp_path / "plain", n=2)
    folder = tmp_path / "shots"
    shutil.copytree(plain, folder)
    (folder / "cache").symlink_to(outside)
    (folder / "o.jpg").symlink_to(outside / "big.bin")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        print_before = store.fingerprint_path(folder)
    assert print_before == store.fingerprint_path(plain)  # only what the stages read
    assert "not reading 2 symbolic links pointing outside it or nowhere: cache, o.jpg" in caplog.text
    (outside / "big.bin").write_bytes(b"y" * 1000)
    assert store.fingerprint_path(folder) == print_before
    copy_ground_truth(folder, tmp_path / "copy")  # copies what the fingerprint covers, no more
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["p0.jpg", "p1.jpg"]


def test_second_path_to_a_folder_is_read_once_and_a_loop_still_refused(tmp_path):
    folder = photos(tmp_path / "shots", n=3)
    shutil.move(photos(tmp_path / "raw", n=2), folder / "raw")
    (folder / "latest").symlink_to("raw")  # a sibling link: not a loop
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain, ignore=lambda d, names: ["latest"])
    assert store.fingerprint_path(folder) == store.fingerprint_path(plain)  # raw/ counted once
    wd = tmp_path / "wd"
    result = run_cli("run", "--images", str(folder), "--workdir", str(wd), "--until", "frames", "--preset",
                     "fast_cpu", "--no-progress")
    assert result.returncode == 0, result.stderr  # was refused as a "symbolic link loop"
    assert re.search(r"shots: a symbolic link to folders inside it, whose files are read once under their real "
                     r"paths: latest$", result.stderr, re.M), result.stderr
    (frames_dir,) = (wd / "shots").glob("frames-*")
    assert json.loads((frames_dir / "frames.json").read_text())["num_source_frames"] == 3
    (folder / "raw" / "up").symlink_to("..")  # a link to an ancestor is a loop
    with pytest.raises(InputError, match=r"shots/raw/up: symbolic link loop inside .*shots$"):
        store.fingerprint_path(folder)
