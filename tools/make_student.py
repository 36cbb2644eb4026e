#!/usr/bin/env python
"""`mnapps make-student` from a source checkout: see mnapps/cli/make_student.py (or run with --help)."""

import sys

from mnapps.cli.make_student import main

if __name__ == "__main__":
    sys.exit(main())
