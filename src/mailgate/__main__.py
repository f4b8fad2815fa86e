"""`python -m mailgate` runs the command line."""

from mailgate.cli import main

raise SystemExit(main())
