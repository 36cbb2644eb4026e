#!/usr/bin/env python
"""`mnapps embed-faces` from a source checkout: see mnapps/cli/embed_faces.py (or run with --help)."""

import sys

from mnapps.cli.embed_faces import main

if __name__ == "__main__":
    sys.exit(main())
