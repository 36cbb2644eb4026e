#!/usr/bin/env python
"""`mnapps-bench-data`: see mnapps/cli/bench_data.py (or run with --help)."""

import sys

from mnapps.cli.bench_data import main

if __name__ == "__main__":
    sys.exit(main())
