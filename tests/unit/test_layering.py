"""Who may import whom inside src/mailgate: an allow-list (docs/ARCHITECTURE.md, "Imports").

Every package and top-level module of src/mailgate has a row in ALLOWED: the mailgate packages
and modules it may import. The test parses every file with `ast` (imports at module level,
inside functions and under TYPE_CHECKING alike, relative ones resolved) and fails naming the
file, the line and the arrow of each import the table does not allow, and each package the
table does not place: a new package must be given a row. Outside `cli` (which builds every
object), the packages with implementations behind an interface may be imported only through
that interface (INTERFACES): every stage is typed against `spool.api.SpoolStore`, the
`directory.Directory` protocol and the authenticator, never against a backend module.
docs/ARCHITECTURE.md shows both tables as `render()` prints them, and the runtime dependencies
of pyproject.toml, exactly; the last tests check that.
"""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "mailgate"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"

# What every row below but the foundation's own may import: the reply table, the error types,
# the configuration, the value types several stages share, the domain rule for what clients
# write, and the one rendering of client-chosen text.
FOUNDATION = frozenset({"replies", "errors", "config", "values", "identity", "text"})
F = FOUNDATION
EVERYTHING = frozenset({"*"})

ALLOWED: dict[str, frozenset[str]] = {
    # The foundation: each imports at most what its row names, never a stage.
    "replies": frozenset(),
    "errors": frozenset({"replies"}),
    "config": frozenset({"errors", "dnsname"}),
    "values": frozenset(),
    "identity": frozenset({"dnsname"}),
    "text": frozenset(),
    # One rule each, importing nothing of mailgate.
    "dnsname": frozenset(),
    "netaddr": frozenset(),
    "dnsresolver": frozenset(),
    # Leaves every stage may call, with one line at the call site.
    "metrics": frozenset({"config"}),
    "tracelog": frozenset({"config", "netaddr"}),
    "log": frozenset({"config", "text"}),
    "tlscert": frozenset({"errors"}),
    # The protocol: sans-IO, the standard library and the address-literal rule only.
    "smtp": frozenset({"replies", "errors", "netaddr"}),
    # The stages and what they stand on.
    "spool": F,
    "directory": F | {"dnsname", "log"},
    "message": F | {"dnsname", "netaddr"},
    "scan": F | {"message", "metrics"},
    "policy": F | {"directory", "netaddr"},
    "auth": F | {"directory"},
    "limits": F | {"netaddr", "metrics"},
    "accept": F | {"scan", "message", "spool", "policy", "metrics", "tracelog"},
    "receive": F | {"smtp", "policy", "accept", "spool", "auth", "limits", "dnsname",
                    "dnsresolver", "netaddr", "metrics", "tracelog"},
    "deliver": F | {"spool", "smtp", "message", "dnsresolver", "netaddr", "metrics",
                    "tracelog"},
    "admin": F | {"metrics", "scan"},
    # The service's figures, and the pages: never a stage; cli hands them callables.
    "status": F | {"directory", "spool", "tracelog"},
    "web": F | {"admin", "status", "tracelog"},
    # The command line builds and wires every object.
    "cli": EVERYTHING,
    "__main__": frozenset({"cli"}),
    "__init__": frozenset(),
}  # fmt: skip

# Package -> the modules of it that other packages (but cli) may import: its interface.
INTERFACES: dict[str, frozenset[str]] = {
    "spool": frozenset({"spool.api", "spool.entry", "spool.incoming", "spool.ids"}),
    "directory": frozenset({"directory", "directory.passwords"}),
    "auth": frozenset({"auth", "auth.authenticator"}),
}


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # dotted, below mailgate: "spool.api", "directory" (a package's __init__)


