"""Configuration: TOML in, frozen dataclasses out.

Owns: the schema of mailgate.toml (INTERFACE.md), its defaults, validation and path
resolution. Every error names the key: ``limits.max_message_size: expected a positive integer``.
Unknown keys are errors. Must not: import anything from mailgate but `errors` and `dnsname`
(the one domain-name rule, a leaf).
Field names are spelled exactly like the TOML keys.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mailgate.dnsname import domain_name
from mailgate.errors import ConfigError

DEFAULT_BLOCKED_EXTENSIONS = (
    "exe", "com", "bat", "cmd", "scr", "pif", "vbs", "js", "jse", "wsf",
    "hta", "msi", "lnk", "cpl", "jar",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Listen:
    """One listening address: host (without brackets) and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    url: str = "sqlite:///state.db"
    default_domain: str = "example.org"

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite:///")

    @property
    def sqlite_path(self) -> Path:
        """The database file of a sqlite:/// URL (already resolved against the config folder)."""
        return Path(self.url.removeprefix("sqlite:///"))


POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
SPOOL_FORMATS = ("journal",)


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    path: Path = Path("spool")
    # The spool is a journal (spool/journal.py); "journal" is the only format. "files", the
    # older one-file-per-entry layout, is no longer written: such a spool is imported into the
    # journal at startup (spool/files_import.py), so the key is refused with that advice.
    format: str = "journal"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path = Path("tls/cert.pem")
    key: Path = Path("tls/key.pem")


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    listen: tuple[Listen, ...] = ()
    # Balancers whose connections start with a PROXY header naming the real client
    # (receive/proxy.py); a header from anybody else is refused.
    proxy_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class SmarthostConfig:
    listen: tuple[Listen, ...] = ()
    proxy_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Only clients whose address has forward-confirmed reverse DNS may relay (receive/rdns.py).
    require_rdns: bool = False
    rdns_timeout: float = 5.0  # seconds for the whole PTR + A/AAAA check of one client
    # Recipients at an address literal inside these networks are refused (stops mail loops).
    bad_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


TLS_POLICY_LEVELS = ("may", "encrypt", "verify", "dane")


@dataclass(frozen=True, slots=True)
class DeliveryTlsConfig:
    """[delivery.tls]: verified TLS to the recipients' MX hosts (INTERFACE part 2).

    mta_sts:      fetch, cache and obey MTA-STS policies (RFC 8461).
    dane:         obey DANE TLSA records (RFC 7672); the AD bit is trusted only from
                  `delivery.nameservers` (with the system resolver DANE is never applied).
    ca_file:      trust anchors for MX certificates and MTA-STS fetches; None: the system's.
    mta_sts_port: where policies are fetched (https://mta-sts.DOMAIN:PORT/...).
    policy:       recipient domain -> "may" | "encrypt" | "verify" | "dane" (lower-case keys).
    """

    mta_sts: bool = True
    dane: bool = True
    ca_file: Path | None = None
    mta_sts_port: int = 443
    policy: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    nameservers: tuple[tuple[str, int], ...] = ()
    smtp_port: int = 25
    relay: str = ""  # "HOST:PORT" or ""
    max_connections: int = 50  # parallel outbound connections overall
    max_per_destination: int = 10  # parallel connections to one destination
    retry_schedule: tuple[int, ...] = (300, 900, 1800, 3600, 7200, 14400)  # seconds; last repeats
    max_queue_lifetime: int = 5 * 86400  # seconds
    delay_warning_after: int = 4 * 3600  # seconds; 0 disables
    postmaster: str = ""  # double bounces go here; "" means postmaster@default_domain
    # Recipients at address literals of loopback/private/link-local/reserved networks
    # (x@[127.0.0.1], x@[10.1.2.3], x@[IPv6:::1]) are refused at RCPT unless this is true.
    allow_internal_literals: bool = False
    hop_limit: int = 50
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    tls: DeliveryTlsConfig = field(default_factory=DeliveryTlsConfig)

    @property
    def relay_host_port(self) -> tuple[str, int] | None:
        if not self.relay:
            return None
        host, _, port = self.relay.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class ScannerConfig:
    clamd: str = ""
    blocked_extensions: tuple[str, ...] = DEFAULT_BLOCKED_EXTENSIONS
    timeout: float = 30.0
    max_stream_size: int = 26214400  # clamd StreamMaxLength (25 MiB by default)
    connect_timeout: float = 5.0  # seconds to reach clamd; `timeout` bounds the scan after that


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_message_size: int = 52428800
    max_recipients: int = 100  # per message (RFC 5321 §4.5.3.1.8 requires at least 100)
    max_errors: int = 10  # protocol errors per session before 421
    command_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7: 5 minutes
    data_timeout: float = 180.0  # RFC 5321 §4.5.3.2.6: 3 minutes between data blocks
    max_connections: int = 10000
    max_connections_per_ip: int = 50
    greeting_delay: float = 0.0  # smarthost: seconds before the 220; early talkers get 554
    # A header section longer than this is refused (552 5.3.4) before any of it is examined:
    # the policy, the scan and the DKIM signature all read the same, bounded, section.
    max_header_size: int = 262144


# The nine rate limits: {scope}_{metric}; scope service (one listener, all clients), login (one
# AUTH identity, across services) or ip (one client network, see ipv4_prefix / ipv6_prefix).
RATE_LIMIT_NAMES = tuple(
    f"{scope}_{metric}"
    for scope in ("service", "login", "ip")
    for metric in ("messages_per_hour", "recipients_per_hour", "recipients_per_message")
)


@dataclass(frozen=True, slots=True)
class ServiceRateLimits:
    """[ratelimits.<service>]: overrides for one listener; None inherits the [ratelimits] value."""

    service_messages_per_hour: int | None = None
    service_recipients_per_hour: int | None = None
    service_recipients_per_message: int | None = None
    login_messages_per_hour: int | None = None
    login_recipients_per_hour: int | None = None
    login_recipients_per_message: int | None = None
    ip_messages_per_hour: int | None = None
    ip_recipients_per_hour: int | None = None
    ip_recipients_per_message: int | None = None
    shadow: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class RateLimitsConfig:
    """[ratelimits]: sending rate limits (0 = no limit), the account breaker, AUTH defence."""

    service_messages_per_hour: int = 0
    service_recipients_per_hour: int = 0
    service_recipients_per_message: int = 0
    login_messages_per_hour: int = 0
    login_recipients_per_hour: int = 0
    login_recipients_per_message: int = 0
    ip_messages_per_hour: int = 0
    ip_recipients_per_hour: int = 0
    ip_recipients_per_message: int = 0
    shadow: tuple[str, ...] = ()  # limit names that only log "would_limit"
    exempt_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    ipv4_prefix: int = 24  # an IPv4 client is counted as its /24
    ipv6_prefix: int = 64  # an IPv6 client is counted as its /64
    breaker_recipients_per_hour: int = 1000  # per login; 0 disables
    breaker_messages_per_hour: int = 0  # per login; 0 disables
    auth_window: float = 900.0  # seconds over which failed AUTH are counted
    auth_delay_after: int = 3  # failures before answers are delayed
    auth_base_delay: float = 1.0  # seconds; doubles with each further failure
    auth_max_delay: float = 16.0  # seconds
    auth_refuse_after: int = 10  # failures from one client before 454 4.7.0
    auth_login_refuse_after: int = 10  # failures for one login before 454 4.7.0
    auth_trust_period: float = 7 * 86400.0  # a client that logged in is exempt from login locks
    auth_parallel_per_client: int = 4  # AUTH attempts of one client in flight at once
    auth_parallel_per_login: int = 4  # AUTH attempts of one login in flight at once
    auth_ban_after: int = 20  # refused reconnects of a locked-out client before a ban; 0: never
    auth_ban_period: float = 900.0  # seconds a banned client's packets are dropped in the kernel
    snapshot_interval: float = 10.0  # seconds between <spool>/limits.json snapshots
    submission: ServiceRateLimits = field(default_factory=ServiceRateLimits)
    submissions: ServiceRateLimits = field(default_factory=ServiceRateLimits)
    smarthost: ServiceRateLimits = field(default_factory=ServiceRateLimits)


@dataclass(frozen=True, slots=True)
class StateConfig:
    """[state]: where the counters of [ratelimits] live (INTERFACE.md part 2, "Several nodes").

    url:    "" (each process counts alone, in memory) or "redis://HOST:PORT/DB"
            (rediss:// for TLS, unix:///path?db=N): counted across every worker and node.
    prefix: the start of every Redis key, so several clusters (or tests) share one Redis.
    """

    url: str = ""
    prefix: str = "mailgate:"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Processes of `mailgate serve`.

    workers: listener processes sharing the ports (SO_REUSEPORT); the delivery engine runs in the
    parent process. 0 runs everything in one process. Default: one per CPU.
    user:    started as root, `serve` switches to this account (after checking its ports and
             reading its keys) before any byte is read from the network, and the administrative
             commands run as it too; "" keeps the account mailgate was started as.
    group:   the group to switch to; "" is the user's own (login) group.
    pin_clients: "auto" steers each client address of 587/465 to one worker when the counters
             are per process ([state] url empty) and not when they are shared; "yes" or "no"
             decide it whatever [state] says (to measure either way, or to keep kernel bans
             on one worker).
    """

    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    user: str = ""
    group: str = ""
    pin_clients: str = "auto"


AUTH_BACKENDS = ("directory", "ldap", "dovecot")
PIN_CLIENTS = ("auto", "yes", "no")
# Asymmetric JWS algorithms only (RFC 7518 §3.1): a token signed with a shared secret ("HS256")
# could be forged by anyone holding the key set, which is public.
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                  "ES512", "EdDSA")  # fmt: skip


@dataclass(frozen=True, slots=True)
class LdapConfig:
    """[auth.ldap]: search the user's entry, then bind as it (auth/ldap.py)."""

    url: str = "ldap://127.0.0.1:389"  # ldap:// or ldaps:// (implicit TLS)
    starttls: bool = False
    ca_file: Path | None = None  # trust anchors for the server's certificate; None: system CAs
    bind_dn: str = ""  # account used to search; "": anonymous search
    bind_password_file: Path | None = None
    base: str = ""
    filter: str = "(uid={login})"  # {login} is escaped (RFC 4515)
    address_attribute: str = "mail"
    alias_attributes: tuple[str, ...] = ()
    timeout: float = 5.0  # seconds for connecting and for each operation
    pool_size: int = 4  # connections (and threads) per process


@dataclass(frozen=True, slots=True)
class DovecotConfig:
    """[auth.dovecot]: Dovecot's authentication protocol 1.x (auth/dovecot.py)."""

    socket: str = ""  # "unix:/path/to/auth-client" or "tcp:HOST:PORT"
    timeout: float = 5.0  # seconds for the whole exchange


@dataclass(frozen=True, slots=True)
class OAuthConfig:
    """[auth.oauth]: OAUTHBEARER/XOAUTH2 with JWT access tokens (auth/oauth.py)."""

    jwks_url: str = ""  # https://... the provider's JWKS; "": token mechanisms not offered
    issuer: str = ""  # the "iss" every token must carry
    audience: str = ""  # an "aud" every token must carry
    login_claim: str = "preferred_username"  # the claim whose value is the login
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    ca_file: Path | None = None  # trust anchors for the JWKS server; None: system CAs
    jwks_cache: float = 3600.0  # seconds the key set is used before it is fetched again
    timeout: float = 5.0  # seconds to fetch the key set
    # What a failed token's error challenge tells the client (RFC 7628 §3.2.2); "": left out
    scope: str = ""  # a scope that gives a token mailgate accepts
    openid_configuration: str = ""  # https://... the provider's discovery document


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """[auth]: where passwords are checked. "directory" is part 1's behaviour."""

    backend: str = "directory"
    cache_ttl: float = 60.0  # seconds a successful verification is remembered; 0: never
    ldap: LdapConfig = field(default_factory=LdapConfig)
    dovecot: DovecotConfig = field(default_factory=DovecotConfig)
    oauth: OAuthConfig = field(default_factory=OAuthConfig)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """[admin]: the operators' HTTP listener (/metrics, /healthz, /readyz, operator pages)."""

    listen: tuple[Listen, ...] = ()
    password_file: Path | None = None  # one line: HTTP Basic password of user "admin"


WEB_USERNAMES = ("auto", "localpart", "address")


@dataclass(frozen=True, slots=True)
class WebConfig:
    """[web]: mail-program set-up (autoconfig, autodiscover, .mobileconfig) and /settings.

    listen:   public HTTP(S) addresses; empty: not served.
    tls:      serve HTTPS with the [tls] certificate.
    username: what mail programs are told to log in with: "localpart" (the part of the
              address before the @), "address" (the whole address), or "auto": "address"
              when the LDAP filter looks {login} up in the address attribute, else
              "localpart" (the directory's and Dovecot's primary address is LOGIN@domain).
    imap:     "HOST:PORT" of the institution's IMAP server, named beside mailgate's outgoing
              server (Thunderbird and Apple profiles need an incoming server); "": none.
    """

    listen: tuple[Listen, ...] = ()
    tls: bool = False
    username: str = "auto"
    imap: str = ""


LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "text"  # "json": one JSON object a line, the same fields as the text


@dataclass(frozen=True, slots=True)
class TraceConfig:
    """[trace]: the message event log behind `mailgate trace` and `mailgate status` (trace/)."""

    path: Path = Path("trace")
    retention_days: int = 30  # whole days kept; older day files are deleted
    max_size_mb: int = 0  # 0: no limit but the days; else the oldest days go first


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """[policy]: the sender policy (policy.py).

    foreign_subdomains: subdomains of the default or a managed domain that are *not* the
    institution's (say a list server run by a third party); every other subdomain is, and
    its addresses are refused to a login that was not granted them. A-label form.
    """

    foreign_subdomains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    path: Path  # the configuration file itself
    hostname: str = "localhost"
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    submission: ServiceConfig = field(default_factory=ServiceConfig)
    submissions: ServiceConfig = field(default_factory=ServiceConfig)
    smarthost: SmarthostConfig = field(default_factory=SmarthostConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    scanner: ScannerConfig = field(default_factory=ScannerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    ratelimits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    state: StateConfig = field(default_factory=StateConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    web: WebConfig = field(default_factory=WebConfig)
    log: LogConfig = field(default_factory=LogConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def default_path() -> Path:
    """-c/--config, else $MAILGATE_CONFIG, else ./mailgate.toml (the CLI passes -c itself)."""
    return Path(os.environ.get("MAILGATE_CONFIG") or "mailgate.toml")


def load(path: Path, *, check_files: bool = True) -> Config:
    """Read and validate the configuration at `path`; raise ConfigError naming the bad key."""
    path = Path(path).absolute()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: configuration file not found (name it with -c or $MAILGATE_CONFIG, "
            "or create one with `mailgate init`)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    cfg = _build(raw, path)
    if check_files:
        _check_files(cfg)
    return cfg


def parse(text: str, path: Path) -> Config:
    """Validate configuration text as if it were the file `path` (which need not exist yet).

    `mailgate init` uses it to refuse bad options before it writes anything.
    """
    path = Path(path).absolute()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return _build(raw, path)


# --- building -----------------------------------------------------------------

_SECTIONS = {
    "directory": DirectoryConfig,
    "spool": SpoolConfig,
    "tls": TlsConfig,
    "submission": ServiceConfig,
    "submissions": ServiceConfig,
    "smarthost": SmarthostConfig,
    "delivery": DeliveryConfig,
    "scanner": ScannerConfig,
    "limits": LimitsConfig,
    "ratelimits": RateLimitsConfig,
    "state": StateConfig,
    "server": ServerConfig,
    "auth": AuthConfig,
    "admin": AdminConfig,
    "web": WebConfig,
    "log": LogConfig,
    "trace": TraceConfig,
    "policy": PolicyConfig,
}
# Tables inside a section ([auth.ldap]): section -> key -> dataclass.
_SUBSECTIONS: dict[str, dict[str, type]] = {
    "delivery": {"tls": DeliveryTlsConfig},
    "auth": {"ldap": LdapConfig, "dovecot": DovecotConfig, "oauth": OAuthConfig},
}


def _build(raw: dict[str, Any], path: Path) -> Config:
    base = path.parent
    top: dict[str, Any] = {"path": path}
    for key, value in raw.items():
        if key == "hostname":
            top["hostname"] = _hostname(value, "hostname")
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a table [{key}]")
            top[key] = _section(key, _SECTIONS[key], value, base)
        else:
            raise ConfigError(f"{key}: unknown key")
    # A section that is absent still has paths, and they are relative to the file too.
    for name, cls in _SECTIONS.items():
        if name not in top:
            top[name] = _section(name, cls, {}, base)
    if top["submissions"].proxy_networks:
        # The header comes before the TLS handshake, and asyncio's TLS upgrade cannot be
        # handed the ClientHello bytes a balancer may send in the same segment.
        raise ConfigError("submissions.proxy_networks: not supported on the implicit-TLS "
                          "listener; put 465 behind the balancer in TCP mode without PROXY, "
                          "or use 587")  # fmt: skip
    cfg = Config(**top)
    _check_auth(cfg.auth)
    return cfg


def _section(name: str, cls: type, raw: dict[str, Any], base: Path) -> Any:
    known = {f.name for f in fields(cls)}
    tables = _SUBSECTIONS.get(name, {})
    values: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{name}.{key}"
        if key not in known:
            raise ConfigError(f"{full}: unknown key")
        if key in tables:
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a table [{full}]")
            values[key] = _section(full, tables[key], value, base)
        else:
            values[key] = _convert(full, value, base)
    # Defaults of path-like keys are relative to the configuration file, not to the cwd.
    for f in fields(cls):
        full = f"{name}.{f.name}"
        if f.name not in values and f.name not in tables and _kind(full) in ("path", "sqlite_url"):
            values[f.name] = _convert(full, str(f.default), base)
    return cls(**values)


def _kind(key: str) -> str:
    short = key.split(".", 1)[1]
    return _KINDS[short] if short in _KINDS else _KINDS_FULL[key]


def _convert(key: str, value: Any, base: Path) -> Any:  # one table of key kinds
    kind = _kind(key)
    if kind == "path":
        return _path(key, value, base)
    if kind == "sqlite_url":
        return _directory_url(key, value, base)
    if kind == "domain":
        return _hostname(value, key)
    if kind == "domains":
        return tuple(_hostname(v, key) for v in _list(key, value))
    if kind == "listen":
        return tuple(_listen(key, v) for v in _list(key, value))
    if kind == "networks":
        return tuple(_network(key, v) for v in _list(key, value))
    if kind == "nameservers":
        return tuple(_nameserver(key, v) for v in _list(key, value))
    if kind == "port":
        return _port(key, value)
    if kind == "posint":
        return _int(key, value, minimum=1)
    if kind == "nonnegint":
        return _int(key, value, minimum=0)
    if kind == "seconds":
        return _seconds(key, value)
    if kind == "seconds_or_zero":
        return _seconds_or_zero(key, value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false")
        return value
    if kind == "relay":
        return _relay(key, value)
    if kind == "clamd":
        return _clamd(key, value, base)
    if kind == "extensions":
        return tuple(_extension(key, v) for v in _list(key, value))
    if kind == "schedule":
        items = tuple(_int(key, v, minimum=1) for v in _list(key, value))
        if not items:
            raise ConfigError(f"{key}: expected a non-empty list of seconds")
        return items
    if kind == "address_or_empty":
        if not isinstance(value, str) or (value and "@" not in value):
            raise ConfigError(f"{key}: expected an email address or an empty string")
        return value
    if kind == "account":
        return _account(key, value)
    if kind == "ratelimit_names":
        return _ratelimit_names(key, value)
    if kind == "prefix4":
        return _prefix(key, value, 32)
    if kind == "prefix6":
        return _prefix(key, value, 128)
    if kind == "ratelimit_service":
        return _ratelimit_service(key, value)
    if kind == "path_or_empty":
        return None if value == "" else _path(key, value, base)
    if kind == "web_username":
        if value not in WEB_USERNAMES:
            raise ConfigError(f'{key}: expected "auto", "localpart" or "address"')
        return value
    if kind == "pin_clients":
        if value not in PIN_CLIENTS:
            raise ConfigError(f'{key}: expected "auto", "yes" or "no"')
        return value
    if kind == "log_format":
        if value not in LOG_FORMATS:
            raise ConfigError(f'{key}: expected "text" or "json"')
        return value
    if kind == "text":
        if not isinstance(value, str) or any(not c.isprintable() for c in value):
            raise ConfigError(f"{key}: expected a string")
        return value
    if kind == "attributes":
        return tuple(_attribute(key, v) for v in _list(key, value))
    if kind == "attribute":
        return _attribute(key, value)
    if kind == "auth_backend":
        if value not in AUTH_BACKENDS:
            raise ConfigError(f'{key}: expected "directory", "ldap" or "dovecot"')
        return value
    if kind == "ldap_url":
        if not isinstance(value, str) or not value.startswith(("ldap://", "ldaps://")):
            raise ConfigError(f'{key}: expected "ldap://HOST:PORT" or "ldaps://HOST:PORT"')
        return value
    if kind == "ldap_filter":
        if not isinstance(value, str) or "{login}" not in value or not value.startswith("("):
            raise ConfigError(
                f'{key}: expected an LDAP filter with {{login}}, e.g. "(uid={{login}})"'
            )
        return value
    if kind == "redis_url":
        if not isinstance(value, str) or (value and not value.startswith(REDIS_SCHEMES)):
            raise ConfigError(f'{key}: expected "redis://HOST:PORT/DB" or ""')
        return value
    if kind == "https_url":
        if not isinstance(value, str) or (value and not value.startswith("https://")):
            raise ConfigError(f'{key}: expected "https://..." or ""')
        return value
    if kind == "jwt_algorithms":
        algorithms = tuple(_list(key, value))
        if not algorithms or any(a not in JWT_ALGORITHMS for a in algorithms):
            raise ConfigError(f"{key}: expected a list of {', '.join(JWT_ALGORITHMS)}")
        return algorithms
    if kind == "auth_socket":
        return _auth_socket(key, value, base)
    if kind == "tls_policy_table":
        return _tls_policy_table(key, value)
    if kind == "spool_format":
        if value == "files":
            raise ConfigError(
                f'{key}: "files" is no longer supported; remove the key (a spool of the files '
                "layout is imported into the journal at startup)"
            )
        if value not in SPOOL_FORMATS:
            raise ConfigError(f'{key}: expected "journal"')
        return value
    raise AssertionError(kind)  # pragma: no cover - table is complete


# Keys whose kind does not depend on the section.
_KINDS = {
    "path": "path",
    "cert": "path",
    "key": "path",
    "listen": "listen",
    "networks": "networks",
    "proxy_networks": "networks",
    "nameservers": "nameservers",
    "smtp_port": "port",
    "relay": "relay",
    "clamd": "clamd",
    "blocked_extensions": "extensions",
    "default_domain": "domain",
    "retry_schedule": "schedule",
    "postmaster": "address_or_empty",
    "allow_internal_literals": "bool",
    "max_message_size": "posint",
    "max_header_size": "posint",
    "foreign_subdomains": "domains",
    "max_recipients": "posint",
    "max_errors": "posint",
    "max_connections": "posint",
    "max_connections_per_ip": "posint",
    "max_per_destination": "posint",
    "max_queue_lifetime": "posint",
    "max_stream_size": "posint",
    "hop_limit": "posint",
    "delay_warning_after": "nonnegint",
    "timeout": "seconds",
    "connect_timeout": "seconds",
    "command_timeout": "seconds",
    "data_timeout": "seconds",
    "greeting_delay": "seconds_or_zero",
    "require_rdns": "bool",
    "rdns_timeout": "seconds",
    "bad_nets": "networks",
    # [ratelimits]
    **{name: "nonnegint" for name in RATE_LIMIT_NAMES},
    "shadow": "ratelimit_names",
    "exempt_networks": "networks",
    "ipv4_prefix": "prefix4",
    "ipv6_prefix": "prefix6",
    "breaker_recipients_per_hour": "nonnegint",
    "breaker_messages_per_hour": "nonnegint",
    "auth_window": "seconds",
    "auth_delay_after": "posint",
    "auth_base_delay": "seconds",
    "auth_max_delay": "seconds",
    "auth_refuse_after": "posint",
    "auth_login_refuse_after": "posint",
    "auth_trust_period": "seconds",
    "auth_parallel_per_client": "posint",
    "auth_parallel_per_login": "posint",
    "auth_ban_after": "nonnegint",
    "auth_ban_period": "seconds",
    "snapshot_interval": "seconds",
}
_KINDS_FULL = {
    "spool.format": "spool_format",
    "admin.password_file": "path_or_empty",
    "web.tls": "bool",
    "web.username": "web_username",
    "web.imap": "relay",
    "log.format": "log_format",
    "trace.retention_days": "posint",
    "trace.max_size_mb": "nonnegint",
    "server.workers": "nonnegint",
    "server.pin_clients": "pin_clients",
    "server.user": "account",
    "server.group": "account",
    "directory.url": "sqlite_url",
    "state.url": "redis_url",
    "state.prefix": "text",
    "delivery.tls.mta_sts": "bool",
    "delivery.tls.dane": "bool",
    "delivery.tls.mta_sts_port": "port",
    "delivery.tls.policy": "tls_policy_table",
    "ratelimits.submission": "ratelimit_service",
    "ratelimits.submissions": "ratelimit_service",
    "ratelimits.smarthost": "ratelimit_service",
    "auth.backend": "auth_backend",
    "auth.cache_ttl": "seconds_or_zero",
    "auth.ldap.url": "ldap_url",
    "auth.ldap.starttls": "bool",
    "auth.ldap.ca_file": "path_or_empty",
    "delivery.tls.ca_file": "path_or_empty",
    "auth.ldap.bind_dn": "text",
    "auth.ldap.bind_password_file": "path_or_empty",
    "auth.ldap.base": "text",
    "auth.ldap.filter": "ldap_filter",
    "auth.ldap.address_attribute": "attribute",
    "auth.ldap.alias_attributes": "attributes",
    "auth.ldap.timeout": "seconds",
    "auth.ldap.pool_size": "posint",
    "auth.dovecot.socket": "auth_socket",
    "auth.dovecot.timeout": "seconds",
    "auth.oauth.jwks_url": "https_url",
    "auth.oauth.issuer": "text",
    "auth.oauth.audience": "text",
    "auth.oauth.login_claim": "text",
    "auth.oauth.algorithms": "jwt_algorithms",
    "auth.oauth.ca_file": "path_or_empty",
    "auth.oauth.jwks_cache": "seconds",
    "auth.oauth.timeout": "seconds",
    "auth.oauth.scope": "text",
    "auth.oauth.openid_configuration": "https_url",
}


def _list(key: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list")
    return value


def _path(key: str, value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a path")
    p = Path(value)
    return p if p.is_absolute() else base / p


def _directory_url(key: str, value: Any, base: Path) -> str:
    if isinstance(value, str) and value.startswith(POSTGRESQL_SCHEMES):
        return value  # libpq's URI; psycopg reports a malformed one when connecting
    if not isinstance(value, str) or not value.startswith("sqlite:///"):
        raise ConfigError(
            f"{key}: expected a URL of the form sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
        )
    rest = value.removeprefix("sqlite:///")
    if not rest:
        raise ConfigError(f"{key}: the sqlite URL names no file")
    p = Path(rest)
    return "sqlite:///" + str(p if p.is_absolute() else base / p)


_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?")


def _account(key: str, value: Any) -> str:
    """A user or group name as useradd(8) accepts it, or "" (no switch)."""
    if not isinstance(value, str) or (value and not _ACCOUNT_NAME.fullmatch(value)):
        raise ConfigError(f"{key}: expected a user or group name")
    return value


def _hostname(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a domain name")
    name = domain_name(value)  # the one LDH rule (dnsname): A-labels for IDNs
    if name is None:
        raise ConfigError(f"{key}: {value!r} is not a valid domain name")
    return name


def _port(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"{key}: expected a port number 1-65535")
    return value


def _int(key: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum >= 1 else "a non-negative integer"
        raise ConfigError(f"{key}: expected {what}")
    return value


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{key}: expected a positive number of seconds")
    return float(value)


def _seconds_or_zero(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{key}: expected a number of seconds (0 or more)")
    return float(value)


def _split_host_port(key: str, value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ConfigError(f'{key}: expected "HOST:PORT", got {value!r}')
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f'{key}: expected "HOST:PORT", got {value!r}')
    if host.startswith("["):
        if not host.endswith("]"):
            raise ConfigError(f"{key}: bad IPv6 address in {value!r}")
        host = host[1:-1]
    return host, _port(key, int(port_text))


def _listen(key: str, value: Any) -> Listen:
    host, port = _split_host_port(key, value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"{key}: {host!r} is not an IP address") from None
    return Listen(host, port)


def _network(key: str, value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ConfigError(f'{key}: expected a network like "10.0.0.0/8"')
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{key}: {value!r} is not an IP network") from None


def _nameserver(key: str, value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ConfigError(f'{key}: expected "IP" or "IP:PORT"')
    try:
        return str(ipaddress.ip_address(value)), 53
    except ValueError:
        pass
    host, port = _split_host_port(key, value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{key}: {host!r} is not an IP address") from None
    return host, port


def _host(key: str, host: str) -> str:
    """An IP address or a domain name (relay, clamd): spaces or stray characters are errors."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return _hostname(host, key)


def _relay(key: str, value: Any) -> str:
    if value == "":
        return ""
    host, port = _split_host_port(key, value)
    host = _host(key, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _clamd(key: str, value: Any, base: Path) -> str:
    if value == "":
        return ""
    if not isinstance(value, str):
        raise ConfigError(f'{key}: expected "tcp:HOST:PORT" or "unix:/path"')
    if value.startswith("tcp:"):
        host, port = _split_host_port(key, value.removeprefix("tcp:"))
        return f"tcp:{_host(key, host)}:{port}"
    if value.startswith("unix:") and len(value) > 5:
        return "unix:" + str(_path(key, value.removeprefix("unix:"), base))
    raise ConfigError(f'{key}: expected "tcp:HOST:PORT" or "unix:/path", got {value!r}')


def _extension(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip(". ") or "/" in value:
        raise ConfigError(f"{key}: {value!r} is not a file extension")
    return value.strip(". ").lower()


def _ratelimit_names(key: str, value: Any) -> tuple[str, ...]:
    names = tuple(_list(key, value))
    for name in names:
        if name not in RATE_LIMIT_NAMES:
            raise ConfigError(f"{key}: {name!r} is not a rate limit name")
    return names


def _prefix(key: str, value: Any, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= bits:
        raise ConfigError(f"{key}: expected a prefix length 1-{bits}")
    return value


def _ratelimit_service(key: str, value: Any) -> ServiceRateLimits:
    """[ratelimits.<service>]: the nine limits and `shadow`, each optional."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table [{key}]")
    values: dict[str, Any] = {}
    for name, item in value.items():
        full = f"{key}.{name}"
        if name in RATE_LIMIT_NAMES:
            values[name] = _int(full, item, minimum=0)
        elif name == "shadow":
            values[name] = _ratelimit_names(full, item)
        else:
            raise ConfigError(f"{full}: unknown key")
    return ServiceRateLimits(**values)


def _attribute(key: str, value: Any) -> str:
    # RFC 4512 §1.4: an attribute description is a keystring (letter, then letters, digits, -).
    if (
        not isinstance(value, str)
        or not value[:1].isalpha()
        or not value.isascii()
        or not all(c.isalnum() or c == "-" for c in value)
    ):
        raise ConfigError(f"{key}: {value!r} is not an LDAP attribute name")
    return value


def _auth_socket(key: str, value: Any, base: Path) -> str:
    if value == "":
        return ""
    if isinstance(value, str) and value.startswith("tcp:"):
        host, port = _split_host_port(key, value.removeprefix("tcp:"))
        return f"tcp:{_host(key, host)}:{port}"
    if isinstance(value, str) and value.startswith("unix:") and len(value) > 5:
        return "unix:" + str(_path(key, value.removeprefix("unix:"), base))
    raise ConfigError(f'{key}: expected "unix:/path" or "tcp:HOST:PORT", got {value!r}')


def _check_auth(auth: AuthConfig) -> None:
    """Keys that the chosen backend cannot do without."""
    if auth.backend == "ldap":
        if not auth.ldap.base:
            raise ConfigError('auth.ldap.base: required when auth.backend = "ldap"')
        if auth.ldap.bind_dn and auth.ldap.bind_password_file is None:
            raise ConfigError("auth.ldap.bind_password_file: required when bind_dn is set")
        if auth.ldap.starttls and auth.ldap.url.startswith("ldaps://"):
            raise ConfigError("auth.ldap.starttls: not with an ldaps:// URL (already TLS)")
    if auth.oauth.jwks_url:
        for name in ("issuer", "audience", "login_claim"):
            if not getattr(auth.oauth, name):
                raise ConfigError(f"auth.oauth.{name}: required when jwks_url is set")
    if auth.backend == "dovecot" and not auth.dovecot.socket:
        raise ConfigError('auth.dovecot.socket: required when auth.backend = "dovecot"')


def _tls_policy_table(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f'{key}: expected a table like {{ "example.net" = "verify" }}')
    table: dict[str, str] = {}
    for domain, level in value.items():
        name = _hostname(domain, f"{key}.{domain}")
        if level not in TLS_POLICY_LEVELS:
            raise ConfigError(
                f'{key}.{domain}: expected "may", "encrypt", "verify" or "dane", got {level!r}'
            )
        table[name] = level
    return table


def _check_files(cfg: Config) -> None:
    """Files that must exist for `serve` (certificate, key) are checked at load time."""
    has_tls = bool(cfg.submission.listen or cfg.submissions.listen or cfg.web.tls)
    if has_tls:
        for key, p in (("tls.cert", cfg.tls.cert), ("tls.key", cfg.tls.key)):
            if not p.is_file():
                raise ConfigError(f"{key}: file not found: {p}")
    ldap = cfg.auth.ldap
    needed = [("auth.oauth.ca_file", cfg.auth.oauth.ca_file)] if cfg.auth.oauth.jwks_url else []
    if cfg.auth.backend == "ldap":
        needed += [("auth.ldap.ca_file", ldap.ca_file),
                   ("auth.ldap.bind_password_file", ldap.bind_password_file)]  # fmt: skip
    needed.append(("delivery.tls.ca_file", cfg.delivery.tls.ca_file))
    needed.append(("admin.password_file", cfg.admin.password_file))
    for key, maybe in needed:
        if maybe is not None and not maybe.is_file():
            raise ConfigError(f"{key}: file not found: {maybe}")
    if not (cfg.submission.listen or cfg.submissions.listen or cfg.smarthost.listen):
        raise ConfigError("submission.listen: no listener configured in any service")
