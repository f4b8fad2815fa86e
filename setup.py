"""The optional compiled build (issue #19).

`MAILGATE_MYPYC=1 pip install .` (or scripts/build-mypyc) compiles the hot, strictly typed
modules below with mypyc into C extensions, which Python imports instead of the .py files
beside them. Without the variable (the default, and CI) nothing is compiled and the package is
pure Python, so it installs wherever no C compiler exists. `mailgate.__compiled__` says which
variant is running; the benchmarks record it.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

# Modules mypyc compiles cleanly and that run per command or per record. Anything that other
# code subclasses or monkeypatches stays out (compiled classes are final to Python code).
MYPYC_MODULES = [
    "src/mailgate/smtp/events.py",
    "src/mailgate/smtp/parse.py",
    "src/mailgate/smtp/data.py",
    "src/mailgate/smtp/server.py",
    "src/mailgate/smtp/client.py",
    "src/mailgate/spool/record.py",
    "src/mailgate/receive/channel.py",
    "src/mailgate/receive/proxy.py",
]

ext_modules = []
# Metadata only (pip's first pass over setup.py): no need to type-check and generate C twice.
_METADATA_ONLY = {"egg_info", "dist_info"}.intersection(sys.argv)
if os.environ.get("MAILGATE_MYPYC") == "1" and not _METADATA_ONLY:
    from mypyc.build import mypycify

    ext_modules = mypycify(MYPYC_MODULES, opt_level="3")

setup(ext_modules=ext_modules)
