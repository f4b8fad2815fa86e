"""The one domain-name validator (dnsname.py), where two labels are required, and selectors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.directory.names import check_selector
from mailgate.directory.store import SqliteDirectory
from mailgate.dnsname import MANAGED_DOMAIN_LABELS, dkim_selector, domain_name
from mailgate.errors import DirectoryError
from mailgate.message import dkimkeys
from mailgate.message.dkimkeys import DkimError
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


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("mg20261128", "mg20261128"),
        ("MG1-ed", "mg1-ed"),
        ("2026.mail", "2026.mail"),  # RFC 6376 §3.1: a selector may be dotted
        ("mg1.", None),
        ("", None),
        ("a b", None),
        ("../x", None),
        ("a/b", None),
        ("a_b", None),
    ],
)
def test_one_selector_rule_for_the_directory_and_the_key_files(
    text: str, canonical: str | None
) -> None:
    assert dkim_selector(text) == canonical
    if canonical is None:
        with pytest.raises(DirectoryError, match=r"^invalid DKIM selector "):
            check_selector(text)
        with pytest.raises(DkimError, match=r"is not a valid DKIM selector$"):
            dkimkeys.check_selector(text)
    else:
        assert check_selector(text) == dkimkeys.check_selector(text) == canonical


@pytest.mark.parametrize(
    "text", ["example.org", "Dept.Example.ORG.", "example", "a..b", "-a.org", "a_b.org", "a" * 64]
)
def test_managed_domains_obey_the_same_rule_in_the_directory_and_the_key_files(
    tmp_path: Path, text: str
) -> None:
    expected = domain_name(text, min_labels=MANAGED_DOMAIN_LABELS)
    d = SqliteDirectory(tmp_path / "mailgate.db", data_dir=tmp_path, default_domain="example.org")
    if expected is None:
        with pytest.raises(DirectoryError):
            d.add_domain(text)
        with pytest.raises(DkimError):
            dkimkeys.check_domain_name(text)
    else:
        assert dkimkeys.check_domain_name(text) == expected
        if expected != "example.org":  # the default domain is managed already
            assert d.add_domain(text).name == expected
