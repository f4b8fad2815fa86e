"""App passwords with the directory backend (the LDAP and Dovecot modules run the same
lifecycle), and the rules of the command line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.auth.conftest import QUIET_GUARD, app_password_lifecycle, try_login
from tests.support.gateway import Gateway
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("apppw"), {"ratelimits": QUIET_GUARD,
                                                      "server": {"workers": 0}})  # fmt: skip
    gw.add_user("alice", "alice's own password")
    gw.start("--no-delivery")
    try:
        yield gw
    finally:
        gw.finish()


def test_app_passwords_with_the_directory_backend(gateway: Gateway) -> None:
    app_password_lifecycle(gateway, "alice", "alice@example.org")
    # The account's own password is untouched.
    assert try_login(gateway, "alice", "alice's own password")[0] == 235


def test_an_app_password_is_only_for_its_login(gateway: Gateway) -> None:
    gateway.add_user("bob", "bob's own password")
    secret = gateway.cli("app-password", "add", "alice", "phone").stdout.strip()
    assert try_login(gateway, "bob", secret)[0] == 535
    # A disabled account stays shut, app passwords included; the server's directory view
    # learns of it within its poll interval (INTERFACE: "within 10 seconds").
    gateway.cli("user", "disable", "alice")
    wait_for(lambda: try_login(gateway, "alice", secret)[0] == 535, timeout=15, what="refusal")
    gateway.cli("user", "enable", "alice")
    wait_for(lambda: try_login(gateway, "alice", secret)[0] == 235, timeout=15, what="login")


def test_command_line_errors(gateway: Gateway, tmp_path: Path) -> None:
    unknown = gateway.cli("app-password", "add", "nobody", "x", check=False)
    assert unknown.returncode == 1 and unknown.stderr == "mailgate: unknown login 'nobody'\n"
    gateway.cli("app-password", "add", "alice", "tablet")
    twice = gateway.cli("app-password", "add", "alice", "tablet", check=False)
    assert twice.stderr == "mailgate: 'alice' already has an app password 'tablet'\n"
    gone = gateway.cli("app-password", "remove", "alice", "laptop", check=False)
    assert gone.stderr == "mailgate: 'alice' has no app password 'laptop'\n"
    bad = gateway.cli("app-password", "add", "alice", "two\nlines", check=False)
    assert bad.returncode == 1 and "invalid app password name" in bad.stderr
