"""rembg model download on first use, against a local HTTP server serving a tiny ONNX model:
the exact rembg path, one request, checksum refusal, a dead server, MESHPIPE_OFFLINE; and our copy
of rembg's model-home logic against rembg's own."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import MaskConfig
from pipeline.errors import ConfigError, StageError
from stages import masks
from stages.masks import rembg as masks_rembg
from tests.test_masks import _run, disk_images, tiny_u2net

LOG = logging.getLogger("pipeline")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "rembg_home"
    monkeypatch.setenv("U2NET_HOME", str(home))
    monkeypatch.delenv("REMBG_HOME", raising=False)
    monkeypatch.delenv(masks_rembg.OFFLINE_ENV, raising=False)
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/served on 127.0.0.1; ``hits`` counts the GET requests."""
    served = tmp_path / "served"
    model = tiny_u2net(served / "u2net.onnx")
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}/u2net.onnx", "hits": hits,
           "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    httpd.shutdown()
    httpd.server_close()


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/u2net.onnx"


def cfg(**kw) -> MaskConfig:
    return dataclasses.replace(MaskConfig(), model="u2net", **kw)


def test_auto_downloads_once_to_rembgs_path_and_uses_it(tmp_path, home, server):
    target = home / "models" / "u2net" / "u2net.onnx"
    sfm = tmp_path / "sfm"
    disk_images(sfm)
    summary = _run(sfm, tmp_path / "out", model="u2net", model_url=server["url"], model_sha256=server["sha256"])
    assert summary["method"] == "rembg" and summary["computed"] == 4
    assert json.loads((tmp_path / "out" / "masks.json").read_text())["method"] == "rembg"
    assert target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == server["sha256"]
    assert server["hits"] == ["/u2net.onnx"]
    c = cfg(model_url=server["url"], model_sha256=server["sha256"])
    assert masks.resolve_method(c, None, LOG) == "rembg"
    assert masks.resolve_method(dataclasses.replace(c, method="rembg"), None, LOG) == "rembg"
    assert len(server["hits"]) == 1  # on disk now: no second download


def test_checksum_mismatch_keeps_nothing(home, server):
    wrong = "0" * 64
    for method in ("auto", "rembg"):
        with pytest.raises(StageError) as err:
            masks.resolve_method(cfg(method=method, model_url=server["url"], model_sha256=wrong), None, LOG)
        msg = str(err.value)
        assert "\n" not in msg and "checksum" in msg and server["url"] in msg
        assert f"expected sha256:{wrong}" in msg and f"got sha256:{server['sha256']}" in msg
        assert not (home / "models" / "u2net").exists()  # no model, no partial file, no empty folder
    assert len(server["hits"]) == 2


def test_unverified_download_only_with_skip(home, server, caplog):
    with pytest.raises(ConfigError, match="needs masks.model_sha256"):
        masks.resolve_method(cfg(model_url=server["url"]), None, LOG)
    with pytest.raises(ConfigError, match="model_sha256 is the checksum"):
        masks.resolve_method(cfg(model_sha256=server["sha256"]), None, LOG)
    with pytest.raises(ConfigError, match="cannot be combined"):
        masks.resolve_method(cfg(model_url=server["url"], model_sha256="skip", model_path="/x.onnx"), None, LOG)
    assert server["hits"] == []
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert masks.resolve_method(cfg(model_url=server["url"], model_sha256="skip"), None, LOG) == "rembg"
    assert "nothing verifies" in caplog.text
    assert (home / "models" / "u2net" / "u2net.onnx").is_file()
    assert masks_rembg.pop_model_origin("u2net") == {"model_source": "downloaded", "model_url": server["url"]}
    assert masks_rembg.pop_model_origin("u2net") == {"model_source": "disk"}


def test_dead_server_falls_back_in_auto_and_fails_in_one_line_for_rembg(home, caplog, monkeypatch):
    target = home / "models" / "u2net" / "u2net.onnx"
    c = cfg(model_url=dead_url(), model_sha256="0" * 64)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert masks.resolve_method(c, None, LOG) == "grabcut"
    assert str(target) in caplog.text and "using grabcut" in caplog.text and "ConnectionError" in caplog.text
    with pytest.raises(StageError) as err:
        masks.resolve_method(dataclasses.replace(c, method="rembg"), None, LOG)
    assert str(target) in str(err.value) and "\n" not in str(err.value)
    # rembg's own URL (https) through a proxy where nothing listens
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(var, dead_url().rsplit("/", 1)[0])
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(StageError, match="cannot be downloaded") as err:
        masks.resolve_method(cfg(method="rembg"), None, LOG)
    assert str(target) in str(err.value)
    assert time.perf_counter() - t0 < 5.0
    assert not target.parent.exists()


def test_offline_never_requests(home, server, caplog, monkeypatch):
    c = cfg(model_url=server["url"], model_sha256=server["sha256"])
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert masks.resolve_method(dataclasses.replace(c, download=False), None, LOG) == "grabcut"
        monkeypatch.setenv(masks_rembg.OFFLINE_ENV, "1")
        assert masks.resolve_method(c, None, LOG) == "grabcut"
    assert "masks.download=false" in caplog.text and "MESHPIPE_OFFLINE=1" in caplog.text
    with pytest.raises(StageError, match="MESHPIPE_OFFLINE=1"):
        masks.resolve_method(dataclasses.replace(c, method="rembg"), None, LOG)
    assert server["hits"] == []


@pytest.mark.parametrize("env", [
    {"U2NET_HOME": "~/u2", "REMBG_HOME": "/r", "XDG_DATA_HOME": "/x"},
    {"REMBG_HOME": "~/r", "XDG_DATA_HOME": "/x"},
    {"XDG_DATA_HOME": "/x"},
    {},
])
def test_model_home_matches_rembgs_own(env, tmp_path, monkeypatch):
    from rembg.sessions import sessions
    from rembg.sessions.base import BaseSession

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("U2NET_HOME", "REMBG_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    name = "isnet-general-use"
    assert masks_rembg.model_file(name) == Path(sessions[name].model_dir()) / f"{name}.onnx"
    assert masks_rembg.legacy_home() == Path(BaseSession.legacy_home())
    url, known = masks_rembg.rembg_source(name)
    assert url.startswith("https://") and url.endswith(f"{name}.onnx") and known.startswith("md5:")


def test_a_run_downloads_before_its_keys_so_the_next_run_reuses_them(tmp_path, home, server):
    """The CLI fetches the model before planning (``store.prepare_stages``): the first run's masks
    key already names the downloaded file, so a rerun computes the same keys; plans download nothing."""
    from pipeline import store
    from pipeline.config import load_config
    from pipeline.dag import Source

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    source = Source("images", str(tmp_path / "photos"))
    config = load_config("fast_cpu", ["masks.model=u2net", f"masks.model_url={server['url']}",
                                      f"masks.model_sha256=sha256:{server['sha256']}"])
    before = store.make_plan("s", source, config, "masks")["keys"]
    assert server["hits"] == []  # planning alone never downloads
    store.prepare_stages(config, "sfm", LOG)
    assert server["hits"] == []  # a run that stops before masks does not need the model
    store.prepare_stages(config, "masks", LOG)
    first = store.make_plan("s", source, config, "masks")["keys"]
    store.prepare_stages(config, "masks", LOG)
    assert len(server["hits"]) == 1 and (home / "models" / "u2net" / "u2net.onnx").is_file()
    assert store.make_plan("s", source, config, "masks")["keys"] == first
    assert first["masks"] != before["masks"] and first["sfm"] == before["sfm"]
