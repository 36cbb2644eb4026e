#!/usr/bin/env python
"""`mnapps export` from a source checkout: see mnapps/cli/export.py (or run with --help)."""

import sys

from mnapps.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
