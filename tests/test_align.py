"""Umeyama similarity alignment and camera error measures (pipeline.align)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pipeline.align import apply_similarity, camera_errors, relative_rotation_errors, umeyama
from pipeline.cameras import look_at


def _orbit(n: int = 12) -> np.ndarray:
    eyes = [np.array([2 * np.cos(a), 2 * np.sin(a), 0.5 + 0.2 * np.sin(3 * a)])
            for a in np.linspace(0, 2 * np.pi, n, endpoint=False)]
    return np.stack([look_at(e, np.zeros(3), np.array([0.0, 0.0, 1.0])) for e in eyes])


def test_umeyama_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(20, 3))
    R = Rotation.from_rotvec([0.3, -1.2, 0.5]).as_matrix()
    dst = 2.5 * src @ R.T + np.array([1.0, -2.0, 3.0])
    s, R_est, t = umeyama(src, dst)
    assert s == pytest.approx(2.5, rel=1e-9)
    np.testing.assert_allclose(R_est, R, atol=1e-9)
    np.testing.assert_allclose(t, [1.0, -2.0, 3.0], atol=1e-9)
    assert np.linalg.det(R_est) == pytest.approx(1.0)


def test_umeyama_rejects_too_few_points():
    with pytest.raises(ValueError):
        umeyama(np.zeros((2, 3)), np.zeros((2, 3)))


def test_camera_errors_zero_after_similarity_and_sensitive_to_noise():
    gt = _orbit()
    R = Rotation.from_rotvec([0.1, 0.2, -2.0]).as_matrix()
    est = apply_similarity(gt, 0.37, R, np.array([5.0, 1.0, -1.0]))  # a different world frame
    err = camera_errors(est, gt)
    assert err["rotation_deg_max"] < 1e-6 and err["center_max"] < 1e-9
    assert err["scale"] == pytest.approx(1 / 0.37)
    noisy = est.copy()
    noisy[3, :3, :3] = Rotation.from_rotvec([0.0, 0.0, np.radians(2.0)]).as_matrix() @ noisy[3, :3, :3]
    err = camera_errors(noisy, gt)
    assert err["rotation_deg"][3] == pytest.approx(2.0, abs=1e-6)
    assert err["rotation_deg_median"] < 1e-6


def test_relative_rotation_errors_ignore_the_world_frame():
    gt = _orbit(6)
    R = Rotation.from_rotvec([1.0, 0.5, 0.2]).as_matrix()
    est = apply_similarity(gt, 3.0, R, np.ones(3))
    rel = relative_rotation_errors(est, gt)
    assert rel.shape == (15,) and rel.max() < 1e-6
