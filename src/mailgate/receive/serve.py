"""Listeners: one asyncio server per configured address, each bound to a service profile.

Owns: binding the sockets (SO_REUSEPORT, so several worker processes can share the ports),
implicit TLS for `submissions`, connection limits overall and per client IP, refusing a client
the AUTH guard locked out (421 at connect, then a kernel ban if it keeps reconnecting), the
PROXY protocol from a listener's `proxy_networks` (the channel reads the header; a header from
anybody else is refused with 554 5.7.0), and graceful stop.
Must not: interpret SMTP or deliver mail.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections import Counter

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


class Listeners:
    """All listening sockets of one process and the sessions they spawned."""

    def __init__(self, services: Services, *, workers: int = 1) -> None:
        self.services = services
        self.workers = workers  # processes sharing each port (for reuseport steering)
        self.servers: list[asyncio.Server] = []
        self.sessions: set[asyncio.Task[None]] = set()
        self.open: set[Session] = set()  # told to stop by stop()
        self.per_ip: Counter[str] = Counter()
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
        for profile, addresses in plan:
            for address in addresses:
                self.servers.append(await self._listen(profile, address, serve=serve))
                log.info("listening service=%s address=%s", profile.name, address)

    async def serve(self) -> None:
        """Accept connections on every socket `start(serve=False)` bound."""
        for server in self.servers:
            await server.start_serving()

    async def _listen(self, profile: Profile, address: Listen, *, serve: bool) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = self.services.tls if profile.implicit_tls else None
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(1024)
        proxy_networks = getattr(self.services.cfg, profile.name).proxy_networks
        if profile.offers_auth and not proxy_networks:
            # Internet-facing AUTH services: one client address, one worker, so the AUTH
            # guard and per-IP limits see all of a client's attempts. The smart host keeps
            # the kernel's 4-tuple hash: its clients are few busy internal hosts (a web server
            # sending a mailing), which must be able to use every core.
            # Behind a balancer (proxy_networks) every connection comes from the balancer:
            # neither steering nor a kernel ban can tell clients apart there.
            steer_by_client_address(sock, self.workers)  # after listen(): the group exists
            self.kernel_ban.add_socket(sock)
        sock.setblocking(False)
        proxy_policy = self._proxy_policy(profile, proxy_networks) if proxy_networks else None
        return await loop.create_server(
            lambda: Channel(lambda ch: self._connected(ch, profile), proxy_policy),
            sock=sock,
            ssl=tls,
            ssl_handshake_timeout=30.0 if tls else None,
            start_serving=serve,
        )

    def _proxy_policy(self, profile: Profile, networks: tuple[IPNetwork, ...]) -> ProxyPolicy:
        def refuse(channel: Channel, why: str) -> None:
            peer = channel.get_extra_info("peername")
            ip = str(peer[0]) if isinstance(peer, tuple) else "unknown"
            self._refuse(channel, ip, profile, replies.PROXY_REFUSED, why)

        return ProxyPolicy(lambda ip: in_networks(ip, networks), refuse)

    def _connected(self, channel: Channel, profile: Profile) -> None:
        limits = self.services.cfg.limits
        peer = channel.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        if len(self.sessions) >= limits.max_connections or (
            self.per_ip[ip] >= limits.max_connections_per_ip
        ):
            self._refuse(channel, ip, profile, replies.TOO_MANY_CONNECTIONS, "too many connections")
            metrics.CONNECTIONS_REFUSED.labels(profile.name, "connection_limit").inc()
            return
        guard = self.services.auth_guard
        if profile.offers_auth and guard is not None and guard.is_client_refused(ip):
            # A password guesser that reached auth_refuse_after: refused before any session,
            # TLS handshake or per-connection log line, so a flood of its reconnects stays cheap.
            self._refuse(channel, ip, profile, replies.CLIENT_LOCKED_OUT, "too many AUTH failures")
            metrics.AUTH_DEFENCE.labels("locked_out").inc()
            self._count_lockout_refusal(ip)
            return
        self.per_ip[ip] += 1
        session = Session(self.services, channel, profile)
        task = asyncio.get_running_loop().create_task(session.run())
        self.sessions.add(task)
        self.open.add(session)

        def done(t: asyncio.Task[None]) -> None:
            self.sessions.discard(t)
            self.open.discard(session)
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]

        task.add_done_callback(done)

    def _refuse(self, channel: Channel, ip: str, profile: Profile, reply: Reply,
                why: str) -> None:  # fmt: skip
        """Answer `reply` instead of a greeting and close; one log line per client a minute."""
        now = time.monotonic()
        if self._refusal_logged.get(ip, 0.0) <= now:
            if len(self._refusal_logged) > 10_000:
                self._refusal_logged.clear()
            self._refusal_logged[ip] = now + _REFUSAL_LOG_INTERVAL
            log.warning("refused connection client=[%s] service=%s: %s (logged once a minute)",
                        ip, profile.name, why)  # fmt: skip
        channel.write(reply.to_bytes())
        channel.close()

    def _count_lockout_refusal(self, ip: str) -> None:
        """A locked-out client that keeps reconnecting is banned in the kernel (receive.kernelban):
        its next SYNs are dropped before they cost this process anything."""
        limits = self.services.cfg.ratelimits
        guard = self.services.auth_guard
        if limits.auth_ban_after == 0 or guard is None:
            return
        key = guard.client_key(ip)
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
