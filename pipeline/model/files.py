"""Model files: fetch a model directory from any fsspec URL into a local cache, fingerprint it, read its JSON.

The fingerprint is what makes outputs comparable: two runs that agree on it produce the same vectors.
Every file error is a ModelConfigError whose message starts with the file's path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

IGNORED_FILES = {"README.md", ".gitattributes"}


class ModelConfigError(ValueError):
    """A model directory that cannot be loaded; the message names the file and the problem."""


def read_json(path: Path) -> Any:
    """Read a JSON file; errors name the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path}: not valid JSON ({exc})") from None


def cache_root() -> Path:
    return Path(os.environ.get("EMBEDPIPE_CACHE", Path.home() / ".cache" / "embedpipe")) / "models"


def is_remote(path_or_url: str) -> bool:
    return "://" in path_or_url and not path_or_url.startswith("file://")


def local_model_dir(path_or_url: str | os.PathLike, storage_options: dict | None = None) -> Path:
    """A local directory for the model: the path itself, or a cached copy of a remote URL."""
    text = os.fspath(path_or_url)
    if not is_remote(text):
        return Path(text.removeprefix("file://"))
    import fsspec

    target = cache_root() / hashlib.sha256(text.encode()).hexdigest()[:24]
    if (target / ".complete").exists():
        return target
    fs, remote = fsspec.core.url_to_fs(text, **(storage_options or {}))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        for remote_file in sorted(fs.find(remote)):
            relative = os.path.relpath(remote_file, remote)
            if relative.startswith(".."):
                continue
            local = staging / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote_file, str(local))
        (staging / ".complete").write_text(text)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def fingerprint(root: Path, options: dict) -> str:
    """sha256 over every model file (path and bytes) and the options that change the vectors."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if path.name in IGNORED_FILES or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        digest.update(relative.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    digest.update(json.dumps(options, sort_keys=True).encode())
    return digest.hexdigest()[:32]
