"""mailgate domain: managed mail domains, their DKIM keys and the DNS records to publish.

Owns: the `domain` command's arguments and output, and wiring key files (message.dkimkeys) to
the directory. Must not: print private key material, or delete a key file (a removed domain's
keys, and a removed selector's key, are moved to ``<data>/dkim/removed/``).

    mailgate domain add DOMAIN [--ed25519] [--allow-network NET ...]
    mailgate domain dns DOMAIN [--json]            # zone-file text, ready to paste
    mailgate domain check DOMAIN [--json]          # what DNS publishes (delivery.nameservers)
    mailgate domain list [--json]
    mailgate domain remove DOMAIN                  # also revokes the domain's grants
    mailgate domain rotate-key DOMAIN [--ed25519]  # new selector(s); old ones stay published
    mailgate domain remove-key DOMAIN SELECTOR     # a retired selector, once out of DNS
    mailgate domain allow-network DOMAIN NET       # smart-host clients whose mail is signed
    mailgate domain disallow-network DOMAIN NET

Rotation signs with the new key at once; the old selector stays valid (published, listed by
`domain dns`) until `remove-key`, so messages signed before the rotation still verify.
RFCs: as in message.dkimkeys (6376, 8463, 7208, 7489, 6186, 8461).
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mailgate.cli.common import CommandError, load_config, open_directory, print_json
from mailgate.config import Config
from mailgate.directory import Directory
from mailgate.dnsresolver import make_resolver
from mailgate.message import dkimkeys
from mailgate.message.dkimkeys import ALGORITHM_ED25519, ALGORITHM_RSA, LookupFailed
from mailgate.values import DkimKey, Domain

DNS_TIMEOUT = 5.0  # seconds for all tries of one lookup


def register(sub: Any) -> None:
    p = sub.add_parser("domain", help="managed mail domains and their DKIM keys")
    dsub = p.add_subparsers(dest="domain_command", metavar="ACTION", required=True)

    add = dsub.add_parser("add", help="add a managed domain, make its DKIM key, print DNS records")
    add.add_argument("domain", metavar="DOMAIN")
    add.add_argument("--ed25519", action="store_true", help="also make an Ed25519 key (RFC 8463)")
    add.add_argument("--allow-network", metavar="NET", action="append", default=[],
                     help="smart-host clients in NET may send signed mail from this domain "
                     "(repeatable)")  # fmt: skip
    add.set_defaults(func=_wired(_add))

    dns_ = dsub.add_parser("dns", help="print the DNS records to publish")
    dns_.add_argument("domain", metavar="DOMAIN")
    dns_.add_argument("--json", action="store_true", help="print JSON")
    dns_.set_defaults(func=_wired(_dns))

    check = dsub.add_parser("check", help="look the records up in DNS and compare")
    check.add_argument("domain", metavar="DOMAIN")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(func=_wired(_check))

    ls = dsub.add_parser("list", help="list managed domains")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_wired(_list))

    rm = dsub.add_parser("remove", help="remove a domain and its grants; keys are set aside")
    rm.add_argument("domain", metavar="DOMAIN")
    rm.set_defaults(func=_wired(_remove))

    rot = dsub.add_parser("rotate-key", help="sign with new key(s); old ones stay published")
    rot.add_argument("domain", metavar="DOMAIN")
    rot.add_argument("--ed25519", action="store_true", help="also add an Ed25519 key")
    rot.set_defaults(func=_wired(_rotate))

    rmk = dsub.add_parser("remove-key", help="remove a retired selector (set its key aside)")
    rmk.add_argument("domain", metavar="DOMAIN")
    rmk.add_argument("selector", metavar="SELECTOR")
    rmk.set_defaults(func=_wired(_remove_key))

    for name, func, text in (
        ("allow-network", _allow_network, "sign smart-host mail from clients in NET"),
        ("disallow-network", _disallow_network, "stop signing smart-host mail from NET"),
    ):
        q = dsub.add_parser(name, help=text)
        q.add_argument("domain", metavar="DOMAIN")
        q.add_argument("network", metavar="NET")
        q.set_defaults(func=_wired(func))


# --- helpers -----------------------------------------------------------------------------


Handler = Callable[[argparse.Namespace, Config, Directory], int]


def _wired(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Load the configuration, open the directory for the handler, and close it after."""

    def run(args: argparse.Namespace) -> int:
        cfg = load_config(args)
        directory = open_directory(cfg)
        try:
            return handler(args, cfg, directory)
        finally:
            directory.close()

    return run


def _name(args: argparse.Namespace) -> str:
    return dkimkeys.check_domain_name(args.domain)


def _get(directory: Directory, name: str) -> Domain:
    domain = directory.get_domain(name)
    if domain is None:
        raise CommandError(f"domain {name} is not a managed domain")
    return domain


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise CommandError(f"{text!r} is not an IP network (like 10.1.0.0/16)") from None


