#!/usr/bin/env python
"""`mnapps import-weights` from a source checkout: see mnapps/cli/import_weights.py (or run with --help)."""

import sys

from mnapps.cli.import_weights import main

if __name__ == "__main__":
    sys.exit(main())
