"""Exceptions that carry a meaning across stages.

Owns: the exception types that policy, scanning, the spool and the directory raise.
One boundary (receive/session.py via accept.py) translates them to replies. Must not:
import anything else from mailgate but `replies`.
"""

from __future__ import annotations

from mailgate.replies import Reply


class MailgateError(Exception):
    """Base of every mailgate error."""


class Rejected(MailgateError):
    """A decision to refuse, with the reply the client gets and a richer reason for the log."""

    def __init__(self, reply: Reply, reason: str = "") -> None:
        super().__init__(reason or reply.line())
        self.reply = reply
        self.reason = reason or reply.text


class ScannerUnavailable(MailgateError):
    """clamd could not be reached or did not answer in time: answer 451 4.7.1."""


class SpoolError(MailgateError):
    """The spool could not store or read an entry for a reason other than lack of space."""


class SpoolFull(SpoolError):
    """ENOSPC, EDQUOT or EFBIG while writing the spool: answer 452 4.3.1."""


class ConfigError(MailgateError):
    """The configuration is invalid; the message names the key: 'limits.max_message_size: ...'."""


class DirectoryError(MailgateError):
    """A directory operation failed (unknown login, duplicate, bad address). Message is one line."""


class AuthUnavailable(MailgateError):
    """The authentication backend (directory, LDAP server, Dovecot) could not answer: refused
    connection, timeout, server error. AUTH answers 454 4.7.0, never 535."""


class DirectoryUnavailable(DirectoryError, AuthUnavailable):
    """The directory's database could not be reached (PostgreSQL down, pool timeout): a
    temporary condition. AUTH answers 454 4.7.0, never 535 (it is an AuthUnavailable too)."""


class UsageError(MailgateError):
    """Our own code called an API wrongly (a bug), e.g. the SMTP machine in the wrong state."""


class ProtocolViolation(MailgateError):
    """The peer broke the protocol (bad syntax, bad sequence, bare LF...): answer `reply`.

    Raised by the sans-IO parsers in mailgate.smtp; never crosses the adapter boundary."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.line())
        self.reply = reply
