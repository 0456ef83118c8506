"""The ``jobs/`` entrypoints: bad specs fail fast (exit 2, the field named, Ray never imported), every example
spec (jobs/specs/ and the ConfigMaps in cluster/) is valid for its job, and a real ``ray job submit`` of
``jobs.embed`` to a Ray head this module starts reads and writes the moto S3 server and ends SUCCEEDED.

The head is started as ``ray start --head --block`` in its own temp dir with its own ports, and stopped by
signalling that process and then its recorded descendants by pid: never ``ray stop``, which would stop
every Ray cluster on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import JOBS
from pipeline.io.dataset import dataset_metadata, embeddings_of, read_dataset
from pipeline.spec import build_spec
from tests.support.s3server import S3Server, free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
JOB_NAMES = ("embed", "dedup", "mine", "reembed")
UPLOAD_EXCLUDES = [
    ".git",
    ".venv",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "demo-output",
    "build",
    "dist",
]

# A value of the wrong kind for one field of each job, and the start of the error that must name it.
BAD_VALUES = {
    "embed": (
        {"model": "m", "input": "in", "output": "out", "rows_per_shard": "many"},
        "rows_per_shard: expected an integer, got 'many'",
    ),
    "dedup": (
        {"input": "in", "output": "out", "threshold": "high"},
        "threshold: expected a number, got 'high'",
    ),
    "mine": (
        {"model": "m", "input": "in", "output": "out", "output_format": "pairs"},
        "output_format: 'pairs' is not one of",
    ),
    "reembed": ({"model": "m", "input": "in", "output": "out", "keep": 0}, "keep: must be at least 1"),
}
# Runs a job module as `python -m` would, then reports whether it imported Ray.
RUN_AND_CHECK_RAY = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    print("ray imported" if "ray" in sys.modules else "ray not imported", file=sys.stderr)
"""


def run_job_module(job: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", **(env or {})}  # any Ray use would fail loudly
    return subprocess.run(
        [sys.executable, "-c", RUN_AND_CHECK_RAY, f"jobs.{job}", *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


# --------------------------------------------------------------------------- specs, no Ray


@pytest.mark.parametrize("job", JOB_NAMES)
def test_bad_spec_exits_2_naming_the_field_before_ray(job: str, tmp_path: Path) -> None:
    values, message = BAD_VALUES[job]
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(values))
    result = run_job_module(job, "--spec", str(spec))
    assert result.returncode == 2, result.stderr
    assert f"python -m jobs.{job}: invalid spec {spec}: {message}" in result.stderr
    assert "ray not imported" in result.stderr
    assert result.stdout == ""

    spec.write_text(yaml.safe_dump({**values, "text_colum": "body"}))
    result = run_job_module(job, "--spec", str(spec))
    assert result.returncode == 2 and "unknown key(s) text_colum; known: " in result.stderr


def test_missing_spec_file_and_missing_flag_exit_2(tmp_path: Path) -> None:
    result = run_job_module("reembed", "--spec", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "nope.yaml: cannot read the spec" in result.stderr
    result = run_job_module("embed")
    assert result.returncode == 2 and "--spec is required" in result.stderr


def test_job_missing_from_the_registry_is_a_clear_error(monkeypatch, capsys) -> None:
    from jobs._entry import main

    monkeypatch.delitem(JOBS, "mine")
    assert main("mine", ["--spec", "whatever.yaml"]) == 2
    err = capsys.readouterr().err
    assert "python -m jobs.mine: error: this embedpipe installation has no 'mine' job" in err


def test_flags_override_the_spec(tmp_path: Path) -> None:
    from jobs._entry import read_spec

    spec = tmp_path / "s.yaml"
    spec.write_text("model: m\ninput: [a]\noutput: s\nkeep: 3\n")
    cls = JOBS["reembed"][0]
    loaded = read_spec(cls, str(spec), {"keep": 5, "break_lock": True})
    assert (loaded.keep, loaded.break_lock, loaded.input) == (5, True, ["a"])


@pytest.mark.parametrize("job", JOB_NAMES)
def test_example_specs_are_valid(job: str) -> None:
    path = REPO / "jobs" / "specs" / f"{job}.yaml"
    text = path.read_text()
    assert text.lstrip().startswith("#"), "example specs start with a comment saying how to run them"
    build_spec(JOBS[job][0], yaml.safe_load(text), str(path))


def cluster_specs() -> list[tuple[str, str, str]]:
    """(file, job, spec text) for every job spec embedded in a cluster/ ConfigMap."""
    found = []
    for path in sorted((REPO / "cluster").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "ConfigMap":
                continue
            for key, text in (doc.get("data") or {}).items():
                if key.endswith(".yaml") and key[:-5] in JOBS:
                    found.append((path.name, key[:-5], text))
    return found


@pytest.mark.parametrize("where, job, text", cluster_specs(), ids=lambda v: v if len(str(v)) < 40 else "spec")
def test_cluster_configmap_specs_are_valid(where: str, job: str, text: str) -> None:
    build_spec(JOBS[job][0], yaml.safe_load(text), f"{where}: {job}.yaml")


def test_every_job_has_a_module_and_an_example_spec() -> None:
    for job in JOB_NAMES:
        assert (REPO / "jobs" / f"{job}.py").is_file() and (REPO / "jobs" / "specs" / f"{job}.yaml").is_file()
    assert set(JOB_NAMES) <= set(JOBS), "every jobs/ module has its job registered in pipeline.cli.JOBS"
    assert len(cluster_specs()) >= 5, "rayjob-{embed,dedup,mine,reembed}.yaml and the nightly re-embed"


# --------------------------------------------------------------------------- a real Ray head


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_head(proc: subprocess.Popen, children: list) -> None:
    """SIGTERM to `ray start --block` (it shuts its node down), then any recorded descendant still alive."""
    import psutil

    children = children + [c for c in descendants(proc.pid) if c.pid not in {x.pid for x in children}]
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(children, timeout=15)
    for child in alive:
        child.terminate()
    _, alive = psutil.wait_procs(alive, timeout=10)
    for child in alive:
        child.kill()


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head with a dashboard (the Jobs API), 2 CPUs, its own temp dir and ports; yields its HTTP address.
    It gets no AWS settings: the submitted job brings them in its runtime_env."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rayjobs-", dir="/tmp"))  # short: Ray's socket paths have a limit
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(temp_dir), PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    )
    ports = {
        name: free_port()
        for name in (
            "port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "node-manager-port",
            "object-manager-port",
        )
    }
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--dashboard-port={dashboard}",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        "--num-cpus=2",
        f"--object-store-memory={100 * 1024 * 1024}",
        f"--temp-dir={temp_dir}",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]
    log = (temp_dir / "ray-start.log").open("wb")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    children: list = []
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"ray start exited with {proc.returncode}:\n{(temp_dir / 'ray-start.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"the Ray dashboard did not answer:\n{(temp_dir / 'ray-start.log').read_text()}"
                    )
                time.sleep(1)
        children = descendants(proc.pid)
        yield address
    finally:
        stop_head(proc, children)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, submission_id: str, env_vars: dict, *entrypoint: str) -> subprocess.CompletedProcess:
    runtime_env = {"excludes": UPLOAD_EXCLUDES, "env_vars": env_vars}
    command = [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        *entrypoint,
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)


