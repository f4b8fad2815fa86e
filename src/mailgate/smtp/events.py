"""Events that ServerConnection yields: the decisions that need the outside world.

Owns: the event dataclasses and the service `Profile`. Must not: perform I/O.
Every event that expects an answer is answered with `conn.send(reply)`; a 2xx/3xx reply
advances the state, a 4xx/5xx reply leaves it unchanged (RFC 5321 §4.1.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class Profile:
    """What a service offers and demands.

    name:             "submission", "submissions" or "smarthost" (used in logs and Received).
    offers_starttls:  STARTTLS is advertised while the connection is plaintext.
    implicit_tls:     the connection is TLS from the first byte (RFC 8314).
    offers_auth:      AUTH PLAIN/LOGIN is advertised once the connection is under TLS.
    requires_auth:    MAIL is refused (530 5.7.0) until AUTH succeeded.
    requires_tls_for_auth: AUTH and MAIL before STARTTLS get 530 5.7.0 (RFC 6409 / 3207).
    offers_requiretls: REQUIRETLS is advertised (and its MAIL parameter accepted) once the
                      connection is under TLS (RFC 8689 §4.1).
    """

    name: str
    offers_starttls: bool
    implicit_tls: bool
    offers_auth: bool
    requires_auth: bool
    requires_tls_for_auth: bool = True
    offers_requiretls: bool = False


SUBMISSION = Profile("submission", offers_starttls=True, implicit_tls=False,
                     offers_auth=True, requires_auth=True, offers_requiretls=True)  # fmt: skip
SUBMISSIONS = Profile("submissions", offers_starttls=False, implicit_tls=True,
                      offers_auth=True, requires_auth=True, offers_requiretls=True)  # fmt: skip
SMARTHOST = Profile("smarthost", offers_starttls=True, implicit_tls=False,
                    offers_auth=False, requires_auth=False)  # fmt: skip
PROFILES = {p.name: p for p in (SUBMISSION, SUBMISSIONS, SMARTHOST)}


class Event:
    """Base class of every event."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Ehlo(Event):
    """EHLO or HELO. domain: the client's claimed name; extended: EHLO (True) or HELO.
    Answer with OK-ish 2xx to accept (the machine builds the multi-line capability reply
    itself when the answer is 2xx) or a 5xx to refuse."""

    domain: str
    extended: bool


@dataclass(frozen=True, slots=True)
class StartTls(Event):
    """STARTTLS was accepted by the machine (nothing pipelined after it). The machine has
    already queued `220 2.0.0 Ready to start TLS`; the adapter flushes it, upgrades the
    transport, then calls `conn.tls_started()`. No reply is sent for this event."""


@dataclass(frozen=True, slots=True)
class Auth(Event):
    """A complete SASL exchange (PLAIN, LOGIN, or OAUTHBEARER/XOAUTH2 when offered) was decoded.

    mechanism: "PLAIN", "LOGIN", "OAUTHBEARER" or "XOAUTH2".
    login:     the authentication identity (authcid); for the token mechanisms the identity
               the client names (authzid or user=), possibly "": the token decides.
    password:  the password, or the bearer token; never log it.
    Answer replies.AUTH_SUCCEEDED (235) or BAD_CREDENTIALS (535) etc."""

    mechanism: str
    login: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class MailFrom(Event):
    """MAIL FROM. address: the reverse path without brackets ("" for the null sender <>).

    size:      SIZE= declared (RFC 1870), or None.
    body:      BODY= value ("7BIT", "8BITMIME") or None (RFC 6152).
    smtputf8:  SMTPUTF8 given (RFC 6531).
    ret:       RET= "FULL"/"HDRS" or None (RFC 3461).
    envid:     ENVID= xtext-decoded, or None (RFC 3461).
    auth:      AUTH= parameter as given, or None (RFC 4954 §5); informational only.
    requiretls: REQUIRETLS given (RFC 8689 §4.1; only where it was advertised).
    The machine already refused a SIZE above the limit (552 5.3.4)."""

    address: str
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    ret: Literal["FULL", "HDRS"] | None = None
    envid: str | None = None
    auth: str | None = None
    requiretls: bool = False


@dataclass(frozen=True, slots=True)
class RcptTo(Event):
    """RCPT TO. address: the forward path without brackets.

    notify: NOTIFY= values as a tuple ("SUCCESS", "FAILURE", "DELAY") or ("NEVER",), or None.
    orcpt:  ORCPT= as "rfc822;addr" (xtext-decoded), or None (RFC 3461)."""

    address: str
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None


@dataclass(frozen=True, slots=True)
class DataStart(Event):
    """DATA with at least one accepted recipient. Answer START_DATA (354) to receive the
    message, or an error reply (the transaction stays open)."""


@dataclass(frozen=True, slots=True)
class MessageChunk(Event):
    """Part of the message text: dot-unstuffed, CRLF line endings, in order. Nothing to answer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfData(Event):
    """The final CRLF.CRLF was received.

    too_big:  the message exceeded the size limit; the rest was discarded. The adapter should
              answer MESSAGE_TOO_BIG.
    bad_line: a text line over 998 octets was seen (the machine has noted it; the adapter
              answers TEXT_LINE_TOO_LONG).
    Answer with replies.queued(qid) or an error. Either way the transaction ends."""

    too_big: bool = False
    bad_line: bool = False


@dataclass(frozen=True, slots=True)
class Reset(Event):
    """RSET, or an implicit reset (EHLO again). The adapter drops any incoming message.
    The machine answers 250 itself for RSET (and writes nothing for the implicit reset, whose
    Ehlo event follows); nothing to answer."""


@dataclass(frozen=True, slots=True)
class Quit(Event):
    """QUIT: the machine queued 221; the adapter flushes and closes."""


@dataclass(frozen=True, slots=True)
class Close(Event):
    """The machine wants the connection closed now (peer closed, HTTP request, too many errors,
    smuggling attempt, pipelined STARTTLS). `reply` was already queued if not None."""

    reason: str
    reply_sent: bool = True
