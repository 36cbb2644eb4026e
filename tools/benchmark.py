#!/usr/bin/env python
"""A lab script, not a verb of `mnapps`: see tools/lab/benchmark_cli.py (or run it with --help)."""

import sys

from lab.benchmark_cli import main

if __name__ == "__main__":
    sys.exit(main())
