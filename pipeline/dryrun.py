"""What a run would do, found without running or writing anything (``meshpipe plan``, ``run --dry-run``).

A plan from ``store.make_plan`` (the keys a run would use) is compared with the workdir: each
stage is ``done`` (its folder has a valid manifest), ``partial`` (only its ``.partial`` folder is
there: a killed run, or one in flight) or ``pending``. What would run follows Luigi's walk of the
graph: from the last stage back, a done stage is taken as it is and the walk stops there, so a
stage needed only by done stages is not run even when its own folder is gone.
"""
from __future__ import annotations

from pathlib import Path

from pipeline import store
from pipeline.dag import UPSTREAM


def _state(final: Path) -> str:
    if store.is_done(final):
        return "done"
    return "partial" if store.partial_dir(final).exists() else "pending"


def stage_states(workdir: Path, plan: dict) -> list[dict]:
    """One row per stage of ``plan`` in pipeline order: stage, key, dir, state and action
    (``cached``: done, taken as it is; ``run``; ``resume``: run, continuing in its ``.partial``
    folder; ``not needed``: not done, but every stage that needs it is)."""
    scene, keys = plan["scene"], plan["keys"]
    dirs = {stage: store.stage_dir(workdir, scene, stage, key) for stage, key in keys.items()}
    states = {stage: _state(folder) for stage, folder in dirs.items()}
    needed, todo = set(), [plan["until"]]
    while todo:
        stage = todo.pop()
        if stage not in needed and states[stage] != "done":
            needed.add(stage)
            todo.extend(UPSTREAM[stage])
    rows = []
    for stage, key in keys.items():
        if states[stage] == "done":
            action = "cached"
        elif stage in needed:
            action = "resume" if states[stage] == "partial" else "run"
        else:
            action = "not needed"
        rows.append({"stage": stage, "key": key, "dir": str(dirs[stage]), "state": states[stage], "action": action})
    return rows
