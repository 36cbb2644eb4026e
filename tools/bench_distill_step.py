#!/usr/bin/env python
"""Time a face-distillation step with the teacher's embeddings cached against the teacher in the step.

Both run the same batch of training views through forward, loss, backward and optimiser step,
side by side in one run, so the teacher's share of a step is a measured ratio. The config, the
teacher and the data are those of ``mnapps distill-face``.
"""

from __future__ import annotations

import argparse
import sys

from lab.face_throughput import benchmark_distill_step
from mnapps.config import ConfigError, config_arg
from mnapps.tasks.face import load_distill_config

EXAMPLES = """example:
  python tools/bench_distill_step.py --config configs/face_mnv1_a100_r160_fewshot_casia.yaml \\
      --set teacher.weights=path/to/20180408-102900-casia-webface-features.pt --steps 5 --device cpu
"""


def report(result: dict) -> str:
    cached, online = result["cached"], result["online"]
    return (
        f"distillation step, batch {result['batch_size']} on {result['device']}:\n"
        f"  teacher embeddings cached:  {cached['images_per_s']:7.1f} images/s ({1000 * cached['step_s']:.0f} ms/step)\n"
        f"  teacher in the step:        {online['images_per_s']:7.1f} images/s ({1000 * online['step_s']:.0f} ms/step, "
        f"teacher {1000 * online['teacher_s']:.0f} ms = {100 * online['teacher_share']:.0f}% of it)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=config_arg, required=True,
                        help="a face experiment: a YAML file, or a shipped config's name (face_*)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps each way (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--weights-backbone", default=None, metavar="CKPT", help="the student's starting trunk")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    try:
        cfg = load_distill_config(args.config, args.set)
        print(report(benchmark_distill_step(cfg, steps=args.steps, device=args.device,
                                            weights_backbone=args.weights_backbone)))
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
