#!/usr/bin/env python
"""`mnapps compare-detectors` from a source checkout: see mnapps/cli/compare_detectors.py (or run with --help)."""

import sys

from mnapps.cli.compare_detectors import main

if __name__ == "__main__":
    sys.exit(main())
