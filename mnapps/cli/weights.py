"""List, download and import the pretrained weights mnapps knows by name (mnapps weights ...).

`mnapps weights list` prints the table: name, what it is, size, license, official address and
SHA-256 where known. `mnapps weights get NAME` downloads the official file(s) with a progress bar
into $MNAPPS_CACHE/weights (default ~/.cache/mnapps/weights), checks the hash, imports them into an
mnapps checkpoint and prints its path; from then on NAME works wherever a weights path does
(--weights, --weights-backbone, --checkpoint, --teacher-weights, model.backbone.weights in a
config). `--from FILE` does the same from a copy downloaded elsewhere (no network needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnapps.weights import WEIGHTS, WeightsError, checkpoint_path, get_weights, weights_cache_dir

EXAMPLES = """examples:
  mnapps weights list
  mnapps weights get mobilenet_v1_1.0_224_imagenet
  mnapps weights get faceapi_ssd_mobilenetv1 --from path/to/face-api/model     # offline: a local copy
  mnapps train-det --head ssd --weights-backbone mobilenet_v1_1.0_224_imagenet --set model.backbone.width_mult=1.0
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:])
        + "\n\n" + EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{list,get}")
    verbs.add_parser("list", help="the known weights, where they come from, and whether they are in the cache")
    get = verbs.add_parser("get", help="download (or take --from), verify and import weights NAME")
    get.add_argument("name", metavar="NAME", help=f"one of: {', '.join(WEIGHTS)}")
    get.add_argument("--from", dest="source", type=Path, metavar="FILE",
                     help="a local copy (file, folder or TF checkpoint prefix) instead of downloading")
    get.add_argument("--mirror", metavar="URL", help="base URL serving the same file names (an internal mirror)")
    get.add_argument("--sha256", metavar="HEX", help="expected SHA-256 of the file where upstream publishes none")
    get.add_argument("--overwrite", action="store_true", help="fetch again even if NAME is already in the cache")
    get.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def list_weights() -> str:
    lines = [f"cache: {weights_cache_dir()}"]
    for spec in WEIGHTS.values():
        cached = "in cache" if checkpoint_path(spec.name).is_file() else "not downloaded"
        lines += ["", f"{spec.name}  ({spec.approx_size}, {cached})", f"  {spec.title}", f"  license: {spec.license}",
                  f"  source: {spec.source}"]  # fmt: skip
        for file in spec.files:
            lines.append(f"  {file.url}")
            lines.append(f"    sha256 {file.sha256 or 'not published upstream'}"
                         + (f", {file.size} bytes" if file.size else ""))  # fmt: skip
        lines.append(f"  {spec.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; only `get` of an uncached name loads torch and the tasks."""
    if args.verb == "list":
        print(list_weights())
        return 0
    if args.name in WEIGHTS and checkpoint_path(args.name).is_file() and not args.overwrite:
        print(f"{args.name} is already in the cache (--overwrite fetches it again)", file=sys.stderr)
        print(checkpoint_path(args.name))
        return 0
    # torch and the tasks load only now: `--help` and `list` stay instant (see tests/test_layout.py).
    from mnapps.cli.weight_importers import IMPORTERS

    try:
        path = get_weights(args.name, IMPORTERS, source=args.source, mirror=args.mirror, sha256=args.sha256,
                           overwrite=args.overwrite, progress=not args.quiet, log=lambda line: print(line, file=sys.stderr))  # fmt: skip
    except (WeightsError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
