"""Unit tests of message.dkimkeys: names, key files, DNS record text, and the record check."""

from __future__ import annotations

import base64
import stat
from datetime import date
from pathlib import Path

import dns.rdatatype
import dns.zone
import pytest

from mailgate.message import dkimkeys
from mailgate.message.dkimkeys import (
    ALGORITHM_ED25519,
    ALGORITHM_RSA,
    DkimError,
    LookupFailed,
    check_records,
)
from mailgate.values import DkimKey, Domain

DAY = date(2026, 11, 28)


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("College.Example.AC.UK.", "college.example.ac.uk"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_domain_names_are_canonical(given: str, expected: str) -> None:
    assert dkimkeys.check_domain_name(given) == expected


@pytest.mark.parametrize(
    "bad", ["localhost", "../etc", "a/b.example", "-x.example", "bücher.example", "a..b", ""]
)
def test_bad_domain_names_are_refused(bad: str) -> None:
    with pytest.raises(DkimError, match="is not a valid domain name"):
        dkimkeys.check_domain_name(bad)


def test_selectors_are_dated_and_never_reused() -> None:
    both = [ALGORITHM_RSA, ALGORITHM_ED25519]
    assert dkimkeys.new_selectors(set(), both, DAY) == {
        ALGORITHM_RSA: "mg20261128",
        ALGORITHM_ED25519: "mg20261128-ed",
    }
    taken = {"mg20261128", "mg20261128-ed"}
    assert dkimkeys.new_selectors(taken, both, DAY) == {
        ALGORITHM_RSA: "mg20261128-2",
        ALGORITHM_ED25519: "mg20261128-2-ed",
    }
    # A stem is used only when it is free for every algorithm made together.
    assert dkimkeys.new_selectors({"mg20261128-ed"}, both, DAY)[ALGORITHM_RSA] == "mg20261128-2"
    assert dkimkeys.new_selectors({"mg20261128"}, [ALGORITHM_RSA], date(2026, 11, 29)) == {
        ALGORITHM_RSA: "mg20261129"
    }


# --- key files -----------------------------------------------------------------------------


def test_rsa_key_file_is_private_and_matches_its_record(tmp_path: Path) -> None:
    key = dkimkeys.generate_key(tmp_path, "Example.ORG", "mg20261128", ALGORITHM_RSA)
    assert key.key_path == tmp_path / "dkim" / "example.org" / "mg20261128.key"
    assert stat.S_IMODE(key.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "dkim").stat().st_mode) == 0o700
    assert stat.S_IMODE(key.key_path.parent.stat().st_mode) == 0o700
    assert key.key_path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")
    private = dkimkeys.load_private_key(key.key_path)
    assert dkimkeys.public_key_b64(private) == key.public_key_b64
    assert private.key_size == 2048  # type: ignore[union-attr]  # RSA here, by construction
    assert key.active and key.algorithm == ALGORITHM_RSA


def test_ed25519_public_key_is_the_raw_32_octets(tmp_path: Path) -> None:
    key = dkimkeys.generate_key(tmp_path, "example.org", "mg20261128-ed", ALGORITHM_ED25519)
    assert len(base64.b64decode(key.public_key_b64)) == 32  # RFC 8463 §4.2
    assert key.key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")


def test_an_existing_key_file_is_never_overwritten(tmp_path: Path) -> None:
    first = dkimkeys.generate_key(tmp_path, "example.org", "mg1", ALGORITHM_ED25519)
    before = first.key_path.read_bytes()
    with pytest.raises(DkimError, match=r"mg1\.key: key file already exists"):
        dkimkeys.generate_key(tmp_path, "example.org", "mg1", ALGORITHM_ED25519)
    assert first.key_path.read_bytes() == before


def test_unreadable_key_file_error_shows_no_content(tmp_path: Path) -> None:
    path = tmp_path / "broken.key"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nsecretsecret\n-----END PRIVATE KEY-----\n")
    with pytest.raises(DkimError) as info:
        dkimkeys.load_private_key(path)
    assert str(info.value) == f"{path}: not a PEM private key"


def test_set_aside_moves_keys_and_never_deletes(tmp_path: Path) -> None:
    a = dkimkeys.generate_key(tmp_path, "example.org", "mg1", ALGORITHM_ED25519)
    b = dkimkeys.generate_key(tmp_path, "example.org", "mg2", ALGORITHM_ED25519)
    content = b.key_path.read_bytes()
    one = dkimkeys.set_aside(tmp_path, "example.org", "mg1")
    assert one is not None and not a.key_path.exists() and one.suffix == ".key"
    assert one.parent == tmp_path / "dkim" / "removed"
    folder = dkimkeys.set_aside(tmp_path, "example.org")
    assert folder is not None and (folder / "mg2.key").read_bytes() == content
    assert not (tmp_path / "dkim" / "example.org").exists()
    assert dkimkeys.set_aside(tmp_path, "example.org") is None


