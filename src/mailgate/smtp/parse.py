"""Parsing of SMTP command arguments: paths, ESMTP parameters, EHLO names and SASL responses.

Owns: the grammar of what a client may put after a command verb, as pure functions from text to
events or values. Every refusal raises `ProtocolViolation(reply)` with the exact reply to send.
Must not: know the session state, limits or policy (the server machine decides sequencing and
the SIZE limit), perform I/O, or log (arguments can hold passwords).

RFCs:
- RFC 5321 §4.1.1.1 (EHLO), §4.1.1.2/§4.1.1.3 (MAIL/RCPT), §4.1.2 (Path, Mailbox, Local-part,
  Domain, address-literal), §4.1.3 (IPv4/IPv6 literals), §4.5.3.1 (size limits), Appendix C
  (source routes are accepted and ignored).
- RFC 1870 (SIZE), RFC 6152 (BODY=8BITMIME), RFC 6531 §3.3 (SMTPUTF8; UTF-8 in addresses),
  RFC 3461 §4 (xtext, RET, ENVID, NOTIFY, ORCPT), RFC 4954 §4-§5 (AUTH, AUTH= parameter),
  RFC 4616 (SASL PLAIN), draft-murchison-sasl-login (SASL LOGIN), RFC 7628 §3.1 (OAUTHBEARER),
  Google's XOAUTH2 (the same bearer token in an older framing).

Choices made where the RFCs leave room (documented for operators):
- A space (or several) after "FROM:" / "TO:" is tolerated; angle brackets are required.
- General address literals (`[tag:content]`) are refused: only IPv4 and `IPv6:` literals.
- "<" and ">" are refused even inside a quoted local part, so an address never contains them.
- The bare `<postmaster>` recipient (any case) is returned as exactly "postmaster".
- xtext hex digits are accepted in either case (RFC 3461 asks senders for upper case).
- The local part is not limited to 64 octets (RFC 5321 §4.5.3.1.1 asks servers to be liberal),
  but the whole path is limited to 256 octets (§4.5.3.1.3) and the domain to 255 (§4.5.3.1.2).
"""

from __future__ import annotations

import binascii
import re
from typing import Final, Literal

from mailgate import replies
from mailgate.errors import ProtocolViolation
from mailgate.netaddr import address_literal
from mailgate.smtp.events import MailFrom, RcptTo

# --- address grammar (RFC 5321 §4.1.2, extended by RFC 6531 §3.3) ---------------------------
# UTF8-non-ascii (RFC 6532 §3.1), without the C1 controls and without the surrogates that
# `surrogateescape` uses to carry undecodable bytes: invalid UTF-8 never matches.
_U = "\u00a0-\ud7ff\ue000-\U0010ffff"
_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~" + _U
_DOT_STRING = f"[{_ATEXT}]+(?:\\.[{_ATEXT}]+)*"
# qtextSMTP = %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP = "\" %d32-126; both without
# "<" and ">" (a deliberate narrowing: an address never contains them, so nothing downstream,
# from a Received header to a DSN, can be confused about where an address ends).
_QTEXT = "\\x20\\x21\\x23-\\x3b\\x3d\\x3f-\\x5b\\x5d-\\x7e" + _U
_QUOTED_STRING = f'"(?:[{_QTEXT}]|\\\\[\\x20-\\x3b\\x3d\\x3f-\\x7e])*"'
_LET_DIG = "A-Za-z0-9" + _U
_SUB_DOMAIN = f"[{_LET_DIG}](?:[{_LET_DIG}\\-]*[{_LET_DIG}])?"
_DOMAIN = f"{_SUB_DOMAIN}(?:\\.{_SUB_DOMAIN})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"  # dcontent; checked further by _check_literal
_MAILBOX = f"(?P<local>{_DOT_STRING}|{_QUOTED_STRING})@(?P<domain>{_DOMAIN}|{_LITERAL})"
_ADL = f"@{_DOMAIN}(?:,@{_DOMAIN})*"
_PATH_RE: Final = re.compile(
    f"<(?:(?P<null>)>|(?P<postmaster>(?i:postmaster))>|(?:{_ADL}:)?{_MAILBOX}>)"
)

