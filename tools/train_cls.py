#!/usr/bin/env python
"""`mnapps train-cls` from a source checkout: see mnapps/cli/train_cls.py (or run with --help)."""

import sys

from mnapps.cli.train_cls import main

if __name__ == "__main__":
    sys.exit(main())