def test_set_aside_of_a_domain_moves_its_loose_key_files_under_dkim_only(tmp_path: Path) -> None:
    kept = dkimkeys.generate_key(tmp_path, "dept.example.org", "mg1", ALGORITHM_ED25519)
    loose = tmp_path / "dkim" / "dept.example.org-old.key"
    loose.write_bytes(b"KEY 0")
    elsewhere = tmp_path / "elsewhere.key"
    elsewhere.write_bytes(b"KEY 2")
    content = kept.key_path.read_bytes()
    folder = dkimkeys.set_aside(
        tmp_path, "dept.example.org", key_paths=[kept.key_path, loose, elsewhere]
    )
    removed = tmp_path / "dkim" / "removed"
    assert folder is not None and folder.parent == removed and folder.suffix != ".org"
    assert (folder / "mg1.key").read_bytes() == content
    (moved,) = removed.glob("dept.example.org-dept.example.org-old-*.key")
    assert moved.read_bytes() == b"KEY 0" and not loose.exists()
    assert elsewhere.read_bytes() == b"KEY 2"  # outside <data_dir>/dkim: left alone
    assert stat.S_IMODE(removed.stat().st_mode) == 0o700
    # Made and set aside again: the earlier copy is never overwritten.
    again = dkimkeys.generate_key(tmp_path, "dept.example.org", "mg1", ALGORITHM_ED25519)
    new_content = again.key_path.read_bytes()
    second = dkimkeys.set_aside(tmp_path, "dept.example.org")
    assert second is not None and second != folder
    assert (second / "mg1.key").read_bytes() == new_content
    assert (folder / "mg1.key").read_bytes() == content


# --- DNS record text -----------------------------------------------------------------------


def _key(selector: str, algorithm: str, public: str, active: bool = True) -> DkimKey:
    return DkimKey(selector, algorithm, Path(f"/x/{selector}.key"), public, active)


RSA_PUBLIC = base64.b64encode(bytes(range(256)) + bytes(38)).decode()  # SPKI-sized: 392 chars
ED_PUBLIC = base64.b64encode(bytes(32)).decode()
DOMAIN = Domain(
    "example.org",
    (
        _key("mg20261128", ALGORITHM_RSA, RSA_PUBLIC, active=False),
        _key("mg20261129", ALGORITHM_RSA, RSA_PUBLIC[::-1]),
        _key("mg20261129-ed", ALGORITHM_ED25519, ED_PUBLIC),
    ),
)


def test_txt_strings_are_at_most_255_octets() -> None:
    value = dkimkeys.dkim_txt_value(DOMAIN.keys[0])
    parts = dkimkeys.txt_strings(value)
    assert [len(p) for p in parts] == [255, len(value) - 255]
    assert "".join(parts) == value
    assert dkimkeys.txt_strings("") == ("",)


def test_zone_text_parses_as_a_zone_and_holds_every_record() -> None:
    records = dkimkeys.dns_records(DOMAIN, hostname="mail.example.ac.uk", submissions_port=None)
    text = dkimkeys.render_zone("example.org", records, dkimkeys.mta_sts_hints("example.org"))
    zone = dns.zone.from_text(text, origin="example.org.", relativize=False, check_origin=False)
    got = {
        (name.to_text(), dns.rdatatype.to_text(rds.rdtype), rdata.to_text())
        for name, node in zone.nodes.items()
        for rds in node.rdatasets
        for rdata in rds
    }
    rsa_old = dkimkeys.txt_strings(f"v=DKIM1; k=rsa; p={RSA_PUBLIC}")
    assert got == {
        ("mg20261128._domainkey.example.org.", "TXT", " ".join(f'"{s}"' for s in rsa_old)),
        (
            "mg20261129._domainkey.example.org.",
            "TXT",
            " ".join(
                f'"{s}"' for s in dkimkeys.txt_strings(f"v=DKIM1; k=rsa; p={RSA_PUBLIC[::-1]}")
            ),
        ),
        ("mg20261129-ed._domainkey.example.org.", "TXT", f'"v=DKIM1; k=ed25519; p={ED_PUBLIC}"'),
        ("example.org.", "TXT", '"v=spf1 a:mail.example.ac.uk ~all"'),
        ("_dmarc.example.org.", "TXT", '"v=DMARC1; p=none; rua=mailto:postmaster@example.org"'),
        ("_submission._tcp.example.org.", "SRV", "0 1 587 mail.example.ac.uk."),
        ("_submissions._tcp.example.org.", "SRV", "0 0 0 ."),  # RFC 6186 §3: not offered
    }
    assert "; DKIM key mg20261128 (rsa-sha256, retired: keep published until removed)" in text
    assert "; MTA-STS (RFC 8461)" in text
    assert "_mta-sts.example.org." in text and "_smtp._tls.example.org." in text