# --- ESMTP parameters (RFC 5321 §4.1.2: esmtp-keyword, esmtp-value) ---------------------------
_PARAM_RE: Final = re.compile(
    r"(?P<kw>[A-Za-z0-9][A-Za-z0-9\-]*)(?:=(?P<val>[\x21-\x3c\x3e-\x7e]+))?"
)
_XTEXT_RE: Final = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*")
_ATOM_RE: Final = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
_NOTIFY_VALUES: Final = frozenset({"SUCCESS", "FAILURE", "DELAY"})

MAX_PATH_OCTETS: Final = 256  # RFC 5321 §4.5.3.1.3, including the angle brackets
MAX_DOMAIN_OCTETS: Final = 255  # RFC 5321 §4.5.3.1.2
MAX_ENVID_CHARS: Final = 100  # RFC 3461 §4.4
MAX_ORCPT_CHARS: Final = 500  # RFC 3461 §4.2
SASL_MECHANISMS: Final[tuple[str, ...]] = ("PLAIN", "LOGIN")
# Bearer-token mechanisms (RFC 7628 OAUTHBEARER, and Google's XOAUTH2 that preceded it): offered
# only when the server is configured to verify tokens ([auth.oauth]).
TOKEN_MECHANISMS: Final[tuple[str, ...]] = ("OAUTHBEARER", "XOAUTH2")


def _fail(reply: replies.Reply) -> ProtocolViolation:
    return ProtocolViolation(reply)


# --- paths --------------------------------------------------------------------------------


def parse_path(
    text: str, *, allow_null: bool, allow_postmaster: bool, smtputf8: bool
) -> tuple[str, str]:
    """Parse a Reverse-path or Forward-path at the start of `text`.

    Returns (address, rest): the address without brackets and source route ("" for `<>`,
    "postmaster" for the bare postmaster), and the unparsed text after the closing bracket.
    Raises ProtocolViolation: 553 5.6.7 for non-ASCII without SMTPUTF8, 501 5.1.3 for a bad
    address inside brackets, 501 5.5.4 when there are no brackets at all.
    """
    m = _PATH_RE.match(text)
    if m is None:
        if not smtputf8 and not text.isascii():
            raise _fail(replies.UTF8_NOT_REQUESTED)
        raise _fail(replies.BAD_ADDRESS if text.startswith("<") else replies.BAD_ARGUMENTS)
    path, rest = m.group(0), text[m.end() :]
    if not smtputf8 and not path.isascii():
        # RFC 6531 §3.2: without SMTPUTF8 on MAIL, an address must be ASCII.
        raise _fail(replies.UTF8_NOT_REQUESTED)
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_OCTETS:
        raise _fail(replies.BAD_ADDRESS)
    if m.group("null") is not None:
        if not allow_null:
            raise _fail(replies.BAD_ADDRESS)
        return "", rest
    if m.group("postmaster") is not None:
        if not allow_postmaster:
            raise _fail(replies.BAD_ADDRESS)
        return "postmaster", rest
    local, domain = m.group("local"), m.group("domain")
    if domain.startswith("["):
        _check_literal(domain)
    else:
        _check_domain(domain)
    return f"{local}@{domain}", rest


def _check_domain(domain: str) -> None:
    """RFC 1035 §2.3.4 lengths: labels up to 63 octets, the name up to 255."""
    if len(domain.encode("utf-8")) > MAX_DOMAIN_OCTETS:
        raise _fail(replies.BAD_ADDRESS)
    for label in domain.split("."):
        if len(label.encode("utf-8")) > 63:
            raise _fail(replies.BAD_ADDRESS)


def _check_literal(literal: str) -> None:
    """RFC 5321 §4.1.3: `[1.2.3.4]` or `[IPv6:...]`; general literals are refused."""
    if address_literal(literal) is None:
        raise _fail(replies.BAD_ADDRESS)


def is_valid_address(address: str, *, smtputf8: bool = False) -> bool:
    """True when `address` (without brackets) is an RFC 5321 Mailbox. For tests and callers
    that hold an address from elsewhere (e.g. a configured postmaster)."""
    try:
        found, rest = parse_path(
            f"<{address}>", allow_null=False, allow_postmaster=False, smtputf8=smtputf8
        )
    except ProtocolViolation:
        return False
    return rest == "" and found == address


