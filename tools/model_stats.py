#!/usr/bin/env python
"""`mnapps-model-stats`: see mnapps/cli/model_stats.py (or run with --help)."""

import sys

from mnapps.cli.model_stats import main

if __name__ == "__main__":
    sys.exit(main())
