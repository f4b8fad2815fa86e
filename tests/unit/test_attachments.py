"""The blocked-file-type check (mailgate.scan.attachments): pure, no sockets, no clamd.

Every blocked-name form of issue #4, executables by content, archives allowed, the bounds
on MIME bombs (refused quickly, in little memory), structures that another parser could read
differently, and a property test that no input makes the walker raise anything but
Rejected(BAD_MIME).
"""

from __future__ import annotations

import base64
import io
import quopri
import tracemalloc
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate import replies
from mailgate.config import DEFAULT_BLOCKED_EXTENSIONS
from mailgate.errors import Rejected
from mailgate.scan.attachments import (
    MAX_DEPTH,
    MAX_PARTS,
    Blocked,
    check_file_types,
    executable_kind,
    extension_of,
    find_blocked,
    is_blocked_name,
)

BLOCKED = DEFAULT_BLOCKED_EXTENSIONS

# Minimal files with the right magic numbers.
PE = b"MZ" + b"\x90" * 58 + (0x80).to_bytes(4, "little") + b"\0" * 0x40 + b"PE\0\0" + b"\0" * 200
ELF = b"\x7fELF\x02\x01\x01" + b"\0" * 100
MACHO_64 = b"\xcf\xfa\xed\xfe\x07\x00\x00\x01" + b"\0" * 100
MACHO_FAT = b"\xca\xfe\xba\xbe\x00\x00\x00\x02" + b"\0" * 100
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + b"\0" * 40
JPEG = b"\xff\xd8\xff\xe0\0\x10JFIF\0" + b"\0" * 40


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def part(headers: str, body: bytes = b"x") -> bytes:
    """One MIME entity: header lines (joined with CRLF) and a body."""
    head = "\r\n".join(line for line in headers.strip().splitlines())
    return head.encode("utf-8") + b"\r\n\r\n" + body


def attachment(
    disposition: str, body: bytes = b"hello", ctype: str = "application/octet-stream"
) -> bytes:
    return part(f"Content-Type: {ctype}\nContent-Disposition: {disposition}", body)


def multipart(*parts: bytes, boundary: str = "b-1", subtype: str = "mixed") -> bytes:
    """A multipart entity (without top-level RFC 5322 fields)."""
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    body += b"--" + boundary.encode() + b"--\r\n"
    return part(f'Content-Type: multipart/{subtype}; boundary="{boundary}"', body)


def message(entity: bytes) -> bytes:
    """A top-level message around one entity."""
    return (
        b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: t\r\nMIME-Version: 1.0\r\n"
        + entity
    )


def with_text(*attachments: bytes) -> bytes:
    return message(multipart(part("Content-Type: text/plain", b"see attached"), *attachments))


# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "ext"),
    [
        ("evil.exe", "exe"),
        ("EVIL.EXE", "exe"),
        ("invoice.pdf.exe", "exe"),
        ("invoice.exe.pdf", "pdf"),
        ("evil.exe.", "exe"),
        ("evil.exe...", "exe"),
        ("evil.exe   ", "exe"),
        ("evil.exe . .", "exe"),
        ("C:\\Users\\x\\evil.exe", "exe"),
        ("../../evil.exe", "exe"),
        ("evil.ｅｘｅ", "exe"),  # full-width letters: NFKC
        ("invoice\u202efdp.exe", "exe"),  # right-to-left override shows "invoiceexe.pdf"
        ("evil.e\u200bxe", "exe"),  # zero-width space
        ("README", ""),
        ("archive.tar.gz", "gz"),
        (".exe", "exe"),
        ("", ""),
    ],
)
def test_extension_of(filename: str, ext: str) -> None:
    assert extension_of(filename) == ext


def test_is_blocked_name_ignores_dots_and_case_in_the_list() -> None:
    assert is_blocked_name("a.EXE", [".Exe"])
    assert not is_blocked_name("a.exe.zip", ["exe"])


@pytest.mark.parametrize("ext", BLOCKED)
def test_every_default_extension_is_blocked(ext: str) -> None:
    msg = with_text(attachment(f'attachment; filename="file.{ext}"'))
    assert find_blocked(msg, BLOCKED) == Blocked(f"file.{ext}", f"extension .{ext}")


