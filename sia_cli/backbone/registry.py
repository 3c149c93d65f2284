"""The backbone registry (`weights.yaml`) and resolution of `--gan NAME_OR_PATH`.

An entry describes a set of weights (attribute names, image size, `thres_int`,
architecture) apart from where the file comes from: a path relative to the registry
file, a URL with its sha256 (downloaded once into the cache), or a file the user must
download by hand into the cache.

The registry is read from several files, later ones replacing earlier entries of the
same name (whole entries, not field by field):

1. the built-ins, `sia_cli/backbone/weights.yaml`, shipped in the package with the default
   backbone (`sia_cli/backbone/builtin/synth-faces-64/`), so an installed wheel works anywhere;
2. the user registry: the file named by `$SIA_WEIGHTS` when it is set (it must exist);
   otherwise `$XDG_CONFIG_HOME/sia/weights.yaml` (default `~/.config/sia/weights.yaml`)
   and then, when the package runs from a source checkout, the checkout's top-level
   `weights.yaml`, each only if it exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sia_cli.backbone.attgan import CARD_FILE, SETTING_FILE, AttGAN, build_backbone, latest_checkpoint, read_checkpoint
from sia_cli.errors import SiaError
from sia_cli.progress import ProgressFn, silent
from sia_cli.runs.files import atomic_output, file_sha256

PACKAGE_DIR = Path(__file__).resolve().parent  # sia_cli/backbone
BUILTIN_REGISTRY = PACKAGE_DIR / "weights.yaml"  # package data: the built-in entries
REPO_ROOT = PACKAGE_DIR.parent.parent  # the checkout, when the package is not installed from a wheel
DEFAULT_BACKBONE = "synth-faces-64"
CHUNK = 1 << 20


@dataclass
class RegistryEntry:
    name: str
    attributes: list[str]
    img_size: int
    thres_int: float
    arch: dict
    path: str | None = None
    url: str | None = None
    sha256: str | None = None
    manual: str | None = None
    description: str = ""
    card: dict = field(default_factory=dict)
    base: Path = field(default=PACKAGE_DIR)
    framing: str = "celeba"  # how its training faces were cropped (sia_cli.align.FRAMINGS)

    def setting(self) -> dict:
        """The entry in the shape of a public `setting.txt`."""
        return {**self.arch, "attrs": list(self.attributes), "img_size": self.img_size, "thres_int": self.thres_int}


def checkout_registry() -> Path | None:
    """The top-level `weights.yaml` of the source checkout this package runs from, if any."""
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "weights.yaml").is_file():
        return REPO_ROOT / "weights.yaml"
    return None


def config_registry() -> Path:
    """The per-user registry file: `$XDG_CONFIG_HOME/sia/weights.yaml` (default `~/.config/...`)."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "sia" / "weights.yaml"


def user_registry_files() -> list[Path]:
    """The user's registry files, in the order they are read (later entries win)."""
    if os.environ.get("SIA_WEIGHTS"):
        path = Path(os.environ["SIA_WEIGHTS"]).expanduser()
        if not path.is_file():
            raise SiaError(f"SIA_WEIGHTS names {path}, which is not a file")
        return [path]
    checkout = checkout_registry()
    return [path for path in (config_registry(), checkout) if path is not None and path.is_file()]


def registry_files() -> list[Path]:
    """Every registry file read, built-ins first."""
    return [BUILTIN_REGISTRY, *user_registry_files()]


