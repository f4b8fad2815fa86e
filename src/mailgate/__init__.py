"""mailgate: an outgoing mail service for an organisation's network."""

__version__ = "0.1.0"


def _is_compiled() -> bool:
    """Whether this is the optional mypyc build (setup.py): its modules are C extensions."""
    from importlib.util import find_spec

    spec = find_spec("mailgate.smtp.server")
    return spec is not None and spec.origin is not None and not spec.origin.endswith(".py")


# True in the optional mypyc build: which variant runs, for benchmarks and the startup log.
__compiled__: bool = _is_compiled()
