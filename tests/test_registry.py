"""The weights.yaml registry: path, url+sha256 (real local HTTP server) and manual entries; the
built-in registry shipped in the package, merged with the user's files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import socket
import threading
from pathlib import Path

import pytest
import torch
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

from sia_cli.backbone import registry
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
    weights.write_text("{}\n")
    monkeypatch.setenv("SIA_WEIGHTS", str(weights))
    monkeypatch.setenv("SIA_CACHE", str(cache))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
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
    assert not list((cache / "remote").glob(".nope.pth.*"))  # no temp file left


def test_offline_download_is_one_clear_line(env, tiny_setting):
    weights, cache = env
    url = f"http://127.0.0.1:{closed_port()}/tiny.pth"
    write_registry(weights, {"remote": entry(tiny_setting, {"url": url, "sha256": "0" * 64})})
    with pytest.raises(SiaError) as exc:
        registry.resolve("remote")
    message = str(exc.value)
    assert "\n" not in message
    assert "cannot download" in message and url in message and str(cache / "remote" / "tiny.pth") in message
    assert not list((cache / "remote").glob(".tiny.pth.*"))  # no temp file left


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
    message = str(exc.value)
    assert "Download weights.199.pth from the site." in message
    # The user follows the message: the file placed at the path it names loads with the registry's settings.
    example = Path(re.search(r"for example (\S+\.pth)", message).group(1))
    assert example == cache / "by-hand" / "weights.199.pth"
    example.parent.mkdir(parents=True)
    torch.save(tiny_state(tiny_setting, 0), example)
    backbone = registry.load_backbone("by-hand")
    assert backbone.attributes == tiny_setting["attrs"] and backbone.discriminator is not None


def test_the_public_celeba_backbone_says_which_project_which_file_and_where(env):
    _, cache = env
    with pytest.raises(SiaError) as exc:
        registry.load_backbone("attgan-celeba-128")
    message = " ".join(str(exc.value).split())
    assert "AttGAN-PyTorch" in message and "128_shortcut1_inject1_none" in message
    assert f"for example {cache / 'attgan-celeba-128' / 'weights.199.pth'}" in message


# ----------------------------------------------------------------------------- names and the registry file


def test_unknown_name_lists_the_known_names(env, tiny_setting):
    weights, _ = env
    write_registry(weights, {"alpha": entry(tiny_setting, {"path": "a"}), "beta": entry(tiny_setting, {"path": "b"})})
    with pytest.raises(SiaError) as exc:
        registry.resolve("gamma")
    # The user's entries and the built-ins, sorted.
    assert "gamma" in str(exc.value) and "(known: alpha, attgan-celeba-128, beta, synth-faces-64)" in str(exc.value)


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


def test_repository_registry_default_backbone_loads(monkeypatch, tmp_path):
    monkeypatch.delenv("SIA_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    entries = registry.load_registry()
    assert registry.DEFAULT_BACKBONE in entries
    for item in entries.values():
        assert item.attributes and item.img_size > 0
        assert item.path or item.url or item.manual, item.name
    backbone = registry.load_backbone(None)  # no --gan: the default, offline
    assert backbone.info.name == registry.DEFAULT_BACKBONE
    assert len(backbone.attributes) == 15 and backbone.img_size == 64
    assert backbone.discriminator is not None


# ----------------------------------------------------------------------------- built-ins and user registries

REPO = Path(__file__).resolve().parents[1]


def test_default_backbone_is_built_in_and_ships_inside_the_package():
    builtins = registry.load_registry(registry.BUILTIN_REGISTRY)
    assert registry.BUILTIN_REGISTRY.parent == registry.PACKAGE_DIR
    default = builtins[registry.DEFAULT_BACKBONE]
    folder = (registry.BUILTIN_REGISTRY.parent / default.path).resolve()
    assert folder.is_relative_to(registry.PACKAGE_DIR), folder  # so the wheel carries it
    source = registry.entry_source(default)
    assert source.checkpoint.is_file() and source.card and source.setting["attrs"] == default.attributes
    for path in folder.rglob("*"):
        assert path.stat().st_size < 5_000_000, path  # every file stays under 5 MB


def test_package_data_patterns_cover_the_builtin_registry_and_backbones():
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sia_cli"]
    shipped = [p for p in registry.PACKAGE_DIR.rglob("*")
               if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert shipped, "no package data found"
    for path in shipped:
        rel = path.relative_to(REPO / "sia_cli")  # package-data patterns are relative to the package
        assert any(rel.match(pattern) for pattern in patterns), f"{rel} is not in [tool.setuptools.package-data]"


def test_repository_weights_yaml_adds_to_the_builtins_without_copying_them():
    # The top-level file holds the user-editable extras; each built-in lives only in sia_cli/backbone/weights.yaml.
    top = registry.load_registry(REPO / "weights.yaml")
    builtins = registry.load_registry(registry.BUILTIN_REGISTRY)
    assert not set(top) & set(builtins), "an entry is kept in both weights.yaml files"
    assert "synth-faces-64" in builtins and "attgan-celeba-128" in builtins


def test_checkout_registry_is_read_only_from_a_source_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv("SIA_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert registry.checkout_registry() == REPO / "weights.yaml"  # the tests run from the checkout
    # Installed from a wheel, the package's parent is site-packages: no pyproject.toml there.
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "weights.yaml").write_text("stray: {attributes: [a], img_size: 8, source: {path: x}}\n")
    monkeypatch.setattr(registry, "REPO_ROOT", site)
    assert registry.checkout_registry() is None
    assert registry.registry_files() == [registry.BUILTIN_REGISTRY]
    assert registry.DEFAULT_BACKBONE in registry.load_registry() and "stray" not in registry.load_registry()


def test_user_entries_override_builtins_by_name_and_add_new_ones(env, tmp_path, make_experiment, tiny_setting):
    weights, _ = env
    make_experiment(tmp_path / "mine", epochs=(2,))
    write_registry(weights, {
        "synth-faces-64": entry(tiny_setting, {"path": "mine"}),  # replaces the built-in, whole
        "extra": entry(tiny_setting, {"path": "mine"}),
    })
    entries = registry.load_registry()
    assert {"synth-faces-64", "extra", "attgan-celeba-128"} <= set(entries)
    assert entries["synth-faces-64"].base == tmp_path and entries["synth-faces-64"].img_size == 32
    assert registry.load_backbone(None).attributes == tiny_setting["attrs"]  # the default name, overridden
    assert registry.load_backbone("extra").info.path.endswith("weights.2.pth")


def test_config_file_is_the_user_registry_when_sia_weights_is_unset(monkeypatch, tmp_path, make_experiment,
                                                                    tiny_setting):
    monkeypatch.delenv("SIA_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setattr(registry, "REPO_ROOT", tmp_path / "not-a-checkout")
    config = tmp_path / "config" / "sia" / "weights.yaml"
    assert registry.config_registry() == config
    config.parent.mkdir(parents=True)
    make_experiment(config.parent / "gans" / "mine", epochs=(1,))
    write_registry(config, {"mine": entry(tiny_setting, {"path": "gans/mine"})})
    assert registry.registry_files() == [registry.BUILTIN_REGISTRY, config]
    assert registry.load_backbone("mine").info.path.endswith("weights.1.pth")
    assert registry.resolve(None).name == registry.DEFAULT_BACKBONE  # the built-in default is still there


def test_checkout_file_is_read_after_the_config_file(monkeypatch, tmp_path, tiny_setting):
    monkeypatch.delenv("SIA_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("")
    write_registry(checkout / "weights.yaml", {"both": entry(tiny_setting, {"path": "from-checkout"})})
    (tmp_path / "config" / "sia").mkdir(parents=True)
    write_registry(registry.config_registry(), {"both": entry(tiny_setting, {"path": "from-config"}),
                                                "config-only": entry(tiny_setting, {"path": "c"})})
    monkeypatch.setattr(registry, "REPO_ROOT", checkout)
    entries = registry.load_registry()
    assert entries["both"].path == "from-checkout" and "config-only" in entries


def test_sia_weights_replaces_the_config_and_checkout_files(env, monkeypatch, tmp_path, tiny_setting):
    weights, _ = env
    (tmp_path / "config" / "sia").mkdir(parents=True)
    write_registry(registry.config_registry(), {"config-only": entry(tiny_setting, {"path": "c"})})
    write_registry(weights, {"mine": entry(tiny_setting, {"path": "m"})})
    assert registry.registry_files() == [registry.BUILTIN_REGISTRY, weights]
    assert set(registry.load_registry()) == {"mine", "synth-faces-64", "attgan-celeba-128"}


def test_sia_weights_naming_a_missing_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SIA_WEIGHTS", str(tmp_path / "typo.yaml"))
    with pytest.raises(SiaError, match="SIA_WEIGHTS names .*typo.yaml, which is not a file"):
        registry.resolve("synth-faces-64")
    # A path given as --gan does not need the registry at all.
    assert registry.resolve(str(registry.PACKAGE_DIR / "builtin" / "synth-faces-64")).checkpoint.is_file()