def cache_dir() -> Path:
    if "SIA_CACHE" in os.environ:
        return Path(os.environ["SIA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sia"


def load_registry(path: Path | None = None) -> dict[str, RegistryEntry]:
    """The entries of one registry file, or with no `path` the merged registry (see the module doc)."""
    if path is None:
        entries: dict[str, RegistryEntry] = {}
        for file in registry_files():
            entries.update(load_registry(file))
        return entries
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SiaError(f"cannot parse backbone registry {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise SiaError(f"backbone registry {path} must map backbone names to entries")
    entries = {}
    for name, item in raw.items():
        try:
            source = item.get("source") or {}
            entries[name] = RegistryEntry(
                name=name,
                attributes=list(item["attributes"]),
                img_size=int(item["img_size"]),
                thres_int=float(item.get("thres_int", 0.5)),
                arch=dict(item.get("arch", {})),
                path=source.get("path"),
                url=source.get("url"),
                sha256=source.get("sha256"),
                manual=source.get("manual"),
                description=item.get("description", ""),
                card=dict(item.get("card") or {}),
                base=path.parent,
                framing=str(item.get("framing", "celeba")),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise SiaError(f"registry {path}: entry {name!r} is incomplete ({exc})") from None
    return entries


def download(url: str, sha256: str, dest: Path, progress: ProgressFn = silent, timeout: float = 30) -> Path:
    """Fetch `url` into `dest` once; the checksum is verified before the file takes its name."""
    sha256 = str(sha256).strip().lower()  # hexdigest() is lower case; registries often paste upper case
    if dest.is_file() and file_sha256(dest) == sha256:
        return dest
    digest = hashlib.sha256()
    with atomic_output(dest) as out:  # a failed or mismatched download leaves no temp file
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                total = int(response.headers.get("Content-Length") or 0)
                done = 0
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    progress(f"download {dest.name}", done, total or done)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SiaError(f"cannot download {url}: {reason} (offline? put the file at {dest} by hand)") from None
        if digest.hexdigest() != sha256:
            raise SiaError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest.hexdigest()}")
    return dest


@dataclass
class BackboneSource:
    """Where a backbone's weights are and how to read them."""

    name: str
    checkpoint: Path
    setting: dict
    card: dict = field(default_factory=dict)


def entry_source(entry: RegistryEntry, progress: ProgressFn = silent) -> BackboneSource:
    if entry.path:
        target = (entry.base / entry.path).resolve()
        source = path_source(target)
        return BackboneSource(entry.name, source.checkpoint, {**entry.setting(), **source.setting},
                              {**source.card, **entry.card})
    if entry.url:
        if not entry.sha256:
            raise SiaError(f"registry entry {entry.name!r} has a url but no sha256 to verify it")
        dest = cache_dir() / entry.name / Path(entry.url.split("?")[0]).name
        return BackboneSource(entry.name, download(entry.url, entry.sha256, dest, progress), entry.setting(),
                              entry.card)
    if entry.manual:
        folder = cache_dir() / entry.name
        found = latest_checkpoint(folder)
        if found is None:
            raise SiaError(f"backbone {entry.name!r} is not downloaded: {entry.manual.strip()} Put the file at "
                           f"{folder / 'weights.<epoch>.pth'}, for example {folder / 'weights.199.pth'} "
                           f"({folder / 'checkpoint'}/ works too)")
        return BackboneSource(entry.name, found, entry.setting(), {**read_card(found.parent), **entry.card})
    raise SiaError(f"registry entry {entry.name!r} names no source (path, url or manual)")


def path_source(path: Path) -> BackboneSource:
    """A checkpoint file, or a directory in the public experiment layout."""
    if path.is_dir():
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise SiaError(f"no weights.<n>.pth checkpoint in {path} or {path / 'checkpoint'}")
    elif path.is_file():
        checkpoint = path
    else:
        raise SiaError(f"backbone path not found: {path}")
    setting_dirs = _setting_folders(path)
    for folder in setting_dirs:
        if (folder / SETTING_FILE).is_file():
            return BackboneSource(str(path), checkpoint, read_setting(folder / SETTING_FILE), read_card(folder))
    raise SiaError(f"no {SETTING_FILE} found next to {checkpoint} (looked in {', '.join(map(str, setting_dirs))})")


def read_card(folder: Path) -> dict:
    """The backbone's `card.json` (what was measured about it), or {} when it has none."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SiaError(f"cannot read {path} as JSON: {exc}") from None
    if not isinstance(card, dict):
        raise SiaError(f"{path} must hold a JSON object")
    return card


def read_setting(path: Path) -> dict:
    try:
        setting = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SiaError(f"cannot read {path} as JSON: {exc}") from None
    if not isinstance(setting, dict) or "attrs" not in setting:
        raise SiaError(f"{path} has no 'attrs' list: not an AttGAN setting file")
    return setting


def _setting_folders(path: Path) -> list[Path]:
    """Where a backbone path's setting.txt may be: the folder itself, or beside a checkpoint file
    (and one level up, for the public checkpoint/ layout)."""
    return [path] if path.is_dir() else [path.parent, path.parent.parent]


def _lookup(name_or_path: str | None) -> Path | RegistryEntry:
    """`--gan` value -> an existing path, or else a registry entry. Paths win over registry names."""
    name_or_path = name_or_path or DEFAULT_BACKBONE
    candidate = Path(name_or_path).expanduser()
    if candidate.exists():
        return candidate
    registry = load_registry()
    if name_or_path in registry:
        return registry[name_or_path]
    known = ", ".join(sorted(registry)) or "none"
    raise SiaError(f"--gan {name_or_path!r} is neither a file, a directory nor a registry name (known: {known})")


def resolve(name_or_path: str | None, progress: ProgressFn = silent) -> BackboneSource:
    """`--gan` value -> weights file and settings."""
    found = _lookup(name_or_path)
    return path_source(found) if isinstance(found, Path) else entry_source(found, progress)


def framing_of(name_or_path: str | None) -> str:
    """The framing a backbone's training faces had (`sia align`), without loading its weights: the
    registry entry's `framing`, or a backbone folder's setting.txt `framing`; CelebA's by default,
    as for the public checkpoints."""
    found = _lookup(name_or_path)
    if isinstance(found, RegistryEntry):
        return found.framing
    for folder in _setting_folders(found):
        if (folder / SETTING_FILE).is_file():
            return str(read_setting(folder / SETTING_FILE).get("framing", "celeba"))
    return "celeba"


def load_backbone(name_or_path: str | None = None, device: str = "cpu", progress: ProgressFn = silent) -> AttGAN:
    source = resolve(name_or_path, progress)
    state = read_checkpoint(source.checkpoint)
    backbone = build_backbone(
        state, source.setting, name=source.name, path=str(source.checkpoint), sha256=file_sha256(source.checkpoint),
        card=source.card,
    )
    return backbone.to(device)
