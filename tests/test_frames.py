"""Tests of stage 1 (frames) on tiny videos and photo folders made inside each test."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import FramesConfig
from pipeline.dag import Context, Source
from pipeline.errors import InputError
from stages import frames

W, H = 160, 120


def texture(seed: int = 0, w: int = W + 200, h: int = H + 200) -> np.ndarray:
    """A smooth random colour texture (features a few pixels wide)."""
    import cv2

    rng = np.random.default_rng(seed)
    small = (rng.random((h // 4, w // 4, 3)) * 255).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def view(base: np.ndarray, shift: int) -> np.ndarray:
    """A W x H crop of ``base`` moved ``shift`` pixels right and down (a moving camera)."""
    return np.ascontiguousarray(base[shift:shift + H, shift:shift + W])


def blur(img: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(img, (0, 0), 2.5)


def write_video(path: Path, images: list[np.ndarray], fps: int = 10, rotation: int = 0,
                options: dict | None = None) -> Path:
    import av

    with av.open(str(path), "w", options=options or {}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = images[0].shape[1], images[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "12"}
        if rotation:
            stream.set_display_rotation(rotation)
        for img in images:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    return path


def write_photo(path: Path, img: np.ndarray, orientation: int = 0) -> Path:
    from PIL import Image

    im = Image.fromarray(img)
    exif = im.getexif()
    if orientation:
        exif[0x0112] = orientation
    im.save(path, quality=95, exif=exif)
    return path


def moving_clip(path: Path, n: int, step: int = 3, seed: int = 0) -> Path:
    base = texture(seed, W + step * n + 8, H + step * n + 8)
    return write_video(path, [view(base, i * step) for i in range(n)])


def run_stage(tmp_path: Path, kind: str, src: Path, gt: str = "", **cfg) -> tuple[dict, dict]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    ctx = Context(scene="t", progress=False, source=Source(kind=kind, path=str(src), gt=gt),
                  log=logging.getLogger("test_frames"))
    summary = frames.run({}, FramesConfig(**cfg), out, ctx)
    meta = json.loads((out / "frames.json").read_text())
    return summary, meta


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


# --------------------------------------------------------------------------- video


def test_picks_the_sharp_frame_of_each_window(tmp_path):
    rng = np.random.default_rng(1)
    base = texture(1, W + 200, H + 200)
    images, sharp = [], []
    for w in range(12):
        pos = int(rng.integers(5))
        sharp.append(5 * w + pos)
        img = view(base, 6 * w)
        images += [img if k == pos else blur(img) for k in range(5)]
    src = write_video(tmp_path / "clip.mp4", images)
    summary, meta = run_stage(tmp_path, "video", src, target_count=12)
    assert [f["source_index"] for f in meta["frames"]] == sharp
    assert summary["num_frames"] == 12 and summary["source_kind"] == "video"
    from PIL import Image
    for f in meta["frames"]:  # the written pixels are those of the chosen (sharp) frame
        out = np.asarray(Image.open(tmp_path / "out" / f["file"])).astype(np.float32)
        src = images[f["source_index"]]
        assert np.abs(out - src).mean() < 0.5 * np.abs(out - blur(src)).mean()


def test_target_count_even_spread_and_metadata(tmp_path):
    src = moving_clip(tmp_path / "clip.mp4", 60)
    summary, meta = run_stage(tmp_path, "video", src, target_count=12)
    idx = [f["source_index"] for f in meta["frames"]]
    assert len(idx) == 12 and all(5 * k <= i < 5 * k + 5 for k, i in enumerate(idx))
    assert meta["num_source_frames"] == 60 and meta["fps"] == pytest.approx(10.0)
    assert (meta["width"], meta["height"]) == (W, H)
    for k, f in enumerate(meta["frames"]):
        assert f["file"] == f"images/{k:06d}.jpg"
        assert f["timestamp"] == pytest.approx(f["source_index"] / 10.0, abs=1e-3)
        assert (tmp_path / "out" / f["file"]).is_file()
    assert summary["seconds"] >= 0


def test_short_video_keeps_all_frames(tmp_path):
    src = moving_clip(tmp_path / "clip.mp4", 8, step=6)
    _, meta = run_stage(tmp_path, "video", src, target_count=20)
    assert [f["source_index"] for f in meta["frames"]] == list(range(8))


def test_video_downscaled_to_max_side(tmp_path):
    src = moving_clip(tmp_path / "clip.mp4", 10, step=6)
    summary, meta = run_stage(tmp_path, "video", src, target_count=5, max_side=80)
    assert (summary["width"], summary["height"]) == (80, 60)
    assert image_size(tmp_path / "out" / meta["frames"][0]["file"]) == (80, 60)


def test_display_rotation_applied(tmp_path):
    img = texture(2)[:H, :W].copy()
    img[:, :10] = 255  # white stripe on the left; rotating 90 deg CCW puts it at the bottom
    images = [np.roll(img, 3 * i, axis=0) for i in range(6)]
    src = write_video(tmp_path / "rot.mp4", images, rotation=90)
    _, meta = run_stage(tmp_path, "video", src, target_count=3)
    assert (meta["width"], meta["height"]) == (H, W)
    from PIL import Image
    out = np.asarray(Image.open(tmp_path / "out" / meta["frames"][0]["file"]).convert("L"))
    assert out[-8:].mean() > 240 and out[:-12].mean() < 200


def test_static_camera_is_an_error(tmp_path):
    src = write_video(tmp_path / "static.mp4", [texture(3)[:H, :W].copy()] * 30)
    with pytest.raises(InputError, match="did not move") as err:
        run_stage(tmp_path, "video", src, target_count=10)
    assert "static.mp4" in str(err.value)


def test_duplicates_dropped_between_moves(tmp_path):
    base = texture(4)
    images = [view(base, 0)] * 20 + [view(base, 10 + 3 * i) for i in range(20)]
    _, meta = run_stage(tmp_path, "video", write_video(tmp_path / "c.mp4", images),
                        target_count=8)
    idx = [f["source_index"] for f in meta["frames"]]
    assert sum(i < 20 for i in idx) == 1 and len(idx) == 5


def test_all_black_video(tmp_path):
    src = write_video(tmp_path / "black.mp4", [np.zeros((H, W, 3), np.uint8)] * 12)
    with pytest.raises(InputError, match=r"no usable \(textured\) frames") as err:
        run_stage(tmp_path, "video", src)
    assert "black.mp4" in str(err.value)


@pytest.mark.parametrize("case", ["missing", "empty", "text", "cut50", "cut10"])
def test_bad_video_files(tmp_path, case):
    src = tmp_path / f"bad_{case}.mp4"
    if case == "empty":
        src.write_bytes(b"")
    elif case == "text":
        src.write_text("this is not a video\n" * 50)
    elif case.startswith("cut"):
        data = moving_clip(tmp_path / "full.mp4", 30).read_bytes()
        src.write_bytes(data[: len(data) * int(case[3:]) // 100])
    with pytest.raises(InputError) as err:
        run_stage(tmp_path, "video", src)
    assert src.name in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name,options", [("cut.mkv", None),
                                          ("cut.mp4", {"movflags": "faststart"})])
def test_truncated_streamable_video_keeps_what_decoded(tmp_path, caplog, name, options):
    images = [view(texture(5), 4 * i) for i in range(40)]
    data = write_video(tmp_path / f"full_{name}", images, options=options).read_bytes()
    src = tmp_path / name
    src.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="test_frames"):
        _, meta = run_stage(tmp_path, "video", src, target_count=40)
    assert 3 <= len(meta["frames"]) < 40
    assert name in caplog.text


class _FailingContainer:
    """A container whose decoder raises after ``ok`` frames (damage in the middle)."""

    def __init__(self, ok: int):
        self.ok = ok

    def decode(self, stream):
        import av

        yield from range(self.ok)
        raise av.InvalidDataError(1094995529, "Invalid data found when processing input")


def test_decode_error_midway(caplog):
    from stages.frames.video import decode_frames

    log = logging.getLogger("test_frames")
    with caplog.at_level(logging.WARNING, logger="test_frames"):
        got = list(decode_frames(_FailingContainer(5), None, Path("/x/broken.mp4"), log))
    assert len(got) == 5 and "broken.mp4" in caplog.text
    with pytest.raises(InputError, match="broken.mp4"):
        list(decode_frames(_FailingContainer(2), None, Path("/x/broken.mp4"), log))


def test_ground_truth_copied_and_resume_overwrites(tmp_path):
    gt = tmp_path / "gt_src"
    (gt / "sub").mkdir(parents=True)
    (gt / "sub" / "mesh.obj").write_text("v 0 0 0\n")
    img_dir = tmp_path / "out" / "images"
    img_dir.mkdir(parents=True)
    (img_dir / "000000.jpg").write_bytes(b"half-written")
    (img_dir / "000099.jpg").write_bytes(b"stale")
    (img_dir / ".000001.jpg.tmp").write_bytes(b"temp")
    src = moving_clip(tmp_path / "clip.mp4", 10, step=6)
    _, meta = run_stage(tmp_path, "video", src, gt=str(gt), target_count=5)
    assert meta["gt"] == "gt"
    assert (tmp_path / "out" / "gt" / "sub" / "mesh.obj").read_text() == "v 0 0 0\n"
    assert sorted(p.name for p in img_dir.iterdir()) == [f"{k:06d}.jpg" for k in range(5)]
    assert image_size(img_dir / "000000.jpg") == (W, H)


# --------------------------------------------------------------------------- photos


def test_photos_exif_orientation_and_order(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    img = texture(6)[:40, :80].copy()
    img[:, :10] = (255, 0, 0)  # red on the left; orientation 6 = rotate 90 deg clockwise
    for name in ("img10.jpg", "img2.JPG"):
        write_photo(folder / name, img, orientation=6)
    summary, meta = run_stage(tmp_path, "images", folder)
    assert (summary["width"], summary["height"]) == (40, 80)
    assert [f["source_file"] for f in meta["frames"]] == ["img2.JPG", "img10.jpg"]
    from PIL import Image
    out = np.asarray(Image.open(tmp_path / "out" / "images" / "000000.jpg"))
    assert out.shape == (80, 40, 3)
    assert out[:6, :, 0].mean() > 200 and out[:6, :, 1].mean() < 60  # red now on top
    assert meta["frames"][0]["sharpness"] > 0


def test_dark_photos_of_a_moving_view_are_not_repeats(tmp_path, caplog):
    """A dark capture (texture at 4..20 of 255, like a dark object on a dark ground) moves by a
    few grey levels between views: every view is kept, while a true repeat is still dropped."""
    folder = tmp_path / "photos"
    folder.mkdir()
    import cv2

    base = (texture(7, W + 80, H + 80) * (16 / 255) + 4).astype(np.uint8)
    shots = [view(base, 3 * i) for i in range(8)]
    thumbs = [cv2.resize(cv2.cvtColor(s, cv2.COLOR_RGB2GRAY), (64, 64), interpolation=cv2.INTER_AREA) / 255.0
              for s in shots]
    assert max(float(np.abs(a - b).mean()) for a, b in zip(thumbs, thumbs[1:])) < 0.01  # unstretched: "repeats"
    for i, img in enumerate([*shots, shots[3]]):
        write_photo(folder / f"p{i}.png", img)
    with caplog.at_level(logging.WARNING):
        summary, meta = run_stage(tmp_path, "images", folder)
    assert [f["source_file"] for f in meta["frames"]] == [f"p{i}.png" for i in range(8)]
    assert "p8.png (= p3.png)" in caplog.text


def test_photos_downscaled_to_max_side(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(2):
        write_photo(folder / f"{k}.jpg", texture(k, 1600, 1200)[:1200, :1600].copy())
    summary, meta = run_stage(tmp_path, "images", folder, max_side=200)
    assert (summary["width"], summary["height"]) == (200, 150)
    assert image_size(tmp_path / "out" / meta["frames"][1]["file"]) == (200, 150)


def test_photo_modes_16bit_and_alpha(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    grey16 = (texture(7)[:120, :160, 0].astype(np.uint16) * 257)
    Image.fromarray(grey16).save(folder / "a.png")
    rgba = np.dstack([texture(8)[:120, :160], np.full((120, 160), 128, np.uint8)])
    Image.fromarray(rgba).save(folder / "b.png")
    _, meta = run_stage(tmp_path, "images", folder)
    out = np.asarray(Image.open(tmp_path / "out" / meta["frames"][0]["file"]))
    assert out.shape == (120, 160, 3)
    assert abs(out[..., 0].astype(float) - texture(7)[:120, :160, 0]).mean() < 3


def _mixed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_photo(folder / "a.jpg", texture(1)[:120, :160].copy())
    write_photo(folder / "b.png", texture(2)[:120, :160].copy())
    write_photo(folder / "c.jpg", texture(3)[:240, :320].copy())
    write_photo(folder / "d.tif", texture(4)[:120, :120].copy())
    return folder


def test_mixed_sizes_resize(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="test_frames"):
        summary, meta = run_stage(tmp_path, "images", _mixed_folder(tmp_path))
    assert summary["num_frames"] == 4 and (summary["width"], summary["height"]) == (160, 120)
    for f in meta["frames"]:
        assert image_size(tmp_path / "out" / f["file"]) == (160, 120)
    assert "center-cropped 1" in caplog.text and "d.tif" in caplog.text


def test_mixed_sizes_reject(tmp_path):
    with pytest.raises(InputError, match="different sizes") as err:
        run_stage(tmp_path, "images", _mixed_folder(tmp_path), mixed_sizes="reject")
    assert "160x120" in str(err.value) and "320x240" in str(err.value)


def test_non_images_skipped_with_warning(tmp_path, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    write_photo(folder / "a.jpg", texture(1)[:120, :160].copy())
    write_photo(folder / "b.jpg", texture(2)[:120, :160].copy())
    (folder / "notes.txt").write_text("hello")
    (folder / "fake.jpg").write_text("not a jpeg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "outside.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    write_photo(tmp_path / "elsewhere.jpg", texture(3)[:120, :160].copy())
    with caplog.at_level(logging.WARNING, logger="test_frames"):
        summary, meta = run_stage(tmp_path, "images", folder)
    assert [f["source_file"] for f in meta["frames"]] == ["a.jpg", "b.jpg"]
    for name in ("notes.txt", "fake.jpg", "loop.jpg", "outside.jpg"):
        assert name in caplog.text


@pytest.mark.parametrize("case", ["empty", "missing", "only_text"])
def test_photo_folder_errors(tmp_path, case):
    folder = tmp_path / f"shots_{case}"
    if case != "missing":
        folder.mkdir()
    if case == "only_text":
        (folder / "x.jpg").write_text("nope")
    with pytest.raises(InputError) as err:
        run_stage(tmp_path, "images", folder)
    assert folder.name in str(err.value)


def test_module_import_is_light():
    import subprocess
    import sys

    code = "import sys, stages.frames; print(any(m in sys.modules for m in ('av', 'cv2', 'PIL', 'luigi')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    assert out.stdout.strip() == "False"
