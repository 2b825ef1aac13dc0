"""A real S3 HTTP API on loopback: moto's server mode in a subprocess, driven by boto3 over HTTP.

``MotoS3`` starts ``python -m moto.server -H 127.0.0.1 -p PORT`` (a free port) and waits until it
answers. ``auth=True`` turns on moto's credential checks (``INITIAL_NO_AUTH_ACTION_COUNT=0``):
every request with an unknown access key is refused with ``InvalidAccessKeyId``.

Fixtures: ``moto_s3`` (session server), ``s3_env`` (AWS_* test credentials +
``MODELFACTORY_S3_ENDPOINT_URL`` pointing at it, restored afterwards), ``s3_bucket`` (a fresh bucket).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

from modelfactory.testing.env import free_port, settings_env

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


class MotoS3:
    """One moto server subprocess; ``url`` is its endpoint."""

    def __init__(self, *, auth: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
        if auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server on {self.url} did not start (exit {self.proc.poll()})")
                time.sleep(0.2)

    def client(self, **credentials: str):
        import boto3
        from botocore.config import Config

        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", **credentials}
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}), **creds)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own process group (start_new_session)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def s3_environment(endpoint: str, **extra: str | None) -> contextlib.AbstractContextManager[None]:
    """AWS test credentials and the factory's endpoint setting for the duration of the block (*extra*
    overrides; ``None`` unsets); ambient AWS profile/session/endpoint variables are unset."""
    cleared = dict.fromkeys(("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"))
    return settings_env(**{**cleared, **TEST_CREDENTIALS, "MODELFACTORY_S3_ENDPOINT_URL": endpoint,
                           "AWS_EC2_METADATA_DISABLED": "true", **extra})


@contextlib.contextmanager
def fresh_bucket(server: MotoS3, *, name: str = "mf", prefix: str = "") -> Iterator[str]:
    """A new bucket on *server*, with this process's (and its children's) S3 settings pointing at it
    (:func:`s3_environment`): yields ``s3://<bucket>`` (+ ``/<prefix>``)."""
    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    server.client().create_bucket(Bucket=bucket)
    with s3_environment(server.url):
        yield f"s3://{bucket}" + (f"/{prefix}" if prefix else "")
