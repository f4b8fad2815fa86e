"""The one domain-name validator (names.py), and where two labels are required."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.directory.store import SqliteDirectory
from mailgate.dnsname import domain_name
from mailgate.errors import DirectoryError
from mailgate.receive.rdns import host_name


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("Dept.Example.ORG.", "dept.example.org"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("localhost", "localhost"),
        ("a" * 63 + ".org", "a" * 63 + ".org"),
        ("", None),
        (".", None),
        ("a..b", None),
        ("a.b..", None),
        ("-a.org", None),
        ("a-.org", None),
        ("a b.org", None),
        ("a_b.org", None),
        ("a" * 64 + ".org", None),
        (("a" * 62 + ".") * 4 + "org", None),  # 252 + 3 > 253
        ("bücher.de", None),
    ],
)
def test_domain_name(text: str, canonical: str | None) -> None:
    assert domain_name(text) == canonical
    assert host_name(text) == canonical  # reverse DNS names obey the same rule


def test_two_labels_where_the_rule_says_so(tmp_path: Path) -> None:
    assert domain_name("example", min_labels=2) is None
    assert domain_name("example.org", min_labels=2) == "example.org"
    d = SqliteDirectory(tmp_path / "mailgate.db", data_dir=tmp_path, default_domain="example.org")
    with pytest.raises(DirectoryError, match=r"^'removed' is not a valid domain name$"):
        d.add_domain("removed")  # a managed domain's name is a folder under dkim/
    assert d.add_domain("Dept.Example.ORG").name == "dept.example.org"