def test_record_json_has_the_strings_and_key_state() -> None:
    record = dkimkeys.dns_records(DOMAIN, hostname="mail.example.ac.uk")[0]
    assert record.to_json() == {
        "name": "mg20261128._domainkey.example.org.",
        "type": "TXT",
        "ttl": 3600,
        "value": f"v=DKIM1; k=rsa; p={RSA_PUBLIC}",
        "purpose": "dkim",
        "strings": list(dkimkeys.txt_strings(f"v=DKIM1; k=rsa; p={RSA_PUBLIC}")),
        "selector": "mg20261128",
        "active": False,
    }


# --- check_records -----------------------------------------------------------------------


class Zone:
    """A lookup over a dict: {(name, type): [texts]}; a name in `failing` raises."""

    def __init__(
        self, records: dict[tuple[str, str], list[str]], failing: frozenset[str] = frozenset()
    ) -> None:
        self.records = records
        self.failing = failing

    def __call__(self, name: str, rtype: str) -> list[str]:
        if name in self.failing:
            raise LookupFailed("timeout")
        return self.records.get((name, rtype), [])


def good_zone() -> dict[tuple[str, str], list[str]]:
    records = dkimkeys.dns_records(DOMAIN, hostname="mail.example.ac.uk")
    return {(r.name.rstrip("."), r.rtype): [r.value] for r in records}


def lines(zone: Zone) -> list[str]:
    return [r.line() for r in check_records(DOMAIN, hostname="mail.example.ac.uk", lookup=zone)]


def test_check_everything_published() -> None:
    assert lines(Zone(good_zone())) == [
        "ok       DKIM   mg20261128._domainkey.example.org: published, key matches (retired key)",
        "ok       DKIM   mg20261129._domainkey.example.org: published, key matches",
        "ok       DKIM   mg20261129-ed._domainkey.example.org: published, key matches",
        'ok       SPF    example.org: "v=spf1 a:mail.example.ac.uk ~all" '
        "includes mail.example.ac.uk",
        "ok       DMARC  _dmarc.example.org: published, p=none",
        "ok       SRV    _submission._tcp.example.org: published: 0 1 587 mail.example.ac.uk.",
        "ok       SRV    _submissions._tcp.example.org: published: 0 1 465 mail.example.ac.uk.",
    ]


def test_check_reports_missing_wrong_and_unknown_line_by_line() -> None:
    zone = good_zone()
    del zone[("mg20261129-ed._domainkey.example.org", "TXT")]
    zone[("mg20261129._domainkey.example.org", "TXT")] = [f"v=DKIM1; k=rsa; p={RSA_PUBLIC}"]
    zone[("example.org", "TXT")] = ["google-site-verification=abc", "v=spf1 mx -all"]
    del zone[("_dmarc.example.org", "TXT")]
    del zone[("_submissions._tcp.example.org", "SRV")]
    results = check_records(
        DOMAIN,
        hostname="mail.example.ac.uk",
        lookup=Zone(zone, failing=frozenset({"mg20261128._domainkey.example.org"})),
    )
    assert [r.line() for r in results] == [
        "UNKNOWN  DKIM   mg20261128._domainkey.example.org: "
        "DNS lookup failed (timeout or SERVFAIL)",
        "WRONG    DKIM   mg20261129._domainkey.example.org: public key mismatch; republish it",
        "MISSING  DKIM   mg20261129-ed._domainkey.example.org: no DKIM key record; publish it",
        'WRONG    SPF    example.org: "v=spf1 mx -all" does not include mail.example.ac.uk',
        "MISSING  DMARC  _dmarc.example.org: no DMARC record; "
        'suggest "v=DMARC1; p=none; rua=mailto:postmaster@example.org"',
        "ok       SRV    _submission._tcp.example.org: published: 0 1 587 mail.example.ac.uk.",
        "MISSING  SRV    _submissions._tcp.example.org: suggest SRV 0 1 465 mail.example.ac.uk.",
    ]
    assert [r.required for r in results] == [True] * 5 + [False] * 2


