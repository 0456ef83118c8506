"""Shared pytest fixtures, grouped by the infrastructure they provide."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import fsspec
import pytest

from tests.support.s3server import S3Bucket, S3Server

# Small real-text corpora shipped with the tests (FAQ pairs, man-page pairs, fortunes): see tests/data/README.md.
# Modules that need them at import time use `from tests.support.paths import TEST_DATA`.

# --------------------------------------------------------------------------- S3 (moto server)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One real moto S3 server for the session; its fake credentials and region are put in the
    environment (so nothing can reach a real account), its endpoint is not: tests pass it explicitly,
    or give `s3_server.env` to subprocesses."""
    with S3Server() as server, pytest.MonkeyPatch.context() as mp:
        for name, value in server.env.items():
            if name != "AWS_ENDPOINT_URL":
                mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> S3Bucket:
    """A new, empty bucket per test (so s3fs listing caches can never be stale across tests)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.make_bucket(name)
    options = s3_server.storage_options
    return S3Bucket(name=name, storage_options=options, fs=fsspec.filesystem("s3", **options))


# --------------------------------------------------------------------------- Ray + models (embed tests)

EMBED_OBJECT_STORE_BYTES = 96 * 1024 * 1024


@pytest.fixture(scope="session", autouse=True)
def _ray_auth_mode_for_the_session() -> Iterator[None]:
    """Ray token authentication off (unless set) for the whole session, before any ray.init: multi-node
    tests join clusters by address, and a process whose first ray.init ran with it on cannot create
    actors on a cluster started with it off (actor creation fails with SchedulingCancelled)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random-weight model (mean pooling, Normalize, 32 dims) saved by sentence-transformers."""
    from tests.support.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("embed-models") / "tiny-mean")


def start_local_ray(s3_endpoint: str) -> None:
    """A fresh local Ray cluster via `pipeline.runtime.cluster.connect()`, with a small object store.

    The moto endpoint is in the environment only while Ray starts, so the workers (which inherit the
    raylet's environment) can reach S3 by environment alone, while this process keeps it unset."""
    from pipeline.runtime import cluster

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("EMBEDPIPE_OBJECT_STORE_BYTES", str(EMBED_OBJECT_STORE_BYTES))
        mp.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        cluster.connect()


@pytest.fixture(scope="session")
def _ray_local_session(s3_server: S3Server) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(s3_server.endpoint)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_local_session: None, s3_server: S3Server) -> None:
    """One local Ray cluster shared by every in-process embed run (ray.init takes 5-9 s); restarted
    only if a multi-node test module shut it down before this module."""
    import ray

    if not ray.is_initialized():
        start_local_ray(s3_server.endpoint)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: multi-node Ray or subprocess runs of whole jobs (make test runs them)"
    )
