"""`mailgate serve`: run every configured listener and the delivery engine in the foreground.

This is where the objects are wired together: config -> directory, spool, policy, scanner,
signer, acceptor, listeners, engine. With `[server] workers = N` (N >= 1) the process forks N
listener workers that share the ports (SO_REUSEPORT; steered by client address unless [state]
shares the counters) and itself runs the delivery engine; workers tell it about new entries
through a pipe (one queue id per line), so receiving and delivery meet only at the spool.
`workers = 0` runs everything in one process.
SIGTERM/SIGINT stop gracefully: listeners close, sessions get `421 4.3.2` at their next
command (a DATA in progress is answered first), the engine lets transactions in flight finish
(or abandons them after a grace period: an unrecorded try is simply tried again), and the
process exits 0 well within 30 seconds. SIGHUP (`mailgate reload`) re-reads the configuration,
certificates and directory in every process; an invalid configuration is refused and the old
one stays. The supervisor also serves `[admin] listen` and prunes the trace log
(cli/running.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import resource
import select
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from mailgate import config as mgconfig
from mailgate import log as mglog
from mailgate import tracelog
from mailgate.cli import running, sdnotify
from mailgate.cli.common import load_config, open_directory
from mailgate.config import Config
from mailgate.errors import MailgateError
from mailgate.spool import open_store
from mailgate.spool.entry import Envelope

if TYPE_CHECKING:
    from mailgate.admin.app import AdminServer
    from mailgate.admin.health import Readiness
    from mailgate.deliver.engine import Engine
    from mailgate.receive.session import Services

log = logging.getLogger("mailgate.serve")

_RESCAN_INTERVAL = 30.0  # the engine looks for entries whose wake-up line was lost
_STOP_GRACE = 20.0  # seconds a worker gets to finish its sessions
_RESTART_DELAY = 1.0  # before a crashed worker is started again
_REAP_INTERVAL = 0.5  # how often the supervisor looks for dead workers
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LISTENING = b"+listening "  # a worker's line on the wake pipe once bound (queue ids are [0-9A-Z])
_PRUNE_INTERVAL = 3600.0  # seconds between two applications of [trace] retention
_BIND_TURN_TIMEOUT = 15.0  # seconds a worker waits for the previous one to bind its sockets


async def _wind_down(
    sessions: Awaitable[object],
    engine: Engine | None,
    engine_task: asyncio.Task[None] | None,
    admin: tuple[AdminServer, Readiness] | None,
    web: running.WebListener | None,
) -> None:
    """The end of `serve`, one process or many: sessions and deliveries wind down side by side
    (together well within 30 seconds), then the admin and web listeners and the trace log
    stop."""
    if admin is not None:
        admin[1].stopping = True  # /readyz says so while the sessions drain
    await asyncio.gather(sessions, engine.stop() if engine is not None else asyncio.sleep(0))
    if engine_task is not None:
        await asyncio.wait({engine_task}, timeout=10.0)
    if admin is not None:
        await admin[0].stop()
    if web is not None:
        await web.stop()
    tracelog.stop()
    log.info("mailgate stopped")


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the listeners and the delivery engine")
    p.add_argument("--no-delivery", action="store_true",
                   help="accept and spool only; do not run the delivery engine")  # fmt: skip
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Whatever serve creates (spool, run/ files, snapshots) is for the service account alone,
    # whatever umask it was started with (systemd's UMask=0077 says the same).
    os.umask(0o077)
    mglog.setup()
    cfg = load_config(args, check_files=True, as_service_user=False)  # switches later
    mglog.setup(fmt=cfg.log.format)
    # Until the event loop handles it, a reload must not kill us (SIGHUP's default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Whatever the caller's umask (the unit file sets 0077 too): what the server creates
    # without an explicit mode (the metrics files of prometheus-client, the trace log's WAL,
    # spool/run) is the service account's alone.
    os.umask(0o077)
    _raise_fd_limit()
    _limit_malloc_arenas()
    deliver = not args.no_delivery
    if cfg.server.workers == 0:
        _asyncio_run(serve_in_one_process(cfg, deliver=deliver))
        return 0
    return Supervisor(cfg, workers=cfg.server.workers, deliver=deliver).run()


def _asyncio_run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


_M_ARENA_MAX = -8  # glibc malloc.h


def _limit_malloc_arenas() -> None:
    """glibc gives each thread that mallocs its own arena (up to 8 per CPU) and rarely hands
    their free pages back: argon2's 19 MiB buffers and TLS bursts would stay resident. Two
    arenas are plenty for one event loop and a few helper threads."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 2)


