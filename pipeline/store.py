"""The artifact store: hash-keyed stage folders, manifests, atomic commits and scene plans.

Layout: ``<workdir>/<scene>/<stage>-<key>/`` holds a finished stage (its ``manifest.json``
is written last); work happens in ``<stage>-<key>.partial/`` and the folder is renamed into
place. ``key`` = first 12 hex digits of sha256 over the stage name, its code version, its
resolved config section (canonical JSON), the keys of its upstream stages and, for the first
stage, a content fingerprint of the input. No paths, mtimes or operational knobs go in.
``<workdir>/<scene>/plan.json`` records the keys of the scene's latest run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from pipeline.config import PipelineConfig, canonical_json, path_fields
from pipeline.dag import STAGES, UPSTREAM, Source, closure
from pipeline.errors import InputError, PipelineError
from pipeline.fsutil import atomic_write_json, read_json, remove_stale_temp_files, sha256_file

KEY_LEN = 12
MANIFEST = "manifest.json"
PLAN = "plan.json"
DONE_PLAN = "plan_done.json"  # the plan of the scene's last run that finished: gc keeps its folders too
INTERNAL_FILES = (".job.json", ".summary.json", ".error.json")
STALE_TEMP_SECONDS = 60  # a temporary file untouched this long outside a locked stage folder is a dead write


def stage_module_name(stage: str) -> str:
    return f"stages.{stage}"


def available_stages() -> list[str]:
    """Stages whose module exists and whose upstream stages all exist too."""
    out: list[str] = []
    for stage in STAGES:
        if importlib.util.find_spec(stage_module_name(stage)) is None:
            continue
        if all(up in out for up in UPSTREAM[stage]):
            out.append(stage)
    return out


def stage_version(stage: str) -> str:
    return str(importlib.import_module(stage_module_name(stage)).VERSION)


def stage_key(stage: str, version: str, section: dict, upstream: dict[str, str],
              fingerprint: str = "") -> str:
    payload = canonical_json({"stage": stage, "version": version, "config": section,
                              "upstream": upstream, "input": fingerprint})
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LEN]


def _walk_files(root: Path) -> list[Path]:
    """Regular files under ``root`` (sorted, relative); refuses symlink loops."""
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            raise InputError(f"{dirpath}: symbolic link loop inside {root}")
        seen.add(real)
        dirnames.sort()
        files.extend(Path(dirpath, f).relative_to(root) for f in sorted(filenames))
    return files


def fingerprint_path(path: Path) -> str:
    """Content fingerprint of a file or a folder: names, sizes and sha256 of every file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    h = hashlib.sha256()
    if path.is_file():
        h.update(f"{path.stat().st_size}:{sha256_file(path)}".encode())
        return h.hexdigest()
    for rel in _walk_files(path):
        full = path / rel
        if full.is_file():
            h.update(f"{rel.as_posix()}:{full.stat().st_size}:{sha256_file(full)}\n".encode())
    return h.hexdigest()


def source_fingerprint(source: Source) -> str:
    parts = [source.kind, source.format, fingerprint_path(Path(source.path))]
    if source.gt:
        parts.append(fingerprint_path(Path(source.gt)))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def key_section(cfg: PipelineConfig, stage: str) -> dict:
    """The config section as hashed: file paths are replaced by their content fingerprint."""
    section = dataclasses.asdict(cfg.section(stage))
    for name in path_fields(stage):
        if section[name]:
            section[name] = "sha256:" + fingerprint_path(Path(section[name]).expanduser())
    return section


def make_plan(scene: str, source: Source, cfg: PipelineConfig, until: str) -> dict:
    """Compute every stage key for one scene up to ``until``; the plan is what tasks run from."""
    avail = available_stages()
    if until not in avail:
        raise PipelineError(f"stage '{until}' is not available (available: {', '.join(avail)})")
    fingerprint = source_fingerprint(source)
    keys: dict[str, str] = {}
    for stage in closure(until):
        upstream = {up: keys[up] for up in UPSTREAM[stage]}
        keys[stage] = stage_key(stage, stage_version(stage), key_section(cfg, stage),
                                upstream, fingerprint if not UPSTREAM[stage] else "")
    return {"scene": scene, "source": dataclasses.asdict(source), "config": cfg.to_dict(),
            "until": until, "keys": keys}


def scene_dir(workdir: Path, scene: str) -> Path:
    return Path(workdir) / scene


def stage_dir(workdir: Path, scene: str, stage: str, key: str) -> Path:
    return scene_dir(workdir, scene) / f"{stage}-{key}"


def partial_dir(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def load_manifest(folder: Path) -> dict | None:
    """The folder's manifest when it is present and well-formed, else None."""
    try:
        data = read_json(Path(folder) / MANIFEST)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "files" in data else None


def is_done(final: Path) -> bool:
    return load_manifest(final) is not None


def verify(folder: Path) -> list[str]:
    """Problems of a finished folder against its manifest (missing, resized or changed files);
    empty when every listed file is there with its size and sha256."""
    manifest = load_manifest(folder)
    if manifest is None:
        return [f"{folder}: no valid {MANIFEST}"]
    problems = []
    for rel, info in sorted(manifest["files"].items()):
        path = Path(folder) / rel
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif path.stat().st_size != info["size"] or sha256_file(path) != info["sha256"]:
            problems.append(f"{path}: differs from the manifest (size or sha256)")
    return problems


def save_plan(workdir: Path, plan: dict) -> None:
    """Write the scene's plan as a run starts, and drop temporary files that killed runs left in
    the scene folder (plan, published copies, error reports) a minute or more ago."""
    folder = scene_dir(workdir, plan["scene"])
    folder.mkdir(parents=True, exist_ok=True)
    for sub in (folder, folder / ".errors"):
        remove_stale_temp_files(sub, older_than=STALE_TEMP_SECONDS, recursive=False)
    atomic_write_json(folder / PLAN, plan)


def save_done_plan(workdir: Path, plan: dict) -> None:
    """Remember the plan of a run that finished (a later failed or changed run replaces plan.json)."""
    atomic_write_json(scene_dir(workdir, plan["scene"]) / DONE_PLAN, plan)


def load_plans(workdir: Path, name: str = PLAN) -> dict[str, dict]:
    plans = {}
    for path in sorted(Path(workdir).glob(f"*/{name}")):
        try:
            plans[path.parent.name] = read_json(path)
        except (OSError, ValueError):
            continue
    return plans


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("numpy", "torch", "pycolmap", "luigi", "av"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


def write_manifest(partial: Path, stage: str, key: str, config: dict, summary: dict,
                   seconds: float) -> dict:
    """Record every file (size, sha256) and write ``manifest.json`` last, atomically."""
    files = {}
    for rel in _walk_files(partial):
        if rel.name in INTERNAL_FILES or rel.as_posix() == MANIFEST:
            continue
        full = partial / rel
        files[rel.as_posix()] = {"size": full.stat().st_size, "sha256": sha256_file(full)}
    manifest = {"stage": stage, "key": key, "files": files, "summary": summary,
                "seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "config": config, "versions": _versions()}
    atomic_write_json(partial / MANIFEST, manifest)
    return manifest


def commit(partial: Path, final: Path) -> None:
    """Rename a finished ``.partial`` folder into place (an old half-folder is moved aside)."""
    for name in INTERNAL_FILES:
        (partial / name).unlink(missing_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
