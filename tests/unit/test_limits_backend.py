"""MemoryBackend: sliding-window buckets, top keys, pruning, bounded memory."""

from __future__ import annotations

import logging

import pytest

from mailgate.limits.backend import Backend, MemoryBackend


def test_counts_slide_bucket_by_bucket() -> None:
    backend = MemoryBackend(window=60.0, buckets=6)  # 10 s buckets
    assert backend.add("k", 1, 100.0) == 1
    assert backend.add("k", 2, 109.9) == 3  # same bucket [100, 110)
    assert backend.add("k", 4, 110.0) == 7
    assert backend.count("k", 159.9) == 7
    assert backend.count("k", 160.0) == 4  # bucket [100, 110) has left the window
    assert backend.count("k", 169.9) == 4
    assert backend.count("k", 170.0) == 0
    assert backend.count("missing", 170.0) == 0


def test_adding_zero_and_negative() -> None:
    backend = MemoryBackend()
    assert backend.add("k", 0, 0.0) == 0
    with pytest.raises(ValueError, match="negative"):
        backend.add("k", -1, 0.0)


def test_top_is_highest_first_ties_by_key_and_filtered_by_prefix() -> None:
    backend = MemoryBackend()
    for key, amount in (("a|x", 2), ("a|y", 5), ("a|z", 2), ("b|w", 9), ("a|gone", 0)):
        backend.add(key, amount, 0.0)
    assert backend.top("a|", 10, 0.0) == [("a|y", 5), ("a|x", 2), ("a|z", 2)]
    assert backend.top("a|", 2, 0.0) == [("a|y", 5), ("a|x", 2)]
    assert backend.top("a|", 10, 3600.0) == []


def test_prune_forgets_expired_keys() -> None:
    backend = MemoryBackend(window=60.0, buckets=6)
    backend.add("old", 1, 0.0)
    backend.add("new", 1, 55.0)
    assert backend.prune(65.0) == 1
    assert len(backend) == 1
    assert backend.count("new", 65.0) == 1


def test_memory_is_bounded_by_forgetting_the_least_recently_updated_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = MemoryBackend(max_keys=3)
    backend.add("a", 1, 0.0)
    backend.add("b", 1, 0.0)
    backend.add("c", 1, 0.0)
    backend.add("a", 1, 1.0)  # "b" is now the least recently updated
    with caplog.at_level(logging.WARNING, logger="mailgate.limits.backend"):
        backend.add("d", 1, 2.0)
        backend.add("e", 1, 2.0)
    assert len(backend) == 3
    assert (backend.count("a", 2.0), backend.count("b", 2.0), backend.count("c", 2.0)) == (2, 0, 0)
    assert [r.getMessage() for r in caplog.records] == [
        "ratelimit backend full max_keys=3 forgetting live keys"
    ]


def test_memory_backend_satisfies_the_protocol() -> None:
    backend: Backend = MemoryBackend()
    assert backend.add("k", 3, 0.0) == 3


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="positive"):
        MemoryBackend(buckets=0)
