"""Synthetic scenes with exact ground truth (for the ``demo`` command, tests and benchmarks).

    from pipeline.synthetic import SceneSpec, generate
    result = generate(out_dir, SceneSpec(num_views=100, output="video"))

Layout of ``out_dir``: ``video.mp4`` or ``images/000000.png ...``, and ``gt/`` with
``images/`` (lossless renders), ``masks/`` (uint8 0/255), ``transforms.json`` (+ sphere_center,
sphere_radius), ``cameras_sphere.npz``, ``gt_mesh.ply`` (closed, world frame) and ``gt.json``
(``transform`` @ source vertex = world vertex). World: z up, ground plane z = 0.
"""
from pipeline.synthetic.scene import SceneSpec, SyntheticScene, bounding_sphere, generate, orbit_cameras

__all__ = ["SceneSpec", "SyntheticScene", "bounding_sphere", "generate", "orbit_cameras"]