def _ports(cfg: Config) -> tuple[int | None, int | None]:
    """The ports the SRV records announce: the first configured listener of each service."""
    sub = cfg.submission.listen[0].port if cfg.submission.listen else None
    subs = cfg.submissions.listen[0].port if cfg.submissions.listen else None
    return sub, subs


def _records(cfg: Config, domain: Domain) -> list[dkimkeys.DnsRecord]:
    sub, subs = _ports(cfg)
    # [web] runs in `mailgate serve` on this host; HTTPS only with [web] tls.
    web_host = cfg.hostname if cfg.web.listen else None
    https_port = cfg.web.listen[0].port if cfg.web.listen and cfg.web.tls else None
    return dkimkeys.dns_records(
        domain, hostname=cfg.hostname, submission_port=sub, submissions_port=subs,
        web_host=web_host, web_https_port=https_port,
    )  # fmt: skip


def _zone_text(cfg: Config, domain: Domain) -> str:
    records = _records(cfg, domain)
    return dkimkeys.render_zone(domain.name, records, dkimkeys.mta_sts_hints(domain.name))


def _taken_selectors(cfg: Config, domain: Domain) -> set[str]:
    taken = {k.selector for k in domain.keys}
    folder = dkimkeys.key_dir(cfg.base_dir, domain.name)
    if folder.is_dir():
        taken |= {p.stem for p in folder.glob("*.key")}
    return taken


def _make_keys(
    cfg: Config, directory: Directory, domain: Domain, algorithms: list[str]
) -> list[DkimKey]:
    """Generate keys, each on disk (fsynced) before the directory refers to it."""
    today = datetime.now(UTC).date()
    selectors = dkimkeys.new_selectors(_taken_selectors(cfg, domain), algorithms, today)
    made: list[DkimKey] = []
    for algorithm in algorithms:
        key = dkimkeys.generate_key(cfg.base_dir, domain.name, selectors[algorithm], algorithm)
        directory.add_dkim_key(domain.name, key)
        made.append(key)
    return made


def _describe(keys: list[DkimKey]) -> str:
    return ", ".join(f"{k.selector} ({k.algorithm})" for k in keys)


# --- commands ------------------------------------------------------------------------------


def _add(args: argparse.Namespace, cfg: Config, directory: Directory) -> int:
    name = _name(args)
    networks = tuple(_network(n) for n in args.allow_network)
    if directory.get_domain(name) is not None:
        raise CommandError(f"domain {name} already exists (see `mailgate domain dns {name}`)")
    algorithms = [ALGORITHM_RSA] + ([ALGORITHM_ED25519] if args.ed25519 else [])
    domain = directory.add_domain(name)
    try:
        made = _make_keys(cfg, directory, domain, algorithms)
        if networks:
            directory.set_smarthost_networks(name, networks)
    except BaseException:
        # Leave no half-made domain behind: without its key it would be managed but unsigned.
        directory.remove_domain(name)
        dkimkeys.set_aside(cfg.base_dir, name)
        raise
    print(f"; added domain {name} with DKIM key(s) {_describe(made)}")
    print(_zone_text(cfg, _get(directory, name)), end="")
    return 0


def _dns(args: argparse.Namespace, cfg: Config, directory: Directory) -> int:
    name = _name(args)
    domain = _get(directory, name)
    if not args.json:
        print(_zone_text(cfg, domain), end="")
        return 0
    records = _records(cfg, domain)
    print_json(
        {
            "domain": domain.name,
            "records": [r.to_json() for r in records],
            "hints": dkimkeys.mta_sts_hints(domain.name),
        }
    )
    return 0


def _list(args: argparse.Namespace, cfg: Config, directory: Directory) -> int:
    domains = sorted(directory.list_domains(), key=lambda d: d.name)
    if args.json:
        print_json([_domain_json(d) for d in domains])
        return 0
    if not domains:
        # Not "none": the default domain counts as managed for senders even without a key.
        default = cfg.directory.default_domain
        print(f"no domains with DKIM keys; {default} (directory.default_domain) is managed for "
              f"senders: `mailgate domain add {default}` gives it a key")  # fmt: skip
        return 0
    rows = [
        (
            d.name,
            ", ".join(f"{k.selector}{'' if k.active else ' (retired)'}" for k in d.keys) or "-",
            ", ".join(d.smarthost_networks) or "-",
        )
        for d in domains
    ]
    widths = [max(len(r[i]) for r in [("DOMAIN", "SELECTORS", ""), *rows]) for i in range(2)]
    print(f"{'DOMAIN':<{widths[0]}}  {'SELECTORS':<{widths[1]}}  SMART-HOST NETWORKS")
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}")
    return 0


def _domain_json(domain: Domain) -> dict[str, object]:
    return {
        "name": domain.name,
        "keys": [
            {
                "selector": k.selector,
                "algorithm": k.algorithm,
                "active": k.active,
                "key_path": str(k.key_path),
            }
            for k in domain.keys
        ],
        "smarthost_networks": list(domain.smarthost_networks),
    }


