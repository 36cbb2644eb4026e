#!/usr/bin/env python
"""`mnapps distill-face` from a source checkout: see mnapps/cli/distill_face.py (or run with --help)."""

import sys

from mnapps.cli.distill_face import main

if __name__ == "__main__":
    sys.exit(main())
