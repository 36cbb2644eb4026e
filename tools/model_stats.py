#!/usr/bin/env python
"""`mnapps-model-stats`: see tools/lab/model_stats_cli.py (or run with --help)."""

import sys

from lab.model_stats_cli import main

if __name__ == "__main__":
    sys.exit(main())
