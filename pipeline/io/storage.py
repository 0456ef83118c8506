"""Object storage: fsspec URL -> filesystem, input listing, atomic commits, retries, secret redaction.

Everything that touches stored bytes goes through here, so commit and retry semantics live in one place.

Retries compose in three layers; each handles what the one below gives up on:

1. botocore retries a single HTTP request (5xx, throttling, connection errors); "legacy" mode by default,
   5 attempts, tune with `AWS_RETRY_MODE` / `AWS_MAX_ATTEMPTS` or `config_kwargs.retries`.
2. s3fs retries a whole boto call (only connection-level errors and SlowDown; `S3FileSystem.retries`).
3. `with_retries` retries a whole logical operation (a commit = upload + copy + delete, a read of one
   object, a listing), which is what a pipeline stage can safely repeat.
Worst case is multiplicative, but bounded: keep `attempts` small here.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

T = TypeVar("T")

MASK = "***"
TEMP_PREFIX = "_tmp."  # readers (pyarrow.dataset, expand_inputs) ignore names starting with "_" or "."

# Storage-option keys whose values are secrets (compared lower-cased, on the last dotted component).
_SECRET_KEYS = frozenset({
    "key", "secret", "token", "password", "passwd", "username",
    "access_key", "access_key_id", "secret_key", "secret_access_key", "session_token",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "security_token",
    "account_key", "sas_token", "client_secret", "connection_string", "credentials", "api_key",
})  # fmt: skip
_SECRET_KEY_PATTERN = re.compile(r"secret|passw|token|credential|private_key|api_key|account_key")
_SECRET_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING",
)  # fmt: skip
_MIN_SECRET_LEN = 4  # shorter values would mangle messages and protect nothing
_URL_USERINFO = re.compile(r"(?P<pre>\b[a-z][a-z0-9+.-]*://[^/@\s:]*):[^/@\s]+@", re.IGNORECASE)

# Secrets seen by `filesystem` in this process: redact() covers them without every caller passing them.
_known_secrets: set[str] = set()


class StorageError(Exception):
    """A storage operation failed for good (after retries). The message is already redacted.

    The original exception is kept in `cause` rather than chained, so tracebacks cannot print an
    unredacted message; it is dropped when pickled (e.g. sent from a Ray worker to the driver).
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause

    def __reduce__(self) -> tuple[type[StorageError], tuple[str]]:
        return (type(self), (str(self),))


# --------------------------------------------------------------------------- secrets


def is_secret_key(name: str) -> bool:
    """Whether a storage-option key (possibly dotted, e.g. `client_kwargs.aws_secret_access_key`) holds a secret."""
    last = name.rsplit(".", 1)[-1].lower()
    return last in _SECRET_KEYS or bool(_SECRET_KEY_PATTERN.search(last))


def secret_values(storage_options: Mapping[str, Any] | None) -> set[str]:
    """Every secret value in (nested) storage options, as strings."""
    found: set[str] = set()

    def leaves(value: Any) -> Iterable[Any]:
        if isinstance(value, Mapping):
            for v in value.values():
                yield from leaves(v)
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                yield from leaves(v)
        else:
            yield value

    def walk(options: Mapping[str, Any]) -> None:
        for k, v in options.items():
            if is_secret_key(str(k)):
                found.update(str(x) for x in leaves(v) if x is not None and not isinstance(x, bool))
            elif isinstance(v, Mapping):
                walk(v)

    walk(storage_options or {})
    return found


def remember_secrets(storage_options: Mapping[str, Any] | None) -> None:
    """Register option secrets so every later `redact` in this process masks them."""
    _known_secrets.update(secret_values(storage_options))


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """Replace secret values (given, remembered, and from AWS_*/AZURE_* env vars) and URL passwords with ***.

    Values shorter than 4 characters are left alone: masking them would garble the message.
    """
    from urllib.parse import quote

    values = set(_known_secrets)
    values.update(os.environ[name] for name in _SECRET_ENV if os.environ.get(name))
    values.update(str(s) for s in secrets or ())
    variants = {v for v in values if len(v) >= _MIN_SECRET_LEN}
    variants |= {quote(v, safe="") for v in variants}  # as it appears inside URLs
    for value in sorted(variants, key=len, reverse=True):  # longest first: no half-masked overlaps
        text = text.replace(value, MASK)
    return _URL_USERINFO.sub(rf"\g<pre>:{MASK}@", text)


