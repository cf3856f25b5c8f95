"""GPU slots for stages that ask for several GPUs (train.gpus / mesh.gpus = N): N cards held at
once or none, the Luigi resource units, and the CUDA_VISIBLE_DEVICES a stage process gets."""
from __future__ import annotations

import json
import threading
import time

import pytest

import tasks.gpus as gpus_mod
from tasks.execute import _call_stage
from tasks.gpus import gpu_slot, gpus_wanted, resource_units


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(gpus_mod, "LOCK_DIR", tmp_path / "locks")


def test_units_and_wanted():
    assert gpus_wanted(None) == 1 and gpus_wanted({"gpus": 3}) == 3 and gpus_wanted({"iterations": 5}) == 1
    assert resource_units({"gpus": 2}, ["0", "1", "2"]) == 2
    assert resource_units({"gpus": 4}, ["0", "1"]) == 2  # capped: the stage process then reports the problem
    assert resource_units({}, ["0"]) == 1


def test_two_cards_are_taken_together_or_not_at_all():
    cards = ["0", "1", "2"]
    got: list[tuple[str, float]] = []

    def second():
        with gpu_slot(cards, 2, poll=0.02) as ids:
            got.append((ids, time.monotonic()))

    with gpu_slot(cards, 2) as first:
        assert first == "0,1"
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        assert got == []  # card 2 alone is free: not enough, and it is not kept while waiting
        with gpu_slot(cards, 1, poll=0.02) as single:
            assert single == "2"
        released = time.monotonic()
    t.join(5)
    assert got and got[0][1] >= released and sorted(got[0][0].split(",")) in (["0", "1"], ["0", "2"], ["1", "2"])
    with pytest.raises(ValueError, match="3 GPUs asked for, but only 2 given"):
        with gpu_slot(["0", "1"], 3):
            pass


def _job(tmp_path, stage: str, gpus: int):
    out = tmp_path / f"{stage}.partial"
    out.mkdir()
    job = out / ".job.json"
    job.write_text(json.dumps({"stage": stage, "scene": "s", "out_dir": str(out), "inputs": {},
                               "section": {"gpus": gpus}, "source": None, "device": "auto"}))
    return job


def test_stage_process_sees_all_its_cards(tmp_path, monkeypatch):
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("PIPELINE_TRACE_FILE", str(trace))
    monkeypatch.setenv("PIPELINE_FAIL_STAGE", "train")  # the stage process ends at once, after tracing
    rc = _call_stage("train", _job(tmp_path, "train", 2), {"gpus": "0,1,2", "device": "auto"})
    assert rc == 4
    (line,) = trace.read_text().splitlines()
    assert json.loads(line)["cuda_visible_devices"] == "0,1"


def test_more_gpus_than_listed_is_a_config_error(tmp_path):
    job = _job(tmp_path, "mesh", 3)
    assert _call_stage("mesh", job, {"gpus": "0,1", "device": "auto"}) == 3
    err = json.loads((job.parent / ".error.json").read_text())
    assert err["kind"] == "ConfigError"
    assert err["message"] == "mesh.gpus=3 but --gpus lists 2 card(s) (0,1); list more cards or set mesh.gpus=2"