def owner(path: Path) -> str:
    """The row of `path`: its top-level package or module below src/mailgate."""
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _is_module(dotted: str) -> bool:
    base = SRC.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(path: Path, root: Path = SRC) -> list[Import]:
    """Every import of a mailgate module in `path`, wherever it stands in the file."""
    package = path.relative_to(root).parts[:-1]  # where a relative import starts
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(node.lineno, a.name.removeprefix("mailgate."))
                      for a in node.names if a.name.startswith("mailgate.")]  # fmt: skip
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - (node.level - 1)])
                module = ".".join(["mailgate", *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module != "mailgate" and not module.startswith("mailgate."):
                continue
            below = module.removeprefix("mailgate").removeprefix(".")
            for alias in node.names:
                sub = f"{below}.{alias.name}" if below else alias.name
                # `from mailgate.directory import passwords` imports the module passwords.
                found.append(Import(node.lineno, sub if _is_module(sub) else below))
    return found


def problems(
    allowed_by: dict[str, frozenset[str]] = ALLOWED,
    interfaces: dict[str, frozenset[str]] = INTERFACES,
) -> list[str]:
    found: list[str] = []  # each once, in file order
    for path in sorted(SRC.rglob("*.py")):
        me, rel = owner(path), path.relative_to(SRC)
        allowed = allowed_by.get(me)
        if allowed is None:
            found.append(f"{rel}: {me} is not in the allow-list: give it a row in ALLOWED "
                         "and in docs/ARCHITECTURE.md")  # fmt: skip
            continue
        for imp in imports(path):
            top = imp.target.split(".")[0]
            if top == me:
                continue
            if allowed is not EVERYTHING and top not in allowed:
                arrow = f"{rel}:{imp.line}: {me} -> {top} (mailgate.{imp.target})"
                found += [] if arrow in found else [arrow]
            elif me != "cli" and top in interfaces and imp.target not in interfaces[top]:
                interface = ", ".join(sorted(interfaces[top]))
                found.append(f"{rel}:{imp.line}: {me} -> mailgate.{imp.target}: outside "
                             f"{top}/ and cli/ only its interface ({interface})")  # fmt: skip
    return found


def test_imports_follow_the_allow_list() -> None:
    assert problems() == []


def test_every_row_names_a_package_or_module_that_exists() -> None:
    present = {owner(p) for p in SRC.rglob("*.py")}
    named = set(ALLOWED) | {m for row in ALLOWED.values() for m in row} | set(INTERFACES)
    assert named - present - {"*"} == set()
    for package, modules in INTERFACES.items():
        assert all(_is_module(m) and m.split(".")[0] == package for m in modules), package


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    bad = tmp_path / "pkg" / "x.py"
    bad.write_text(
        "from typing import TYPE_CHECKING\n"
        "from mailgate.receive.session import Session\n"
        "import mailgate.deliver.engine\n"
        "from mailgate import spool\n"
        "from mailgate.directory import passwords, Directory\n"
        "if TYPE_CHECKING:\n"
        "    from mailgate.limits import Limits\n"
        "def later() -> None:\n"
        "    from mailgate.message import dkim\n"
        "from . import y\n"
        "from ..smtp import events\n"
    )
    assert sorted((i.line, i.target) for i in imports(bad, root=tmp_path)) == [
        (2, "receive.session"), (3, "deliver.engine"), (4, "spool"), (5, "directory"),
        (5, "directory.passwords"), (7, "limits"), (9, "message.dkim"), (10, "pkg"),
        (11, "smtp.events"),
    ]  # fmt: skip


def test_a_reversed_arrow_and_an_unplaced_package_are_named() -> None:
    table = {**ALLOWED, "smtp": frozenset({"replies", "errors"})}
    del table["tlscert"]
    found = problems(table)
    assert any(re.match(r"smtp/parse\.py:\d+: smtp -> netaddr \(mailgate\.netaddr\)$", p)
               for p in found), found  # fmt: skip
    assert "tlscert.py: tlscert is not in the allow-list" in "\n".join(found)
    narrower = {**INTERFACES, "spool": frozenset({"spool.api"})}
    found = problems(interfaces=narrower)
    assert any(re.match(r"receive/session\.py:\d+: receive -> mailgate\.spool\.incoming: outside "
                        r"spool/ and cli/ only its interface \(spool\.api\)$", p)
               for p in found), found  # fmt: skip


# --- docs/ARCHITECTURE.md says exactly this ---------------------------------------------------


def render() -> str:
    """The two tables as docs/ARCHITECTURE.md shows them."""

    def names(row: frozenset[str]) -> str:
        if row is EVERYTHING:
            return "everything"
        rest = sorted(row - F) if row >= F else sorted(row)
        listed = ", ".join(f"`{m}`" for m in rest)
        if row >= F:
            return "the foundation" + (f", {listed}" if listed else "")
        return listed or "nothing of mailgate"

    lines = ["| package or module | may import |", "|---|---|"]
    lines += [f"| `{me}` | {names(row)} |" for me, row in ALLOWED.items()]
    lines += ["", "| package | outside it and `cli`, only |", "|---|---|"]
    lines += [f"| `{p}` | {', '.join(f'`{m}`' for m in sorted(ms))} |"
              for p, ms in INTERFACES.items()]  # fmt: skip
    return "\n".join(lines) + "\n"


def test_architecture_shows_the_allow_list() -> None:
    foundation = ", ".join(f"`{m}`" for m in sorted(F))
    text = ARCHITECTURE.read_text()
    assert f"The foundation is {foundation}." in text
    assert render() in text, "paste the output of tests/unit/test_layering.py render()"


def test_architecture_lists_exactly_the_runtime_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["fast"]]
    required = {re.split(r"[<>=!~; ]", d, maxsplit=1)[0].lower() for d in wanted}
    section = ARCHITECTURE.read_text().split("## Runtime dependencies", 1)[1]
    listed: set[str] = set()
    for row in section.splitlines():
        cells = row.split("|")
        if row.startswith("| `") and len(cells) > 2:
            listed |= {n.lower() for n in re.findall(r"`([^`]+)`", cells[1])
                       if not n.startswith("[")}  # fmt: skip
    assert listed == required
