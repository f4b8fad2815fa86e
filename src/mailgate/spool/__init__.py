"""The durable spool: the hand-off point between receiving and delivery (see store.py)."""
