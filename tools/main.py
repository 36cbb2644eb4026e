#!/usr/bin/env python
"""`mnapps <verb>`: see mnapps/cli/main.py (or run with --help)."""

import sys

from mnapps.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