# (header lines of the attachment, the name the refusal names)
NAME_FORMS = [
    ('Content-Disposition: attachment; filename="evil.exe"', "evil.exe"),
    ("Content-Disposition: attachment; filename=evil.exe", "evil.exe"),
    ("Content-Disposition: ATTACHMENT; FILENAME=EVIL.EXE", "EVIL.EXE"),
    ('Content-Disposition: inline; filename="invoice.pdf.exe"', "invoice.pdf.exe"),
    ('Content-Disposition: attachment; filename="evil.exe..."', "evil.exe..."),
    ('Content-Disposition: attachment; filename="evil.exe   "', "evil.exe   "),
    ('Content-Disposition: attachment; filename="evil.exe. . "', "evil.exe. . "),
    # Content-Type name only (RFC 2046 §4.5.1, still what many clients use)
    ('Content-Type: application/octet-stream; name="setup.exe"', "setup.exe"),
    # RFC 2231 §4: charset and language, percent-encoded
    ("Content-Disposition: attachment; filename*=UTF-8''%65vil%2Eexe", "evil.exe"),
    ("Content-Disposition: attachment; filename*=iso-8859-1'fr'r%E9sum%E9.scr", "résumé.scr"),
    # RFC 2231 §3: continuations, plain and encoded
    ('Content-Disposition: attachment; filename*0="inv"; filename*1="oice.bat"', "invoice.bat"),
    (
        "Content-Disposition: attachment;"
        " filename*0*=UTF-8''f%C3%BCr; filename*1*=.v; filename*2=bs",
        "für.vbs",
    ),
    # RFC 2047 encoded words inside a quoted parameter (not allowed, widely produced)
    ('Content-Disposition: attachment; filename="=?UTF-8?B?aW52b2ljZS5leGU=?="', "invoice.exe"),
    ('Content-Type: application/x-foo; name="=?iso-8859-1?Q?r=E9sum=E9=2Ejs?="', "résumé.js"),
    # a harmless Content-Disposition name does not hide a blocked Content-Type name
    (
        'Content-Type: application/octet-stream; name="run.cmd"\n'
        'Content-Disposition: attachment; filename="notes.txt"',
        "run.cmd",
    ),
    # duplicated Content-Disposition: a client may honour either
    (
        'Content-Disposition: attachment; filename="notes.txt"\n'
        'Content-Disposition: attachment; filename="run.pif"',
        "run.pif",
    ),
    # a broken header (unterminated quote) still names the file
    ('Content-Disposition: attachment; filename="broken.hta', "broken.hta"),
    ('Content-Disposition: attachment; filename="C:\\\\temp\\\\tool.msi"', "C:\\temp\\tool.msi"),
]


@pytest.mark.parametrize(("headers", "name"), NAME_FORMS)
def test_blocked_name_forms(headers: str, name: str) -> None:
    if "Content-Type:" not in headers:
        headers = "Content-Type: application/octet-stream\n" + headers
    msg = with_text(part(headers, b"data"))
    found = find_blocked(msg, BLOCKED)
    assert found is not None
    assert found.name == name


def test_check_file_types_refuses_with_the_exact_reply() -> None:
    msg = with_text(attachment('attachment; filename="invoice.pdf.exe"'))
    with pytest.raises(Rejected) as info:
        check_file_types(msg, BLOCKED)
    assert info.value.reply == replies.blocked_file("invoice.pdf.exe")
    assert info.value.reply.line() == (
        "554 5.7.1 Message rejected: attachment 'invoice.pdf.exe' is a blocked file type;"
        " put it in a zip archive and send it again"
    )


def test_name_with_control_characters_is_printable_in_the_reply() -> None:
    msg = with_text(attachment("attachment; filename*=UTF-8''a%0D%0A250%20ok.exe"))
    with pytest.raises(Rejected) as info:
        check_file_types(msg, BLOCKED)
    assert "\r" not in info.value.reply.line() and "\n" not in info.value.reply.line()
    assert info.value.reply.code == 554 and info.value.reply.status == "5.7.1"


@pytest.mark.parametrize(
    "filename",
    ["report.pdf", "photo.jpg", "setup.exe.zip", "tools.7z", "notes.exe.txt", "exe", "README"],
)
def test_harmless_names_pass(filename: str) -> None:
    msg = with_text(attachment(f'attachment; filename="{filename}"', PDF))
    assert find_blocked(msg, BLOCKED) is None


