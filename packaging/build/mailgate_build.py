"""The build backend: setuptools, plus mypy in the build environment when the optional
compiled build is asked for (MAILGATE_MYPYC=1, see setup.py). Without that variable it is
exactly setuptools.build_meta, and the package is pure Python.
"""

from __future__ import annotations

import os

from setuptools.build_meta import *  # noqa: F403  (the other hooks, unchanged)

MYPYC_REQUIRES = ["mypy>=1.10"]


def _extra() -> list[str]:
    return MYPYC_REQUIRES if os.environ.get("MAILGATE_MYPYC") == "1" else []


def get_requires_for_build_wheel(config_settings: dict[str, object] | None = None) -> list[str]:
    # Not setuptools' own hook: it runs setup.py to find setup_requires (setup.py has none),
    # and setup.py imports mypyc when the compiled build is asked for, before mypy is there.
    return _extra()
