#!/usr/bin/env python
"""`mnapps infer-det` from a source checkout: see mnapps/cli/infer_det.py (or run with --help)."""

import sys

from mnapps.cli.infer_det import main

if __name__ == "__main__":
    sys.exit(main())
