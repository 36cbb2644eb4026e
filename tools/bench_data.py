#!/usr/bin/env python
"""`mnapps-bench-data`: see tools/lab/bench_data_cli.py (or run with --help)."""

import sys

from lab.bench_data_cli import main

if __name__ == "__main__":
    sys.exit(main())
