"""Every SMTP reply a client can rely on, defined once.

Owns: the `Reply` value and the named replies of INTERFACE.md's table and of the protocol
(RFC 5321 §4.2, enhanced status codes RFC 3463 / RFC 2034). Must not: import anything else
from mailgate, or build reply text from exception messages.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply.

    code:   the three-digit reply code (250, 451, 550 ...).
    status: the RFC 3463 enhanced status code, always present ("5.7.1").
    text:   one human-readable line, never internals.
    """

    code: int
    status: str
    text: str

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def line(self) -> str:
        """The reply as one line without CRLF: '250 2.0.0 Ok'."""
        return f"{self.code} {self.status} {self.text}"

    def to_bytes(self) -> bytes:
        # RFC 5321 §4.2 / RFC 6531 §3.7.4: reply text is ASCII (an SMTPUTF8 client may get
        # UTF-8, an old one would choke). The one place replies become bytes keeps it so.
        return (self.line() + "\r\n").encode("ascii", "replace")


# --- success and flow --------------------------------------------------------
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
START_DATA = Reply(354, "2.0.0", "End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_SUCCEEDED = Reply(235, "2.7.0", "Authentication successful")
BYE = Reply(221, "2.0.0", "Bye")
RESET_OK = Reply(250, "2.0.0", "Ok")
NOOP_OK = Reply(250, "2.0.0", "Ok")
VRFY_DISABLED = Reply(
    252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"
)

# --- INTERFACE.md reply table -------------------------------------------------
STARTTLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
BAD_CREDENTIALS = Reply(535, "5.7.8", "Authentication credentials invalid")
RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")
SENDER_NOT_ALLOWED = Reply(553, "5.7.1", "Sender address not allowed for this login")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message too big")
SCANNER_UNAVAILABLE = Reply(451, "4.7.1", "Content scanner unavailable, try again later")
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, try again later")

# --- protocol errors (RFC 5321 §4.2.2, §4.5.3.1) -------------------------------
SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_ARGUMENTS = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_ADDRESS = Reply(501, "5.1.3", "Bad address syntax")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
PARAM_NOT_RECOGNIZED = Reply(
    555, "5.5.4", "MAIL FROM/RCPT TO parameters not recognized or not implemented"
)
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
TOO_MANY_ERRORS = Reply(421, "4.5.0", "Too many errors, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")
PIPELINED_STARTTLS = Reply(554, "5.5.1", "Commands pipelined after STARTTLS, closing connection")
AUTH_NOT_SUPPORTED = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_ENCODING = Reply(501, "5.5.2", "Cannot decode AUTH parameter")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line too long")
AUTH_NOT_OFFERED = Reply(503, "5.5.1", "AUTH not available on this service")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
AUTH_TEMPORARILY_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure")
CLIENT_LOCKED_OUT = Reply(421, "4.7.0", "Too many authentication failures, try again later")
TOO_MANY_AUTH_FAILURES = Reply(454, "4.7.0", "Too many authentication failures, try again later")
# More AUTH attempts of one client or login in flight than [ratelimits] auth_parallel_per_*.
TOO_MANY_AUTH_IN_PROGRESS = Reply(
    454, "4.7.0", "Too many authentication attempts in progress, try again later"
)
SMUGGLING = Reply(
    554, "5.5.2", "Bare CR or LF in message data, closing connection (see RFC 5321 section 2.3.8)"
)
TEXT_LINE_TOO_LONG = Reply(
    554, "5.6.0", "Message text line longer than 998 octets (RFC 5322 section 2.1.1)"
)
HTTP_REFUSED = Reply(554, "5.7.0", "This is an SMTP server, closing connection")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
UTF8_NOT_REQUESTED = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
HOP_LIMIT_EXCEEDED = Reply(554, "5.4.6", "Too many Received headers, mail loop suspected")
BAD_MIME = Reply(554, "5.6.0", "Message structure too deep or too broken to inspect")
RELAY_TO_INTERNAL_DENIED = Reply(550, "5.7.1", "Relaying to internal networks denied")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
# A PROXY protocol header from outside the listener's proxy_networks (or a bad one from a
# balancer inside them): the connection is closed.
PROXY_REFUSED = Reply(554, "5.7.0", "PROXY protocol header refused")
NUL_IN_DATA = Reply(554, "5.6.0", "NUL octet in message data, closing connection")
# Smart host hygiene (issue #6): pipelining before the greeting, and forward-confirmed rDNS.
EARLY_TALKER = Reply(554, "5.7.0", "Talking before the greeting is not allowed, closing connection")
RDNS_REQUIRED = Reply(550, "5.7.1", "Client host rejected: reverse DNS does not match your address")
RDNS_TEMPFAIL = Reply(450, "4.7.1", "Client host rejected: reverse DNS lookup failed, try later")
HELP_INFO = Reply(
    214, "2.0.0", "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"
)


@functools.lru_cache(maxsize=16)  # built for every connection, from one or two hostnames
def greeting(hostname: str) -> bytes:
    """The 220 banner (RFC 5321 §4.3.1)."""
    return f"220 {_one_line(hostname)} ESMTP mailgate\r\n".encode("ascii")


def virus_found(name: str) -> Reply:
    return Reply(554, "5.7.1", f"Message rejected: virus found ({_one_line(name)})")


def blocked_file(filename: str) -> Reply:
    return Reply(
        554,
        "5.7.1",
        f"Message rejected: attachment {_one_line(filename)!r} is a blocked file type;"
        " put it in a zip archive and send it again",
    )


# clamd reported Heuristics.Limits.Exceeded.* (AlertExceedsMax): part of the message was not
# scanned. Permanent: the same archive exceeds the same limits on every retry.
UNSCANNABLE_ARCHIVE = Reply(
    554,
    "5.7.1",
    "Message rejected: an archive in it exceeds the virus scanner's limits"
    " (size, nesting or number of files); send the files unpacked or in smaller parts",
)


def too_big_to_scan(limit: int) -> Reply:
    """A message longer than clamd accepts as one stream (scanner.max_stream_size).

    Permanent: retrying cannot help, and the message is never accepted unscanned.
    """
    return Reply(552, "5.3.4", f"Message too big to scan for viruses (limit {limit} bytes)")


def queued(qid: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {qid}")


def rate_limited(sentence: str) -> Reply:
    return Reply(450, "4.7.1", _one_line(sentence))


def _one_line(text: str) -> str:
    """Printable ASCII only: a reply can never be split, and its text stays ASCII."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)[:200]


# --- the header section and the sender's identity (issue #11) --------------------------------
def header_too_big(limit: int) -> Reply:
    """A header section longer than [limits] max_header_size: refused before any of it is read."""
    return Reply(552, "5.3.4", f"Message header section too big (limit {limit} bytes)")


def malformed_header(what: str) -> Reply:
    """A header line that is not a field (RFC 5322 section 2.2), e.g. "Subject :"."""
    return Reply(554, "5.6.0", f"Malformed message header: {_one_line(what)}")


def unreadable_author(field: str, what: str) -> Reply:
    """An author or sender field (From, Sender, Resent-From, Resent-Sender) that a receiver
    could display as an address but that does not parse strictly (RFC 5322 section 3.4)."""
    return Reply(
        554, "5.6.0", f"{_one_line(field)} field cannot be read strictly: {_one_line(what)}"
    )


def identity_not_allowed(field: str) -> Reply:
    """Sender:, Resent-From: or Resent-Sender: naming an institution address the login may not
    use (From: and MAIL FROM get SENDER_NOT_ALLOWED, the contract's wording)."""
    return Reply(553, "5.7.1", f"{_one_line(field)} address not allowed for this login")
