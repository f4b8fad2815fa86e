"""A real OpenLDAP slapd (Debian's `slapd`) on a loopback port, with a throwaway configuration.

`Slapd(folder, people, ca=...)` writes a slapd.conf (core, cosine, inetorgperson and a tiny test
schema for mailAlternateAddress), loads the people with slapadd, and `start()` runs
`slapd -d 0` in the foreground on ldap://127.0.0.1:PORT (StartTLS offered when a test CA is
given) until `stop()`. The directory suffix is dc=example,dc=org; people live in
ou=people; a service account cn=mailgate,dc=example,dc=org (password in `service_password`)
may search, anonymous users may not (so anonymous-search tests use `anonymous_search=True`).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.ports import accepts, free_port
from tests.support.processes import start_logged, terminate
from tests.support.testca import TestCA
from tests.support.waiting import wait_for

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"
SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
SERVICE_DN = f"cn=mailgate,{SUFFIX}"

# mailAlternateAddress as the Netscape/Sun messaging schema defines it (its OID), and an
# auxiliary class under OpenLDAP's experimental arc to carry it: nothing a test needs more.
TEST_SCHEMA = """\
attributetype ( 2.16.840.1.113730.3.1.13 NAME 'mailAlternateAddress'
  EQUALITY caseIgnoreIA5Match SUBSTR caseIgnoreIA5SubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.26{256} )
objectclass ( 1.3.6.1.4.1.4203.666.11.99.1 NAME 'mailgateTestRecipient'
  SUP top AUXILIARY MAY ( mailAlternateAddress ) )
"""


@dataclass(frozen=True)
class Person:
    uid: str
    password: str
    mail: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()


@dataclass
class Slapd:
    folder: Path
    people: list[Person]
    ca: TestCA | None = None
    anonymous_search: bool = False
    service_password: str = "service secret"
    port: int = field(default_factory=free_port)
    ldaps_port: int = field(default_factory=free_port)  # listened on when a CA is given
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "db").mkdir(exist_ok=True)
        (self.folder / "test.schema").write_text(TEST_SCHEMA)
        tls = ""
        if self.ca is not None:
            issued = self.ca.issue("localhost")
            tls = (
                f"TLSCACertificateFile {self.ca.cert_path}\n"
                f"TLSCertificateFile {issued.cert}\nTLSCertificateKeyFile {issued.key}\n"
            )
        search = "by anonymous read" if self.anonymous_search else ""
        (self.folder / "slapd.conf").write_text(
            "include /etc/ldap/schema/core.schema\n"
            "include /etc/ldap/schema/cosine.schema\n"
            "include /etc/ldap/schema/inetorgperson.schema\n"
            f"include {self.folder / 'test.schema'}\n"
            f"pidfile {self.folder / 'slapd.pid'}\n"
            "modulepath /usr/lib/ldap\nmoduleload back_mdb\n"
            f"{tls}"
            "database mdb\n"
            f'suffix "{SUFFIX}"\n'
            f'rootdn "cn=admin,{SUFFIX}"\nrootpw "admin secret"\n'
            f"directory {self.folder / 'db'}\nmaxsize 10485760\n"
            "access to attrs=userPassword by anonymous auth by self write by * none\n"
            f'access to * by dn.exact="{SERVICE_DN}" read {search} by self read by * none\n'
        )
        (self.folder / "data.ldif").write_text(self._ldif())
        subprocess.run([SLAPADD, "-q", "-f", str(self.folder / "slapd.conf"),
                        "-l", str(self.folder / "data.ldif")],
                       check=True, capture_output=True, timeout=60)  # fmt: skip

    def _ldif(self) -> str:
        entries = [
            f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: x\n",
            f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
            f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject"
            f"\ncn: mailgate\nuserPassword: {self.service_password}\n",
        ]
        for p in self.people:
            lines = [f"dn: uid={p.uid},{PEOPLE}", "objectClass: inetOrgPerson",
                     "objectClass: mailgateTestRecipient", f"uid: {p.uid}", f"cn: {p.uid}",
                     f"sn: {p.uid}", f"userPassword: {p.password}"]  # fmt: skip
            lines += [f"mail: {m}" for m in p.mail]
            lines += [f"mailAlternateAddress: {a}" for a in p.aliases]
            entries.append("\n".join(lines) + "\n")
        return "\n".join(entries)

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    def start(self) -> None:
        self.proc = start_logged(
            [
                SLAPD,
                "-d",
                "0",
                "-f",
                str(self.folder / "slapd.conf"),
                "-h",
                f"{self.url}/" + (f" {self.ldaps_url}/" if self.ca is not None else ""),
            ],
            self.folder / "slapd.log",
        )
        wait_for(self._listens, timeout=20, what="slapd listening")

    def _listens(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"slapd exited: {(self.folder / 'slapd.log').read_text()[-2000:]}")
        return accepts(self.port)

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None
