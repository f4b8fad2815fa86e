"""Imports point one way (docs/ARCHITECTURE.md). Fails when an arrow is reversed."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "mailgate"

# package -> mailgate packages/modules it must never import
FORBIDDEN = {
    "smtp": {"receive", "deliver", "accept", "policy", "directory", "spool", "scan", "message",
             "cli", "config", "limits", "dnsresolver"},
    "receive": {"deliver", "cli"},
    "deliver": {"receive", "accept", "policy", "cli", "scan"},
    "accept": {"receive", "deliver", "cli"},
    "policy": {"receive", "deliver", "accept", "spool", "scan", "cli"},
    "spool": {"receive", "deliver", "accept", "policy", "scan", "message", "directory", "cli"},
    "scan": {"receive", "deliver", "accept", "policy", "spool", "directory", "cli"},
    "directory": {"receive", "deliver", "accept", "policy", "spool", "scan", "smtp", "cli",
                  "auth"},
    "auth": {"receive", "deliver", "accept", "policy", "spool", "scan", "smtp", "cli", "message",
             "limits"},
    # Operating (issue #16): metrics and the event log are leaves every stage may call; the
    # admin listener is wired by cli alone and reads only what it is handed.
    "metrics": {"*"},
    "tracelog": {"receive", "deliver", "accept", "policy", "spool", "scan", "message",
                 "directory", "cli", "smtp", "limits", "admin", "metrics"},
    "admin": {"receive", "deliver", "accept", "policy", "spool", "cli", "smtp", "limits",
              "tracelog", "directory"},
    # The web pages (issue #17): handed their data by cli; they read the event log and the
    # status figures, and never a stage.
    "web": {"receive", "deliver", "accept", "policy", "spool", "cli", "smtp", "limits", "scan",
            "message", "directory", "auth"},
    "status": {"receive", "deliver", "accept", "policy", "scan", "cli", "smtp", "limits",
               "admin", "web", "message", "auth"},
    "replies": {"*"},
    "errors": {"*"},
    "config": {"*"},
    "netaddr": {"*"},  # leaf helpers: import nothing from mailgate
    "dnsresolver": {"*"},
    "dnsname": {"*"},
    "identity": {"*"},
    "text": {"*"},
}  # fmt: skip
ALWAYS_ALLOWED = {"replies", "errors", "config", "identity", "text"}


def imported_mailgate_parts(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    parts: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            if name.startswith("mailgate."):
                parts.add(name.split(".")[1])
    return parts


def owner(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def test_imports_point_one_way() -> None:
    problems = []
    for path in SRC.rglob("*.py"):
        me = owner(path)
        forbidden = FORBIDDEN.get(me, set())
        for part in imported_mailgate_parts(path) - {me}:
            if part in ALWAYS_ALLOWED and me not in {
                "replies",
                "errors",
                "config",
                "identity",
                "text",
            }:
                continue
            if (
                "*" in forbidden
                and (me, part)
                not in {
                    ("errors", "replies"),
                    ("config", "errors"),
                    ("config", "dnsname"),
                    ("identity", "dnsname"),
                }
            ) or part in forbidden:
                problems.append(f"{path.relative_to(SRC)} imports mailgate.{part}")
    assert problems == []


def test_the_checker_sees_a_reversed_arrow(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("from mailgate.receive.session import Session\nimport mailgate.deliver.engine\n")
    assert imported_mailgate_parts(bad) == {"receive", "deliver"}