def test_blocked_list_comes_from_the_configuration() -> None:
    msg = with_text(attachment('attachment; filename="data.iso"'))
    assert find_blocked(msg, BLOCKED) is None
    assert find_blocked(msg, ["iso"]) == Blocked("data.iso", "extension .iso")
    assert find_blocked(with_text(attachment('attachment; filename="a.exe"')), []) is None


# --- where the part is ----------------------------------------------------------------


def test_nested_multipart_alternative_and_related() -> None:
    inner = multipart(
        part("Content-Type: text/plain", b"hi"),
        multipart(
            part("Content-Type: text/html", b"<p>hi</p>"),
            attachment('inline; filename="logo.scr"', b"x", ctype="image/png"),
            boundary="rel",
            subtype="related",
        ),
        boundary="alt",
        subtype="alternative",
    )
    found = find_blocked(message(multipart(inner, boundary="top")), BLOCKED)
    assert found == Blocked("logo.scr", "extension .scr")


def test_forwarded_message_rfc822_is_walked() -> None:
    forwarded = b"From: carol@example.net\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n" + multipart(
        part("Content-Type: text/plain", b"original"),
        attachment('attachment; filename="payload.exe"', b64(b"data")).replace(
            b"\r\n\r\n", b"\r\nContent-Transfer-Encoding: base64\r\n\r\n", 1
        ),
        boundary="inner",
    )
    msg = with_text(part("Content-Type: message/rfc822", forwarded))
    assert find_blocked(msg, BLOCKED) == Blocked("payload.exe", "extension .exe")


def test_first_blocked_part_in_document_order_is_named() -> None:
    msg = with_text(
        attachment('attachment; filename="ok.pdf"', PDF),
        attachment('attachment; filename="first.bat"'),
        attachment('attachment; filename="second.exe"'),
    )
    assert find_blocked(msg, BLOCKED) == Blocked("first.bat", "extension .bat")


def test_uuencoded_attachment_in_a_text_body() -> None:
    body = b"Here it is:\r\n\r\nbegin 644 tool.exe\r\nM35H``\r\n`\r\nend\r\n"
    msg = message(part("Content-Type: text/plain", body))
    assert find_blocked(msg, BLOCKED) == Blocked("tool.exe", "uuencoded, extension .exe")


# --- content -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (PE, "a PE executable"),
        (b"MZ" + b"\0" * 10, "an MZ executable"),
        (ELF, "an ELF executable"),
        (MACHO_64, "a Mach-O executable"),
        (b"\xfe\xed\xfa\xce" + b"\0" * 8, "a Mach-O executable"),
        (MACHO_FAT, "a Mach-O executable"),
        (PDF, None),
        (PNG, None),
        (JPEG, None),
        (b"PK\x03\x04", None),
        (b"", None),
    ],
)
def test_executable_kind(data: bytes, kind: str | None) -> None:
    assert executable_kind(data) == kind


def test_text_starting_with_mz_is_not_an_executable() -> None:
    assert (
        executable_kind(b"MZ Hotel booking confirmation for next week, room 12", is_text=True)
        is None
    )
    assert executable_kind(PE, is_text=True) == "a PE executable"


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        (
            'Content-Type: image/jpeg; name="photo.jpg"\nContent-Transfer-Encoding: base64',
            b64(PE),
            Blocked("photo.jpg", "content is a PE executable"),
        ),
        (
            "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64",
            b64(ELF),
            Blocked("part 2 (application/octet-stream)", "content is an ELF executable"),
        ),
        (
            'Content-Type: application/pdf; name="doc.pdf"\n'
            "Content-Transfer-Encoding: quoted-printable",
            quopri.encodestring(MACHO_FAT).replace(b"\n", b"\r\n"),
            Blocked("doc.pdf", "content is a Mach-O executable"),
        ),
        (
            'Content-Type: text/plain; name="readme.txt"\nContent-Transfer-Encoding: base64',
            b64(PE),
            Blocked("readme.txt", "content is a PE executable"),
        ),
    ],
)
def test_executable_content_under_a_harmless_name(
    headers: str, body: bytes, expected: Blocked
) -> None:
    assert find_blocked(with_text(part(headers, body)), BLOCKED) == expected


