"""The artifact store: hash-keyed stage folders, manifests, atomic commits and scene plans.

Layout: ``<workdir>/<scene>/<stage>-<key>/`` holds a finished stage (its ``manifest.json``
is written last); work happens in ``<stage>-<key>.partial/`` and the folder is renamed into
place. ``key`` = first 12 hex digits of sha256 over the stage name, its code version, its
resolved config section (canonical JSON), the keys of its upstream stages and, for the first
stage, a content fingerprint of the input. No paths, mtimes or operational knobs go in.
``<workdir>/<scene>/plan.json`` records the keys of the scene's latest run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.config import PipelineConfig, canonical_json, path_fields
from pipeline.dag import STAGES, UPSTREAM, Source, closure, stage_module_name
from pipeline.errors import InputError, PipelineError, one_line
from pipeline.fsutil import (atomic_write_json, file_lock, json_unchanged, read_json, remove_stale_temp_files,
                             sha256_file)

KEY_LEN = 12
MANIFEST = "manifest.json"
PLAN = "plan.json"
DONE_PLAN = "plan_done.json"  # the plan of the scene's last run that finished: gc keeps its folders too
VERSIONS = ".versions.json"  # written by the stage process: what it ran with (dependency_versions)
INTERNAL_FILES = (".job.json", ".summary.json", ".error.json", VERSIONS)
# Distributions whose versions a manifest records (those installed); several names, one key.
DEPENDENCIES = {"torch": ("torch",), "numpy": ("numpy",), "scipy": ("scipy",), "pycolmap": ("pycolmap",),
                "luigi": ("luigi",), "trimesh": ("trimesh",), "pymeshlab": ("pymeshlab",),
                "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
                           "opencv-contrib-python"),
                "rembg": ("rembg",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "av": ("av",),
                "pillow": ("pillow",), "scikit-image": ("scikit-image",), "xatlas": ("xatlas",),
                "tensorboard": ("tensorboard",), "tqdm": ("tqdm",), "pyyaml": ("pyyaml",), "triton": ("triton",),
                "tinycudann": ("tinycudann",)}
STALE_TEMP_SECONDS = 60  # a temporary file untouched this long outside a locked stage folder is a dead write


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


def _walk_files(root: Path, log: logging.Logger | None = None) -> list[Path]:
    """Files under ``root`` (sorted, relative) the way stages read an input folder: a symbolic link
    is followed only to a file inside the folder; a link to a folder inside it is a second path to
    what is read once under its real path, a link to an ancestor is a loop (an InputError), and a
    link out of the folder (or a broken one) is left out. ``log`` gets one warning for each kind."""
    root = Path(root)
    real_root = Path(os.path.realpath(root))
    files, again, out = [], [], []
    for dirpath, dirnames, filenames in os.walk(root):  # linked folders are listed, never entered
        here = Path(dirpath)
        dirnames.sort()
        for name in [d for d in dirnames if (here / d).is_symlink()]:
            target = Path(os.path.realpath(here / name))
            if Path(os.path.realpath(here)).is_relative_to(target):
                raise InputError(f"{here / name}: symbolic link loop inside {root}")
            (again if target.is_relative_to(real_root) else out).append((here / name).relative_to(root))
        for name in sorted(filenames):
            full = here / name
            if full.is_symlink():
                target = Path(os.path.realpath(full))
                if not (target.is_file() and target.is_relative_to(real_root)):
                    out.append(full.relative_to(root))
                    continue
            files.append(full.relative_to(root))
    if log and again:
        log.warning("%s: %s to folders inside it, whose files are read once under their real paths: %s", root,
                    _links(again), ", ".join(p.as_posix() for p in again))
    if log and out:
        log.warning("%s: not reading %s pointing outside it or nowhere: %s", root, _links(out),
                    ", ".join(p.as_posix() for p in out))
    return files


def _links(items: list) -> str:
    return "a symbolic link" if len(items) == 1 else f"{len(items)} symbolic links"


def input_files(root: Path) -> list[Path]:
    """The files of an input folder that its fingerprint covers and that stages copy (see
    ``_walk_files``); skipped links are reported on the pipeline logger."""
    return _walk_files(root, logging.getLogger("pipeline"))  # pipeline.log.LOGGER_NAME


def fingerprint_path(path: Path) -> str:
    """Content fingerprint of a file or a folder: names, sizes and sha256 of ``input_files``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    h = hashlib.sha256()
    if path.is_file():
        h.update(f"{path.stat().st_size}:{sha256_file(path)}".encode())
        return h.hexdigest()
    for rel in input_files(path):
        full = path / rel
        h.update(f"{rel.as_posix()}:{full.stat().st_size}:{sha256_file(full)}\n".encode())
    return h.hexdigest()


