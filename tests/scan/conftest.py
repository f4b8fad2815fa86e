"""Fixtures for the scanner tests: one real clamd for the session (tests/support/clamd.py).

clamd starts in about 0.1 s with the test database, so tests that need to stop it, or to run
it with another StreamMaxLength, start their own with `running_clamd`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.clamd import ClamdHandle, running_clamd


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdHandle]:
    with running_clamd(tmp_path_factory.mktemp("clamd")) as handle:
        yield handle


@pytest.fixture(params=["tcp", "unix"])
def clamd_spec(request: pytest.FixtureRequest, clamd: ClamdHandle) -> str:
    """scanner.clamd for the shared clamd, over TCP and over its Unix socket."""
    return clamd.tcp_spec if request.param == "tcp" else clamd.unix_spec
