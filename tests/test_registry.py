"""The weights.yaml registry: path, url+sha256 (real local HTTP server) and manual entries."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch
import yaml

from sia_cli import registry
from sia_cli.errors import SiaError


def entry(tiny_setting: dict, source: dict) -> dict:
    arch = {k: v for k, v in tiny_setting.items() if k not in ("attrs", "n_attrs", "img_size", "thres_int")}
    return {"attributes": tiny_setting["attrs"], "img_size": 32, "thres_int": 0.5, "arch": arch, "source": source}


class Server:
    """A real HTTP server on 127.0.0.1 serving one folder; counts the GET requests per path."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{name}"


@pytest.fixture
def server(tmp_path, make_experiment):
    """Serves `tiny.pth`, a real small checkpoint (the highest epoch of a tiny experiment)."""
    exp = make_experiment(tmp_path / "served_exp", epochs=(3,))
    folder = tmp_path / "www"
    folder.mkdir()
    (folder / "tiny.pth").write_bytes((exp / "checkpoint" / "weights.3.pth").read_bytes())
    srv = Server(folder)
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Point the registry and the cache at tmp_path; returns (registry file, cache folder)."""
    weights, cache = tmp_path / "weights.yaml", tmp_path / "cache"
    monkeypatch.setenv("SIA_WEIGHTS", str(weights))
    monkeypatch.setenv("SIA_CACHE", str(cache))
    return weights, cache


def write_registry(path: Path, entries: dict) -> None:
    path.write_text(yaml.safe_dump(entries))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- path entries


def test_path_entry_is_resolved_relative_to_the_registry_file(env, tmp_path, make_experiment, tiny_setting):
    weights, _ = env
    make_experiment(tmp_path / "models" / "exp", epochs=(0, 4))
    write_registry(weights, {"local": entry(tiny_setting, {"path": "models/exp"})})
    backbone = registry.load_backbone("local")
    assert backbone.attributes == tiny_setting["attrs"]
    assert backbone.info.path.endswith("weights.4.pth")


# ----------------------------------------------------------------------------- url entries


def test_url_entry_downloads_once_into_the_cache_and_loads(env, server, tiny_setting):
    weights, cache = env
    sha = hashlib.sha256((server.folder / "tiny.pth").read_bytes()).hexdigest()
    write_registry(weights, {"remote": entry(tiny_setting, {"url": server.url("tiny.pth"), "sha256": sha})})
    calls = []
    backbone = registry.load_backbone("remote", progress=lambda task, done, total, info=None: calls.append((done, total)))
    cached = cache / "remote" / "tiny.pth"
    assert cached.is_file() and registry.file_sha256(cached) == sha
    assert backbone.attributes == tiny_setting["attrs"] and backbone.info.sha256 == sha
    assert server.requests == ["/tiny.pth"]
    # Progress reports growing byte counts that end at the file size.
    size = cached.stat().st_size
    assert calls and calls[-1] == (size, size)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    # Second use: served from the cache, no new request.
    registry.load_backbone("remote")
    assert server.requests == ["/tiny.pth"]


def test_wrong_checksum_leaves_nothing_in_the_cache(env, server, tiny_setting):
    weights, cache = env
    write_registry(weights, {"remote": entry(tiny_setting, {"url": server.url("tiny.pth"), "sha256": "0" * 64})})
    with pytest.raises(SiaError, match="checksum mismatch"):
        registry.resolve("remote")
    assert server.requests == ["/tiny.pth"]
    left = list(cache.rglob("*")) if cache.exists() else []
    assert not [p for p in left if p.is_file()], left


def test_uppercase_checksum_in_registry_is_accepted(env, server, tiny_setting):
    # sha256 sums are often pasted in upper case; hex digits compare case-insensitively.
    weights, _ = env
    sha = hashlib.sha256((server.folder / "tiny.pth").read_bytes()).hexdigest().upper()
    write_registry(weights, {"remote": entry(tiny_setting, {"url": server.url("tiny.pth"), "sha256": sha})})
    registry.resolve("remote")
    registry.resolve("remote")
    assert server.requests == ["/tiny.pth"]


def test_missing_file_on_server_is_a_clear_error(env, server, tiny_setting):
    weights, cache = env
    write_registry(weights, {"remote": entry(tiny_setting, {"url": server.url("nope.pth"), "sha256": "0" * 64})})
    with pytest.raises(SiaError) as exc:
        registry.resolve("remote")
    assert "cannot download" in str(exc.value) and "\n" not in str(exc.value)
    assert not (cache / "remote" / "nope.pth.part").exists()


def test_offline_download_is_one_clear_line(env, tiny_setting):
    weights, cache = env
    url = f"http://127.0.0.1:{closed_port()}/tiny.pth"
    write_registry(weights, {"remote": entry(tiny_setting, {"url": url, "sha256": "0" * 64})})
    with pytest.raises(SiaError) as exc:
        registry.resolve("remote")
    message = str(exc.value)
    assert "\n" not in message
    assert "cannot download" in message and url in message and str(cache / "remote" / "tiny.pth") in message
    assert not (cache / "remote" / "tiny.pth.part").exists()


def test_url_without_checksum_is_refused(env, tiny_setting):
    weights, _ = env
    write_registry(weights, {"remote": entry(tiny_setting, {"url": "http://127.0.0.1:9/x.pth"})})
    with pytest.raises(SiaError, match="sha256"):
        registry.resolve("remote")


# ----------------------------------------------------------------------------- manual entries


def test_manual_entry_says_where_to_put_the_file_then_loads_it(env, tiny_setting, tiny_state):
    weights, cache = env
    write_registry(weights, {"by-hand": entry(tiny_setting, {"manual": "Download weights.199.pth from the site."})})
    with pytest.raises(SiaError) as exc:
        registry.load_backbone("by-hand")
    assert "Download weights.199.pth from the site." in str(exc.value)
    assert str(cache / "by-hand") in str(exc.value)
    # The user follows the message: the file placed there loads with the registry's settings.
    (cache / "by-hand").mkdir(parents=True)
    torch.save(tiny_state(tiny_setting, 0), cache / "by-hand" / "weights.199.pth")
    backbone = registry.load_backbone("by-hand")
    assert backbone.attributes == tiny_setting["attrs"] and backbone.discriminator is not None


# ----------------------------------------------------------------------------- names and the registry file


def test_unknown_name_lists_the_known_names(env, tiny_setting):
    weights, _ = env
    write_registry(weights, {"alpha": entry(tiny_setting, {"path": "a"}), "beta": entry(tiny_setting, {"path": "b"})})
    with pytest.raises(SiaError) as exc:
        registry.resolve("gamma")
    assert "gamma" in str(exc.value) and "alpha, beta" in str(exc.value)


@pytest.mark.parametrize("text", ["- just\n- a list\n", "broken:\n  attributes: [a, b]\n", "x: {source: , img_size: 3, attributes: [a]}\n"])
def test_malformed_registry_is_a_clear_error(env, text):
    weights, _ = env
    weights.write_text(text)
    with pytest.raises(SiaError, match="registry"):
        registry.resolve("x")


def test_cache_dir_honours_sia_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SIA_CACHE", str(tmp_path / "c"))
    assert registry.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SIA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.cache_dir() == tmp_path / "xdg" / "sia"


def test_repository_registry_default_backbone_loads(monkeypatch):
    monkeypatch.delenv("SIA_WEIGHTS", raising=False)
    entries = registry.load_registry()
    assert registry.DEFAULT_BACKBONE in entries
    for item in entries.values():
        assert item.attributes and item.img_size > 0
        assert item.path or item.url or item.manual, item.name
    backbone = registry.load_backbone(None)  # no --gan: the default, offline
    assert backbone.info.name == registry.DEFAULT_BACKBONE
    assert len(backbone.attributes) == 15 and backbone.img_size == 64
    assert backbone.discriminator is not None
