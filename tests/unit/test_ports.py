"""The tests' port helper never hands out one port twice before a server binds it: two gateways
configured one after the other, then started together, must not share a listener port."""

from __future__ import annotations

from tests.support.ports import free_base, free_port


def test_free_port_draws_distinct_ports_before_any_is_bound() -> None:
    ports = [free_port() for _ in range(400)]
    assert len(set(ports)) == 400


def test_free_base_ranges_do_not_overlap_ports_already_handed_out() -> None:
    offsets = (0, 1, 2, 5)
    singles = {free_port() for _ in range(100)}
    bases = [free_base(offsets) for _ in range(50)]
    ranged = [base + offset for base in bases for offset in offsets]
    assert len(set(ranged)) == len(ranged)
    assert not singles & set(ranged)
