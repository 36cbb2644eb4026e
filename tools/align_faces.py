#!/usr/bin/env python
"""`mnapps align-faces` from a source checkout: see mnapps/cli/align_faces.py (or run with --help)."""

import sys

from mnapps.cli.align_faces import main

if __name__ == "__main__":
    sys.exit(main())
