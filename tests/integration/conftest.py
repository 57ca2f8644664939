"""Fixtures for integration tests; the S3 server (``s3_server``, ``s3_env``) is shared by every
folder, so it lives in tests/conftest.py and tests/helpers.py."""

from __future__ import annotations

import pytest
from helpers import free_port


@pytest.fixture
def free_tcp_port() -> int:
    """A port nothing listens on (for "server unreachable" tests)."""
    return free_port()
