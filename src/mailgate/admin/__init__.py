"""The operators' HTTP side: the `[admin] listen` listener and what it serves.

Owns: the aiohttp application (`app.make_app`, one factory that later web pages extend with
their own routes), `/metrics`, `/healthz` and `/readyz` (INTERFACE.md part 2, "Web"), and the
readiness checks (`health`). It runs in the supervisor of `mailgate serve` (beside the
delivery engine), never in the listener workers, so one address serves every process's metrics.
Must not: accept or deliver mail, or change the spool; only `cli` imports it.
"""
