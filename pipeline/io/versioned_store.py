"""A versioned store of embedding datasets: complete versions side by side, ``_LATEST`` naming the current one.

Layout under the store URL::

    v00001/ v00002/ ...     complete embed datasets, never modified once complete
    _LATEST                 {"version": "v00002", ...}: committed atomically, last; readers start here
    _LOCK                   the running writer's claim on the store, created exclusively
    _staging/v00003/        the run in progress

Readers need only `latest_version_url`; a writer holds `store_lock` for its whole run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.io.output import MANIFEST_FILE, PLAN_FILE, SUCCESS_FILE, DatasetError, OutputFolder
from pipeline.io.storage import create_exclusive, redact, with_retries

LATEST_FILE = "_LATEST"
LOCK_FILE = "_LOCK"
STAGING_DIR = "_staging"
VERSION_NAME = re.compile(r"^v(\d{5,})$")

Log = Callable[[str], None]


class StoreError(RuntimeError):
    """The store cannot be used as asked; the message names the store (and version or lock) and what to do."""


class LockHeld(StoreError):
    """Another run holds the store's ``_LOCK`` (or a crashed one left it)."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def version_name(number: int) -> str:
    return f"v{number:05d}"


def version_number(name: str) -> int | None:
    match = VERSION_NAME.match(name)
    return int(match.group(1)) if match else None


class Store(OutputFolder):
    """The snapshot store: an output folder whose versions are complete datasets, plus the few files
    that coordinate runs."""

    def url_of(self, *names: str) -> str:  # type: ignore[override]
        return "/".join([self.url, *names])

    def remove(self, *names: str) -> None:  # type: ignore[override]
        """Remove a file or folder; a version loses its success marker first, so a half-removed one reads as
        incomplete rather than as a dataset with missing parts."""
        name = "/".join(names)
        if self.exists(f"{name}/{SUCCESS_FILE}"):
            super().remove(f"{name}/{SUCCESS_FILE}")
        super().remove(name)

    def versions(self) -> dict[str, bool]:
        """Every version folder in the store -> whether it is complete (has its success marker)."""
        found = {
            name: self.exists(f"{name}/{SUCCESS_FILE}")
            for name in self.list()
            if version_number(name) is not None
        }
        return dict(sorted(found.items(), key=lambda item: version_number(item[0]) or 0))

    def latest(self) -> str | None:
        """The version _LATEST names (JSON, or a bare name written by hand for a rollback), checked complete."""
        data = self.read_bytes(LATEST_FILE)
        if data is None:
            if self.exists(SUCCESS_FILE) or self.exists(PLAN_FILE):
                raise StoreError(
                    f"{self.url}: holds a plain embed output, not a reembed store (no {LATEST_FILE}); "
                    "choose an empty --output for the store"
                )
            return None
        text = data.decode("utf-8", "replace").strip()
        try:
            parsed = json.loads(text)
            name = parsed.get("version") if isinstance(parsed, dict) else parsed
        except json.JSONDecodeError:
            name = text
        if not isinstance(name, str) or version_number(name) is None:
            raise StoreError(
                f"{self.url_of(LATEST_FILE)}: does not name a version like v00001 ({text[:80]!r})"
            )
        if not self.exists(f"{name}/{SUCCESS_FILE}"):
            self.child(name).is_complete()  # an earlier embedpipe's layout is named as such
            raise StoreError(
                f"{self.url_of(LATEST_FILE)}: names {name}, which is not a complete version "
                f"(no {self.url_of(name, SUCCESS_FILE)})"
            )
        return name

    def write_latest(self, name: str, info: dict) -> None:
        self.write_json(LATEST_FILE, {"version": name, **info})


def latest_version_url(store_url: str, storage_options: dict | None = None) -> str:
    """The URL of the version a store's _LATEST names: what dedup, mine or a reader should take as input."""
    store = Store(store_url, storage_options)
    name = store.latest()
    if name is None:
        raise StoreError(f"{store.url}: no {LATEST_FILE}; no reembed run has finished here")
    return store.url_of(name)


# -- the lock -------------------------------------------------------------------------------------


def describe_lock(holder: dict | None) -> str:
    if not holder:
        return "its holder is unknown (the lock file is empty or unreadable)"
    text = (
        f"held by run {holder.get('run', '?')} on host {holder.get('host', '?')} (pid {holder.get('pid', '?')}) "
        f"since {holder.get('started', '?')}"
    )
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            text += "; that process is gone, so the lock is stale"
        except OSError:
            pass
    return text


