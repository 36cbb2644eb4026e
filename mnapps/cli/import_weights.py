"""Convert TensorFlow MobileNetV1 weights into an mnapps checkpoint (no TensorFlow needed).

--kind classifier (the default): Google's TF-slim ImageNet weights -> a classification
checkpoint. SOURCE is an .npz of TF-slim tensors (name -> array, e.g.
mobilenet_v1_1.0_224_tfslim.npz) or the official checkpoint prefix mobilenet_v1_1.0_224.ckpt
(its .index/.data-* files, read without TensorFlow). The result records TF padding, ReLU6 and
BN epsilon 1e-3 in its config; tools/classify.py uses it, and any head starts from its trunk
with load_backbone_weights.

--kind ssd: a TF Object Detection API ssd_mobilenet_v1 (the COCO zoo model, models fine-tuned
from it, face-api.js's face detector) -> a detection checkpoint that tools/infer_det.py,
eval_det.py, export.py and train_det.py --weights take. SOURCE is a TensorFlow.js weights folder
(*weights_manifest.json + shards), an .npz of TF OD API names (FeatureExtractor/MobilenetV1/...,
BoxPredictor_i/...) or a TF checkpoint prefix (model.ckpt). The checkpoint records the input
size, anchors, TF's preprocessing (stretch, or zero-pad to a square for face-api.js) and
sigmoid scores, so the imported model gives the source's boxes. Of face-api.js's three logits
per anchor only the face class is kept by default (the one face-api.js reports; sigmoid scores
are per class, so dropping the third changes nothing else).

An existing --output is never replaced unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mnapps.files import check_output_path

EXAMPLES = """examples:
  python tools/import_weights.py path/to/mobilenet_v1_1.0_224_tfslim.npz
  python tools/import_weights.py path/to/mobilenet_v1_1.0_224.ckpt --output runs/weights/imagenet.pt
  python tools/import_weights.py --kind ssd ../shared/data/faceapi_ssd_mobilenetv1 \\
      --output runs/weights/faceapi_ssd.pt
  python tools/import_weights.py --kind ssd path/to/ssd_mobilenet_v1_coco/model.ckpt --size 300 \\
      --output runs/weights/ssd_coco.pt
