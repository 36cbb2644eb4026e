#!/usr/bin/env python
"""`mnapps eval-det` from a source checkout: see mnapps/cli/eval_det.py (or run with --help)."""

import sys

from mnapps.cli.eval_det import main

if __name__ == "__main__":
    sys.exit(main())