def safe_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of the options with secret values masked, for logs and manifests."""

    def mask(options: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in options.items():
            if is_secret_key(str(k)) and v is not None:
                out[k] = MASK
            elif isinstance(v, Mapping):
                out[k] = mask(v)
            else:
                out[k] = v
        return out

    return mask(storage_options or {})


# --------------------------------------------------------------------------- options and filesystems


def _coerce(raw: str) -> Any:
    """CLI text -> bool / int / float / JSON object or list / string. Quote a value to keep it a string."""
    low = raw.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if re.fullmatch(r"[-+]?(0|[1-9][0-9]*)", raw):  # no leading zeros: "007" stays a string
        return int(raw)
    if re.fullmatch(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+)", raw):
        return float(raw)
    if raw[:1] in ("{", "[", '"'):
        with contextlib.suppress(ValueError):
            return json.loads(raw)
    return raw


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """Repeated `--storage-option KEY=VALUE` -> nested dict; dotted keys nest, later pairs win.

    `client_kwargs.region_name=x` -> {"client_kwargs": {"region_name": "x"}}. Errors name the pair,
    but never echo the value of a well-formed key (it may be a secret).
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--storage-option expects KEY=VALUE, got {pair!r}")
        parts = key.split(".")
        if not all(p.strip() for p in parts):
            raise ValueError(f"--storage-option has an empty key part in {key!r}=...")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ValueError(f"--storage-option {key!r}: {prefix!r} is already set to a non-object value")
            node = child
        node[parts[-1]] = _coerce(raw)
    return out


def filesystem(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL; plain paths and file:// are local.

    For s3:// with no endpoint option, botocore itself reads `AWS_ENDPOINT_URL` (and
    `AWS_ENDPOINT_URL_S3`), so it is not handled again here. Note fsspec caches instances by
    options, not by environment. Errors are redacted and unchained, so they cannot carry a secret.
    """
    options = dict(storage_options or {})
    remember_secrets(options)
    try:
        return fsspec.core.url_to_fs(url, **options)
    except Exception as exc:
        raise StorageError(redact(f"cannot open {url}: {type(exc).__name__}: {exc}"), exc) from None


# --------------------------------------------------------------------------- listing

_MAGIC = re.compile(r"[*?\[]")


def _hidden(name: str) -> bool:
    return name.startswith(("_", "."))


def _expand_one(fs: fsspec.AbstractFileSystem, url: str, path: str) -> list[str]:
    def files_under(root: str) -> list[str]:
        root = root.rstrip("/")
        found = []
        for name in fs.find(root, withdirs=False):
            rel = name[len(root) :].lstrip("/")
            if not any(_hidden(part) for part in rel.split("/")):
                found.append(name)
        return found

    if _MAGIC.search(path):
        explicit_hidden = _hidden(posixpath.basename(path))
        found = []
        for name, info in fs.glob(path, detail=True).items():
            if _hidden(posixpath.basename(name.rstrip("/"))) and not explicit_hidden:
                continue
            found.extend(files_under(name) if info.get("type") == "directory" else [name])
    else:
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"input not found: {url}") from None
        found = files_under(path) if info.get("type") == "directory" else [path]
    if not found:
        raise FileNotFoundError(f"input matches no files: {url}")
    return found


def expand_inputs(urls: Iterable[str], storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Input URLs -> the sorted, de-duplicated file URLs they denote (with protocol, e.g. s3://b/k).

    Globs are expanded; directories yield their files recursively, skipping names that start with
    "_" or "." (_SUCCESS, _tmp.* commits in flight, .hidden). Local files come back as file:// URLs.
    A URL that matches nothing is a FileNotFoundError naming it.
    """
    result: set[str] = set()
    for url in urls:
        fs, path = filesystem(url, storage_options)
        names = with_retries(lambda fs=fs, path=path, url=url: _expand_one(fs, url, path), what=url)
        result.update(fs.unstrip_protocol(name) for name in names)
    return sorted(result)


# --------------------------------------------------------------------------- atomic commit


def temp_path(path: str) -> str:
    """A unique hidden sibling of `path` (same directory, so a rename never crosses filesystems)."""
    parent, name = posixpath.split(path)
    return posixpath.join(parent, f"{TEMP_PREFIX}{uuid.uuid4().hex[:16]}.{name}")


def _commit(fs: fsspec.AbstractFileSystem, path: str, write_temp: Callable[[str], None]) -> None:
    """Write via `write_temp(tmp)` then move into place; on any failure remove the temporary and re-raise."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)  # object stores have no directories to make
    tmp = temp_path(path)
    try:
        write_temp(tmp)
        fs.mv(tmp, path)  # local: atomic rename; s3: server-side copy (atomic for readers) + delete
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm_file(tmp)
        except Exception as cleanup:
            logger.warning("could not remove temporary %s: %s", tmp, redact(str(cleanup)))
        raise


def commit_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Atomically (as readers see it) write `data` to `path`: whole or absent, never partial.

    Safe to wrap in `with_retries`: each attempt uses a fresh temporary name.
    """
    _commit(fs, path, lambda tmp: fs.pipe_file(tmp, data))


