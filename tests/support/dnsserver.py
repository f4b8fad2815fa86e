"""A tiny authoritative DNS server for tests, on a loopback port, with a zone the test edits.

Owns: answering A, AAAA, MX, TXT, TLSA queries (UDP and TCP) from an in-memory zone, plus the
failure modes a resolver must handle: NXDOMAIN (any name the zone does not know), NODATA (a
known name without records of the asked type), SERVFAIL and silence (a timeout). Must not:
recurse, or listen anywhere but loopback. Built on dnspython's message parsing (RFC 1035 §4,
RFC 7766 TCP framing); null MX is RFC 7505 (`MX 0 .`).

    with DnsServer() as dns:
        dns.mx("example.org", (10, "mx1.example.org"), (20, "mx2.example.org"))
        dns.a("mx1.example.org", "127.0.0.2")
        cfg_nameservers = [dns.nameserver]          # "127.0.0.1:<port>"

The zone may be changed while the server runs (a lock protects it); every query is recorded in
`queries` as (name, type) so a test can assert what was asked.

DNSSEC is simulated the way a validating resolver reports it (RFC 4035 §3.2.3): answers for
names inside a zone marked with `sign()` carry the AD bit (NXDOMAIN and NODATA too); no RRSIGs
are served. The delivery code trusts that bit from its configured resolver, which is what is
tested.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tests.support.serving import Background

DEFAULT_TTL = 60


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class DnsServer(Background):
    """An authoritative server for whatever names the test puts in its zone."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__()
        self.host = host
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], list[str]] = {}
        self._names: set[str] = set()
        self._servfail: set[str] = set()
        self._silent: set[str] = set()
        self._signed: set[str] = set()

    # --- zone editing ---------------------------------------------------------------------

    def mx(self, domain: str, *hosts: tuple[int, str]) -> None:
        """Set the MX records of `domain` to (preference, host) pairs."""
        self._set(domain, "MX", [f"{pref} {_key(host)}." for pref, host in hosts])

    def null_mx(self, domain: str) -> None:
        """RFC 7505: `MX 0 .`, the domain accepts no mail."""
        self._set(domain, "MX", ["0 ."])

    def a(self, name: str, *addresses: str) -> None:
        self._set(name, "A", list(addresses))

    def aaaa(self, name: str, *addresses: str) -> None:
        self._set(name, "AAAA", list(addresses))

    def txt(self, name: str, *texts: str) -> None:
        self._set(name, "TXT", ['"' + t.replace('"', '\\"') + '"' for t in texts])

    def tlsa(self, name: str, *records: tuple[int, int, int, str]) -> None:
        """TLSA records (usage, selector, matching type, hex data) at `name`, e.g.
        "_25._tcp.mx.example.org" (RFC 6698 §2, RFC 7672 §2.2)."""
        self._set(name, "TLSA", [f"{u} {s} {m} {data}" for u, s, m, data in records])

    def sign(self, zone: str) -> None:
        """Answers for `zone` and every name under it carry the AD bit from now on."""
        with self._lock:
            self._signed.add(_key(zone))

    def unsign(self, zone: str) -> None:
        with self._lock:
            self._signed.discard(_key(zone))

    def _is_signed(self, name: str) -> bool:
        return any(name == z or name.endswith("." + z) for z in self._signed)

    def exists(self, name: str) -> None:
        """Make `name` exist without records (queries get NODATA, not NXDOMAIN)."""
        with self._lock:
            self._names.add(_key(name))

    def servfail(self, name: str) -> None:
        """Answer every query for `name` with SERVFAIL."""
        with self._lock:
            self._servfail.add(_key(name))

    def silence(self, name: str) -> None:
        """Never answer queries for `name` (the resolver times out)."""
        with self._lock:
            self._silent.add(_key(name))

    def remove(self, name: str) -> None:
        """Forget everything about `name`: it becomes NXDOMAIN."""
        key = _key(name)
        with self._lock:
            self._names.discard(key)
            self._servfail.discard(key)
            self._silent.discard(key)
            for k in [k for k in self._records if k[0] == key]:
                del self._records[k]

    def _set(self, name: str, rdtype: str, values: list[str]) -> None:
        key = _key(name)
        with self._lock:
            self._names.add(key)
            self._servfail.discard(key)
            self._silent.discard(key)
            self._records[(key, rdtype)] = values

    # --- answering ------------------------------------------------------------------------

    def answer(self, wire: bytes) -> bytes | None:
        """The response to one query in wire format, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None  # garbage: a real server would drop it too
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return bytes(response.to_wire())
        question = query.question[0]
        name = _key(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries.append((name, rdtype))
            if self._is_signed(name):
                response.flags |= dns.flags.AD
            if name in self._silent:
                return None
            if name in self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
                return bytes(response.to_wire())
            if name not in self._names:
                response.set_rcode(dns.rcode.NXDOMAIN)
                return bytes(response.to_wire())
            values = list(self._records.get((name, rdtype), ()))
        if values:
            rrset = dns.rrset.from_text_list(
                question.name, DEFAULT_TTL, dns.rdataclass.IN, question.rdtype, values
            )
            response.answer.append(rrset)
        return bytes(response.to_wire())

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def nameserver(self) -> str:
        """The `delivery.nameservers` entry for this server: "127.0.0.1:<port>"."""
        return f"{self.host}:{self.port}"

    def _listen(self) -> None:
        owner = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = owner.answer(data)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(5)
                for _ in range(100):  # bounded: at most 100 queries per TCP connection
                    head = _recv_exact(sock, 2)
                    if head is None:
                        return
                    (length,) = struct.unpack("!H", head)
                    body = _recv_exact(sock, length)
                    if body is None:
                        return
                    reply = owner.answer(body)
                    if reply is None:
                        return
                    sock.sendall(struct.pack("!H", len(reply)) + reply)

        # The UDP port is picked by the kernel; TCP must get the same number, which may be
        # taken: retry a bounded number of times.
        for _ in range(20):
            udp = socketserver.ThreadingUDPServer((self.host, 0), Udp)
            port = udp.server_address[1]
            try:
                tcp = socketserver.ThreadingTCPServer((self.host, port), Tcp)
            except OSError:
                udp.server_close()
                continue
            break
        else:  # pragma: no cover - twenty collisions in a row
            raise RuntimeError("no free port for the test DNS server")
        self.port = int(port)
        self.serve_in_background(udp)
        self.serve_in_background(tcp)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:  # bounded by n: every successful recv adds at least one byte
        try:
            chunk = sock.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf
