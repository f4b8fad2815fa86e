"""The "dovecot" backend: a client of Dovecot's authentication protocol 1.x, as Postfix's and
chasquid's Dovecot SASL clients use it.

Owns: one exchange per check on `[auth.dovecot] socket` ("unix:/path" or "tcp:HOST:PORT", the
auth service's client listener): our handshake (VERSION 1.1, CPID), the server's (VERSION with
major 1, MECH lines, DONE; PLAIN must be among the mechanisms), then
`AUTH <id> PLAIN service=smtp secured no-penalty nologin resp=<base64>` and its answer:
  OK   -> the password is right; the primary address is the `user=` Dovecot returns when it is
          an address, else LOGIN@default_domain;
  FAIL -> a wrong password or an unknown login (Dovecot answers both alike, after its own
          auth_failure_delay), unless it carries `temp` or `code=temp_fail` (its passdb could not
          answer): then AuthUnavailable, like a refused connection or a timeout;
  CONT -> refused (PLAIN is one step; a server asking for more is not one we understand).
`no-penalty` because mailgate's own AUTH defence (limits/) counts and delays failures; `secured`
because AUTH is only offered under TLS. Must not: log passwords, or keep a connection open
between checks (one short exchange each; Dovecot's auth service handles many).

The line format is sans-IO (`encode_line`, `parse_line`): tab-separated, with Dovecot's \\001
escapes for TAB, LF, CR, NUL and \\001 in values.
"""

from __future__ import annotations

import asyncio
import base64
import os
from dataclasses import dataclass

from mailgate.auth import Identity
from mailgate.config import DovecotConfig
from mailgate.errors import AuthUnavailable

MAX_LINE = 16384  # the auth protocol's expected maximum line length
_ESCAPES = {"\x01": "\x011", "\t": "\x01t", "\n": "\x01n", "\r": "\x01r", "\0": "\x010"}
_UNESCAPES = {"1": "\x01", "t": "\t", "n": "\n", "r": "\r", "0": "\0", "l": "\n"}


@dataclass(frozen=True, slots=True)
class Line:
    """One protocol line: the command, its positional arguments and its name=value options
    (a boolean option has the value "")."""

    command: str
    args: tuple[str, ...]
    options: dict[str, str]


def escape(value: str) -> str:
    return "".join(_ESCAPES.get(ch, ch) for ch in value)


def unescape(value: str) -> str:
    out: list[str] = []
    chars = iter(value)
    for ch in chars:
        if ch == "\x01":
            nxt = next(chars, "")
            out.append(_UNESCAPES.get(nxt, nxt))
        else:
            out.append(ch)
    return "".join(out)


def encode_line(command: str, *fields: str) -> bytes:
    return ("\t".join([command, *(escape(f) for f in fields)]) + "\n").encode("utf-8")


def parse_line(raw: bytes, positional: int) -> Line:
    """Split a line (without its LF) into the command, `positional` arguments, and options."""
    parts = raw.decode("utf-8", "replace").split("\t")
    args = tuple(unescape(p) for p in parts[1 : 1 + positional])
    options: dict[str, str] = {}
    for part in parts[1 + positional :]:
        name, _, value = part.partition("=")
        options[name] = unescape(value)
    return Line(parts[0], args, options)


def auth_request(request_id: int, login: str, password: str) -> bytes:
    # RFC 4616: authzid (empty) NUL authcid NUL passwd, base64 in resp=.
    resp = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode()).decode()
    return encode_line("AUTH", str(request_id), "PLAIN", "service=smtp", "secured", "no-penalty",
                       "nologin", f"resp={resp}")  # fmt: skip


class DovecotBackend:
    name = "dovecot"

    def __init__(self, cfg: DovecotConfig, *, default_domain: str) -> None:
        self.cfg = cfg
        self.default_domain = default_domain
        self._next_id = 0

    async def verify(self, login: str, password: str) -> Identity | None:
        self._next_id = self._next_id % 1_000_000 + 1
        try:
            return await asyncio.wait_for(
                self._exchange(self._next_id, login, password), self.cfg.timeout
            )
        except TimeoutError:
            raise AuthUnavailable(
                f"{self.cfg.socket}: no answer in {self.cfg.timeout:g}s"
            ) from None
        except (OSError, EOFError, ValueError) as e:
            raise AuthUnavailable(f"{self.cfg.socket}: {e}") from None

    async def lookup(self, login: str) -> Identity | None:
        """Dovecot's auth-client socket cannot look a user up without a password (that is the
        auth-userdb socket, for trusted processes): an app password's login is taken as is."""
        return Identity(login=login, addresses=(self._primary(login, None),))

    def close(self) -> None:
        pass

    async def _exchange(self, request_id: int, login: str, password: str) -> Identity | None:
        reader, writer = await self._connect()
        try:
            writer.write(encode_line("VERSION", "1", "1") + encode_line("CPID", str(os.getpid())))
            mechanisms: set[str] = set()
            while True:  # the server's handshake, up to DONE
                line = parse_line(await _read_line(reader), positional=2)
                if line.command == "VERSION" and line.args[:1] != ("1",):
                    raise ValueError(f"unsupported auth protocol version {line.args}")
                if line.command == "MECH" and line.args:
                    mechanisms.add(line.args[0].upper())
                if line.command == "DONE":
                    break
            if "PLAIN" not in mechanisms:
                raise ValueError("the auth service does not offer PLAIN (auth_mechanisms)")
            writer.write(auth_request(request_id, login, password))
            await writer.drain()
            answer = parse_line(await _read_line(reader), positional=1)
        finally:
            writer.close()
        if answer.args[:1] != (str(request_id),):
            raise ValueError(f"answer for another request: {answer.command} {answer.args}")
        if answer.command == "OK":
            return Identity(login=login, addresses=(self._primary(login, answer.options),))
        if answer.command == "FAIL":
            if "temp" in answer.options or answer.options.get("code") == "temp_fail":
                raise AuthUnavailable(f"{self.cfg.socket}: temporary failure")
            return None
        raise ValueError(f"unexpected answer {answer.command}")

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        spec = self.cfg.socket
        if spec.startswith("unix:"):
            return await asyncio.open_unix_connection(spec.removeprefix("unix:"), limit=MAX_LINE)
        host, _, port = spec.removeprefix("tcp:").rpartition(":")
        return await asyncio.open_connection(host.strip("[]"), int(port), limit=MAX_LINE)

    def _primary(self, login: str, options: dict[str, str] | None) -> str:
        user = (options or {}).get("user", "")
        return user if "@" in user else f"{login}@{self.default_domain}"


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise EOFError("the auth service closed the connection") from None
    except asyncio.LimitOverrunError:
        raise ValueError("line too long from the auth service") from None
    return line.removesuffix(b"\n")
