"""pipeline.io.storage against a local disk and a real S3 server (moto over HTTP), with real faults."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.io.storage import (
    StorageError,
    backoff_delay,
    commit_bytes,
    commit_file,
    expand_inputs,
    filesystem,
    is_transient,
    parse_storage_options,
    redact,
    safe_options,
    with_retries,
    write_json_atomic,
)
from tests.support.faultproxy import FaultProxy
from tests.support.s3server import S3Bucket

DISTINCT_SECRET = "Qx7-embedpipe-DISTINCT-secret-91f3"


def no_inner_retries(fs: Any) -> Any:
    """Switch off s3fs's own retry loop (botocore's is off via config_kwargs), so every fault the
    proxy injects reaches `with_retries` and request counts are exact."""
    fs.retries = 1
    return fs


def proxied_options(bucket: S3Bucket, proxy: FaultProxy) -> dict[str, Any]:
    opts = proxy.storage_options(bucket.storage_options)
    opts["config_kwargs"] = {"retries": {"total_max_attempts": 1}, "connect_timeout": 5, "read_timeout": 10}
    return opts


def s3_names(bucket: S3Bucket, prefix: str = "") -> list[str]:
    """Every key in the bucket (fresh listing, straight from the server), relative to the bucket."""
    bucket.fs.invalidate_cache()
    root = f"{bucket.name}/{prefix}".rstrip("/")
    return sorted(p[len(bucket.name) + 1 :] for p in bucket.fs.find(root))


def retry_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [float(m) for m in re.findall(r"retrying in ([0-9.]+)s", caplog.text)]


# --------------------------------------------------------------------------- options


def test_parse_storage_options_coerces_and_nests() -> None:
    opts = parse_storage_options(
        [
            "anon=false",
            "use_ssl=TRUE",
            "default_block_size=1048576",
            "listings_expiry_time=1.5",
            'config_kwargs={"retries": {"max_attempts": 2}}',
            "client_kwargs.endpoint_url=http://127.0.0.1:9000/?a=b",
            "client_kwargs.verify=false",
            "key=007",  # leading zeros: a credential, not a number
            'token="12345"',  # quoted: forced string
            "s3_additional_kwargs.ServerSideEncryption=AES256",
            "tags=[1, 2]",
            "bad_json={not json",
        ]
    )
    assert opts == {
        "anon": False,
        "use_ssl": True,
        "default_block_size": 1048576,
        "listings_expiry_time": 1.5,
        "config_kwargs": {"retries": {"max_attempts": 2}},
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000/?a=b", "verify": False},
        "key": "007",
        "token": "12345",
        "s3_additional_kwargs": {"ServerSideEncryption": "AES256"},
        "tags": [1, 2],
        "bad_json": "{not json",
    }
    # later pairs win; a dotted key merges into an object given as JSON
    assert parse_storage_options(["a=1", "a=2"]) == {"a": 2}
    assert parse_storage_options(['c={"x": 1}', "c.y=2"]) == {"c": {"x": 1, "y": 2}}


@pytest.mark.parametrize("pair", ["novalue", "=x", "a..b=1", "client_kwargs.=1"])
def test_parse_storage_options_error_names_the_pair(pair: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_storage_options(["ok=1", pair])
    assert pair.split("=")[0] in str(err.value)


def test_parse_storage_options_errors_do_not_echo_values() -> None:
    with pytest.raises(ValueError) as err:
        parse_storage_options(
            ["client_kwargs=plain", f"client_kwargs.aws_secret_access_key={DISTINCT_SECRET}"]
        )
    assert "client_kwargs" in str(err.value)
    assert DISTINCT_SECRET not in str(err.value)


# --------------------------------------------------------------------------- filesystems


def test_filesystem_local_paths(tmp_path: Path) -> None:
    for url in (str(tmp_path / "x.parquet"), f"file://{tmp_path}/x.parquet"):
        fs, path = filesystem(url)
        assert isinstance(fs, LocalFileSystem)
        assert path == f"{tmp_path}/x.parquet"


def test_filesystem_error_is_redacted() -> None:
    with pytest.raises(StorageError) as err:
        filesystem(f"nosuchproto://{DISTINCT_SECRET}/x", {"secret": DISTINCT_SECRET})
    assert "nosuchproto://***/x" in str(err.value)
    assert DISTINCT_SECRET not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_s3_endpoint_from_environment(
    s3_bucket: S3Bucket, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS_ENDPOINT_URL alone reaches the server: botocore reads it, so storage.py need not."""
    s3_bucket.fs.pipe_file(f"{s3_bucket.name}/k.txt", b"via env")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    fs, path = filesystem(s3_bucket.path("k.txt"), {"skip_instance_cache": True})
    assert fs.cat_file(path) == b"via env"


