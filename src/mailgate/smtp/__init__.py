"""The SMTP protocol as sans-IO state machines: bytes in, events out; replies in, bytes out.

Must not: open sockets, use asyncio, read the clock, consult the directory or policy.
"""
