"""Listeners: one asyncio server per configured address, each bound to a service profile.

Owns: binding the sockets (SO_REUSEPORT, so several worker processes can share the ports),
connection limits overall and per client IP, refusing a client the AUTH guard locked out (421
at connect, then a kernel ban if it keeps reconnecting), the PROXY protocol from a listener's
`proxy_networks` (the channel reads the header; a header from anybody else is refused with
554 5.7.0; not on 465, where config refuses the key), and graceful stop.

Implicit TLS (`submissions`, port 465, RFC 8314) is not asyncio's `create_server(ssl=...)`:
that runs the handshake before the protocol hears of the connection, so no limit applied to a
connection still handshaking (hundreds of idle ones were held) and a locked-out client got a
full handshake before its refusal (issue #11, class 7). (Upgrading a plain connection with
`loop.start_tls()` instead cannot work on uvloop: it starts reading right after
`connection_made()`, so the ClientHello may already be consumed.) The 465 listener accepts
with `loop.sock_accept()`, checks the limits and the lock-out on the bare TCP socket, closes a
refused one without a byte (a plaintext 421 means nothing to a TLS client; it gets no
handshake), and hands an admitted one to `loop.connect_accepted_socket(ssl=...)` as a
connection that is already counted, handshake included.
Must not: interpret SMTP or deliver mail.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from mailgate import metrics, replies
from mailgate.config import Listen
from mailgate.netaddr import IPNetwork, in_networks
from mailgate.receive.channel import Channel, ProxyPolicy
from mailgate.receive.kernelban import KernelBan
from mailgate.receive.reuseport import steer_by_client_address
from mailgate.receive.session import Services, Session
from mailgate.replies import Reply
from mailgate.smtp.events import SMARTHOST, SUBMISSION, SUBMISSIONS, Profile

log = logging.getLogger(__name__)
_REFUSAL_LOG_INTERVAL = 60.0  # seconds between log lines about one refused client
_TLS_HANDSHAKE_TIMEOUT = 30.0  # seconds an admitted 465 connection has for its handshake


class Listeners:
    """All listening sockets of one process and the sessions they spawned."""

    def __init__(self, services: Services, *, workers: int = 1) -> None:
        self.services = services
        self.workers = workers  # processes sharing each port (for reuseport steering)
        self.servers: list[asyncio.Server] = []
        self._tls_sockets: list[tuple[socket.socket, Profile]] = []  # implicit TLS (465)
        self._accepting: list[tuple[socket.socket, asyncio.Task[None]]] = []  # their accept loops
        self.sessions: set[asyncio.Task[None]] = set()
        self.open: set[Session] = set()  # told to stop by stop()
        self.per_ip: Counter[str] = Counter()  # this process's connections per address
        self._shared_open: dict[asyncio.Task[Any] | None, str] = {}  # counted in Redis
        self._refusal_logged: dict[str, float] = {}  # ip -> when its next refusal is logged
        self._lockout_refusals: Counter[str] = Counter()  # client key -> refused reconnects
        self.kernel_ban = KernelBan()
        self._ban_timer: asyncio.TimerHandle | None = None

    async def start(self, *, serve: bool = True) -> None:
        """Bind and listen on every address; accept connections at once unless `serve` is
        False (then `serve()` starts accepting: until it does, clients wait in the backlog)."""
        cfg = self.services.cfg
        plan: list[tuple[Profile, tuple[Listen, ...]]] = [
            (SUBMISSION, cfg.submission.listen),
            (SUBMISSIONS, cfg.submissions.listen),
            (SMARTHOST, cfg.smarthost.listen),
        ]
        loop = asyncio.get_running_loop()
        for profile, addresses in plan:
            for address in addresses:
                sock = self._bind(profile, address)
                if profile.implicit_tls:
                    self._tls_sockets.append((sock, profile))
                else:
                    self.servers.append(await loop.create_server(
                        self._factory(profile), sock=sock, start_serving=serve))  # fmt: skip
                log.info("listening service=%s address=%s", profile.name, address)
        if serve:
            await self.serve()

    async def serve(self) -> None:
        """Accept connections on every socket `start(serve=False)` bound."""
        for server in self.servers:
            await server.start_serving()
        loop = asyncio.get_running_loop()
        for sock, profile in self._tls_sockets:
            if not any(s is sock for s, _ in self._accepting):
                self._accepting.append((sock, loop.create_task(self._accept_tls(sock, profile))))

    def _bind(self, profile: Profile, address: Listen) -> socket.socket:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(1024)
        if profile.offers_auth and not self._proxy_networks(profile):
            # Internet-facing AUTH services with per-process counters ([state] url empty):
            # one client address, one worker, so the AUTH guard and per-IP limits see all of
            # a client's attempts. With shared counters (Redis) every worker sees them all, so
            # the kernel's 4-tuple hash spreads one busy address (a large NAT) over every core.
            # The smart host always keeps the hash: its clients are few busy internal hosts.
            # Behind a balancer (proxy_networks) every connection comes from the balancer:
            # neither steering nor a kernel ban can tell clients apart there.
            if self._pins_clients():
                steer_by_client_address(sock, self.workers)  # after listen(): the group exists
            self.kernel_ban.add_socket(sock)
        sock.setblocking(False)
        return sock

    def _pins_clients(self) -> bool:
        cfg = self.services.cfg
        mode = cfg.server.pin_clients
        return mode == "yes" or (mode == "auto" and not cfg.state.url)

    def _proxy_networks(self, profile: Profile) -> tuple[IPNetwork, ...]:
        networks: tuple[IPNetwork, ...] = getattr(self.services.cfg, profile.name).proxy_networks
        return networks

    def _factory(self, profile: Profile) -> Callable[[], Channel]:
        networks = self._proxy_networks(profile)
        policy = self._proxy_policy(profile, networks) if networks else None
        return lambda: Channel(lambda ch: self._connected(ch, profile), policy)

    def _proxy_policy(self, profile: Profile, networks: tuple[IPNetwork, ...]) -> ProxyPolicy:
        def refuse(channel: Channel, why: str) -> None:
            peer = channel.get_extra_info("peername")
            ip = str(peer[0]) if isinstance(peer, tuple) else "unknown"
            self._log_refusal(ip, profile, why)
            channel.write(replies.PROXY_REFUSED.to_bytes())
            channel.close()

        return ProxyPolicy(lambda ip: in_networks(ip, networks), refuse)

    def _connected(self, channel: Channel, profile: Profile) -> None:
        peer = channel.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        if self._is_over_local_limits(ip, profile):
            channel.write(replies.TOO_MANY_CONNECTIONS.to_bytes())
            channel.close()
            return
        self._track(self._admit_then_run(channel, profile, ip), ip)

    async def _admit_then_run(self, channel: Channel, profile: Profile, ip: str) -> None:
        refusal = await self._shared_refusal(ip, profile)
        if refusal is not None:
            channel.write(refusal.to_bytes())
            channel.close()
            return
        await self._run(Session(self.services, channel, profile))

    async def _accept_tls(self, sock: socket.socket, profile: Profile) -> None:
        """Implicit TLS: admit on the TCP connection, then hand over for the handshake."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as e:  # EMFILE and friends: keep the listener alive
                log.warning("accept failed service=%s: %s", profile.name, e)
                await asyncio.sleep(0.1)
                continue
            ip = str(peer[0]) if isinstance(peer, tuple) else "unknown"
            if self._is_over_local_limits(ip, profile):
                conn.close()  # no handshake and no bytes
                continue
            self._track(self._tls_session(conn, profile, ip), ip)

    async def _tls_session(self, conn: socket.socket, profile: Profile, ip: str) -> None:
        if await self._shared_refusal(ip, profile) is not None:
            conn.close()  # no handshake and no bytes
            return
        loop = asyncio.get_running_loop()
        made: list[Channel] = []  # uvloop returns its SSL protocol here, not ours

        def channel() -> Channel:
            made.append(Channel(lambda ch: None))
            return made[0]

        try:
            await loop.connect_accepted_socket(
                channel, conn, ssl=self.services.tls, ssl_handshake_timeout=_TLS_HANDSHAKE_TIMEOUT
            )
        except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
            log.info("tls handshake failed service=%s: %s: %s", profile.name, type(e).__name__, e)
            conn.close()
            return
        await self._run(Session(self.services, made[0], profile))

    async def _run(self, session: Session) -> None:
        """One session, known to stop() while it runs."""
        self.open.add(session)
        try:
            await session.run()
        finally:
            self.open.discard(session)

    def _is_over_local_limits(self, ip: str, profile: Profile) -> bool:
        """This process's connection limits: overall, and per client address unless the
        counters are shared (then `_shared_refusal` counts the address cluster-wide)."""
        limits = self.services.cfg.limits
        if len(self.sessions) >= limits.max_connections or (
            not self._is_shared() and self.per_ip[ip] >= limits.max_connections_per_ip
        ):
            self._refuse_too_many(ip, profile)
            return True
        return False

    def _is_shared(self) -> bool:
        counters = self.services.counters
        return counters is not None and counters.shared is not None

    def _refuse_too_many(self, ip: str, profile: Profile) -> None:
        self._log_refusal(ip, profile, "too many connections")
        metrics.CONNECTIONS_REFUSED.labels(profile.name, "connection_limit").inc()

    async def _shared_refusal(self, ip: str, profile: Profile) -> Reply | None:
        """Why an admitted connection from `ip` is refused after all (logged once a minute):
        too many connections from `ip` in the cluster, or an AUTH lock-out; or None. The
        connection is already counted in this process (`_track`)."""
        counters = self.services.counters
        if counters is None:
            return None
        locked_out = False
        if self._is_shared():
            # One round trip: the cluster's count of `ip` and, on the AUTH services, its lock-out.
            limit = self.services.cfg.limits.max_connections_per_ip
            admission, locked_out = await counters.admit(ip, limit, lockout=profile.offers_auth)
            if admission == "refused":
                self._refuse_too_many(ip, profile)
                return replies.TOO_MANY_CONNECTIONS
            if admission == "shared":
                self._shared_open[asyncio.current_task()] = ip
            elif self.per_ip[ip] > limit:  # Redis unreachable: this process counts alone
                self._refuse_too_many(ip, profile)
                return replies.TOO_MANY_CONNECTIONS
        elif profile.offers_auth:
            locked_out = counters.guard.is_client_refused(ip)
        if locked_out:
            # A password guesser that reached auth_refuse_after: refused before any session,
            # TLS handshake or per-connection log line, so a flood of its reconnects stays cheap.
            self._log_refusal(ip, profile, "too many AUTH failures")
            metrics.AUTH_DEFENCE.labels("locked_out").inc()
            self._count_lockout_refusal(ip)
            return replies.CLIENT_LOCKED_OUT
        return None

    def _track(self, connection: Coroutine[Any, Any, None], ip: str) -> None:
        """Run one admitted connection (a 465 one from its handshake on), counted overall and
        against `ip` until it ends."""
        self.per_ip[ip] += 1
        task = asyncio.get_running_loop().create_task(connection)
        self.sessions.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.sessions.discard(t)
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]
            if self._shared_open.pop(t, None) is not None:
                self._close_shared(ip)

        task.add_done_callback(done)

    def _close_shared(self, ip: str) -> None:
        counters = self.services.counters
        assert counters is not None
        counters.close_connection_soon(ip)  # sent with this loop turn's other commands

    def _log_refusal(self, ip: str, profile: Profile, why: str) -> None:
        """One log line per refused client a minute."""
        now = time.monotonic()
        if self._refusal_logged.get(ip, 0.0) <= now:
            if len(self._refusal_logged) > 10_000:
                self._refusal_logged.clear()
            self._refusal_logged[ip] = now + _REFUSAL_LOG_INTERVAL
            log.warning("refused connection client=[%s] service=%s: %s (logged once a minute)",
                        ip, profile.name, why)  # fmt: skip

    def _count_lockout_refusal(self, ip: str) -> None:
        """A locked-out client that keeps reconnecting is banned in the kernel (receive.kernelban):
        its next SYNs are dropped before they cost this process anything."""
        limits = self.services.cfg.ratelimits
        counters = self.services.counters
        if limits.auth_ban_after == 0 or counters is None:
            return
        key = counters.guard.client_key(ip)
        if len(self._lockout_refusals) > 10_000:
            self._lockout_refusals.clear()
        self._lockout_refusals[key] += 1
        if self._lockout_refusals[key] < limits.auth_ban_after:
            return
        del self._lockout_refusals[key]
        try:
            network = ipaddress.ip_network(key, strict=False)
        except ValueError:
            return  # not an IP client (a Unix socket peer): nothing to filter on
        if self.kernel_ban.ban(network, limits.auth_ban_period):
            metrics.AUTH_DEFENCE.labels("banned").inc()
            log.warning("client banned in the kernel client=[%s] seconds=%g: %d connections "
                        "refused after too many AUTH failures", key, limits.auth_ban_period,
                        limits.auth_ban_after)  # fmt: skip
            self._schedule_ban_expiry()

    def _schedule_ban_expiry(self) -> None:
        if self._ban_timer is not None:
            self._ban_timer.cancel()
            self._ban_timer = None
        wait = self.kernel_ban.expire()
        if wait is not None:
            loop = asyncio.get_running_loop()
            self._ban_timer = loop.call_later(wait + 0.05, self._schedule_ban_expiry)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop listening; sessions get 421 4.3.2 at their next command (a DATA in progress
        is answered first); after `grace` seconds the rest are cancelled."""
        for server in self.servers:
            server.close()
        for sock, task in self._accepting:
            task.cancel()
            sock.close()
        for session in list(self.open):
            session.shutdown()
        log.info("stopping: listeners closed, %d sessions told to finish", len(self.open))
        if self._ban_timer is not None:
            self._ban_timer.cancel()
        if self.sessions:
            _, pending = await asyncio.wait(set(self.sessions), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
