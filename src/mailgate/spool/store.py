"""The only code that touches spool files.

Layout (docs/ARCHITECTURE.md):
  spool/tmp/             being received; emptied at startup
  spool/msg/<qid>.eml    message bytes as they will be sent; immutable after commit
  spool/env/<qid>.json   envelope and per-recipient state; its existence means "committed"
  spool/corrupt/         entries that failed to load; kept for the operator

Durability contract: commit() writes+fsyncs the message, renames it into msg/, writes+fsyncs
the envelope, renames it into env/, fsyncs both directories, and only then returns.
ENOSPC/EDQUOT/EFBIG raise SpoolFull; other OS errors raise SpoolError.

TO BE IMPLEMENTED (helper B) -- signatures below are the contract.
"""
