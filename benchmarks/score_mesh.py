"""Score a scene's raw marching-cubes mesh (stage ``mesh``) against its ground truth, the way the
``evaluate`` stage scores the cleaned one (camera alignment + ICP, Chamfer-L1, F-scores, object region).

For machines where ``cleanup`` cannot run (the GPU test machine has no pymeshlab): the raw mesh
is what cleanup starts from, so its score bounds what cleanup can give (cleanup removes
floaters and culls, it does not move the surface).

    PYTHONPATH=. python benchmarks/score_mesh.py --workdir /tmp/e2e --scene spot --out raw_score.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from bench_paths import ROOT  # noqa: E402,F401


def score(workdir: Path, scene: str, num_samples: int) -> dict:
    from pipeline import store
    from pipeline.cameras import load_transforms
    from pipeline.config import EvaluateConfig
    from pipeline.dag import Context
    from stages import evaluate

    plan = store.load_plans(workdir)[scene]
    inputs = {name: store.stage_dir(workdir, scene, name, plan["keys"][name]) for name in ("frames", "sfm", "mesh")}
    for name, folder in inputs.items():
        if not store.is_done(folder):
            raise SystemExit(f"{folder}: stage {name} is not finished; run the pipeline with --until mesh first")
    vertices, faces, colors = evaluate.load_mesh(inputs["mesh"] / "mesh_raw.ply")
    cams = load_transforms(inputs["sfm"] / "transforms.json")
    meta = json.loads((inputs["frames"] / "frames.json").read_text())
    gt_dir = inputs["frames"] / meta["gt"] if meta.get("gt") else None
    eval_scene = evaluate.EvalScene(inputs, vertices, faces, colors, cams, meta, gt_dir)
    cfg = EvaluateConfig(num_samples=num_samples)
    t0 = time.perf_counter()
    geometry, alignment = evaluate.evaluate_geometry(eval_scene, cfg, Context(scene=scene, progress=False,
                                                                             log=logging.getLogger("score")))
    return {"mesh": str(inputs["mesh"] / "mesh_raw.ply"), "faces": int(len(faces)), "geometry": geometry,
            "alignment": {k: v for k, v in alignment.items() if k != "pairs"}, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--scene", required=True)
    ap.add_argument("--num-samples", type=int, default=200000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    result = score(args.workdir, args.scene, args.num_samples)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    geo = result["geometry"]
    if not geo.get("available"):
        print(f"not scored: {geo.get('reason')}")
        return 1
    region = geo.get("object_region", {})
    print("\n| mesh | faces | alignment | Chamfer-L1 % | F@0.5% | F@1% | object-region Chamfer % | surface Chamfer % |")
    print("|---|---|---|---|---|---|---|---|")
    f05, f1 = (s["fscore"] for s in geo["fscores"][:2])
    reg = f"{region['chamfer_l1_pct']:.3f}" if region.get("available") else "-"
    surf = geo.get("surface", {}).get("chamfer_l1_pct")
    print(f"| raw (mesh stage) | {result['faces']:,} | {result['alignment']['method']} | "
          f"{geo['chamfer_l1_pct']:.3f} | {f05:.3f} | {f1:.3f} | {reg} | {'-' if surf is None else f'{surf:.3f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
