#!/usr/bin/env python
"""`mnapps eval-face` from a source checkout: see mnapps/cli/eval_face.py (or run with --help)."""

import sys

from mnapps.cli.eval_face import main

if __name__ == "__main__":
    sys.exit(main())
