"""The engine's fast path for a try that delivered everything decides as `_merge` would.

`_record` removes an entry without building its merged envelope when `_all_delivered` says
the results finish it; that must hold exactly when the merged envelope has every recipient
delivered (else a deferred or failed recipient would be lost with the entry)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.config import Config, DeliveryConfig, SpoolConfig
from mailgate.deliver.attempt import RecipientResult
from mailgate.deliver.engine import Engine, _all_delivered
from mailgate.spool.entry import Envelope, Recipient
from mailgate.spool.journal import JournalStore

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ADDRESSES = ["a@x.test", "b@x.test", "c@y.test"]

recipients = st.lists(
    st.builds(
        Recipient,
        address=st.sampled_from(ADDRESSES),
        state=st.sampled_from(["pending", "delivered", "failed"]),
    ),
    min_size=1,
    max_size=4,
)
results = st.lists(
    st.builds(
        RecipientResult,
        address=st.sampled_from(ADDRESSES),
        status=st.sampled_from(["delivered", "deferred", "failed"]),
        reply=st.none(),
        detail=st.just("detail"),
    ),
    max_size=4,
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    tmp = tmp_path_factory.mktemp("engine")
    cfg = Config(
        path=tmp / "mailgate.toml",
        hostname="mail.example.org",
        spool=SpoolConfig(tmp / "spool"),
        delivery=DeliveryConfig(relay="127.0.0.1:2525"),
    )
    return Engine(cfg, JournalStore(cfg.spool.path), now=lambda: NOW)


@settings(max_examples=300)
@given(rcpts=recipients, outcome=results)
def test_all_delivered_agrees_with_the_merged_envelope(
    engine: Engine, rcpts: list[Recipient], outcome: list[RecipientResult]
) -> None:
    env = Envelope(id="Q" * 12, mail_from="s@x.test", recipients=tuple(rcpts), received_at=NOW)
    merged = engine._merge(env, outcome, NOW, warn=[])
    assert _all_delivered(env, outcome) == all(r.state == "delivered" for r in merged.recipients)