def source_fingerprint(source: Source) -> str:
    parts = [source.kind, source.format, fingerprint_path(Path(source.path))]
    if source.gt:
        parts.append(fingerprint_path(Path(source.gt)))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def key_section(cfg: PipelineConfig, stage: str) -> dict:
    """The config section as hashed: file paths are replaced by their content fingerprint, and
    what the stage reads from this machine besides its config (its ``key_inputs(section)``, for
    example the masks model found on disk) is added under ``"machine"``."""
    section = dataclasses.asdict(cfg.section(stage))
    module = importlib.import_module(stage_module_name(stage))
    machine = module.key_inputs(cfg.section(stage)) if hasattr(module, "key_inputs") else {}
    for name in path_fields(stage):
        if section[name]:
            section[name] = "sha256:" + fingerprint_path(Path(section[name]).expanduser())
    if machine:
        section["machine"] = machine
    return section


def prepare_stages(cfg: PipelineConfig, until: str, log: logging.Logger) -> None:
    """Before a run's keys are computed, let each stage fetch what it reads from this machine
    (its ``prepare(section, log)``: the masks stage downloads a missing model), so the keys say
    what the run uses and the next run finds its folders. Plans and dry runs never call this."""
    for stage in closure(until):
        module = importlib.import_module(stage_module_name(stage))
        if hasattr(module, "prepare"):
            module.prepare(cfg.section(stage), log)


def make_plan(scene: str, source: Source, cfg: PipelineConfig, until: str) -> dict:
    """Compute every stage key for one scene up to ``until``; the plan is what tasks run from."""
    avail = available_stages()
    if until not in avail:
        raise PipelineError(f"stage '{until}' is not available (available: {', '.join(avail)})")
    check_scene_name(scene)
    fingerprint = source_fingerprint(source)
    keys: dict[str, str] = {}
    for stage in closure(until):
        upstream = {up: keys[up] for up in UPSTREAM[stage]}
        keys[stage] = stage_key(stage, stage_version(stage), key_section(cfg, stage),
                                upstream, fingerprint if not UPSTREAM[stage] else "")
    return {"scene": scene, "source": dataclasses.asdict(source), "config": cfg.to_dict(),
            "until": until, "keys": keys}


def check_scene_name(scene: str) -> None:
    """A scene name is one plain folder name inside the workdir: no separators, not ``.`` or
    ``..``, no leading dot (the workdir's own hidden entries), no control characters."""
    if not scene or scene in (".", "..") or scene.startswith(".") or "/" in scene or os.sep in scene \
            or (os.altsep and os.altsep in scene) or not scene.isprintable() or len(scene.encode()) > 200:
        raise InputError(f"scene name '{one_line(scene)}': must be one plain folder name (no '/', not '.' or "
                         "'..', not starting with '.', no control characters, at most 200 bytes)")


def check_workdir(workdir: Path) -> None:
    """``workdir`` is a folder, or can become one: its nearest existing ancestor is a folder."""
    workdir = Path(workdir)
    for path in (workdir, *workdir.parents):
        if path.is_dir():
            return
        if path.exists() or path.is_symlink():
            what = "the workdir" if path == workdir else f"a parent of the workdir {workdir}"
            raise InputError(f"{path}: {what} is a file, not a folder; give --workdir a folder")


