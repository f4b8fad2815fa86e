"""The web pages: mail programs setting themselves up, people reading their settings, and the
operators' pages (INTERFACE.md part 2, "Web: operators and mail programs").

Owns: `[web] listen` (public: Thunderbird autoconfig, Outlook autodiscover, Apple
.mobileconfig, `/settings`), the operator pages that `cli` adds to the `[admin]` application
(`/`, `/trace`), HTTP Basic auth of those pages, and the one HTML escaping rule (`html.py`).
Runs in the supervisor of `mailgate serve`, beside the admin listener.
Must not: accept or deliver mail, change the spool or the directory, or import the stages:
what it shows is handed to it by `cli` as callables (`mailgate.status` gathers the figures,
`tracelog.query` reads a message's story).
"""
