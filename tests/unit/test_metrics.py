"""metrics.py: every metric has labels, so none makes its value before `cli serve` picks the
multiprocess storage (a value made at import time would count in memory, unseen by /metrics)."""

from __future__ import annotations

from prometheus_client.metrics import MetricWrapperBase

from mailgate import metrics


def test_every_metric_has_labels() -> None:
    defined = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    assert len(defined) >= 15
    assert [m._name for m in defined if not m._labelnames] == []


def test_render_without_multiprocess_shows_the_default_registry() -> None:
    metrics.RELOADS.labels("ok").inc()
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    assert b'mailgate_reloads_total{result="ok"}' in body
