#!/usr/bin/env python
"""`mnapps classify` from a source checkout: see mnapps/cli/classify.py (or run with --help)."""

import sys

from mnapps.cli.classify import main

if __name__ == "__main__":
    sys.exit(main())
