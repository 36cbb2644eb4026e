#!/usr/bin/env python
"""`mnapps-benchmark`: see tools/lab/benchmark_cli.py (or run with --help)."""

import sys

from lab.benchmark_cli import main

if __name__ == "__main__":
    sys.exit(main())
