"""A real moto S3 server in a subprocess, so tests talk HTTP to S3 exactly as production code does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

# Distinctive fake credentials: moto accepts anything, and distinct values let tests grep for leaks
# without matching ordinary words.
ACCESS_KEY = "EMBEDPIPETESTKEYID01"
SECRET_KEY = "embedpipe-test-secret-0f9a8b7c6d5e4f3a"
REGION = "us-east-1"


def free_port() -> int:
    """A port that was free a moment ago (the OS picks it, so parallel runs do not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def option_flags(endpoint: str, *extra: str) -> list[str]:
    """The test server's credentials and ``endpoint`` (the server's, or a FaultProxy's in front of it) as
    ``--storage-option KEY=VALUE`` values, plus ``extra`` ones."""
    return [f"key={ACCESS_KEY}", f"secret={SECRET_KEY}", f"client_kwargs.endpoint_url={endpoint}", *extra]


class S3Server:
    """`with S3Server() as s3:` starts `moto.server` on a free port and stops it on exit.

    The region is set by environment (`env`), never through `client_kwargs`: s3fs turns a
    `region_name` into a LocationConstraint, which moto rejects for us-east-1.
    """

    def __init__(self, host: str = "127.0.0.1", start_timeout: float = 30.0) -> None:
        self.host = host
        self.port = 0
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """Options for s3fs (`fsspec.filesystem("s3", **opts)`) pointing at this server."""
        return {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"endpoint_url": self.endpoint},
        }

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables for subprocesses (CLI runs, Ray workers) so they reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def start(self) -> S3Server:
        self.port = free_port()
        cmd = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        env = {**os.environ, **self.env}
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._proc.returncode}: {self._output()}")
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint} within {self.start_timeout}s")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is serving
        except OSError:
            return False

    def _output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def make_bucket(self, name: str) -> str:
        """Create a bucket (botocore directly, no s3fs caches involved) and return `s3://name`."""
        import botocore.session

        client = botocore.session.get_session().create_client(
            "s3",
            region_name=REGION,
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()
        return f"s3://{name}"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class S3Bucket:
    """A fresh bucket on the test server: `url` is `s3://name`, `fs` an s3fs filesystem for it."""

    name: str
    storage_options: dict[str, Any]
    fs: Any = field(repr=False)

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    def path(self, *parts: str) -> str:
        """`s3://name/part/part` (the form users pass on the command line)."""
        return "/".join([self.url, *parts])
