#!/usr/bin/env python
"""`mnapps-benchmark`: see mnapps/cli/benchmark.py (or run with --help)."""

import sys

from mnapps.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
