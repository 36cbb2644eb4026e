#!/usr/bin/env python
"""`mnapps-face-pipeline-bench`: see tools/lab/face_pipeline_bench_cli.py (or run with --help)."""

import sys

from lab.face_pipeline_bench_cli import main

if __name__ == "__main__":
    sys.exit(main())
