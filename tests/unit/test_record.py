"""The journal's record format (spool/record.py) on plain bytes, with hypothesis: records
read back as written; a cut anywhere keeps every whole record and names the torn tail; damage
anywhere never raises and never yields a record that was not written."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.spool.record import (
    COMMIT,
    REMOVE,
    SEGMENT_HEADER,
    UPDATE,
    Read,
    Record,
    Tail,
    encode,
    message_offset,
    read_record,
    read_segment_header,
    scan,
    segment_header,
    torn_qid,
)

MAGIC = b"\x07MAGIC\xfe\x01"
SEQ = 7


@dataclass(frozen=True)
class Written:
    kind: int
    qid: str
    envelope: bytes
    message: bytes
    start: int
    end: int


def reader(data: bytes) -> Read:
    """os.pread over bytes."""
    return lambda length, offset: data[offset : offset + length]


qids = st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=6, max_size=32)
records = st.lists(
    st.tuples(
        st.sampled_from([COMMIT, UPDATE, REMOVE]),
        qids,
        st.binary(max_size=200),  # envelope
        st.binary(max_size=600),  # message
        st.integers(min_value=0, max_value=600),  # how much of the message comes as a tail
    ),
    max_size=8,
)


def build(spec: list[tuple[int, str, bytes, bytes, int]]) -> tuple[bytes, list[Written]]:
    """A segment holding the records of `spec`, and where each one is."""
    data = bytearray(segment_header(SEQ, MAGIC))
    written = []
    for kind, qid, envelope, message, tail_size in spec:
        if kind == UPDATE:
            message = b""
        elif kind == REMOVE:
            envelope = message = b""
        start = len(data)
        cut = max(0, len(message) - tail_size)
        tail = None
        if kind == COMMIT and cut < len(message):
            rest = message[cut:]
            tail = Tail(reader(b"pad" + rest), 3, len(rest))
        parts = encode(MAGIC, kind, qid, envelope, (message[:cut],) if kind == COMMIT else (), tail)
        for part in parts:
            data += part
        if tail is not None:
            data += message[cut:]  # the writer appends the tail's bytes itself
        written.append(Written(kind, qid, envelope, message, start, len(data)))
    return bytes(data), written


def same(record: Record, w: Written, data: bytes) -> bool:
    message = data[record.msg_offset : record.msg_offset + record.msg_length]
    return (record.kind, record.qid, record.start, record.end, record.envelope) == (
        w.kind,
        w.qid,
        w.start,
        w.end,
        w.envelope,
    ) and (w.kind != COMMIT or message == w.message)


@given(records)
@settings(max_examples=200, deadline=None)
def test_records_read_back_as_written(spec: list[tuple[int, str, bytes, bytes, int]]) -> None:
    data, written = build(spec)
    assert read_segment_header(reader(data), SEQ) == MAGIC
    found = scan(reader(data), MAGIC, SEGMENT_HEADER.size, len(data))
    assert found.bad == [] and found.torn_at is None and found.end == len(data)
    assert len(found.records) == len(written)
    for record, w in zip(found.records, written, strict=True):
        assert same(record, w, data)
        if w.kind == COMMIT:
            assert record.msg_offset == message_offset(w.start, w.qid, w.envelope)


@given(records, st.data())
@settings(max_examples=200, deadline=None)
def test_a_cut_anywhere_keeps_whole_records_and_names_the_torn_tail(
    spec: list[tuple[int, str, bytes, bytes, int]], draw: st.DataObject
) -> None:
    data, written = build(spec)
    cut = draw.draw(st.integers(min_value=SEGMENT_HEADER.size, max_value=len(data)))
    found = scan(reader(data[:cut]), MAGIC, SEGMENT_HEADER.size, cut)
    whole = [w for w in written if w.end <= cut]
    assert len(found.records) == len(whole)
    assert all(same(r, w, data) for r, w in zip(found.records, whole, strict=True))
    assert found.bad == []
    boundary = cut == SEGMENT_HEADER.size or any(w.end == cut for w in written)
    assert found.torn_at == (None if boundary else found.end)
    if found.torn_at is not None:
        torn = next(w for w in written if w.start == found.torn_at)
        name = torn_qid(reader(data[:cut]), MAGIC, found.torn_at)
        assert name in ("", torn.qid) and (name == "" or torn.kind == COMMIT)


@given(records, st.data())
@settings(max_examples=300, deadline=None)
def test_damage_never_raises_and_never_invents_a_record(
    spec: list[tuple[int, str, bytes, bytes, int]], draw: st.DataObject
) -> None:
    data, written = build(spec)
    if len(data) == SEGMENT_HEADER.size:
        return
    at = draw.draw(st.integers(min_value=SEGMENT_HEADER.size, max_value=len(data) - 1))
    flip = draw.draw(st.integers(min_value=1, max_value=255))
    damaged = bytearray(data)
    damaged[at] ^= flip
    found = scan(reader(bytes(damaged)), MAGIC, SEGMENT_HEADER.size, len(damaged))
    for record in found.records:
        w = next(w for w in written if w.start == record.start)  # only where one was written
        assert w.start > at or w.end <= at  # the damaged record itself never reads back
        assert same(record, w, data)
    # Every record wholly before the damage is kept.
    assert [r.start for r in found.records if r.end <= at] == [
        w.start for w in written if w.end <= at
    ]


@given(st.binary(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_are_no_records(noise: bytes) -> None:
    data = segment_header(SEQ, MAGIC) + noise
    found = scan(reader(data), MAGIC, SEGMENT_HEADER.size, len(data))
    assert found.records == []
    assert read_record(reader(data), MAGIC, SEGMENT_HEADER.size, len(data)) in ("bad", "incomplete")


@pytest.mark.parametrize("at", range(SEGMENT_HEADER.size))
def test_a_segment_header_with_any_byte_changed_is_refused(at: int) -> None:
    head = bytearray(segment_header(SEQ, MAGIC))
    head[at] ^= 0x01
    assert read_segment_header(reader(bytes(head)), SEQ) is None
    assert read_segment_header(reader(segment_header(SEQ, MAGIC)), SEQ + 1) is None