def test_large_base64_executable_is_found_from_its_prefix() -> None:
    body = b64(PE + bytes(range(256)) * 4096)  # ~1 MiB
    msg = with_text(
        part("Content-Type: image/png; name=big.png\nContent-Transfer-Encoding: base64", body)
    )
    assert find_blocked(msg, BLOCKED) == Blocked("big.png", "content is a PE executable")


def zip_of(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()


def test_zipped_executable_passes_the_file_type_check() -> None:
    archive = zip_of("setup.exe", PE)
    msg = with_text(
        part(
            'Content-Type: application/zip; name="setup.zip"\nContent-Transfer-Encoding: base64',
            b64(archive),
        )
    )
    assert find_blocked(msg, BLOCKED) is None


def test_clean_mail_with_pdfs_and_images_passes() -> None:
    msg = with_text(
        part(
            'Content-Type: application/pdf; name="a.pdf"\nContent-Transfer-Encoding: base64',
            b64(PDF),
        ),
        part('Content-Type: image/png; name="b.png"\nContent-Transfer-Encoding: base64', b64(PNG)),
        part(
            'Content-Type: image/jpeg\nContent-Disposition: inline; filename="c.jpg"\n'
            "Content-Transfer-Encoding: base64",
            b64(JPEG),
        ),
        part("Content-Type: text/html; charset=utf-8", "<p>Grüße</p>".encode()),
    )
    assert find_blocked(msg, BLOCKED) is None


def test_plain_message_without_mime_passes() -> None:
    assert find_blocked(b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n", BLOCKED) is None
    assert find_blocked(b"", BLOCKED) is None


# --- bounds ---------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    """`depth` multiparts each inside the previous one, below the top-level message."""
    head = b"From: a@example.org\r\nMIME-Version: 1.0\r\n"
    opening = b"".join(
        b'Content-Type: multipart/mixed; boundary="n%d"\r\n\r\n--n%d\r\n' % (i, i)
        for i in range(depth + 1)
    )
    closing = b"".join(b"\r\n--n%d--\r\n" % i for i in reversed(range(depth + 1)))
    return head + opening + b"Content-Type: text/plain\r\n\r\nbottom" + closing


def refusal(msg: bytes, max_depth: int = MAX_DEPTH, max_parts: int = MAX_PARTS) -> Rejected:
    with pytest.raises(Rejected) as info:
        find_blocked(msg, BLOCKED, max_depth=max_depth, max_parts=max_parts)
    assert info.value.reply == replies.BAD_MIME
    assert (
        info.value.reply.line() == "554 5.6.0 Message structure too deep or too broken to inspect"
    )
    return info.value


def test_depth_up_to_the_limit_is_inspected() -> None:
    # The top multipart is depth 0; its descendants reach MAX_DEPTH with the text part.
    assert find_blocked(nested(MAX_DEPTH - 1), BLOCKED) is None
    assert "deeper than 20" in refusal(nested(MAX_DEPTH)).reason


# How fast these bombs are refused is measured by bench/bench_mime_bombs.py, not asserted here:
# a loaded machine would make any bound on the clock flaky.


def test_nested_bomb_is_refused_in_little_memory() -> None:
    bomb = nested(20_000)  # ~1 MB of nesting
    tracemalloc.start()
    try:
        refusal(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024  # the parse stops at depth 21, far before the end of input


def test_message_rfc822_nesting_bomb_is_refused() -> None:
    bomb = b"From: a@example.org\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * 5000 + b"x\r\n"
    assert "deeper than" in refusal(bomb).reason


def test_part_count_up_to_the_limit_is_inspected() -> None:
    # The top-level message is the multipart itself: it and its children make MAX_PARTS.
    siblings = [part("Content-Type: text/plain", b"p") for _ in range(MAX_PARTS - 1)]
    assert find_blocked(message(multipart(*siblings)), BLOCKED) is None
    siblings.append(part("Content-Type: text/plain", b"p"))
    assert "too many MIME parts" in refusal(message(multipart(*siblings))).reason


def test_flat_bomb_is_refused() -> None:
    bomb = message(
        b'Content-Type: multipart/mixed; boundary="f"\r\n\r\n' + b"--f\r\n\r\nx\r\n" * 200_000
    )
    assert "too many MIME parts" in refusal(bomb).reason


def encoded_words_field(count: int) -> bytes:
    return b'Content-Disposition: attachment; filename="' + b"=?utf-8?q?a?= " * count + b'"'


def test_long_mime_header_fields_are_refused_before_they_are_parsed() -> None:
    # policy.default takes seconds on 280 KB of encoded words; the bound refuses at once.
    msg = message(part(encoded_words_field(20_000).decode(), b"x"))
    assert "Content-Disposition field longer than 16384" in refusal(msg).reason
    # Just under the bound it is parsed.
    assert find_blocked(message(part(encoded_words_field(1_100).decode(), b"x")), BLOCKED) is None


def test_repeated_mime_header_fields_are_refused() -> None:
    msg = message(part("Content-Type: text/plain\n" * 5, b"x"))
    assert "Content-Type field repeated more than 4 times" in refusal(msg).reason


def test_total_size_of_mime_header_fields_is_bounded() -> None:
    field = "Content-Type: application/pdf; name=" + "n" * 16_000 + ".pdf"
    msg = message(multipart(*(part(field, b"x") for _ in range(40))))  # 40 x 16 KB
    assert "MIME header fields longer than 524288" in refusal(msg).reason


def test_bounds_are_parameters() -> None:
    refusal(nested(3), max_depth=3)
    assert find_blocked(with_text(attachment("inline")), BLOCKED, max_parts=3) is None
    refusal(with_text(attachment("inline")), max_parts=2)


# --- ambiguity -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "why"),
    [
        (
            message(b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nhidden\r\n--x--\r\n"),
            "boundary",
        ),
        (
            message(b'Content-Type: multipart/mixed; boundary="y"\r\n\r\n--x\r\n\r\nhi\r\n'),
            "boundary",
        ),
        (
            message(
                b"Content-Type: (c) multipart/mixed; boundary=x\r\n\r\n--x\r\n\r\nhi\r\n--x--\r\n"
            ),
            "container",
        ),
        (
            message(
                b"Content-Type: text/plain\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n"
            ),
            "conflicting",
        ),
        (
            with_text(
                part(
                    "Content-Type: message/rfc822\nContent-Transfer-Encoding: base64",
                    b64(b"From: a\r\n\r\nx"),
                )
            ),
            "encoded message/rfc822",
        ),
    ],
)
def test_ambiguous_structures_are_refused(msg: bytes, why: str) -> None:
    assert why in refusal(msg).reason


def test_stdlib_exceptions_become_bad_mime_with_their_cause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Fuzzing found no input that makes the email package raise, so the guard is shown with
    # a stdlib decoder that fails the way a future bug might.
    def broken(data: bytes, header: bool = False) -> bytes:
        raise RuntimeError("simulated decoder bug")

    monkeypatch.setattr(quopri, "decodestring", broken)
    msg = with_text(part("Content-Type: text/plain\nContent-Transfer-Encoding: quoted-printable"))
    error = refusal(msg)
    assert error.reason.startswith("MIME walk failed: RuntimeError at test_attachments.py:")
    assert isinstance(error.__cause__, RuntimeError)


# --- fuzzing ---------------------------------------------------------------------------

_HEADER_NAMES = [
    "Content-Type",
    "Content-Disposition",
    "Content-Transfer-Encoding",
    "Subject",
    "X-A",
]
_HEADER_VALUES = [
    "multipart/mixed; boundary=b",
    'multipart/alternative; boundary="c"',
    "message/rfc822",
    "multipart/digest; boundary=b",
    "text/plain; charset=unknown-8bit",
    "application/octet-stream; name*=bogus''%ff%fe.exe",
    "attachment; filename*0*=x''a; filename*1=.exe",
    'attachment; filename="=?utf-8?q?=FF=FE?="',
    'attachment; filename="=?x-unknown?b?!!!?="',
    "base64",
    "quoted-printable",
    "x-uuencode",
    "(comment) multipart/mixed; boundary=b",
    "multipart/mixed; boundary=",
    "",
]
_LINES = [
    b"--b",
    b"--b--",
    b"--c",
    b"--c--",
    b"",
    b"begin 644 x.exe",
    b"MZ",
    b"=?=",
    b"\xff\xfe",
    b"A" * 80,
]


@st.composite
def mime_like(draw: st.DrawFn) -> bytes:
    """Messages made of MIME-significant pieces in random order: headers, boundaries, bodies."""
    lines: list[bytes] = []
    for _ in range(draw(st.integers(0, 40))):
        if draw(st.booleans()):
            name = draw(st.sampled_from(_HEADER_NAMES))
            value = draw(st.sampled_from(_HEADER_VALUES) | st.text(max_size=30))
            lines.append(f"{name}: {value}".encode("utf-8", "surrogatepass"))
        else:
            lines.append(draw(st.sampled_from(_LINES) | st.binary(max_size=30)))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    return eol.join(lines)


def _fuzz_once(data: bytes) -> None:
    try:
        result = find_blocked(data, BLOCKED, max_depth=5, max_parts=30)
    except Rejected as e:
        assert e.reply == replies.BAD_MIME
    else:
        assert result is None or isinstance(result, Blocked)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mime_like())
def test_fuzz_mime_like_input_never_raises_unhandled(data: bytes) -> None:
    _fuzz_once(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes_never_raise_unhandled(data: bytes) -> None:
    _fuzz_once(data)


# --- the fast path for messages without MIME fields ----------------------------------------

_FIELD = st.sampled_from([
    b"From: a@b.test", b"To: c@d.test", b"Subject: hi", b"X-Mailer: cron", b"  folded line",
    b"MIME-Version: 1.0", b"Content-Type: text/plain", b"Content-Transfer-Encoding: base64",
    b"content-disposition: attachment; filename=a.exe", b"not a field", b"From nobody", b"\tx",
    b"Subject: =?utf-8?q?caf=C3=A9?=",
])  # fmt: skip
_BODY_LINE = st.sampled_from([
    b"hello", b"MZ", b"MZ\x90\x00", b"\x7fELF\x02\x01", b"begin 644 a.exe", b"", b".",
    b"begin 644 notes.txt", b"begin-base64 644 run.bat ", b"\xcf\xfa\xed\xfe",
    b"TVqQAAMAAAAEAAAA", b"M9V]O9&)Y90``",
])  # fmt: skip


def _outcome(message: bytes) -> object:
    try:
        return find_blocked(message, DEFAULT_BLOCKED_EXTENSIONS)
    except Rejected as e:
        return ("rejected", e.reply)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_FIELD, max_size=6), st.lists(_BODY_LINE, max_size=6), st.booleans())
def test_fast_path_answers_as_the_mime_walk_does(
    fields: list[bytes], body: list[bytes], separator: bool
) -> None:
    import mailgate.scan.attachments as attachments

    message = b"".join(f + b"\r\n" for f in fields)
    message += (b"\r\n" if separator else b"") + b"".join(line + b"\r\n" for line in body)
    fast = _outcome(message)
    original = attachments._plain_body_start
    attachments._plain_body_start = lambda message, section=None: None  # the walk only
    try:
        walked = _outcome(message)
    finally:
        attachments._plain_body_start = original
    assert fast == walked


def test_fast_path_is_taken_only_without_mime_fields() -> None:
    import mailgate.scan.attachments as attachments

    assert attachments._plain_body(b"From: a@b.test\r\nSubject: x\r\n\r\nbody\r\n") == b"body\r\n"
    assert (
        attachments._plain_body(b"From: a@b.test\r\ncontent-TYPE: text/plain\r\n\r\nb\r\n") is None
    )
    assert attachments._plain_body(b"From a@b.test Mon\r\nSubject: x\r\n\r\nbody\r\n") is None
    assert attachments._plain_body(b"Subject: x\r\n") is None
    found = find_blocked(
        b"From: a@b.test\r\n\r\nhi\r\nbegin 644 a.exe\r\n", DEFAULT_BLOCKED_EXTENSIONS
    )
    assert found is not None and found.name == "a.exe"
    found = find_blocked(b"From: a@b.test\r\n\r\n\x7fELF\x02\x01\r\n", DEFAULT_BLOCKED_EXTENSIONS)
    assert found is not None and found.name == "part 1 (text/plain)"
