#!/usr/bin/env python
"""`mnapps pseudo-label` from a source checkout: see mnapps/cli/pseudo_label.py (or run with --help)."""

import sys

from mnapps.cli.pseudo_label import main

if __name__ == "__main__":
    sys.exit(main())