# --------------------------------------------------------------------------- listing


def make_tree(root: Path) -> None:
    files = [
        "data/a.parquet",
        "data/sub/b.parquet",
        "data/sub/deeper/c.parquet",
        "data/_SUCCESS",
        "data/.hidden",
        "data/_tmp.0a1b.part-00003.parquet",
        "data/_logs/run.log",
        "data/.cache/blob",
        "other/d.jsonl",
    ]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)


def test_expand_inputs_local(tmp_path: Path) -> None:
    make_tree(tmp_path)
    url = f"file://{tmp_path}"
    got = expand_inputs(
        [
            str(tmp_path / "data"),  # directory: recursive, hidden and _-names skipped
            f"{tmp_path}/data/sub/*.parquet",  # overlaps the directory: deduplicated
            f"{url}/other/d.jsonl",  # explicit file
        ],
        None,
    )
    assert got == [
        f"{url}/data/a.parquet",
        f"{url}/data/sub/b.parquet",
        f"{url}/data/sub/deeper/c.parquet",
        f"{url}/other/d.jsonl",
    ]
    # a glob skips hidden names too, unless the pattern itself asks for them
    assert expand_inputs([f"{tmp_path}/data/*"]) == [
        f"{url}/data/a.parquet",
        f"{url}/data/sub/b.parquet",
        f"{url}/data/sub/deeper/c.parquet",
    ]
    assert expand_inputs([f"{tmp_path}/data/_S*"]) == [f"{url}/data/_SUCCESS"]
    # an explicitly named file is never skipped
    assert expand_inputs([f"{tmp_path}/data/_SUCCESS"]) == [f"{url}/data/_SUCCESS"]


