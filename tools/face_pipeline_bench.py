#!/usr/bin/env python
"""`mnapps-face-pipeline-bench`: see mnapps/cli/face_pipeline_bench.py (or run with --help)."""

import sys

from mnapps.cli.face_pipeline_bench import main

if __name__ == "__main__":
    sys.exit(main())
