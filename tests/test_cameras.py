"""Camera conventions: a round trip per format, and projection vs rays (pixel centres)."""
import json

import numpy as np
import pytest

from pipeline import cameras as C
from pipeline.errors import InputError


def _cams(n=5, seed=0) -> C.Cameras:
    rng = np.random.default_rng(seed)
    c2w = []
    for _ in range(n):
        eye = rng.normal(size=3) * 3
        c2w.append(C.look_at(eye, rng.normal(size=3) * 0.1, np.array([0.0, 0.0, 1.0])))
    K = np.stack([C.intrinsics(500 + 10 * i, 505 + 10 * i, 320.5, 240.25) for i in range(n)])
    return C.Cameras([f"images/{i:06d}.jpg" for i in range(n)], K, np.stack(c2w), 640, 480)


def test_gl_cv_round_trip_and_axes():
    cams = _cams()
    back = C.cv_from_gl(C.gl_from_cv(cams.c2w))
    np.testing.assert_allclose(back, cams.c2w, atol=1e-12)
    gl = C.gl_from_cv(cams.c2w[0])
    target = -gl[:3, 2]  # OpenGL cameras look down -z
    np.testing.assert_allclose(target, cams.c2w[0][:3, 2], atol=1e-12)


def test_transforms_json_round_trip(tmp_path):
    cams = _cams()
    C.save_transforms(tmp_path / "t.json", cams, extra={"sphere_radius": 1.5})
    got = C.load_transforms(tmp_path / "t.json")
    assert got.names == cams.names and (got.width, got.height) == (640, 480)
    np.testing.assert_allclose(got.K, cams.K, atol=1e-9)
    np.testing.assert_allclose(got.c2w, cams.c2w, atol=1e-12)
    assert got.extra["sphere_radius"] == 1.5


def test_transforms_json_camera_angle_x(tmp_path):
    cams = _cams(n=1)
    data = {"w": 640, "h": 480, "camera_angle_x": 1.0,
            "frames": [{"file_path": "a.png", "transform_matrix": C.gl_from_cv(cams.c2w[0]).tolist()}]}
    (tmp_path / "t.json").write_text(json.dumps(data))
    got = C.load_transforms(tmp_path / "t.json")
    assert got.K[0, 0, 0] == pytest.approx(320 / np.tan(0.5))
    assert got.K[0, 0, 2] == 320 and got.K[0, 1, 2] == 240


def test_neus_npz_round_trip(tmp_path):
    cams = _cams()
    scale = np.diag([2.0, 2.0, 2.0, 1.0])
    scale[:3, 3] = [0.1, -0.2, 0.3]
    C.save_neus_npz(tmp_path / "cameras_sphere.npz", cams, scale)
    got, got_scale = C.load_neus_npz(tmp_path / "cameras_sphere.npz", cams.names, 640, 480)
    np.testing.assert_allclose(got.K, cams.K, atol=1e-6)
    np.testing.assert_allclose(got.c2w, cams.c2w, atol=1e-9)
    np.testing.assert_allclose(got_scale, scale)


def test_projection_and_rays_agree_on_pixel_centres():
    cams = _cams(n=1)
    K, c2w = cams.K[0], cams.c2w[0]
    uv = np.array([[0.5, 0.5], [639.5, 479.5], [320.5, 240.25]])  # pixel centres and the principal point
    origins, dirs = C.pixel_rays(K, c2w, uv)
    points = origins + 2.7 * dirs
    proj, depth = C.project(points, K, np.linalg.inv(c2w))
    np.testing.assert_allclose(proj, uv, atol=1e-9)
    assert np.all(depth > 0)
    np.testing.assert_allclose(dirs[2], c2w[:3, 2], atol=1e-12)  # the principal ray is the optical axis


def test_bad_camera_files(tmp_path):
    cams = _cams(n=2)
    C.save_transforms(tmp_path / "t.json", cams)
    data = json.loads((tmp_path / "t.json").read_text())
    data["frames"][1]["transform_matrix"][0][0] = float("nan")
    (tmp_path / "nan.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="nan.json.*NaN"):
        C.load_transforms(tmp_path / "nan.json")
    data["frames"][1]["transform_matrix"] = np.zeros((4, 4)).tolist()
    (tmp_path / "singular.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="singular"):
        C.load_transforms(tmp_path / "singular.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="broken.json"):
        C.load_transforms(tmp_path / "broken.json")


def test_orbit_distance_is_the_orbit_radius():
    """Cameras on a circle of radius r around a point, looking at it: r, whether the point is
    given or found as the look-at point; the median, so one far camera does not move it."""
    centre, r = np.array([0.3, -1.2, 0.5]), 2.5
    angles = np.linspace(0.0, 2 * np.pi, 12, endpoint=False)
    eyes = centre + r * np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)], 1)
    c2w = [C.look_at(eye, centre, np.array([0.0, 0.0, 1.0])) for eye in eyes]
    c2w.append(C.look_at(centre + [10.0 * r, 0.0, 0.0], centre, np.array([0.0, 0.0, 1.0])))
    K = np.stack([C.intrinsics(500, 500, 320, 240)] * len(c2w))
    cams = C.Cameras([f"{i}.png" for i in range(len(c2w))], K, np.stack(c2w), 640, 480)
    assert C.orbit_distance(cams, centre) == pytest.approx(r, rel=1e-12)
    assert C.orbit_distance(cams) == pytest.approx(r, rel=1e-9)  # the look-at point is the centre
    assert C.orbit_distance(cams, centre + [0.0, 0.0, 1.0]) == pytest.approx(np.hypot(r, 1.0), rel=1e-12)


def test_pixels_in_image_are_the_projections_floored():
    """The pixel a point falls in is its projection floored (pixel centres at +0.5); points behind
    the camera or outside the image are left out; float32 points are projected in float32."""
    cams = _cams(n=1)
    K, w2c = cams.K[0], np.linalg.inv(cams.c2w[0])
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(4000, 3)) * 3
    sel, row, col, depth = C.pixels_in_image(pts, K, w2c, (480, 640))
    uv, z = C.project(pts, K, w2c)
    with np.errstate(invalid="ignore"):
        inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < 640) & (uv[:, 1] >= 0) & (uv[:, 1] < 480)
    assert 0 < len(sel) < len(pts) and np.array_equal(sel, np.flatnonzero(inside))
    np.testing.assert_array_equal(col, np.floor(uv[sel, 0]))
    np.testing.assert_array_equal(row, np.floor(uv[sel, 1]))
    np.testing.assert_allclose(depth, z[sel], rtol=1e-12)
    assert C.pixels_in_image(pts.astype(np.float32), K, w2c, (480, 640))[3].dtype == np.float32