def read_lock(store: Store) -> dict | None:
    data = store.read_bytes(LOCK_FILE)
    if data is None:
        return None
    try:
        holder = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def store_lock(store: Store, break_lock: bool, log: Log) -> Iterator[dict]:
    """Hold ``_LOCK`` for the run: created exclusively (one of two concurrent runs wins), removed at the
    end only if it is still ours. A run that dies leaves it behind on purpose: nothing can tell a crashed
    run from a slow one, so the operator clears it (``--break-lock``)."""
    token = {"run": uuid.uuid4().hex[:16], "host": socket.gethostname(), "pid": os.getpid(), "started": now()}
    lock_url = store.url_of(LOCK_FILE)
    if break_lock:
        holder = read_lock(store)
        if holder is not None:
            log(f"--break-lock: removing {lock_url} ({describe_lock(holder)})")
            store.remove(LOCK_FILE)
    data = json.dumps(token).encode()
    try:
        created = with_retries(
            lambda: create_exclusive(store.fs, store.path_of(LOCK_FILE), data), what=lock_url
        )
    except Exception as exc:
        raise StoreError(
            redact(f"{lock_url}: cannot create the lock ({type(exc).__name__}: {exc})")
        ) from None
    if not created:
        holder = read_lock(store)
        if not (holder and holder.get("run") == token["run"]):  # our own write, seen again after a retry
            raise LockHeld(
                f"{lock_url} exists: {describe_lock(holder)}. Another reembed is writing this store, or a crashed "
                f"run left the lock. If no run is active, re-run with --break-lock (break_lock: true in a spec) "
                f"or delete {lock_url}."
            )
    try:
        yield token
    finally:
        holder = read_lock(store)
        if holder and holder.get("run") == token["run"]:
            store.remove(LOCK_FILE)
        else:
            log(f"warning: {lock_url} was taken over by another run ({describe_lock(holder)}); left in place")


# -- the previous version -------------------------------------------------------------------------


@dataclass
class Snapshot:
    """One complete version: its manifest, and its rows read column by column, part by part."""

    store: Store
    name: str
    manifest: dict

    @property
    def url(self) -> str:
        return self.store.url_of(self.name)

    @property
    def options(self) -> dict:
        return (self.manifest.get("reembed") or {}).get("options") or {}

    @property
    def parts(self) -> list[dict]:
        return self.manifest.get("parts") or []

    def index(self, columns: list[str]) -> pa.Table:
        """The given columns, part number and row within the part, for every row (no vectors read)."""
        return part_index(self.url, self.parts, columns, self.store.storage_options)

    def read_part(self, index: int) -> pa.Table:
        """Part ``index`` of the manifest, whole, checked against its checksum."""
        return self.store.child(self.name).read_part(self.parts[index])


def part_index(root: str, parts: list[dict], columns: list[str], storage_options: dict) -> pa.Table:
    """The given columns of every part (checked against its manifest checksum), with "__part" (its position
    in the manifest) and "__row" (within the part), so later steps find each row's vector without a lookup."""
    folder = OutputFolder(root, storage_options)
    tables = []
    for number, part in enumerate(parts):
        table = folder.read_part(part, columns)
        tables.append(
            table.append_column("__part", pa.array(np.full(table.num_rows, number, np.int32))).append_column(
                "__row", pa.array(np.arange(table.num_rows, dtype=np.int64))
            )
        )
    if not tables:
        raise DatasetError(f"{redact(root)}: the dataset has no parts")
    return pa.concat_tables(tables).combine_chunks()


def load_snapshot(store: Store, name: str) -> Snapshot:
    manifest = store.read_json(f"{name}/{MANIFEST_FILE}")
    if manifest is None:
        raise StoreError(f"{store.url_of(name)}: no {MANIFEST_FILE}")
    return Snapshot(store, name, manifest)


# -- housekeeping ---------------------------------------------------------------------------------


def clean_leftovers(store: Store, latest: str | None, log: Log) -> str:
    """Under the lock: drop incomplete versions (crashed runs) and other runs' staging; name the next version.
    The next version's own staging stays, so its embed job can resume."""
    versions = store.versions()
    for name, complete in versions.items():
        if not complete and name != latest:
            log(f"removing the incomplete version {store.url_of(name)} (left by a crashed run)")
            store.remove(name)
    numbers = [version_number(n) or 0 for n, complete in versions.items() if complete]
    numbers.append(version_number(latest) or 0 if latest else 0)
    following = version_name(max(numbers) + 1)
    for stage in store.list(STAGING_DIR):
        if stage != following:
            store.remove(STAGING_DIR, stage)
    return following


def prune(store: Store, keep: int | None, latest: str, log: Log) -> list[str]:
    """Keep the version _LATEST names and the newest ``keep - 1`` others; remove the rest."""
    if keep is None:
        return []
    others = [name for name in store.versions() if name != latest]
    kept = set(others[len(others) - (keep - 1) :]) if keep > 1 else set()
    pruned = [name for name in others if name not in kept]
    for name in pruned:
        log(f"pruning {store.url_of(name)}")
        store.remove(name)
    return pruned
