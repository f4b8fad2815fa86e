"""Real PostgreSQL databases and Redis key prefixes for tests, each made for one test and removed.

The servers are the machine's (scripts/install-test-deps starts them where missing):
MAILGATE_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/postgres, a role that may
create databases) and MAILGATE_TEST_REDIS (default redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg

POSTGRES = os.environ.get("MAILGATE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("MAILGATE_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty database for this test; its URL. Dropped afterwards, whoever is connected."""
    name = f"mailgate_test_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield _with_database(POSTGRES, name)
    finally:
        with psycopg.connect(POSTGRES, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def postgres_sql(url: str, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run one statement (with `?` placeholders, as SQLite takes them) and return its rows."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query.replace("?", "%s"), params or None)
        return cur.fetchall() if cur.description else []


def closed_port_url() -> str:
    """A PostgreSQL URL nobody listens on (a port just bound and released)."""
    from tests.support.ports import free_port

    return f"postgresql://postgres@127.0.0.1:{free_port()}/mailgate"


@contextlib.contextmanager
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in the machine's Redis; its keys are deleted afterwards."""
    import redis

    prefix = f"mailgate-test-{secrets.token_hex(6)}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
