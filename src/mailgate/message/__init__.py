"""Message fix-ups: trace and identity headers (stamp.py) and DKIM signing (dkim.py)."""
