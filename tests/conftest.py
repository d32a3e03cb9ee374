"""Shared fixtures: a temporary catalog and object store, and a real S3 API (moto) on loopback."""

from __future__ import annotations

import logging
import socket
import uuid
from pathlib import Path
from typing import Iterator

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def loopback_port() -> int:
    """A free TCP port on 127.0.0.1 for a server the test starts."""
    return free_port()


@pytest.fixture
def tmp_catalog(tmp_path: Path):
    """A fresh catalog file with the full schema."""
    from calibri_pipeline.storage.catalog import Catalog

    return Catalog(tmp_path / "catalog.duckdb", lock_timeout=30)


@pytest.fixture
def local_store(tmp_path: Path):
    """A fresh local-directory object store."""
    from calibri_pipeline.storage.object_store import ObjectStore

    return ObjectStore(tmp_path / "objects")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server (real HTTP S3 API) on a free loopback port, for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """AWS_* variables pointing at the moto server, set for this test only; returns the endpoint."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "calibri-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "calibri-test-secret-do-not-log")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    # Never read the developer's real ~/.aws files.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return moto_endpoint


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A new, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"calibri-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket=name)
    return name