def commit_file(fs: fsspec.AbstractFileSystem, local_path: str, path: str) -> None:
    """Atomically upload the local file `local_path` to `path` (streamed; multipart where large)."""
    _commit(fs, path, lambda tmp: fs.put_file(local_path, tmp))


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Commit `obj` as indented UTF-8 JSON (plans, manifests: small files that must never be torn)."""
    commit_bytes(fs, path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` holding `data` only if nothing is there; False when it already exists (locks).

    Local: the bytes go to a temporary first and are hard-linked into place (link fails if the name
    exists, and a reader never sees a half-written file); where links are unsupported, open "xb".
    S3: a conditional PUT (If-None-Match: *), which AWS S3, MinIO and moto honour; a store that
    ignores the header would make this a plain write.
    """
    if isinstance(fs, LocalFileSystem):
        target = fs._strip_protocol(path)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        tmp = temp_path(target)
        try:
            with open(tmp, "xb") as handle:
                handle.write(data)
            try:
                os.link(tmp, target)
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
            try:
                with open(target, "xb") as handle:
                    handle.write(data)
                return True
            except FileExistsError:
                return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as exc:  # s3fs maps 412 to FileExistsError only when it sees the Condition field
        response = getattr(exc.__cause__, "response", None) or {}
        if response.get("Error", {}).get("Code") == "PreconditionFailed":
            return False
        raise
    return True


# --------------------------------------------------------------------------- retries

_PERMANENT: tuple[type[BaseException], ...] = (
    FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
    ValueError, TypeError, KeyError, NotImplementedError, StorageError,
)  # fmt: skip
_PERMANENT_ERRNO = frozenset({errno.EINVAL, errno.ENAMETOOLONG, errno.EMSGSIZE, errno.ENOSPC, errno.EROFS})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable",
})  # fmt: skip
_TRANSIENT_TEXT = re.compile(
    r"\b(?:HTTP|status|code)\D{0,3}5\d\d\b|SlowDown|InternalError|ServiceUnavailable|"
    r"reduce your request rate|Throttl",
    re.IGNORECASE,
)


@functools.cache
def _client_error_types() -> dict[str, tuple[type[BaseException], ...]]:
    """botocore/aiohttp exception classes, imported lazily (local-only use needs neither)."""
    types: dict[str, tuple[type[BaseException], ...]] = {
        "client": (),
        "network": (),
        "aiohttp": (),
        "aio_resp": (),
    }
    try:
        from botocore import exceptions as be
        from botocore.parsers import ResponseParserError

        types["client"] = (be.ClientError,)
        types["network"] = (
            be.HTTPClientError,
            be.ConnectionError,
            be.IncompleteReadError,
            ResponseParserError,
        )
    except ImportError:
        pass
    try:
        import aiohttp

        types["aiohttp"] = (aiohttp.ClientError,)
        types["aio_resp"] = (aiohttp.ClientResponseError,)
    except ImportError:
        pass
    return types


def _http_transient(status: int | None, code: str | None) -> bool:
    return (status is not None and (status >= 500 or status == 429)) or (code in _TRANSIENT_CODES)


def is_transient(exc: BaseException) -> bool:
    """Whether repeating the operation may succeed: throttling, 5xx, dropped connections, timeouts."""
    types = _client_error_types()
    # s3fs turns botocore ClientErrors into OSErrors, keeping the original as the cause: when S3
    # answered, its HTTP status and error code decide (4xx is permanent whatever the wrapper type).
    for candidate in (exc, exc.__cause__):
        if types["client"] and isinstance(candidate, types["client"]):
            response = getattr(candidate, "response", None) or {}
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response.get("Error", {}).get("Code")
            return _http_transient(status, code) or bool(_TRANSIENT_TEXT.search(str(code or "")))
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, OSError):  # includes ConnectionError, TimeoutError, socket.timeout
        return exc.errno not in _PERMANENT_ERRNO
    if types["network"] and isinstance(exc, types["network"]):
        return True
    if types["aio_resp"] and isinstance(exc, types["aio_resp"]):
        return _http_transient(exc.status, None)
    if types["aiohttp"] and isinstance(exc, types["aiohttp"]):
        return True
    return bool(_TRANSIENT_TEXT.search(str(exc)))


def backoff_delay(attempt: int, base_delay: float, max_delay: float) -> float:
    """Delay after failed attempt `attempt` (1-based): exponential, capped, "equal jitter" (half fixed,
    half random), so waits grow reliably but concurrent workers do not retry in lockstep."""
    ceiling = min(max_delay, base_delay * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def with_retries(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.2,
    max_delay: float = 5.0,
    what: str,
) -> T:
    """`fn()` with bounded retries on transient storage errors; permanent errors re-raise at once.

    After the last attempt raises StorageError naming `what` (e.g. the URL) and the cause, redacted.
    Each retry is logged at WARNING with its delay.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            cause = f"{type(exc).__name__}: {exc}"
            if attempt == attempts:
                message = f"{what}: failed after {attempts} attempts: {cause}"
                raise StorageError(redact(message), exc) from None
            delay = backoff_delay(attempt, base_delay, max_delay)
            logger.warning(
                "%s",
                redact(f"{what}: attempt {attempt}/{attempts} failed ({cause}); retrying in {delay:.2f}s"),
            )
            time.sleep(delay)
    raise AssertionError("unreachable")