def _remove(args: argparse.Namespace, cfg: Config, directory: Directory) -> int:
    name = _name(args)
    domain = _get(directory, name)
    grants = [a for a, _ in directory.list_grants() if a.rpartition("@")[2].lower() == name]
    # The directory removes the domain's grants and key rows; its key files are set aside
    # after that (if moving fails, the files merely stay where they were).
    directory.remove_domain(name)
    dkimkeys.set_aside(cfg.base_dir, name, key_paths=[k.key_path for k in domain.keys])
    print(f"removed domain {name} and {len(grants)} grant(s); its DKIM keys are kept in "
          f"{cfg.base_dir / 'dkim' / 'removed'}")  # fmt: skip
    print(f"remove its DNS records (_domainkey, SPF, _dmarc, SRV) from the {name} zone")
    return 0


def _rotate(args: argparse.Namespace, cfg: Config, directory: Directory) -> int:
    name = _name(args)
    domain = _get(directory, name)
    old = [k for k in domain.keys if k.active]
    algorithms = sorted({k.algorithm for k in old} | {ALGORITHM_RSA}, key=dkimkeys.ALGORITHMS.index)
    if args.ed25519 and ALGORITHM_ED25519 not in algorithms:
        algorithms.append(ALGORITHM_ED25519)
    # New keys first, then retire the old: there is never a moment without an active key.
    made = _make_keys(cfg, directory, domain, algorithms)
    for key in old:
        directory.set_dkim_key_active(name, key.selector, False)
    print(f"; {name}: now signing with {_describe(made)}")
    if old:
        retired = " ".join(k.selector for k in old)
        print(f"; retired (keep published until `mailgate domain remove-key {name} SELECTOR`):"
              f" {retired}")  # fmt: skip
    print(_zone_text(cfg, _get(directory, name)), end="")
    return 0


def _remove_key(args: argparse.Namespace, cfg: Config, directory: Directory) -> int:
    name = _name(args)
    domain = _get(directory, name)
    selector = dkimkeys.check_selector(args.selector.lower())
    key = next((k for k in domain.keys if k.selector.lower() == selector), None)
    if key is None:
        raise CommandError(f"domain {name} has no DKIM selector {selector}")
    if key.active:
        raise CommandError(f"selector {selector} is signing mail; `mailgate domain rotate-key "
                           f"{name}` first")  # fmt: skip
    directory.remove_dkim_key(name, key.selector)
    moved = dkimkeys.set_aside(cfg.base_dir, name, key.key_path.stem)
    where = f"; its key was moved to {moved}" if moved else ""
    print(f"removed selector {selector} from {name}{where}")
    print(f"remove {selector}._domainkey.{name} from DNS")
    return 0


def _allow_network(args: argparse.Namespace, cfg: Config, directory: Directory) -> int:
    name = _name(args)
    domain = _get(directory, name)
    network = _network(args.network)
    if network not in domain.smarthost_networks:
        directory.set_smarthost_networks(name, (*domain.smarthost_networks, network))
    print(f"{name}: smart-host mail from {network} is signed")
    return 0


def _disallow_network(args: argparse.Namespace, cfg: Config, directory: Directory) -> int:
    name = _name(args)
    domain = _get(directory, name)
    network = _network(args.network)
    if network not in domain.smarthost_networks:
        raise CommandError(f"{network} is not an allowed network of {name}")
    directory.set_smarthost_networks(
        name, tuple(n for n in domain.smarthost_networks if n != network)
    )
    print(f"{name}: smart-host mail from {network} is no longer signed")
    return 0


# --- check ---------------------------------------------------------------------------------


def dns_lookup(cfg: Config) -> dkimkeys.Lookup:
    """A lookup over `delivery.nameservers` (else the system resolver) for check_records."""
    resolver = make_resolver(cfg.delivery.nameservers, DNS_TIMEOUT)

    def lookup(name: str, rtype: str) -> list[str]:
        try:
            answer = resolver.resolve(name, rtype, raise_on_no_answer=False, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise LookupFailed(str(e)) from None
        out: list[str] = []
        for rdata in answer.rrset or ():
            if rdata.rdtype == dns.rdatatype.TXT:
                out.append(b"".join(rdata.strings).decode("utf-8", "replace"))
            elif rdata.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                out.append(str(rdata.address))
            else:
                out.append(rdata.to_text())
        return out

    return lookup


def _check(args: argparse.Namespace, cfg: Config, directory: Directory) -> int:
    name = _name(args)
    domain = _get(directory, name)
    results = dkimkeys.check_records(domain, hostname=cfg.hostname, lookup=dns_lookup(cfg))
    problems = [r for r in results if r.required and r.status != "ok"]
    if args.json:
        print_json({"domain": name, "ok": not problems,
                    "results": [r.to_json() for r in results]})  # fmt: skip
    else:
        for result in results:
            print(result.line())
        print(f"{name}: " + (f"{len(problems)} problem(s)" if problems else "all records in place"))
    return 1 if problems else 0