# --- ESMTP parameters -----------------------------------------------------------------------


def parse_params(text: str) -> dict[str, str | None]:
    """Parse `SP esmtp-param *(SP esmtp-param)` into {KEYWORD: value or None}.

    Keywords are upper-cased; values are kept as given. Extra spaces are tolerated.
    A malformed or repeated parameter raises 501 5.5.4."""
    params: dict[str, str | None] = {}
    if text and not text.startswith(" "):
        raise _fail(replies.BAD_ARGUMENTS)
    for word in text.split():
        m = _PARAM_RE.fullmatch(word)
        if m is None:
            raise _fail(replies.BAD_ARGUMENTS)
        keyword = m.group("kw").upper()
        if keyword in params:
            raise _fail(replies.BAD_ARGUMENTS)
        params[keyword] = m.group("val")
    return params


def decode_xtext(text: str) -> str:
    """RFC 3461 §4: xtext to text. The result must be printable ASCII (it ends up in DSNs,
    where a CR or LF would let a client inject header lines). Raises 501 5.5.4."""
    if _XTEXT_RE.fullmatch(text) is None:
        raise _fail(replies.BAD_ARGUMENTS)
    if "+" not in text:
        return text
    parts = text.split("+")
    out = [parts[0]]
    for part in parts[1:]:
        code = int(part[:2], 16)
        if not 0x20 <= code <= 0x7E:
            raise _fail(replies.BAD_ARGUMENTS)
        out.append(chr(code) + part[2:])
    return "".join(out)


def _flag(params: dict[str, str | None], keyword: str) -> bool:
    """A parameter that takes no value (SMTPUTF8)."""
    if keyword not in params:
        return False
    if params.pop(keyword) is not None:
        raise _fail(replies.BAD_ARGUMENTS)
    return True


def _value(params: dict[str, str | None], keyword: str) -> str | None:
    """A parameter that requires a value."""
    if keyword not in params:
        return None
    value = params.pop(keyword)
    if value is None:
        raise _fail(replies.BAD_ARGUMENTS)
    return value


def parse_mail_args(arg: str, *, requiretls: bool = False) -> MailFrom:
    """The text after `MAIL `: `FROM:<reverse-path> [params]` (RFC 5321 §4.1.1.2).

    `requiretls`: REQUIRETLS was advertised, so its parameter is accepted (RFC 8689 §4.1);
    otherwise it is an unknown parameter like any other.

    Raises ProtocolViolation with 501 5.5.4 (syntax), 501 5.1.3 (address), 553 5.6.7
    (non-ASCII without SMTPUTF8) or 555 5.5.4 (unknown parameter). The SIZE limit is the
    caller's business."""
    if arg[:5].upper() != "FROM:":
        raise _fail(replies.BAD_ARGUMENTS)
    text = arg[5:].lstrip(" ")
    wants_utf8 = any(word.upper() == "SMTPUTF8" for word in text.split(" ")[1:])
    address, rest = parse_path(text, allow_null=True, allow_postmaster=False, smtputf8=wants_utf8)
    if not rest.isascii():
        raise _fail(replies.BAD_ARGUMENTS)
    params = parse_params(rest)
    smtputf8 = _flag(params, "SMTPUTF8")
    if not smtputf8 and not address.isascii():
        # the word SMTPUTF8 seen above may have been inside a quoted local part
        raise _fail(replies.UTF8_NOT_REQUESTED)
    size: int | None = None
    if (size_text := _value(params, "SIZE")) is not None:
        # RFC 1870 §3: size-value = 1*20DIGIT
        if not (size_text.isdigit() and len(size_text) <= 20):
            raise _fail(replies.BAD_ARGUMENTS)
        size = int(size_text)
    body = _value(params, "BODY")
    if body is not None:
        body = body.upper()
        if body == "BINARYMIME":  # RFC 3030: needs CHUNKING, which is not offered
            raise _fail(replies.PARAM_NOT_RECOGNIZED)
        if body not in ("7BIT", "8BITMIME"):
            raise _fail(replies.BAD_ARGUMENTS)
    ret: Literal["FULL", "HDRS"] | None = None
    if (ret_text := _value(params, "RET")) is not None:
        match ret_text.upper():
            case "FULL":
                ret = "FULL"
            case "HDRS":
                ret = "HDRS"
            case _:
                raise _fail(replies.BAD_ARGUMENTS)
    envid = _value(params, "ENVID")
    if envid is not None:
        envid = decode_xtext(envid)
        if len(envid) > MAX_ENVID_CHARS:
            raise _fail(replies.BAD_ARGUMENTS)
    auth = _value(params, "AUTH")  # RFC 4954 §5: informational; kept as given
    if auth is not None and _XTEXT_RE.fullmatch(auth) is None:
        raise _fail(replies.BAD_ARGUMENTS)
    wants_tls = requiretls and _flag(params, "REQUIRETLS")
    if params:
        raise _fail(replies.PARAM_NOT_RECOGNIZED)
    return MailFrom(address=address, size=size, body=body, smtputf8=smtputf8, ret=ret,
                    envid=envid, auth=auth, requiretls=wants_tls)  # fmt: skip