def _release_free_memory() -> None:
    """Return free heap pages to the system after a burst (glibc malloc_trim, which also
    releases whole free pages inside the heap). Cheap: called every few seconds."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _raise_fd_limit() -> None:
    """Every connection is a descriptor: use the hard limit (10,000 idle clients need it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the receiving side ------------------------------------------------------------------------


class Receiver:
    """Listeners, sessions and everything they use, in one process."""

    def __init__(self, cfg: Config, *, workers: int, index: int,
                 on_committed: Callable[[Envelope], None]) -> None:  # fmt: skip
        from mailgate.directory.cache import DirectoryView
        from mailgate.limits import AuthGuard, Limits
        from mailgate.limits.counters import Counters
        from mailgate.limits.shared import SharedState
        from mailgate.receive.serve import Listeners
        from mailgate.receive.tls import ReloadingContext
        from mailgate.spool.group import GroupCommitter

        self.cfg = cfg
        self.index = index
        self.on_committed = on_committed
        # The event loop asks the view (memory); it loads and follows the database in a
        # thread (directory/cache.py), started by run(). A reload keeps it (it follows the
        # database by itself) and asks it to catch up at once.
        self.directory = DirectoryView(open_directory(cfg, check=False))
        self.store = open_store(cfg.spool)
        self.committer = GroupCommitter(self.store)
        self.tls = ReloadingContext(cfg.tls.cert, cfg.tls.key) if _uses_tls(cfg) else None
        self.limits = Limits(cfg.ratelimits)
        self.auth_guard = AuthGuard(cfg.ratelimits)
        # [state] url: the counters of every worker and node in one Redis; a reload keeps it
        # (a new url needs a restart), only the limits change.
        shared = SharedState(cfg.state.url, cfg.state.prefix) if cfg.state.url else None
        self.counters = Counters(self.limits, self.auth_guard, shared)
        self.listeners = Listeners(self._services(cfg), workers=max(1, workers))

    def _services(self, cfg: Config) -> Services:
        """Everything a new session uses; sessions already open keep the one they started
        with, so a reload never changes a transaction half-way."""
        from mailgate.accept import Acceptor
        from mailgate.auth import open_authenticator
        from mailgate.message.dkim import Signer
        from mailgate.policy import Policy
        from mailgate.receive.session import Services
        from mailgate.scan import Scanner

        directory = self.directory
        policy = Policy(
            directory,
            smarthost_networks=cfg.smarthost.networks,
            foreign_subdomains=cfg.policy.foreign_subdomains,
        )
        acceptor = Acceptor(
            hostname=cfg.hostname,
            policy=policy,
            committer=self.committer,
            scanner=Scanner(cfg.scanner),
            signer=Signer(directory),
            hop_limit=cfg.delivery.hop_limit,
            max_header_size=cfg.limits.max_header_size,
            on_committed=self.on_committed,
        )
        return Services(
            cfg=cfg, store=self.store, policy=policy, acceptor=acceptor, directory=directory,
            authenticator=open_authenticator(cfg, directory),
            tls=self.tls.context if self.tls else None,
            counters=self.counters,
        )  # fmt: skip

    def reload(self) -> None:
        """SIGHUP: the configuration file again, certificates, directory, limits. A file that
        does not load is refused with one log line; the running configuration stays."""
        from mailgate.limits import AuthGuard, Limits
        from mailgate.limits.counters import Counters

        try:
            cfg = mgconfig.load(self.cfg.path, check_files=True)
            if self.tls is not None:
                self.tls.use(cfg.tls.cert, cfg.tls.key)
            if cfg.ratelimits != self.cfg.ratelimits:
                self.limits = Limits(cfg.ratelimits)  # counting starts again under new limits
                self.auth_guard = AuthGuard(cfg.ratelimits)
                self.counters = Counters(self.limits, self.auth_guard, self.counters.shared)
            if cfg.state != self.cfg.state:
                log.warning("reload: [state] changes take effect at the next restart")
            self.listeners.services = self._services(cfg)
        except (MailgateError, OSError, ssl.SSLError) as e:
            log.error("reload refused: %s (the previous configuration stays in force)", e)
            return
        self.cfg = cfg
        asyncio.get_running_loop().run_in_executor(None, self.directory.sync)
        log.info("reloaded config=%s", cfg.path)

    async def start(self) -> None:
        """Bind every listener (not accepting yet), then give up the capability that binding
        needed: first of all, while this process has one thread (capabilities are per thread)."""
        from mailgate.cli import privileges

        if not self.listeners.servers:
            await self.listeners.start(serve=False)
            privileges.drop_capabilities()

    async def run(self, stop: asyncio.Event, on_serving: Callable[[], None] = lambda: None,
                  on_hup: Callable[[], None] | None = None) -> None:  # fmt: skip
        """Bind, start the directory view, accept connections (then `on_serving()`) until
        `stop` is set; SIGHUP calls `on_hup` (default: this process's reload)."""
        await self.start()
        await asyncio.to_thread(self.directory.start)  # its first snapshot, then a thread
        heartbeat = asyncio.get_running_loop().create_task(self.counters.run())
        try:
            await self._serve(stop, on_serving, on_hup)
        finally:
            heartbeat.cancel()
            await self.counters.close()
            await asyncio.to_thread(self.directory.close)

    async def _serve(self, stop: asyncio.Event, on_serving: Callable[[], None],
                     on_hup: Callable[[], None] | None) -> None:  # fmt: skip
        await self.listeners.serve()
        on_serving()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, on_hup or self.reload)
        next_snapshot = loop.time() + self.cfg.ratelimits.snapshot_interval
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5.0)
            if self.tls is not None:
                self.tls.maybe_reload()
            _release_free_memory()
            if loop.time() >= next_snapshot:
                next_snapshot = loop.time() + self.cfg.ratelimits.snapshot_interval
                await self._write_limits_snapshot()
        await self.listeners.stop()
        await self._write_limits_snapshot()

    async def _write_limits_snapshot(self) -> None:
        """For `mailgate limits report`; a full disk must not stop the server."""
        from mailgate.limits import snapshot_path

        path = snapshot_path(self.cfg.spool.path)
        if self.index > 0:  # one file per worker; the report reads them all
            path = path.with_name(f"{path.stem}.w{self.index}{path.suffix}")
        try:
            await asyncio.to_thread(self.limits.write_snapshot, path,
                                    extra={"auth": self.auth_guard.snapshot()})  # fmt: skip
        except OSError as e:
            log.warning("limits snapshot not written: %s", e)


