"""Run a trained mnapps detector on images: draw boxes, class names and scores, and optionally
write a COCO results JSON (original category ids) for tools/eval_det.py --results.

Drawn images go to --out with the input's name (JPEG and PNG keep their name, any other format
gets ".png" appended: photo.bmp -> photo.bmp.png; should that still clash with another input,
photo.bmp~2.png). --out must not be, or lie inside, the input folder; no file that existed in
--out before the run is replaced unless --overwrite is given, and files are replaced by renaming,
so an --out holding hard links or symlinks to the photos never changes the photos. Only
detections scoring at least --score-threshold are drawn; the results JSON keeps every detection
the model returns (COCO AP needs the low-scoring ones too). Image ids in the JSON come from --ann
(the annotation file listing the images), else from numeric file names, else 1..N. Unreadable
images are skipped and counted; when none could be read the exit status is 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from mnapps.data.image_io import IMAGE_EXTENSIONS, list_images
from mnapps.files import atomic_write, check_output_path, check_writable_folder, refuse_existing_outputs, unique_output_names
from mnapps.weights import weights_arg

EXAMPLES = """examples:
  python tools/infer_det.py --checkpoint runs/ssd_mnv1_a050_r192_shapes/best.pt \\
      ~/.cache/mnapps/shapes_det_v1_n2000-200_s192_seed0/val --out /tmp/drawn
  python tools/infer_det.py --checkpoint runs/coco8/best.pt coco8/images/val --out /tmp/coco8 \\
      --results-json /tmp/coco8/results.json --ann coco8/instances_val.json
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, metavar="IMAGE_OR_DIR", help="an image file or a folder of images")
    parser.add_argument("--checkpoint", type=weights_arg, required=True, metavar="F", help="mnapps detection checkpoint (.pt)")
    parser.add_argument("--out", type=Path, required=True, metavar="D",
                        help="folder for the drawn images (not the input folder, nor inside it)")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="draw detections scoring at least this (default 0.3)")
    parser.add_argument("--results-json", type=Path, metavar="F", help="also write COCO results JSON here")
    parser.add_argument("--ann", type=Path, metavar="F", help="COCO annotation file naming the images (for image ids)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    parser.add_argument("--overwrite", action="store_true", help="replace files that already exist in --out")
    args = parser.parse_args(argv)
    if not 0.0 <= args.score_threshold <= 1.0:
        parser.error(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def output_name(path: Path) -> str:
    """The drawn image's file name: JPEG and PNG inputs keep theirs, others get ``.png`` added."""
    return path.name if path.suffix.lower() in (".jpg", ".jpeg", ".png") else f"{path.name}.png"


def _check_outputs(args: argparse.Namespace, paths: list[Path]) -> None:
    """Refuse outputs that are, or are inside, an input, or that would replace an input file."""
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is an existing file; give a folder for the drawn images")
    inputs = [args.source, args.checkpoint] + ([args.ann] if args.ann else [])
    check_output_path(args.out, inputs, what="--out folder")
    check_writable_folder(args.out, flag="--out")
    args.names = unique_output_names(paths, output_name)
    # A single input file drawn into its own folder would be written over by its drawing.
    originals = {path.resolve() for path in paths}
    for path in paths:
        if args.out.resolve() / args.names[path] in originals:  # the folder resolved, not a link in it
            raise ValueError(
                f"drawing {path} into --out {args.out} would write over the input {path}; choose another --out folder"
            )
    if args.results_json is not None:
        if args.results_json.is_dir():
            raise ValueError(f"--results-json {args.results_json} is a folder; give a file name such as results.json")
        check_output_path(args.results_json, inputs, what="--results-json file")
    targets = [args.out / name for name in args.names.values()] + ([args.results_json] if args.results_json else [])
    refuse_existing_outputs(targets, flag="--out", overwrite=args.overwrite)


def _predict(args: argparse.Namespace, model, paths: list[Path], device) -> list[dict]:
    from mnapps.tasks.detection import predict_images

    # Unreadable images are reported here as one line each and counted, not as Python warnings.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        predictions = predict_images(model, paths, device=device, batch_size=args.batch_size)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return predictions


def _draw(args: argparse.Namespace, predictions: list[dict], names: list[str]) -> None:
    from mnapps.tasks.detection import draw_detections

    args.out.mkdir(parents=True, exist_ok=True)
    for pred in predictions:
        keep = pred["scores"] >= args.score_threshold
        drawn = draw_detections(pred["image"], pred["boxes"][keep], pred["labels"][keep], pred["scores"][keep], names)
        target = args.out / args.names[pred["path"]]
        # A new file renamed into place: an old one that links to a photo is replaced, never written through.
        jpeg = target.suffix.lower() in (".jpg", ".jpeg")
        atomic_write(target, lambda handle: drawn.save(handle, format="JPEG", quality=95) if jpeg else drawn.save(handle, format="PNG"))
        shown = [f"{names[int(l)]} {s:.2f}" for l, s in zip(pred["labels"][keep], pred["scores"][keep])]
        found = ", ".join(shown[:5]) + (f", ... (+{len(shown) - 5})" if len(shown) > 5 else "")
        print(f"{pred['path'].name}: {int(keep.sum())} detection(s) >= {args.score_threshold:g}{': ' + found if found else ''}")


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them."""
    from mnapps.engine.distributed import resolve_device
    from mnapps.eval.coco import predictions_to_coco_results
    from mnapps.tasks.detection import image_ids_for, load_detector

    try:
        device = resolve_device(args.device)
        paths = list_images(args.source, recursive=False)
        if not paths:
            raise FileNotFoundError(f"{args.source} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        _check_outputs(args, paths)
        model, cfg = load_detector(args.checkpoint, device=device)
        ids = image_ids_for(paths, args.ann) if args.results_json else None
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    predictions = _predict(args, model, paths, device)
    if not predictions:
        print(f"error: none of the {len(paths)} image(s) under {args.source} could be read; nothing was drawn",
              file=sys.stderr)
        return 2
    names = list(cfg.model.class_names) or [f"class_{i}" for i in range(cfg.model.num_classes)]
    _draw(args, predictions, names)
    skipped = len(paths) - len(predictions)
    print(f"drew {len(predictions)} image(s) into {args.out}" + (f"; skipped {skipped} unreadable" if skipped else ""))

    if args.results_json:
        label_to_cat = {label: cat for label, cat in enumerate(cfg.model.category_ids, start=1)}
        if not label_to_cat:
            label_to_cat = {label: label for label in range(1, cfg.model.num_classes)}
        id_of = dict(zip(paths, ids))
        results = predictions_to_coco_results(predictions, [id_of[p["path"]] for p in predictions], label_to_cat)
        atomic_write(args.results_json, lambda handle: handle.write(json.dumps(results).encode()))
        print(f"wrote {len(results)} detections to {args.results_json}")
    return 0
