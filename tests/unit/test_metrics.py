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


def test_the_alert_rules_and_dashboard_name_only_metrics_that_exist() -> None:
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs"
    defined = {m._name for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    # Counters are exposed with _total; histograms as _bucket/_count/_sum; the queue gauges
    # come from the supervisor's collector (cli/running.py).
    exposed = {f"{n}_total" for n in defined} | {
        f"{n}{s}" for n in defined for s in ("", "_bucket", "_count", "_sum")
    }
    exposed |= {"mailgate_queue_messages", "mailgate_queue_oldest_message_age_seconds"}
    for name in ("ops/mailgate-alerts.yml", "ops/mailgate-dashboard.json", "OPERATIONS.md"):
        used = set(re.findall(r"mailgate_[a-z_]+[a-z]", (docs / name).read_text()))
        assert used and used <= exposed, (name, used - exposed)