"""
FORMATS = ("auto", "tfjs", "npz", "tf-ckpt")
ANCHOR_ORDERS = {"last": "last", "after-square": "after_square"}
SSD_ONLY = ("size", "anchor_order", "class_names", "score_threshold", "nms_threshold")
CLASSIFIER_ONLY = {"keep_background": False, "resolution": None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) + "\n\n" + EXAMPLES,
    )
    parser.add_argument("source", type=Path, help="TF.js folder or manifest, .npz, or TF checkpoint prefix")
    parser.add_argument("--kind", choices=["classifier", "ssd"], default="classifier",
                        help="what the weights are: a TF-slim ImageNet classifier (default) or a TF OD API SSD")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="how SOURCE is stored (default auto: a folder or .json is TF.js, .npz is numpy, "
                        "anything else a TF checkpoint prefix)")
    parser.add_argument("--output", type=Path,
                        help="checkpoint to write (default: classifier runs/weights/mobilenet_v1_1.0_224_imagenet.pt, "
                        "where tools/classify.py looks first; ssd runs/weights/<source name>_ssd.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    group = parser.add_argument_group("classifier options")
    group.add_argument("--keep-background", action="store_true",
                       help="keep TF's 1001 logits (index 0 = background) instead of the usual 1000 ImageNet classes")
    group.add_argument("--resolution", type=int, help="input size the weights were trained at (default 224)")
    group = parser.add_argument_group("ssd options")
    group.add_argument("--size", type=int, help="input side (default: the file's own for TF.js, else 300)")
    group.add_argument("--anchor-order", choices=sorted(ANCHOR_ORDERS),
                       help="where the source put the interpolated-scale anchor of a location: last (TF OD API "
                       "since 2018) or after-square (its first release, face-api.js); default read from the "
                       "anchors a TF.js file stores, else last")
    group.add_argument("--class-names", metavar="A,B",
                       help="foreground class names in logit order; fewer names than classes keep only the "
                       "first ones, exactly (sigmoid scores are per class). Default: face for face-api.js "
                       "(the one logit it reports; its third logit is dropped), else class_1,... (all)")
    group.add_argument("--score-threshold", type=float, help="lowest score the model returns (default 0.01)")
    group.add_argument("--nms-threshold", type=float,
                       help="NMS IoU (default 0.5 for face-api.js's layout, its own; else 0.6, the TF OD API's)")
    args = parser.parse_args(argv)
    _check_kind_options(parser, args)
    return args


def _check_kind_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.kind == "classifier":
        wrong = [name for name in SSD_ONLY if getattr(args, name) is not None]
    else:
        wrong = [name for name, default in CLASSIFIER_ONLY.items() if getattr(args, name) != default]
    if wrong:
        options = ", ".join("--" + name.replace("_", "-") for name in wrong)
        other = "ssd" if args.kind == "classifier" else "classifier"
        parser.error(f"{options} {'is' if len(wrong) == 1 else 'are'} only for --kind {other}")
    for name in ("score_threshold", "nms_threshold"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    if args.size is not None and args.size < 32:
        parser.error(f"--size must be >= 32, got {args.size}")


def source_format(source: Path) -> str:
    """``tfjs``, ``npz`` or ``tf-ckpt``, as ``--format auto`` decides it."""
    if source.is_dir() or source.suffix == ".json":
        return "tfjs"
    return "npz" if source.suffix == ".npz" else "tf-ckpt"


def _check_source(args: argparse.Namespace) -> None:
    found = source_format(args.source)
    if args.format != "auto" and args.format != found:
        hint = {"tfjs": "a folder holding *weights_manifest.json, or that .json", "npz": "a file ending in .npz",
                "tf-ckpt": "a checkpoint prefix such as model.ckpt (beside model.ckpt.index)"}[args.format]
        raise ValueError(f"--format {args.format} expects {hint}, but {args.source} looks like {found}")
    if args.kind == "classifier" and found == "tfjs":
        raise ValueError(f"{args.source}: the classifier import reads an .npz or a TF checkpoint, not TF.js")


def _default_output(args: argparse.Namespace) -> Path:
    if args.kind == "classifier":
        return Path("runs") / "weights" / "mobilenet_v1_1.0_224_imagenet.pt"
    source = args.source.parent if args.source.suffix == ".json" else args.source
    name = re.sub(r"\.(ckpt|npz)$", "", source.name) or "imported"
    return Path("runs") / "weights" / f"{name}_ssd.pt"


def _import_ssd(args: argparse.Namespace, output: Path) -> str:
    from mnapps.tasks.detection import import_tf_od_api_ssd_checkpoint

    names = None if args.class_names is None else args.class_names.split(",")
    path, info = import_tf_od_api_ssd_checkpoint(
        args.source, output, size=args.size,
        interpolated_anchor=ANCHOR_ORDERS.get(args.anchor_order) if args.anchor_order else None,
        class_names=names, score_threshold=args.score_threshold, nms_threshold=args.nms_threshold,
    )  # fmt: skip
    ssd = info.ssd
    text = (f"wrote {path}: SSD-MobileNetV1 width {info.backbone.width_mult:g}, input {ssd.size}, "
            f"{info.num_classes - 1} class(es) + background ({', '.join(info.class_names)}), {info.layout} layout, "
            f"anchor order "
            f"{info.interpolated_anchor.replace('_', '-')}, preprocess {ssd.preprocess}, {ssd.score_activation} "
            f"scores, NMS IoU {ssd.nms_threshold:g}")
    if info.skipped:
        text += f"\nskipped {len(info.skipped)} non-weight tensor(s): {', '.join(info.skipped[:5])}"
    return text


def _import_classifier(args: argparse.Namespace, output: Path) -> str:
    from mnapps.tasks.classification import import_tf_slim_checkpoint

    path, info = import_tf_slim_checkpoint(
        args.source, output, keep_background=args.keep_background, resolution=args.resolution or 224
    )
    classes = f"{info.num_classes} classes" + (" (background logit dropped)" if info.background_dropped else "")
    text = f"wrote {path}: MobileNetV1 width {info.width_mult:g}, {classes}, {info.mapped} TF tensors mapped"
    if info.skipped:
        text += f"\nskipped {len(info.skipped)} non-weight tensor(s): {', '.join(info.skipped[:5])}"
    return text


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; the importers (torch) load only in the _import_* helpers."""
    output = args.output or _default_output(args)
    try:
        if output.is_dir():
            raise ValueError(f"--output {output} is an existing folder; give the checkpoint's file name (.pt)")
        if output.exists() and not args.overwrite:
            raise ValueError(f"--output {output} already exists; pass --overwrite to replace it, or another --output")
        check_output_path(output, [args.source], what="--output file")
        _check_source(args)
        text = _import_ssd(args, output) if args.kind == "ssd" else _import_classifier(args, output)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0
