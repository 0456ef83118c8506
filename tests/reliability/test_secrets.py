"""Secrets never leave the process that holds them: not in outputs, manifests, plans, reports, stdout,
stderr, Python logs or Ray's logs.

Credentials come both from the environment (the S3 server's fake AWS_* keys, plus a session token) and
from --storage-option (other, equally distinctive values). embed, dedup and mine run through the CLI
against the S3 server, one of them with -v; two runs fail (every request answered 503/500 through a
FaultProxy, and an unreachable endpoint whose URL carries a secret, which errors quote), both with -v, so
the traceback path is exercised too. Then every object in the bucket, everything captured from stdout
and stderr (file-descriptor level, so Ray's forwarded worker output counts), the Python log records,
and every file under the Ray session directory are searched for each secret.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from tests.support.faultproxy import FaultProxy
from tests.support.s3server import ACCESS_KEY, SECRET_KEY

OPT_KEY = "OPTKEYembedpipeZZ42"
OPT_SECRET = "opt-secret-7Hq2-embedpipe-leakcheck"
OPT_TOKEN = "opt-session-token-Xy81-leakcheck"
ENV_TOKEN = "env-session-token-Pq55-leakcheck"
SECRETS = (ACCESS_KEY, SECRET_KEY, OPT_KEY, OPT_SECRET, OPT_TOKEN, ENV_TOKEN)


def options(endpoint: str, *extra: str) -> list[str]:
    pairs = [
        f"key={OPT_KEY}",
        f"secret={OPT_SECRET}",
        f"token={OPT_TOKEN}",
        f"client_kwargs.endpoint_url={endpoint}",
        *extra,
    ]
    return [f"--storage-option={p}" for p in pairs]


def ray_session_files() -> list[Path]:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return [
        p for p in session.rglob("*") if p.is_file() and not p.is_symlink() and p.suffix not in (".sock",)
    ]


def leaks(blob: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in blob]


def test_no_secret_anywhere(
    ray_local, tiny_model_dir: Path, s3_server, s3_bucket, capfd, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("AWS_SESSION_TOKEN", ENV_TOKEN)
    fs, bucket = s3_bucket.fs, s3_bucket.name
    texts = [f"secret handling sentence number {i} " + "word " * (i % 5) for i in range(30)]
    texts[20] = texts[3]  # a duplicate for dedup
    sink = io.BytesIO()
    pq.write_table(pa.table({"id": list(range(30)), "text": texts}), sink, row_group_size=10)
    fs.pipe_file(f"{bucket}/corpus/c.parquet", sink.getvalue())
    sink = io.BytesIO()
    pq.write_table(pa.table({"q": texts[:12], "a": texts[12:24]}), sink)
    fs.pipe_file(f"{bucket}/pairs/p.parquet", sink.getvalue())
    url = s3_bucket.path
    good = options(s3_server.endpoint)
    common = ["--no-progress", "--workers", "1"]
    captured = []

    def run(argv: list[str]) -> int:
        code = cli.main(argv)
        out, err = capfd.readouterr()
        captured.append(f"{out}\n{err}")  # (not argv: the command line holds the secrets by design)
        return code

    assert (
        run(
            [
                "-v",
                "embed",
                "--model",
                str(tiny_model_dir),
                "--input",
                url("corpus"),
                "--output",
                url("emb"),
                "--rows-per-shard",
                "10",
                *common,
                *good,
            ]
        )
        == 0
    )
    assert (
        run(["dedup", "--input", url("emb"), "--output", url("dedup"), "--threshold", "0.99", *common, *good])
        == 0
    )
    assert (
        run(
            [
                "mine",
                "--model",
                str(tiny_model_dir),
                "--input",
                url("pairs"),
                "--output",
                url("mine"),
                "--num-negatives",
                "2",
                *common,
                *good,
            ]
        )
        == 0
    )
    with FaultProxy(s3_server.endpoint, error_rate=1.0) as proxy:
        failing = options(proxy.endpoint, "config_kwargs.retries.total_max_attempts=1")
        assert (
            run(
                [
                    "-v",
                    "embed",
                    "--model",
                    str(tiny_model_dir),
                    "--input",
                    url("corpus"),
                    "--output",
                    url("never"),
                    *common,
                    *failing,
                ]
            )
            == 2
        )
        assert proxy.stats["requests"] > 0
    # Nothing listens there, and the endpoint's path holds a secret: botocore's error quotes the URL.
    unreachable = options(f"http://127.0.0.1:9/{OPT_SECRET}", "config_kwargs.retries.total_max_attempts=1")
    assert (
        run(
            [
                "-v",
                "mine",
                "--model",
                str(tiny_model_dir),
                "--input",
                url("pairs"),
                "--output",
                url("never2"),
                *common,
                *unreachable,
            ]
        )
        == 2
    )
    assert "Traceback" in captured[-1] and "embedpipe mine: error:" in captured[-1]  # -v: traceback, redacted
    assert "127.0.0.1:9/***" in captured[-1]

    # Search everything.
    fs.invalidate_cache()
    blobs: dict[str, bytes] = {f"s3://{name}": fs.cat_file(name) for name in fs.find(bucket)}
    names = {n.rsplit("/", 1)[-1] for n in blobs}
    assert {"plan.json", "manifest.json", "report.json", "SUCCESS"} <= names
    plan = json.loads(blobs[url("emb", ".embedpipe/plan.json")])
    assert plan["storage_options"]["secret"] == plan["storage_options"]["key"] == "***"
    blobs["captured stdout/stderr"] = "\n".join(captured).encode()
    blobs["python log records"] = caplog.text.encode()
    session_files = ray_session_files()
    assert any("worker" in p.name for p in session_files)
    for path in session_files:
        blobs[str(path)] = path.read_bytes()
    found = {name: leaks(blob) for name, blob in blobs.items() if leaks(blob)}
    assert found == {}, f"secrets leaked: {found}"
    print(
        "FIGURES",
        json.dumps(
            {
                "runs": len(captured),
                "failing runs": 2,
                "secrets": len(SECRETS),
                "objects searched": sum(n.startswith("s3://") for n in blobs),
                "ray files searched": len(session_files),
                "ray bytes searched": sum(p.stat().st_size for p in session_files),
                "leaks": 0,
            }
        ),
    )
    assert os.environ["AWS_SESSION_TOKEN"] == ENV_TOKEN