def parse_rcpt_args(arg: str, *, smtputf8: bool) -> RcptTo:
    """The text after `RCPT `: `TO:<forward-path> [params]` (RFC 5321 §4.1.1.3).

    `smtputf8`: the transaction's MAIL carried SMTPUTF8, so the address may be UTF-8.
    Raises ProtocolViolation like parse_mail_args; `<>` is refused with 501 5.1.3."""
    if arg[:3].upper() != "TO:":
        raise _fail(replies.BAD_ARGUMENTS)
    text = arg[3:].lstrip(" ")
    address, rest = parse_path(text, allow_null=False, allow_postmaster=True, smtputf8=smtputf8)
    if not rest.isascii():
        raise _fail(replies.BAD_ARGUMENTS)
    params = parse_params(rest)
    notify: tuple[str, ...] | None = None
    if (notify_text := _value(params, "NOTIFY")) is not None:
        notify = _parse_notify(notify_text)
    orcpt = _value(params, "ORCPT")
    if orcpt is not None:
        orcpt = _parse_orcpt(orcpt)
    if params:
        raise _fail(replies.PARAM_NOT_RECOGNIZED)
    return RcptTo(address=address, notify=notify, orcpt=orcpt)


def _parse_notify(text: str) -> tuple[str, ...]:
    """RFC 3461 §4.1: "NEVER" alone, or a comma list of SUCCESS, FAILURE, DELAY."""
    values = tuple(v.upper() for v in text.split(","))
    if values == ("NEVER",):
        return values
    if not values or len(set(values)) != len(values) or not _NOTIFY_VALUES.issuperset(values):
        raise _fail(replies.BAD_ARGUMENTS)
    return values


def _parse_orcpt(text: str) -> str:
    """RFC 3461 §4.2: addr-type ";" xtext, returned as "addr-type;decoded"."""
    addr_type, sep, encoded = text.partition(";")
    if not sep or _ATOM_RE.fullmatch(addr_type) is None or not encoded:
        raise _fail(replies.BAD_ARGUMENTS)
    decoded = decode_xtext(encoded)
    if len(addr_type) + 1 + len(decoded) > MAX_ORCPT_CHARS:
        raise _fail(replies.BAD_ARGUMENTS)
    return f"{addr_type};{decoded}"


# --- EHLO / HELO -----------------------------------------------------------------------------


def parse_ehlo_domain(arg: str) -> str:
    """The client's name after EHLO/HELO (RFC 5321 §4.1.1.1).

    Deliberately liberal (RFC 5321 §4.1.4: the server must not refuse a session because the
    name is wrong; Windows hosts send names with underscores): one word of printable ASCII.
    Empty, several words or non-ASCII raise 501 5.5.4."""
    domain = arg.strip(" ")
    if not domain or not domain.isascii() or not domain.isprintable() or " " in domain:
        raise _fail(replies.BAD_ARGUMENTS)
    return domain


# --- SASL (RFC 4954, RFC 4616) ----------------------------------------------------------------


def decode_base64(text: str) -> bytes:
    """Strict base64 of a SASL response (RFC 4954 §4). Raises 501 5.5.2 when undecodable."""
    if not text.isascii():
        raise _fail(replies.AUTH_BAD_ENCODING)
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except binascii.Error:
        raise _fail(replies.AUTH_BAD_ENCODING) from None


