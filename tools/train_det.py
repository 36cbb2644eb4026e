#!/usr/bin/env python
"""`mnapps train-det` from a source checkout: see mnapps/cli/train_det.py (or run with --help)."""

import sys

from mnapps.cli.train_det import main

if __name__ == "__main__":
    sys.exit(main())