@pytest.mark.parametrize(
    ("records", "status", "detail"),
    [
        (["v=spf1 ip4:192.0.2.0/24 -all"], "ok", "includes"),  # our A record is inside
        (["v=spf1 ip6:2001:db8::/32 ~all"], "ok", "includes"),
        (["v=spf1 +a:Mail.Example.AC.UK. -all"], "ok", "includes"),
        (["v=spf1 include:mail.example.ac.uk -all"], "ok", "includes"),
        (["v=spf1 -a:mail.example.ac.uk ~all"], "wrong", "does not include"),  # a fail term
        (["v=spf1 ip4:198.51.100.0/24 -all"], "wrong", "does not include"),
        (["v=spf1 a:mail.example.ac.uk -all", "v=spf1 -all"], "wrong", "several v=spf1"),
        (["v=spf10 a:mail.example.ac.uk"], "missing", "no SPF record"),
    ],
)
def test_spf_check(records: list[str], status: str, detail: str) -> None:
    zone = good_zone()
    zone[("example.org", "TXT")] = records
    zone[("mail.example.ac.uk", "A")] = ["192.0.2.25"]
    zone[("mail.example.ac.uk", "AAAA")] = ["2001:db8::25"]
    results = check_records(DOMAIN, hostname="mail.example.ac.uk", lookup=Zone(zone))
    spf = next(r for r in results if r.what == "SPF")
    assert spf.status == status
    assert detail in spf.detail


@pytest.mark.parametrize(
    ("records", "status", "detail"),
    [
        (["v=DMARC1; p=reject; adkim=s"], "ok", "published, p=reject"),
        (["v=DMARC1; p=none", "v=DMARC1; p=reject"], "wrong", "several v=DMARC1 records"),
        (["v=DMARC1; p=bogus"], "wrong", "p=bogus is not a policy"),
        (["p=reject; v=DMARC1"], "missing", "no DMARC record"),  # RFC 7489 §6.4: v= first
    ],
)
def test_dmarc_check(records: list[str], status: str, detail: str) -> None:
    zone = good_zone()
    zone[("_dmarc.example.org", "TXT")] = records
    results = check_records(DOMAIN, hostname="mail.example.ac.uk", lookup=Zone(zone))
    dmarc = next(r for r in results if r.what == "DMARC")
    assert dmarc.status == status
    assert dmarc.detail.startswith(detail)


def test_dkim_record_split_by_the_publisher_still_matches() -> None:
    zone = good_zone()
    key = DOMAIN.keys[2]
    zone[("mg20261129-ed._domainkey.example.org", "TXT")] = [
        f"v=DKIM1;k=ed25519; p={key.public_key_b64[:20]} {key.public_key_b64[20:]}"
    ]
    zone[("mg20261129._domainkey.example.org", "TXT")] = [f"v=DKIM1; k=ed25519; p={ED_PUBLIC}"]
    results = check_records(DOMAIN, hostname="mail.example.ac.uk", lookup=Zone(zone))
    assert results[2].status == "ok"
    assert (results[1].status, results[1].detail) == ("wrong", "k=ed25519, expected rsa")


def test_web_set_up_records_point_at_the_web_host() -> None:
    records = dkimkeys.dns_records(
        DOMAIN, hostname="mail.example.ac.uk", web_host="mail.example.ac.uk", web_https_port=443
    )
    text = dkimkeys.render_zone("example.org", records, [])
    zone = dns.zone.from_text(text, origin="example.org.", relativize=False, check_origin=False)
    got = {
        (name.to_text(), dns.rdatatype.to_text(rds.rdtype), rdata.to_text())
        for name, node in zone.nodes.items()
        for rds in node.rdatasets
        for rdata in rds
    }
    assert {
        ("autoconfig.example.org.", "CNAME", "mail.example.ac.uk."),
        ("autodiscover.example.org.", "CNAME", "mail.example.ac.uk."),
        ("_autodiscover._tcp.example.org.", "SRV", "0 0 443 mail.example.ac.uk."),
    } <= got
    # without HTTPS, Outlook would not follow the SRV record: it is not suggested
    plain = dkimkeys.dns_records(DOMAIN, hostname="h.example", web_host="h.example")
    assert not [r for r in plain if r.name.startswith("_autodiscover")]
    assert [r.name for r in plain if r.rtype == "CNAME"] == [
        "autoconfig.example.org.", "autodiscover.example.org."]  # fmt: skip
    # no [web] listen: nothing about it
    assert not [r for r in dkimkeys.dns_records(DOMAIN, hostname="h.example") if r.rtype == "CNAME"]