def check_scene_folder(workdir: Path, scene: str) -> None:
    """``<workdir>/<scene>`` is a folder or does not exist yet."""
    folder = scene_dir(workdir, scene)
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        raise InputError(f"{folder}: the folder of scene '{scene}' is a file; move it away or pick "
                         "another --scene")


def check_writable(folder: Path) -> None:
    """Raise a one-line error when ``folder`` (or, while it does not exist, its nearest existing
    ancestor) cannot be written: read-only mount, or no write permission."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{path}: not writable (read-only file system or no write permission), and this run "
                         "has stages to compute; make it writable or give another --workdir")


@contextlib.contextmanager
def writing(where: Path) -> Iterator[None]:
    """A permission or read-only error while the block writes the run's bookkeeping under
    ``where`` becomes a one-line InputError naming the file."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise InputError(f"{exc.filename or where}: cannot write ({exc.strerror}); the workdir must be "
                         "writable when a run has work to do") from None


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


def plan_fallbacks(workdir: Path, plan: dict) -> list[str]:
    """``<stage>: <line>`` for each fallback (a choice made in place of what was asked, listed
    under ``fallbacks`` in a stage's summary) of the plan's finished stages, in stage order."""
    out = []
    for stage, key in plan["keys"].items():
        summary = (load_manifest(stage_dir(workdir, plan["scene"], stage, key)) or {}).get("summary") or {}
        out += [f"{stage}: {line}" for line in summary.get("fallbacks") or []]
    return out


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
    the scene folder (plan, published copies, error reports) a minute or more ago. Nothing is
    written when the same plan is already there (a rerun with nothing to do writes nothing)."""
    folder = scene_dir(workdir, plan["scene"])
    folder.mkdir(parents=True, exist_ok=True)
    for sub in (folder, folder / ".errors"):
        remove_stale_temp_files(sub, older_than=STALE_TEMP_SECONDS, recursive=False)
    if not json_unchanged(folder / PLAN, plan):
        atomic_write_json(folder / PLAN, plan)


def save_done_plan(workdir: Path, plan: dict) -> None:
    """Remember the plan of a run that finished (a later failed or changed run replaces plan.json)."""
    path = scene_dir(workdir, plan["scene"]) / DONE_PLAN
    if not json_unchanged(path, plan):
        atomic_write_json(path, plan)


def read_plan(path: Path) -> dict:
    """A scene's ``plan.json`` (or ``plan_done.json``), checked: a JSON object whose ``keys`` map
    known stage names to stage keys. Raise InputError naming the file otherwise."""
    try:
        plan = read_json(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({one_line(str(exc))}); remove it, or rerun the scene "
                         "to write a new one") from None
    keys = plan.get("keys") if isinstance(plan, dict) else None
    if not isinstance(keys, dict) or not all(
            stage in STAGES and isinstance(key, str) and re.fullmatch(f"[0-9a-f]{{{KEY_LEN}}}", key)
            for stage, key in keys.items()):
        raise InputError(f"{path}: not a valid plan (expected a JSON object whose \"keys\" map stage names to "
                         f"{KEY_LEN}-digit hex keys); remove it, or rerun the scene to write a new one")
    return plan


def load_plans(workdir: Path, name: str = PLAN, on_bad=None) -> dict[str, dict]:
    """{scene: plan} of every scene folder that has a ``name`` file. A damaged file raises
    InputError, or, with ``on_bad``, is reported to ``on_bad(message)`` and left out."""
    plans = {}
    for path in sorted(Path(workdir).glob(f"*/{name}")):
        try:
            plans[path.parent.name] = read_plan(path)
        except InputError as exc:
            if on_bad is None:
                raise
            on_bad(str(exc))
    return plans


def dependency_versions() -> dict:
    """Python, the project and every installed dependency of ``DEPENDENCIES``, with torch's CUDA
    build when torch is loaded: called in the stage process, so it records what the stage ran with."""
    from pipeline.version import DISTRIBUTION, version

    out = {"python": platform.python_version(), DISTRIBUTION: version()}
    for key, names in DEPENDENCIES.items():
        for name in names:
            try:
                out[key] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "version", None) is not None:
        out["torch_cuda"] = torch.version.cuda or "none"
    return out


def write_manifest(partial: Path, stage: str, key: str, config: dict, summary: dict,
                   seconds: float) -> dict:
    """Record every file (size, sha256) and write ``manifest.json`` last, atomically. The
    versions are those the stage process recorded (``VERSIONS``); empty when it left none."""
    files = {}
    for rel in _walk_files(partial):
        if rel.name in INTERNAL_FILES or rel.as_posix() == MANIFEST:
            continue
        full = partial / rel
        files[rel.as_posix()] = {"size": full.stat().st_size, "sha256": sha256_file(full)}
    manifest = {"stage": stage, "key": key, "files": files, "summary": summary,
                "seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "config": config, "versions": _recorded_versions(partial)}
    atomic_write_json(partial / MANIFEST, manifest)
    return manifest


def _recorded_versions(partial: Path) -> dict:
    try:
        versions = read_json(partial / VERSIONS)
    except (OSError, ValueError):
        return {}
    return versions if isinstance(versions, dict) else {}


def commit(partial: Path, final: Path) -> None:
    """Rename a finished ``.partial`` folder into place (an old half-folder is moved aside)."""
    for name in INTERNAL_FILES:
        (partial / name).unlink(missing_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


def lock_file(workdir: Path, scene: str, stage: str, key: str) -> Path:
    """The lock a run holds while it works on (or removes) one stage folder."""
    return scene_dir(workdir, scene) / ".locks" / f"{stage}-{key}.lock"


def scene_status(workdir: Path, on_bad: Callable[[str], None]) -> dict:
    """Each scene's stages and their state (done / partial / missing); a scene whose plan.json
    is damaged is left out and reported to ``on_bad``."""
    scenes = {}
    for scene, plan in load_plans(workdir, on_bad=lambda msg: on_bad(f"{msg}; scene skipped")).items():
        stages = {}
        for stage, key in plan["keys"].items():
            final = stage_dir(workdir, scene, stage, key)
            state = "done" if is_done(final) else "partial" if partial_dir(final).exists() else "missing"
            stages[stage] = {"state": state, "dir": str(final)}
        scenes[scene] = stages
    return {"scenes": scenes}


def collect_garbage(workdir: Path, on_removed: Callable[[Path], None]) -> tuple[int, int]:
    """Remove stage folders (and their lock files) that neither a scene's current plan nor its
    last finished run's plan points to, and temporary files of killed writes untouched for 10
    minutes; anything a run holds the lock of is kept. Returns (folders removed, temporary files
    removed). A damaged plan file raises before anything is removed."""
    removed = temps = 0
    pattern = re.compile(rf"^({'|'.join(STAGES)})-([0-9a-f]{{{KEY_LEN}}})(\.partial|\.lock)?$")
    done = load_plans(workdir, DONE_PLAN)
    for scene, plan in load_plans(workdir).items():
        keep = {f"{s}-{k}" for p in (plan, done.get(scene, {"keys": {}})) for s, k in p["keys"].items()}
        folder = scene_dir(workdir, scene)
        temps += len(remove_stale_temp_files(folder, older_than=600))
        for path in sorted([*folder.iterdir(), *folder.glob(".locks/*.lock")]):
            m = pattern.match(path.name)
            if not m or f"{m.group(1)}-{m.group(2)}" in keep:
                continue
            lock = lock_file(workdir, scene, m.group(1), m.group(2))
            with file_lock(lock, blocking=False) as held:
                if held is None or not path.exists():
                    continue
                if path != lock:
                    shutil.rmtree(path)
                    removed += 1
                    on_removed(path)
                final = stage_dir(workdir, scene, m.group(1), m.group(2))
                if not final.exists() and not partial_dir(final).exists():
                    lock.unlink(missing_ok=True)  # safe while held: waiters re-check the inode
    return removed, temps
