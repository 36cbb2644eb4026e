#!/usr/bin/env python
"""`mnapps weights` from a source checkout: see mnapps/cli/weights.py (or run with --help)."""

import sys

from mnapps.cli.weights import main

if __name__ == "__main__":
    sys.exit(main())