def _lock_spool(cfg: Config) -> int:
    """One `serve` per spool: recovery empties spool/tmp, which another server is writing.

    The lock is an flock on spool/serve.lock, held (and inherited by the workers) until exit.
    """
    from mailgate.errors import ConfigError

    cfg.spool.path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(cfg.spool.path / "serve.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"spool.path: another mailgate serve uses {cfg.spool.path}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _check_ports_free(cfg: Config) -> None:
    """Refuse to start when another process listens on our ports.

    SO_REUSEPORT would otherwise let a second `mailgate serve` (or any other server that set it)
    share the ports silently and take a share of the connections. A probe bound without
    SO_REUSEPORT fails with EADDRINUSE when anything listens there.
    """
    from mailgate.errors import ConfigError

    for service in ("submission", "submissions", "smarthost", "admin", "web"):
        for address in getattr(cfg, service).listen:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    probe.bind((address.host, address.port))
                except OSError as e:
                    hint = (" (ports below 1024 need root or CAP_NET_BIND_SERVICE; "
                            "docs/INSTALL.md)" if e.errno == errno.EACCES else "")  # fmt: skip
                    raise ConfigError(f"{service}.listen: cannot listen on {address}: "
                                      f"{e.strerror}{hint}") from None  # fmt: skip


def _become_service_account(cfg: Config) -> None:
    """Started as root with [server] user: switch now, after the ports were found free and the
    keys read, before the spool is opened or any byte is read from the network; then check, as
    that account, that it can use the keys, the database and the spool (one line naming the key
    when it cannot)."""
    from mailgate.cli import check_config, privileges
    from mailgate.errors import ConfigError

    account = privileges.service_account(cfg)
    if account is None:
        if os.geteuid() == 0:
            log.warning("running as root: set [server] user (docs/INSTALL.md)")
        return
    privileges.load_code()
    if not privileges.become(account, keep_bind=privileges.needs_bind_capability(cfg)):
        return
    try:
        check_config.check(cfg)
    except ConfigError as e:
        raise ConfigError(f"{e} (as user {account.user})") from None


def _uses_tls(cfg: Config) -> bool:
    return bool(cfg.submission.listen or cfg.submissions.listen or cfg.smarthost.listen)


def _stop_event_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _notify_ready() -> None:
    sdnotify.notify("READY=1")


async def serve_in_one_process(cfg: Config, *, deliver: bool = True) -> None:
    """Everything in this process: `[server] workers = 0`."""
    _check_ports_free(cfg)
    _become_service_account(cfg)
    lock = _lock_spool(cfg)  # noqa: F841 - held for the life of the process
    running.enable_metrics(cfg)
    from mailgate.deliver.engine import Engine

    store = open_store(cfg.spool)
    log.info("spool recovered path=%s %s", cfg.spool.path, store.recover())
    engine = Engine(cfg, store) if deliver else None
    receiver = Receiver(
        cfg, workers=1, index=0,
        on_committed=(lambda env: engine.wake(env.id)) if engine else (lambda env: None),
    )  # fmt: skip
    stop = _stop_event_on_signals()
    await receiver.start()  # before the engine: no helper thread may exist when it binds
    tracelog.start(cfg.trace)  # a thread: after the binding
    engine_task = asyncio.get_running_loop().create_task(engine.run()) if engine else None
    admin = await running.start_admin(
        cfg, snapshot=engine.queue_snapshot if engine else None, store=store
    )
    web = await running.start_web(cfg)

    def reload() -> None:
        new = _validated_reload(receiver.cfg)
        if new is not None:
            receiver.reload()

    run = asyncio.get_running_loop().create_task(
        receiver.run(stop, on_serving=_notify_ready, on_hup=reload)
    )
    log.info("mailgate started hostname=%s workers=0 build=%s", cfg.hostname, _build())
    await stop.wait()
    log.info("mailgate stopping")
    sdnotify.notify("STOPPING=1")
    await _wind_down(run, engine, engine_task, admin, web)


def _validated_reload(current: Config) -> Config | None:
    """The supervisor's half of a reload: check the new file like `check-config`, record the
    outcome for `mailgate reload`, and return the configuration to apply (None: refused)."""
    from mailgate import metrics

    try:
        new = running.validate(current.path)
    except MailgateError as e:
        log.error("reload refused: %s (the previous configuration stays in force)", e)
        metrics.RELOADS.labels("refused").inc()
        running.write_reload_status(current, ok=False, error=str(e))
        return None
    kept = running.needs_restart(current, new)
    if kept:
        log.warning("reload: %s changed; takes effect at the next restart", ", ".join(kept))
    metrics.RELOADS.labels("ok").inc()
    running.write_reload_status(current, ok=True, kept=kept)
    return new


# --- several processes -------------------------------------------------------------------------


class Supervisor:
    """The parent process: recovers the spool, forks the listener workers, runs delivery."""

    def __init__(self, cfg: Config, *, workers: int, deliver: bool) -> None:
        self.cfg = cfg
        self.workers = workers
        self.deliver = deliver
        self.children: dict[int, int] = {}  # pid -> worker index
        self.stopping = False

    def run(self) -> int:
        # Before any fork: recovery must finish before anyone commits, and a bad certificate
        # must stop the start here, with one line, rather than in every worker.
        if _uses_tls(self.cfg):
            from mailgate.receive.tls import server_context

            server_context(self.cfg.tls.cert, self.cfg.tls.key)
        _check_ports_free(self.cfg)
        _become_service_account(self.cfg)
        self.lock = _lock_spool(self.cfg)
        running.enable_metrics(self.cfg)
        store = open_store(self.cfg.spool)
        log.info("spool recovered path=%s %s", self.cfg.spool.path, store.recover())
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)
        # turns[i] passes the turn to bind from worker i to worker i + 1 (BindingTurn).
        turns = [os.pipe() for _ in range(self.workers - 1)]
        for index in range(self.workers):
            self._fork(index, BindingTurn.of(index, turns))
        for fd in (fd for pair in turns for fd in pair):
            os.close(fd)  # a worker that dies before binding then passes the turn (EOF)
        _asyncio_run(self._main())
        return 0

    def _fork(self, index: int, turn: BindingTurn | None = None) -> None:
        """Start worker `index`; `turn` orders its binding after its predecessor's (None: it
        binds at once, as a restarted worker does: the others are bound already)."""
        pid = os.fork()
        if pid == 0:  # the worker
            _die_with_parent()
            os.close(self.wake_read)
            status = 0
            try:
                turn = turn.keep_own() if turn is not None else BindingTurn(index)
                _asyncio_run(_worker_main(self.cfg, index, self.workers, self.wake_write, turn))
            except BaseException:
                log.exception("worker %d failed", index)
                status = 1
            finally:
                logging.shutdown()
                os._exit(status)
        self.children[pid] = index
        log.info("worker started index=%d pid=%d", index, pid)

    async def _main(self) -> None:
        from mailgate.deliver.engine import Engine

        loop = asyncio.get_running_loop()
        stop = _stop_event_on_signals()
        tracelog.start(self.cfg.trace)
        engine = Engine(self.cfg, open_store(self.cfg.spool)) if self.deliver else None
        engine_task = loop.create_task(engine.run()) if engine else None
        admin = await running.start_admin(
            self.cfg,
            snapshot=engine.queue_snapshot if engine else None,
            store=engine.store if engine else None,
        )
        web = await running.start_web(self.cfg)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        buffer = bytearray()

        listening: set[bytes] = set()  # workers that reported their sockets bound

        def on_wake() -> None:
            try:
                data = os.read(self.wake_read, 65536)
            except BlockingIOError:
                return
            buffer.extend(data)
            *lines, rest = bytes(buffer).split(b"\n")
            buffer[:] = rest
            for line in lines:
                if line.startswith(_LISTENING):
                    listening.add(line)
                    if len(listening) == self.workers:  # every port answers: tell systemd
                        sdnotify.notify("READY=1")
                elif engine is not None:
                    engine.wake(line.decode("ascii", "replace") or None)

        os.set_blocking(self.wake_read, False)
        loop.add_reader(self.wake_read, on_wake)
        log.info("mailgate started hostname=%s workers=%d build=%s",
                 self.cfg.hostname, self.workers, _build())  # fmt: skip
        next_rescan = loop.time() + _RESCAN_INTERVAL
        next_prune = loop.time()
        while not stop.is_set():
            # uvloop keeps SIGCHLD for itself, so dead workers are found by polling.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _REAP_INTERVAL)
            self._reap()
            if engine is not None and loop.time() >= next_rescan:
                next_rescan = loop.time() + _RESCAN_INTERVAL
                engine.wake()  # safety net for a wake-up line lost to a full pipe
            if loop.time() >= next_prune:
                next_prune = loop.time() + _PRUNE_INTERVAL
                await asyncio.to_thread(tracelog.prune_old, self.cfg.trace)
        log.info("mailgate stopping")
        sdnotify.notify("STOPPING=1")
        self.stopping = True
        await _wind_down(self._stop_workers(), engine, engine_task, admin, web)

    def _reload(self) -> None:
        """SIGHUP: check the file here once, then every worker re-reads it (each keeps its
        configuration if its own load fails, logged). The engine keeps the configuration it
        started with ([delivery] is named as needing a restart)."""
        new = _validated_reload(self.cfg)
        if new is None:
            return
        self.cfg = new  # workers started from now on get it too
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            _process_died(pid)
            if self.stopping:
                log.info("worker stopped index=%d pid=%d status=%d", index, pid, code)
                continue
            log.error("worker died index=%d pid=%d status=%d: restarting", index, pid, code)
            time.sleep(_RESTART_DELAY)  # a worker that dies at once must not spin
            self._fork(index)

    async def _stop_workers(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE
        while self.children and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            self._reap()
        for pid in list(self.children):
            log.warning("worker did not stop in time pid=%d: killing", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children:
            self._reap_blocking()

    def _reap_blocking(self) -> None:
        try:
            pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            self.children.clear()
            return
        self.children.pop(pid, None)


def _process_died(pid: int) -> None:
    from mailgate import metrics

    metrics.process_died(pid)


def _die_with_parent() -> None:
    """A worker must not outlive a supervisor killed with -9 (it would hold the ports)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class BindingTurn:
    """Workers bind their listening sockets one after the other, worker 0 first.

    A SO_REUSEPORT group numbers its sockets in the order they joined (listen()), and the
    steering program (receive/reuseport.py) picks a socket by that number: `address mod N`.
    Workers binding concurrently could join the 587 group in one order and the 465 group in
    the other, so one client address would reach one worker on 587 and another on 465, and an
    AUTH lock-out earned on one port (counted in that worker's memory) would not hold on the
    other. One worker at a time gives every group the same order (socket i is worker i's).
    A worker that dies leaves the same gap in every group (the kernel moves the last socket
    into it) and its replacement joins last everywhere, so the order stays the same across
    ports. The wait is bounded: a predecessor stuck before binding costs a warning, not the
    service.
    """

    def __init__(self, index: int, wait_fd: int | None = None, pass_fd: int | None = None,
                 others: tuple[int, ...] = ()) -> None:  # fmt: skip
        self.index = index
        self.wait_fd = wait_fd  # readable (a byte, or EOF) once worker index - 1 has bound
        self.pass_fd = pass_fd  # written once this worker has bound
        self.others = others  # the other workers' ends, inherited through fork

    @classmethod
    def of(cls, index: int, turns: list[tuple[int, int]]) -> BindingTurn:
        """Worker `index`'s ends of the supervisor's pipes (turns[i]: worker i to i + 1)."""
        wait_fd = turns[index - 1][0] if index > 0 else None
        pass_fd = turns[index][1] if index < len(turns) else None
        mine = {wait_fd, pass_fd}
        others = tuple(fd for pair in turns for fd in pair if fd not in mine)
        return cls(index, wait_fd, pass_fd, others)

    def keep_own(self) -> BindingTurn:
        """In the worker: close the other workers' ends, so that the predecessor's exit is
        seen as EOF here rather than hidden by a copy of its end held by this process."""
        for fd in self.others:
            os.close(fd)
        return BindingTurn(self.index, self.wait_fd, self.pass_fd)

    async def wait(self) -> None:
        """Until the previous worker has bound its sockets, exited, or _BIND_TURN_TIMEOUT."""
        if self.wait_fd is None:
            return
        if not select.select([self.wait_fd], [], [], 0)[0]:
            log.info("worker %d: waiting for worker %d to bind its sockets",
                     self.index, self.index - 1)  # fmt: skip
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self.wait_fd, readable)
        try:
            await asyncio.wait_for(ready, _BIND_TURN_TIMEOUT)
        except TimeoutError:
            log.warning("worker %d: worker %d has not bound its sockets after %g s: binding "
                        "now (a client address may reach different workers on different "
                        "ports)", self.index, self.index - 1, _BIND_TURN_TIMEOUT)  # fmt: skip
        finally:
            loop.remove_reader(self.wait_fd)
            os.close(self.wait_fd)
            self.wait_fd = None

    def passed(self) -> None:
        """This worker has bound its sockets: the next one may bind."""
        if self.pass_fd is None:
            return
        with contextlib.suppress(OSError):  # the next worker is gone: its replacement binds
            os.write(self.pass_fd, b".")
        os.close(self.pass_fd)
        self.pass_fd = None


async def _worker_main(cfg: Config, index: int, workers: int, wake_fd: int,
                       turn: BindingTurn) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    committed: list[bytes] = []  # queue id lines for the supervisor, written once per loop pass

    def send_committed() -> None:
        # One write (one wake-up of the supervisor) for every commit of this pass of the loop,
        # not one per message (issue #19). Writes of at most PIPE_BUF bytes are atomic, so the
        # two workers' lines never interleave; a write refused whole only delays delivery.
        lines = committed[:]
        committed.clear()
        start = 0
        while start < len(lines):  # bounded: every pass writes at least one line
            end, size = start + 1, len(lines[start])
            while end < len(lines) and size + len(lines[end]) <= select.PIPE_BUF:
                size += len(lines[end])
                end += 1
            try:
                os.write(wake_fd, b"".join(lines[start:end]))
            except BlockingIOError:
                pass  # a full pipe: the supervisor's periodic rescan finds the entries
            except OSError as e:
                log.warning("cannot wake the delivery engine for %d entries: %s", end - start, e)
            start = end

    def notify(env: Envelope) -> None:
        if not committed:
            loop.call_soon(send_committed)
        committed.append(env.id.encode("ascii") + b"\n")

    receiver = Receiver(cfg, workers=workers, index=index, on_committed=notify)
    stop = _stop_event_on_signals()

    def serving() -> None:
        # The pipe is empty at start; a lost line would only delay READY.
        with contextlib.suppress(OSError):
            os.write(wake_fd, _LISTENING + str(index).encode("ascii") + b"\n")

    await turn.wait()
    try:
        await receiver.start()  # binding drops a capability per thread: before the log's thread
    finally:
        turn.passed()
    tracelog.start(cfg.trace)
    await receiver.run(stop, on_serving=serving)
    tracelog.stop()


def _build() -> str:
    """Which variant runs: the optional mypyc build (setup.py) or pure Python."""
    import mailgate

    return "mypyc" if mailgate.__compiled__ else "python"