def test_ray_job_submit_runs_jobs_embed_against_s3(
    ray_head: str, s3_server: S3Server, s3_bucket, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    fs = s3_bucket.fs
    fs.put(str(tiny_model_dir), s3_bucket.path("models", "tiny"), recursive=True)
    texts = [
        f"document {i}: " + " ".join(["alpha", "beta", "gamma", "delta"][: 1 + i % 4]) for i in range(60)
    ]
    corpus = pa.table(
        {"id": pa.array(range(100, 160), pa.int64()), "text": texts, "lang": ["en", "de", "fr"] * 20}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(corpus, sink, row_group_size=20)
    fs.pipe_file(s3_bucket.path("corpus", "part-0.parquet"), sink.getvalue().to_pybytes())
    output = s3_bucket.path("embeddings")
    spec = {
        "model": s3_bucket.path("models", "tiny"),
        "input": [s3_bucket.path("corpus")],
        "output": output,
        "keep_columns": ["lang"],
        "rows_per_shard": 20,
        "workers": 1,
        "max_attempts": 2,
        "progress": False,
    }
    fs.pipe_file(s3_bucket.path("specs", "embed.yaml"), yaml.safe_dump(spec).encode())
    # Credentials and endpoint travel in the job's runtime_env, as a cluster's Secret would provide them.
    env_vars = {**s3_server.env, "EMBEDPIPE_CACHE": str(tmp_path / "model-cache")}

    submission = f"embed-{uuid.uuid4().hex[:8]}"
    result = submit(
        ray_head,
        submission,
        env_vars,
        "python",
        "-m",
        "jobs.embed",
        "--spec",
        s3_bucket.path("specs", "embed.yaml"),
    )
    client = JobSubmissionClient(ray_head)
    logs = client.get_job_logs(submission)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{logs}"
    assert client.get_job_status(submission) == JobStatus.SUCCEEDED
    summary = json.loads(logs[logs.rindex('{\n  "output"') : logs.rindex("}") + 1])
    assert summary["rows"] == 60 and summary["shards"]["total"] == 3

    table = read_dataset(output, s3_bucket.storage_options)
    assert sorted(table.column("id").to_pylist()) == list(range(100, 160)), "every id exactly once"
    metadata = dataset_metadata(output, s3_bucket.storage_options)
    assert embeddings_of(table).shape == (60, metadata["dim"]) and metadata["dim"] == 32
    assert table.column("lang").to_pylist() == corpus.column("lang").to_pylist()
    assert np.isfinite(embeddings_of(table)).all()

    # A bad spec fails the Ray job (exit 2 from the driver), naming the field, before any work.
    fs.pipe_file(
        s3_bucket.path("specs", "bad.yaml"), yaml.safe_dump({**spec, "rows_per_shard": "many"}).encode()
    )
    failing = f"embed-bad-{uuid.uuid4().hex[:8]}"
    result = submit(
        ray_head,
        failing,
        env_vars,
        "python",
        "-m",
        "jobs.embed",
        "--spec",
        s3_bucket.path("specs", "bad.yaml"),
    )
    assert result.returncode != 0
    assert client.get_job_status(failing) == JobStatus.FAILED
    assert "rows_per_shard: expected an integer, got 'many'" in client.get_job_logs(failing)