def decode_sasl_text(raw: bytes) -> str:
    """A SASL string: UTF-8 without NUL, non-empty (RFC 4616 §2: 1*SAFE). Else 501 5.5.2."""
    if not raw or b"\0" in raw:
        raise _fail(replies.AUTH_BAD_ENCODING)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(replies.AUTH_BAD_ENCODING) from None


def parse_sasl_plain(response: str) -> tuple[str, str]:
    """Decode a SASL PLAIN response (RFC 4616 §2): base64 of authzid NUL authcid NUL passwd.

    Returns (authcid, password). An authorization identity other than empty or the authcid
    itself is refused with 535 5.7.8: mailgate has no proxy authorization, and saying
    "bad credentials" tells a client nothing about which identities exist."""
    raw = decode_base64(response)
    parts = raw.split(b"\0")
    if len(parts) != 3:
        raise _fail(replies.AUTH_BAD_ENCODING)
    authzid_raw, authcid_raw, password_raw = parts
    authcid = decode_sasl_text(authcid_raw)
    password = decode_sasl_text(password_raw)
    if authzid_raw and decode_sasl_text(authzid_raw) != authcid:
        raise _fail(replies.BAD_CREDENTIALS)
    return authcid, password


def parse_oauthbearer(response: str) -> tuple[str, str]:
    """Decode an OAUTHBEARER client response (RFC 7628 §3.1): base64 of
    gs2-header ^A *(key=value ^A) ^A, e.g. "n,a=user@example.com,^Aauth=Bearer TOKEN^A^A".

    Returns (authzid or "", token). Channel binding ("p=") is not supported (RFC 7628 §3.1:
    the gs2 flag must be "n" or "y"); anything malformed is 501 5.5.2."""
    header, pairs = _sasl_pairs(decode_base64(response), header=True)
    fields = header.split(",")  # gs2-cb-flag, [a=authzid], "" (RFC 5801 §4)
    if len(fields) != 3 or fields[0] not in ("n", "y") or fields[2]:
        raise _fail(replies.AUTH_BAD_ENCODING)
    authzid = fields[1]
    if authzid and not authzid.startswith("a="):
        raise _fail(replies.AUTH_BAD_ENCODING)
    # RFC 5801 §4 saslname: "," and "=" are written =2C and =3D.
    user = authzid.removeprefix("a=").replace("=2C", ",").replace("=3D", "=")
    return user, _bearer(pairs)


def parse_xoauth2(response: str) -> tuple[str, str]:
    """Decode an XOAUTH2 client response: base64 of "user=" USER ^A "auth=Bearer " TOKEN ^A ^A.
    Returns (user, token); anything malformed is 501 5.5.2."""
    _, pairs = _sasl_pairs(decode_base64(response), header=False)
    user = pairs.get("user", "")
    if not user:
        raise _fail(replies.AUTH_BAD_ENCODING)
    return user, _bearer(pairs)


def _sasl_pairs(raw: bytes, *, header: bool) -> tuple[str, dict[str, str]]:
    """Split "[header ^A] key=value ^A ... ^A" (RFC 7628 §3.1 kvpairs, ending in an empty one)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(replies.AUTH_BAD_ENCODING) from None
    items = text.split("\x01")
    if len(items) < 3 or items[-2:] != ["", ""] or "\0" in text:
        raise _fail(replies.AUTH_BAD_ENCODING)
    first = items[0] if header else ""
    pairs: dict[str, str] = {}
    for item in items[1 if header else 0 : -2]:
        key, sep, value = item.partition("=")
        if not sep or not key or key in pairs:
            raise _fail(replies.AUTH_BAD_ENCODING)
        pairs[key] = value
    return first, pairs


def _bearer(pairs: dict[str, str]) -> str:
    """The token of "auth=Bearer TOKEN" (RFC 6750 §2.1: the scheme is case-insensitive)."""
    scheme, _, token = pairs.get("auth", "").partition(" ")
    if scheme.lower() != "bearer" or not token or not token.isascii() or not token.isprintable():
        raise _fail(replies.AUTH_BAD_ENCODING)
    return token.strip()
