"""mailgate.smtp.data: the DATA reader and dot-stuffing, as plain functions.

Property tests: encode_data(text) fed in any chunk split gives back exactly `text`; arbitrary
bytes never raise; and a message only ever ends at CRLF "." CRLF with no bare CR/LF before it.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.errors import UsageError
from mailgate.smtp.data import MAX_HELD_LINE, DataProgress, DataReader, Violation, encode_data

BIG = 10**9


def read_all(chunks: list[bytes], max_size: int = BIG) -> tuple[bytes, DataProgress, DataReader]:
    """Feed chunks until the reader is done or stops; return the text, last progress, reader."""
    reader = DataReader(max_size)
    text = b""
    progress = DataProgress(b"")
    for chunk in chunks:
        progress = reader.feed(chunk)
        text += progress.chunk
        if progress.is_done or progress.violation:
            break
    return text, progress, reader


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


def test_simple_message() -> None:
    text, progress, reader = read_all([b"Subject: x\r\n\r\nbody\r\n.\r\n"])
    assert text == b"Subject: x\r\n\r\nbody\r\n"
    assert progress.is_done and progress.leftover == b"" and progress.violation is None
    assert reader.size == len(text) and not reader.too_big and not reader.bad_line


def test_empty_message() -> None:
    text, progress, _ = read_all([b".\r\nQUIT\r\n"])
    assert (text, progress.is_done, progress.leftover) == (b"", True, b"QUIT\r\n")


def test_dot_unstuffing() -> None:
    text, _, _ = read_all([b"..\r\n.a\r\n...b\r\nc.\r\n.\r\n"])
    assert text == b".\r\na\r\n..b\r\nc.\r\n"


def test_leftover_is_returned() -> None:
    _, progress, _ = read_all([b"a\r\n.\r\nMAIL FROM:<x@y.z>\r\nRCPT"])
    assert progress.leftover == b"MAIL FROM:<x@y.z>\r\nRCPT"


def test_one_chunk_per_feed() -> None:
    reader = DataReader(BIG)
    progress = reader.feed(b"line 1\r\nline 2\r\nline 3 incompl")
    assert progress == DataProgress(b"line 1\r\nline 2\r\n")
    progress = reader.feed(b"ete\r\n.\r\n")
    assert progress == DataProgress(b"line 3 incomplete\r\n", is_done=True)


@pytest.mark.parametrize(
    "pieces",
    [
        [b"a\r\n", b".\r\n"],
        [b"a\r\n.", b"\r\n"],
        [b"a\r\n.\r", b"\n"],
        [b"a\r", b"\n.\r\n"],
        [b"a", b"\r", b"\n", b".", b"\r", b"\n"],
    ],
)
def test_end_split_anywhere(pieces: list[bytes]) -> None:
    text, progress, _ = read_all(pieces)
    assert (text, progress.is_done) == (b"a\r\n", True)


@pytest.mark.parametrize(
    "data",
    [
        b"a\n.\n",
        b"a\n.\r\n",
        b"a\r\n.\n",
        b"a\r.\r",
        b"a\r\n.\r",
        b"a\r.\r\n",
        b"a\n\r\n.\r\n",
        b"a\rb\r\n.\r\n",
        b"a\nb\r\n.\r\n",
        b"\n.\r\n",
        b"\r.\r\n",
    ],
)
def test_bare_cr_or_lf_is_a_violation(data: bytes) -> None:
    # followed by more text and a proper end, as a smuggling attempt would be
    _, progress, _ = read_all([data + b"\r\nMAIL FROM:<x@y.z>\r\n\r\n.\r\n"])
    assert progress.violation is Violation.BARE_CR_OR_LF
    assert not progress.is_done and progress.chunk == b""


def test_bare_lf_split_across_feeds() -> None:
    reader = DataReader(BIG)
    assert reader.feed(b"abc\r").violation is None
    assert reader.feed(b"x\r\n").violation is Violation.BARE_CR_OR_LF


def test_nul_is_a_violation() -> None:
    _, progress, _ = read_all([b"a\0b\r\n.\r\n"])
    assert progress.violation is Violation.NUL


def test_bytes_after_the_end_are_not_checked() -> None:
    _, progress, _ = read_all([b"a\r\n.\r\nNOOP\n\0"])
    assert progress.violation is None and progress.leftover == b"NOOP\n\0"


def test_feed_after_end_is_a_usage_error() -> None:
    reader = DataReader(BIG)
    reader.feed(b".\r\n")
    with pytest.raises(UsageError):
        reader.feed(b"x")


def test_size_limit_stops_chunks_and_reads_to_the_end() -> None:
    reader = DataReader(10)
    assert reader.feed(b"12345678\r\n").chunk == b"12345678\r\n"  # exactly 10: allowed
    assert not reader.too_big
    assert reader.feed(b"x\r\n").chunk == b""
    progress = reader.feed(b"more\r\n" * 100 + b".\r\nQUIT\r\n")
    assert progress == DataProgress(b"", is_done=True, leftover=b"QUIT\r\n")
    assert reader.too_big and reader.size == 10 + 3 + 600


def test_size_counts_unstuffed_octets() -> None:
    reader = DataReader(BIG)
    reader.feed(b"..x\r\n.\r\n")
    assert reader.size == 4


def test_line_of_998_is_fine_999_is_not() -> None:
    _, _, reader = read_all([b"a" * 998 + b"\r\n.\r\n"])
    assert not reader.bad_line
    _, _, reader = read_all([b"." + b"a" * 998 + b"\r\n.\r\n"])  # the stuffed dot does not count
    assert not reader.bad_line
    text, progress, reader = read_all([b"x\r\n" + b"a" * 999 + b"\r\n.\r\n"])
    assert reader.bad_line and progress.is_done and text == b"x\r\n" + b"a" * 999 + b"\r\n"


def test_endless_line_is_passed_on_not_held() -> None:
    reader = DataReader(BIG)
    total = b""
    for _ in range(50):
        progress = reader.feed(b"." + b"z" * 9999)
        total += progress.chunk
    progress = reader.feed(b"\r\n.\r\n")
    total += progress.chunk
    assert progress.is_done and reader.bad_line
    # every feed's leading "." is text in the middle of a line, only the very first is stuffing
    assert total == (b"z" * 9999 + (b"." + b"z" * 9999) * 49 + b"\r\n")


def test_held_line_is_bounded() -> None:
    reader = DataReader(BIG)
    for _ in range(20):
        reader.feed(b"y" * 3000)
        assert len(reader._held) <= MAX_HELD_LINE + 3000  # white-box: memory stays bounded


def test_long_line_ending_in_cr_keeps_the_cr() -> None:
    reader = DataReader(BIG)
    first = reader.feed(b"w" * (MAX_HELD_LINE + 10) + b"\r")
    assert first.chunk == b"w" * (MAX_HELD_LINE + 10)
    second = reader.feed(b"\n.\r\n")
    assert second == DataProgress(b"\r\n", is_done=True)


def test_long_line_with_bare_cr_is_a_violation() -> None:
    reader = DataReader(BIG)
    assert reader.feed(b"w" * (MAX_HELD_LINE + 10) + b"\rw").violation is Violation.BARE_CR_OR_LF


def test_encode_data() -> None:
    assert encode_data(b"") == b".\r\n"
    assert encode_data(b"a") == b"a\r\n.\r\n"
    assert encode_data(b".a\r\n.\r\nb\r\n") == b"..a\r\n..\r\nb\r\n.\r\n"


# --- properties ---------------------------------------------------------------------------------
LINE_BYTES = bytes(b for b in range(1, 256) if b not in (10, 13))
lines = st.binary(max_size=60).map(lambda b: bytes(LINE_BYTES[x % len(LINE_BYTES)] for x in b))
dotty_lines = st.one_of(lines, lines.map(lambda b: b"." + b), st.just(b"."), st.just(b""))
texts = st.lists(dotty_lines, max_size=30).map(lambda ls: b"".join(x + b"\r\n" for x in ls))


@given(texts, st.lists(st.integers(min_value=0), max_size=20), st.binary(max_size=20))
def test_dot_stuffing_round_trips_in_any_split(text: bytes, cuts: list[int], after: bytes) -> None:
    wire = encode_data(text) + after
    got, progress, reader = read_all(split(wire, cuts))
    assert got == text
    assert progress.is_done and progress.violation is None
    assert reader.size == len(text)
    # the leftover is whatever came after the end-of-data line in the last fed chunk
    assert after.startswith(progress.leftover) or progress.leftover == b""


@given(st.lists(st.binary(max_size=300), max_size=10), st.integers(min_value=1, max_value=500))
def test_arbitrary_bytes_never_raise(chunks: list[bytes], max_size: int) -> None:
    text, progress, _ = read_all(chunks, max_size)
    assert len(text) <= max_size
    if progress.violation is None:
        assert b"\0" not in text
        assert text.count(b"\r") == text.count(b"\n") == text.count(b"\r\n")


@given(texts, st.sampled_from([b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\r\r\n"]),
       st.lists(st.integers(min_value=0), max_size=10))  # fmt: skip
def test_smuggled_end_never_ends_a_message(text: bytes, fake_end: bytes, cuts: list[int]) -> None:
    stuffed = encode_data(text)[: -len(b".\r\n")]
    wire = stuffed + b"x" + fake_end + b"MAIL FROM:<evil@x.test>\r\n.\r\n"
    _, progress, _ = read_all(split(wire, cuts))
    assert progress.violation is Violation.BARE_CR_OR_LF
    assert not progress.is_done


@given(
    st.lists(
        st.sampled_from([0, 1, 76, 997, 998, 999, 1000, 2100]) | st.integers(0, 2500),
        min_size=1,
        max_size=12,
    ),
    st.integers(1, 4096),
)
def test_a_long_line_is_noticed_wherever_the_blocks_cut_the_text(
    lengths: list[int], read: int
) -> None:
    # The line-length check jumps a window at a time (no split per line): it must agree with
    # the plain definition, RFC 5321 §4.5.3.1.6's 998 octets, whatever the line lengths.
    text = b"".join(b"x" * n + b"\r\n" for n in lengths)
    reader = DataReader(max_message_size=10_000_000)
    wire = text + b".\r\n"
    for i in range(0, len(wire), read):
        reader.feed(wire[i : i + read])
    assert reader.bad_line is (max(lengths) > 998)
