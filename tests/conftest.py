"""Shared pytest fixtures, grouped by the infrastructure they provide."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fsspec
import pytest

from tests.support.s3server import S3Bucket, S3Server

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