@pytest.mark.parametrize("suffix", ["missing.parquet", "data/*.jsonl", "empty"])
def test_expand_inputs_local_nothing_matches(tmp_path: Path, suffix: str) -> None:
    make_tree(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    url = f"{tmp_path}/{suffix}"
    with pytest.raises(FileNotFoundError, match=re.escape(url)):
        expand_inputs([f"{tmp_path}/data", url])


def test_expand_inputs_s3(s3_bucket: S3Bucket) -> None:
    fs, b = s3_bucket.fs, s3_bucket.name
    for name in [
        "in/a.parquet",
        "in/p=1/b.parquet",
        "in/p=2/c.parquet",
        "in/_SUCCESS",
        "in/.keep",
        "x.jsonl",
    ]:
        fs.pipe_file(f"{b}/{name}", name.encode())
    opts = s3_bucket.storage_options
    assert expand_inputs([s3_bucket.path("in"), s3_bucket.path("in/p=*/*.parquet")], opts) == [
        s3_bucket.path("in/a.parquet"),
        s3_bucket.path("in/p=1/b.parquet"),
        s3_bucket.path("in/p=2/c.parquet"),
    ]
    assert expand_inputs([s3_bucket.path("**/*.jsonl"), s3_bucket.path("in/p=2/")], opts) == [
        s3_bucket.path("in/p=2/c.parquet"),
        s3_bucket.path("x.jsonl"),
    ]
    for missing in (s3_bucket.path("nope/"), s3_bucket.path("in/*.csv"), "s3://no-such-bucket-embedpipe/x"):
        with pytest.raises(FileNotFoundError, match=re.escape(missing)):
            expand_inputs([s3_bucket.path("in"), missing], opts)


# --------------------------------------------------------------------------- atomic commit


def test_commit_local(tmp_path: Path) -> None:
    fs, out = filesystem(str(tmp_path / "out"))
    commit_bytes(fs, f"{out}/part-00000.bin", b"first")
    commit_bytes(fs, f"{out}/part-00000.bin", b"second")  # replaces
    src = tmp_path / "local.bin"
    src.write_bytes(os.urandom(100_000))
    commit_file(fs, str(src), f"{out}/part-00001.bin")
    write_json_atomic(fs, f"{out}/_manifest.json", {"parts": 2, "name": "é"})
    assert sorted(os.listdir(tmp_path / "out")) == ["_manifest.json", "part-00000.bin", "part-00001.bin"]
    assert (tmp_path / "out/part-00000.bin").read_bytes() == b"second"
    assert (tmp_path / "out/part-00001.bin").read_bytes() == src.read_bytes()
    assert json.loads((tmp_path / "out/_manifest.json").read_text()) == {"parts": 2, "name": "é"}


def test_commit_local_failure_leaves_nothing(tmp_path: Path) -> None:
    fs, out = filesystem(str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError):
        commit_file(fs, str(tmp_path / "does-not-exist"), f"{out}/part-00000.bin")
    with pytest.raises(TypeError):
        write_json_atomic(fs, f"{out}/_plan.json", {"x": object()})
    assert os.listdir(tmp_path / "out") == []


def test_commit_s3(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    fs, out = filesystem(s3_bucket.path("out"), s3_bucket.storage_options)
    data = os.urandom(3 * 2**20)
    commit_bytes(fs, f"{out}/part-00000.bin", data)
    src = tmp_path / "t.parquet"
    table = pa.table({"id": list(range(1000)), "text": [f"row {i}" for i in range(1000)]})
    pq.write_table(table, src)
    commit_file(fs, str(src), f"{out}/part-00001.parquet")
    write_json_atomic(fs, f"{out}/_manifest.json", {"parts": 2})
    assert s3_names(s3_bucket) == ["out/_manifest.json", "out/part-00000.bin", "out/part-00001.parquet"]
    assert fs.cat_file(f"{out}/part-00000.bin") == data
    assert pq.read_table(f"{out}/part-00001.parquet", filesystem=fs).equals(table)
    assert json.loads(fs.cat_file(f"{out}/_manifest.json")) == {"parts": 2}


def is_copy(method: str, path: str, headers: Any) -> bool:
    return method == "PUT" and "x-amz-copy-source" in headers


def is_put_object(method: str, path: str, headers: Any) -> bool:
    return method == "PUT" and "x-amz-copy-source" not in headers


@pytest.mark.parametrize("fails", [is_put_object, is_copy], ids=["upload-fails", "rename-fails"])
def test_commit_s3_failure_leaves_nothing_visible(s3_bucket: S3Bucket, s3_server: Any, fails: Any) -> None:
    """Whether the upload or the copy to the final name fails, the final name never appears and the
    temporary (already uploaded in the rename case) is removed."""
    with FaultProxy(s3_server.endpoint, error_rate=1.0, fault_filter=fails) as proxy:
        fs, out = filesystem(s3_bucket.path("out"), proxied_options(s3_bucket, proxy))
        no_inner_retries(fs)
        with pytest.raises(OSError):
            commit_bytes(fs, f"{out}/part-00000.bin", os.urandom(200_000))
        assert proxy.stats["slowdown"] + proxy.stats["internal"] == 1
    assert s3_names(s3_bucket) == []


# --------------------------------------------------------------------------- retries


def test_with_retries_completes_through_faults(
    s3_bucket: S3Bucket, s3_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """5% error answers + 5% connection resets, no retries below us: every commit and read still
    completes, with exactly the original bytes, and nothing temporary is left behind."""
    payloads = {
        f"out/part-{i:05d}.bin": os.urandom(n) for i, n in enumerate([0, 1, 1000, 70_000, 3 * 2**20] * 3)
    }
    caplog.set_level(logging.WARNING, logger="pipeline.io.storage")
    with FaultProxy(s3_server.endpoint, error_rate=0.05, reset_rate=0.05, seed=3) as proxy:
        fs, _ = filesystem(s3_bucket.url, proxied_options(s3_bucket, proxy))
        no_inner_retries(fs)
        for key, data in payloads.items():
            url = s3_bucket.path(key)
            with_retries(
                lambda k=key, d=data: commit_bytes(fs, f"{s3_bucket.name}/{k}", d), what=url, base_delay=0.01
            )
        for key, data in payloads.items():
            url = s3_bucket.path(key)
            got = with_retries(lambda k=key: fs.cat_file(f"{s3_bucket.name}/{k}"), what=url, base_delay=0.01)
            assert got == data, key
        # parquet through pyarrow over the same faulty connection
        table = pa.table({"id": list(range(5000)), "x": [float(i) for i in range(5000)]})
        path = f"{s3_bucket.name}/t.parquet"
        with_retries(lambda: pq.write_table(table, path, filesystem=fs), what=path, base_delay=0.01)
        assert with_retries(lambda: pq.read_table(path, filesystem=fs), what=path, base_delay=0.01).equals(
            table
        )
        stats = dict(proxy.stats)
    assert stats.get("reset", 0) > 0 and stats.get("slowdown", 0) + stats.get("internal", 0) > 0, stats
    assert len(retry_delays(caplog)) > 0  # our layer did the recovering
    assert s3_names(s3_bucket) == sorted([*payloads, "t.parquet"])


@pytest.mark.parametrize("fault", ["error_rate", "reset_rate"])
def test_with_retries_gives_up_after_bounded_attempts(
    s3_bucket: S3Bucket, s3_server: Any, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    s3_bucket.fs.pipe_file(f"{s3_bucket.name}/k.bin", b"data")
    url = s3_bucket.path("k.bin")
    caplog.set_level(logging.WARNING, logger="pipeline.io.storage")
    with FaultProxy(s3_server.endpoint, **{fault: 1.0}) as proxy:
        fs, path = filesystem(url, proxied_options(s3_bucket, proxy))
        no_inner_retries(fs)
        with pytest.raises(StorageError) as err:
            with_retries(lambda: fs.cat_file(path), what=url, attempts=4, base_delay=0.02, max_delay=1.0)
        requests = proxy.stats["requests"]
    message = str(err.value)
    assert url in message and "after 4 attempts" in message
    if fault == "error_rate":
        # HEAD answers have no body, so the text is the HTTP reason rather than S3's error code
        assert re.search("SlowDown|Service Unavailable|Internal", message, re.IGNORECASE)
    # bounded: s3fs's cat_file makes one or two requests (HEAD for the size, then GET or a listing)
    assert 4 <= requests <= 8
    delays = retry_delays(caplog)
    assert len(delays) == 3
    for attempt, delay in enumerate(delays, start=1):  # exponential back-off with jitter inside bounds
        ceiling = 0.02 * 2 ** (attempt - 1)
        assert ceiling / 2 - 0.01 <= delay <= ceiling + 0.01
    assert delays == sorted(delays)


def test_with_retries_permanent_errors_raise_at_once(s3_bucket: S3Bucket) -> None:
    calls = []

    def read_missing() -> bytes:
        calls.append(1)
        return s3_bucket.fs.cat_file(f"{s3_bucket.name}/missing")

    with pytest.raises(FileNotFoundError):
        with_retries(read_missing, what="s3://x/missing", base_delay=0.01)
    assert len(calls) == 1


def _client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")  # type: ignore[arg-type]


def _wrapped(status: int, code: str, exc: OSError) -> OSError:
    """How s3fs surfaces a ClientError: an OSError whose cause is the ClientError."""
    exc.__cause__ = _client_error(status, code)
    return exc


def _transient_cases() -> list[tuple[str, BaseException, bool]]:
    import aiohttp
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, NoCredentialsError

    return [
        ("not-found", FileNotFoundError("s3://b/k"), False),
        ("permission", PermissionError("denied"), False),
        ("value", ValueError("bad"), False),
        ("reset", ConnectionResetError(errno.ECONNRESET, "reset"), True),
        ("timeout", TimeoutError("timed out"), True),
        ("eio", OSError(errno.EIO, "We encountered an internal error"), True),
        ("einval", OSError(errno.EINVAL, "invalid argument"), False),
        ("client-503", _client_error(503, "SlowDown"), True),
        ("client-403", _client_error(403, "AccessDenied"), False),
        ("s3fs-500", _wrapped(500, "InternalError", OSError(errno.EIO, "internal")), True),
        ("s3fs-400", _wrapped(400, "InvalidRequest", OSError(errno.EIO, "bad request")), False),
        ("endpoint", EndpointConnectionError(endpoint_url="http://x"), True),
        ("closed", ConnectionClosedError(endpoint_url="http://x"), True),
        ("no-credentials", NoCredentialsError(), False),
        ("aiohttp-disconnect", aiohttp.ServerDisconnectedError(), True),
        ("text-503", RuntimeError("HTTP 503 Service Unavailable"), True),
        ("text-slowdown", RuntimeError("SlowDown: please reduce your request rate"), True),
        ("other", RuntimeError("row 500 is malformed"), False),
    ]


@pytest.mark.parametrize("name,exc,expected", _transient_cases(), ids=[c[0] for c in _transient_cases()])
def test_is_transient(name: str, exc: BaseException, expected: bool) -> None:
    assert is_transient(exc) is expected


def test_backoff_grows_and_is_capped() -> None:
    for attempt in range(1, 10):
        ceiling = min(5.0, 0.2 * 2 ** (attempt - 1))
        assert ceiling / 2 <= backoff_delay(attempt, 0.2, 5.0) <= ceiling


# --------------------------------------------------------------------------- secrets


def test_redact_and_safe_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env/Secret+Value0123")
    text = (
        f"failed with {DISTINCT_SECRET} via https://user:pa55word@host/x?sig=env%2FSecret%2BValue0123 "
        "and env/Secret+Value0123; the key 'abc' is too short to matter"
    )
    out = redact(text, [DISTINCT_SECRET, "abc"])
    assert DISTINCT_SECRET not in out and "pa55word" not in out and "Secret" not in out
    assert "https://user:***@host" in out and "'abc'" in out

    options = {
        "key": "AKIAEXAMPLE",
        "secret": DISTINCT_SECRET,
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://h:1", "aws_session_token": "tok-123456"},
        "config_kwargs": {"retries": {"max_attempts": 3}},
    }
    safe = safe_options(options)
    assert safe == {
        "key": "***",
        "secret": "***",
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://h:1", "aws_session_token": "***"},
        "config_kwargs": {"retries": {"max_attempts": 3}},
    }
    assert options["secret"] == DISTINCT_SECRET  # the caller's dict is untouched
    assert DISTINCT_SECRET not in json.dumps(safe)


def test_storage_error_never_leaks_secret(
    s3_bucket: S3Bucket, s3_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A secret given only as a storage option is masked in the final error and in retry logs, even when
    the failing operation's own description carries it (here: a signed-URL-style name)."""
    caplog.set_level(logging.WARNING, logger="pipeline.io.storage")
    with FaultProxy(s3_server.endpoint, error_rate=1.0) as proxy:
        options = {**proxied_options(s3_bucket, proxy), "secret": DISTINCT_SECRET}
        options["client_kwargs"] = {**options["client_kwargs"], "aws_secret_access_key": DISTINCT_SECRET}
        fs, path = filesystem(s3_bucket.path("k.bin"), options)
        no_inner_retries(fs)
        what = f"{s3_bucket.path('k.bin')}?X-Amz-Signature={DISTINCT_SECRET}"
        with pytest.raises(StorageError) as err:
            with_retries(lambda: fs.cat_file(path), what=what, attempts=2, base_delay=0.01)
    assert DISTINCT_SECRET not in str(err.value)
    assert DISTINCT_SECRET not in caplog.text
    assert "X-Amz-Signature=***" in str(err.value)
    assert err.value.__cause__ is None and err.value.cause is not None
    shipped = pickle.loads(pickle.dumps(err.value))  # as a Ray worker would send it to the driver
    assert str(shipped) == str(err.value) and shipped.cause is None


def test_fault_proxy_is_transparent(s3_bucket: S3Bucket, s3_server: Any, tmp_path: Path) -> None:
    """The proxy itself must not corrupt traffic: multi-MB put/get (multipart too) and parquet, 10% delays."""
    data = os.urandom(11 * 2**20)
    (tmp_path / "big.bin").write_bytes(data)
    with FaultProxy(s3_server.endpoint, delay_rate=0.1, delay_s=0.01) as proxy:
        fs = fsspec.filesystem("s3", **proxy.storage_options(s3_bucket.storage_options))
        b = s3_bucket.name
        fs.put_file(str(tmp_path / "big.bin"), f"{b}/big.bin")
        fs.get_file(f"{b}/big.bin", str(tmp_path / "back.bin"))
        with fs.open(f"{b}/multipart.bin", "wb", block_size=5 * 2**20) as f:
            f.write(data)
        table = pa.table({"id": list(range(20_000)), "s": [str(i) for i in range(20_000)]})
        pq.write_table(table, f"{b}/t.parquet", filesystem=fs)
        assert pq.read_table(f"{b}/t.parquet", filesystem=fs).equals(table)
        assert fs.cat_file(f"{b}/multipart.bin") == data
        assert proxy.stats["requests"] > 5
    assert (tmp_path / "back.bin").read_bytes() == data
