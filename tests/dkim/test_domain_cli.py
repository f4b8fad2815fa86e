"""`mailgate domain ...` against a real SQLite directory, key files and a loopback DNS server."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.dkim.conftest import HOSTNAME, Site

DOMAIN = "college.example.ac.uk"


def test_add_makes_private_key_files_and_prints_the_records(site: Site) -> None:
    result = site.run("domain", "add", "College.Example.AC.UK", "--ed25519")
    assert result.status == 0, result.err
    first, *zone = result.out.splitlines()
    assert first == (
        f"; added domain {DOMAIN} with DKIM key(s) mg"
        + first.split(" mg", 1)[1]  # the selectors carry today's date
    )
    keys = sorted((site.path / "dkim" / DOMAIN).iterdir(), key=lambda p: len(p.name))
    assert [p.suffix for p in keys] == [".key", ".key"]
    assert keys[1].name == keys[0].stem + "-ed.key"
    for path in [*keys, keys[0].parent, keys[0].parent.parent]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o600 if path.is_file() else 0o700)
    assert f"{keys[0].stem}._domainkey.{DOMAIN}. 3600 IN TXT " in result.out
    assert f'{DOMAIN}. 3600 IN TXT "v=spf1 a:{HOSTNAME} ~all"' in zone
    dmarc = f'"v=DMARC1; p=none; rua=mailto:postmaster@{DOMAIN}"'
    assert f"_dmarc.{DOMAIN}. 3600 IN TXT {dmarc}" in zone
    assert f"_submission._tcp.{DOMAIN}. 3600 IN SRV 0 1 587 {HOSTNAME}." in zone
    assert f"_submissions._tcp.{DOMAIN}. 3600 IN SRV 0 1 465 {HOSTNAME}." in zone
    assert "PRIVATE KEY" not in result.out + result.err
    # `domain dns` prints the same records again.
    assert site.run("domain", "dns", DOMAIN).out == "\n".join(zone) + "\n"


def test_add_refuses_duplicates_bad_names_and_bad_networks(site: Site) -> None:
    assert site.run("domain", "add", DOMAIN).status == 0
    again = site.run("domain", "add", DOMAIN)
    assert (again.status, again.err) == (
        1,
        f"mailgate: domain {DOMAIN} already exists (see `mailgate domain dns {DOMAIN}`)\n",
    )
    bad = site.run("domain", "add", "../etc")
    assert bad.status == 1
    assert (
        bad.err == "mailgate: '../etc' is not a valid domain name (use the ASCII form, xn--...)\n"
    )
    net = site.run("domain", "add", "dept.example.org", "--allow-network", "10.0.0.300/8")
    assert net.status == 1
    assert net.err == "mailgate: '10.0.0.300/8' is not an IP network (like 10.1.0.0/16)\n"
    # Nothing was half-made by the refused commands.
    assert [d["name"] for d in json.loads(site.run("domain", "list", "--json").out)] == [DOMAIN]
    assert sorted(p.name for p in (site.path / "dkim").iterdir()) == [DOMAIN]


def test_list_json_and_text(site: Site) -> None:
    assert site.run("domain", "list").out == (
        "no domains with DKIM keys; example.ac.uk (directory.default_domain) is managed for "
        "senders: `mailgate domain add example.ac.uk` gives it a key\n"
    )
    networks = ["--allow-network", "10.1.2.0/24", "--allow-network", "2001:db8::/48"]
    site.run("domain", "add", DOMAIN, *networks)
    site.run("domain", "add", "dept.example.org")
    listed = json.loads(site.run("domain", "list", "--json").out)
    assert [d["name"] for d in listed] == ["college.example.ac.uk", "dept.example.org"]
    college = listed[0]
    assert college["smarthost_networks"] == ["10.1.2.0/24", "2001:db8::/48"]
    (key,) = college["keys"]
    assert key["algorithm"] == "rsa-sha256" and key["active"] is True
    assert Path(key["key_path"]) == site.path / "dkim" / DOMAIN / f"{key['selector']}.key"
    text = site.run("domain", "list").out.splitlines()
    assert text[0].split() == ["DOMAIN", "SELECTORS", "SMART-HOST", "NETWORKS"]
    assert text[1].split() == [DOMAIN, key["selector"], "10.1.2.0/24,", "2001:db8::/48"]
    assert text[2].split()[-1] == "-"


def test_dns_json_splits_keys_into_255_octet_strings(site: Site) -> None:
    site.run("domain", "add", DOMAIN, "--ed25519")
    out = json.loads(site.run("domain", "dns", DOMAIN, "--json").out)
    assert out["domain"] == DOMAIN
    purposes = [r["purpose"] for r in out["records"]]
    assert purposes == ["dkim", "dkim", "spf", "dmarc", "submission-srv", "submission-srv"]
    rsa, ed = out["records"][:2]
    assert [len(s) for s in rsa["strings"]] == [255, len(rsa["value"]) - 255]
    assert "".join(rsa["strings"]) == rsa["value"]
    assert rsa["value"].startswith("v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA")
    assert ed["value"].startswith("v=DKIM1; k=ed25519; p=") and len(ed["strings"]) == 1
    assert any(h.startswith("MTA-STS (RFC 8461)") for h in out["hints"])


def test_unknown_domain_is_an_error(site: Site) -> None:
    for argv in (["dns", "nowhere.example"], ["rotate-key", "nowhere.example"],
                 ["remove", "nowhere.example"], ["check", "nowhere.example"]):  # fmt: skip
        result = site.run("domain", *argv)
        assert (result.status, result.err) == (
            1,
            "mailgate: domain nowhere.example is not a managed domain\n",
        )


def test_remove_revokes_grants_and_keeps_the_keys_aside(site: Site) -> None:
    site.run("domain", "add", DOMAIN, "--ed25519")
    with site.directory() as directory:
        directory.add_user("bursar", "bursar@example.ac.uk", "correct horse battery")
        directory.grant(f"fees@{DOMAIN}", "bursar")
        directory.grant(f"*@{DOMAIN}", "bursar")
        directory.grant("bursar2@example.ac.uk", "bursar")
    contents = {p.name: p.read_bytes() for p in (site.path / "dkim" / DOMAIN).iterdir()}
    result = site.run("domain", "remove", DOMAIN)
    assert result.status == 0, result.err
    assert result.out.splitlines()[0] == (
        f"removed domain {DOMAIN} and 2 grant(s); its DKIM keys are kept in "
        f"{site.path / 'dkim' / 'removed'}"
    )
    with site.directory() as directory:
        assert directory.get_domain(DOMAIN) is None
        assert directory.list_grants() == [("bursar2@example.ac.uk", "bursar")]
    assert not (site.path / "dkim" / DOMAIN).exists()
    kept = {p.name: p.read_bytes() for p in (site.path / "dkim" / "removed").rglob("*.key")}
    assert kept == contents


def test_rotate_then_remove_the_retired_key(site: Site) -> None:
    site.run("domain", "add", DOMAIN)
    (old,) = json.loads(site.run("domain", "list", "--json").out)[0]["keys"]
    result = site.run("domain", "rotate-key", DOMAIN, "--ed25519")
    assert result.status == 0, result.err
    keys = json.loads(site.run("domain", "list", "--json").out)[0]["keys"]
    state = {k["selector"]: (k["algorithm"], k["active"]) for k in keys}
    new_rsa = old["selector"] + "-2"
    assert state == {
        old["selector"]: ("rsa-sha256", False),
        new_rsa: ("rsa-sha256", True),
        new_rsa + "-ed": ("ed25519-sha256", True),
    }
    assert result.out.splitlines()[0] == (
        f"; {DOMAIN}: now signing with {new_rsa} (rsa-sha256), {new_rsa}-ed (ed25519-sha256)"
    )
    assert "retired: keep published until removed" in site.run("domain", "dns", DOMAIN).out

    busy = site.run("domain", "remove-key", DOMAIN, new_rsa)
    assert (busy.status, busy.err) == (
        1,
        f"mailgate: selector {new_rsa} is signing mail; "
        f"`mailgate domain rotate-key {DOMAIN}` first\n",
    )
    content = Path(old["key_path"]).read_bytes()
    done = site.run("domain", "remove-key", DOMAIN, old["selector"])
    assert done.status == 0, done.err
    assert not Path(old["key_path"]).exists()
    (kept,) = (site.path / "dkim" / "removed").iterdir()
    assert kept.read_bytes() == content and stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert old["selector"] + "._domainkey" not in site.run("domain", "dns", DOMAIN).out
    missing = site.run("domain", "remove-key", DOMAIN, old["selector"])
    assert missing.err == f"mailgate: domain {DOMAIN} has no DKIM selector {old['selector']}\n"


def test_allow_and_disallow_networks(site: Site) -> None:
    site.run("domain", "add", DOMAIN)
    assert site.run("domain", "allow-network", DOMAIN, "10.1.2.3/16").out == (
        f"{DOMAIN}: smart-host mail from 10.1.0.0/16 is signed\n"
    )
    site.run("domain", "allow-network", DOMAIN, "10.1.0.0/16")  # twice: listed once
    site.run("domain", "allow-network", DOMAIN, "2001:db8::/32")
    with site.directory() as directory:
        domain = directory.get_domain(DOMAIN)
        assert domain is not None
        assert domain.smarthost_networks == ("10.1.0.0/16", "2001:db8::/32")
    assert site.run("domain", "disallow-network", DOMAIN, "10.1.0.0/16").status == 0
    absent = site.run("domain", "disallow-network", DOMAIN, "10.9.0.0/16")
    assert absent.err == f"mailgate: 10.9.0.0/16 is not an allowed network of {DOMAIN}\n"
    with site.directory() as directory:
        domain = directory.get_domain(DOMAIN)
        assert domain is not None and domain.smarthost_networks == ("2001:db8::/32",)


def test_check_after_publishing_everything(site: Site) -> None:
    site.run("domain", "add", DOMAIN, "--ed25519")
    site.publish(DOMAIN)
    result = site.run("domain", "check", DOMAIN)
    assert result.status == 0, result.out
    lines = result.out.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [
        ["ok", what] for what in ("DKIM", "DKIM", "SPF", "DMARC", "SRV", "SRV")
    ]
    assert lines[-1] == f"{DOMAIN}: all records in place"
    # The lookups went to our loopback server (delivery.nameservers), not elsewhere.
    assert (f"_dmarc.{DOMAIN}", "TXT") in site.dns.queries


def test_check_says_what_is_missing_or_wrong(site: Site) -> None:
    site.run("domain", "add", DOMAIN, "--ed25519")
    site.publish(DOMAIN)
    listed = json.loads(site.run("domain", "list", "--json").out)
    rsa, ed = (k["selector"] for k in listed[0]["keys"])
    # Someone pasted an old key, an SPF record that forgets us, and no DMARC; the Ed25519
    # name fails to resolve.
    site.dns._set(f"{rsa}._domainkey.{DOMAIN}", "TXT", ['"v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG"'])
    site.dns.txt(DOMAIN, "v=spf1 mx -all")
    site.dns.remove(f"_dmarc.{DOMAIN}")
    site.dns.servfail(f"{ed}._domainkey.{DOMAIN}")
    result = site.run("domain", "check", DOMAIN)
    assert result.status == 1
    assert result.out.splitlines() == [
        f"WRONG    DKIM   {rsa}._domainkey.{DOMAIN}: public key mismatch; republish it",
        f"UNKNOWN  DKIM   {ed}._domainkey.{DOMAIN}: DNS lookup failed (timeout or SERVFAIL)",
        f'WRONG    SPF    {DOMAIN}: "v=spf1 mx -all" does not include {HOSTNAME}',
        f"MISSING  DMARC  _dmarc.{DOMAIN}: no DMARC record; "
        f'suggest "v=DMARC1; p=none; rua=mailto:postmaster@{DOMAIN}"',
        f"ok       SRV    _submission._tcp.{DOMAIN}: published: 0 1 587 {HOSTNAME}.",
        f"ok       SRV    _submissions._tcp.{DOMAIN}: published: 0 1 465 {HOSTNAME}.",
        f"{DOMAIN}: 4 problem(s)",
    ]
    as_json = json.loads(site.run("domain", "check", DOMAIN, "--json").out)
    assert as_json["ok"] is False
    statuses = [r["status"] for r in as_json["results"]]
    assert statuses == ["wrong", "unknown", "wrong", "missing", "ok", "ok"]


def test_the_installed_command(site: Site) -> None:
    """The `mailgate` entry point itself, as an operator runs it."""
    site.run("domain", "add", DOMAIN)
    env = {**os.environ, "MAILGATE_CONFIG": str(site.config_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "mailgate", "domain", "dns", DOMAIN, "--json"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["domain"] == DOMAIN
    proc = subprocess.run(
        [sys.executable, "-m", "mailgate", "domain", "remove-key", DOMAIN, "x"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (
        1,
        f"mailgate: domain {DOMAIN} has no DKIM selector x\n",
    )
