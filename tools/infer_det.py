#!/usr/bin/env python
"""Run a trained mnapps detector on images: draw boxes, class names and scores, and optionally
write a COCO results JSON (original category ids) for tools/eval_det.py --results.

Drawn images go to --out with the input's name (JPEG stays JPEG, anything else becomes PNG).
Only detections scoring at least --score-threshold are drawn; the results JSON keeps every
detection the model returns (COCO AP needs the low-scoring ones too). Image ids in the JSON come
from --ann (the annotation file listing the images), else from numeric file names, else 1..N.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXAMPLES = """examples:
  python tools/infer_det.py --checkpoint runs/ssd_mnv1_a050_r192_shapes/best.pt \\
      ~/.cache/mnapps/shapes_det_v1_n2000-200_s192_seed0/val --out /tmp/drawn
  python tools/infer_det.py --checkpoint runs/coco8/best.pt ../shared/data/coco8/images/val --out /tmp/coco8 \\
      --results-json /tmp/coco8/results.json --ann ../shared/data/coco8/instances_val.json
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, metavar="IMAGE_OR_DIR", help="an image file or a folder of images")
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="F", help="mnapps detection checkpoint (.pt)")
    parser.add_argument("--out", type=Path, required=True, metavar="D", help="folder for the drawn images")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="draw detections scoring at least this (default 0.3)")
    parser.add_argument("--results-json", type=Path, metavar="F", help="also write COCO results JSON here")
    parser.add_argument("--ann", type=Path, metavar="F", help="COCO annotation file naming the images (for image ids)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.score_threshold <= 1.0:
        parser.error(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mnapps.engine.detection import draw_detections, image_ids_for, list_images, load_detector, predict_images
    from mnapps.eval.coco import predictions_to_coco_results

    try:
        paths = list_images(args.source)
        model, cfg = load_detector(args.checkpoint, device=args.device)
        ids = image_ids_for(paths, args.ann) if args.results_json else None
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    predictions = predict_images(model, paths, device=args.device, batch_size=args.batch_size)
    names = list(cfg.model.class_names) or [f"class_{i}" for i in range(cfg.model.num_classes)]
    args.out.mkdir(parents=True, exist_ok=True)
    for pred in predictions:
        keep = pred["scores"] >= args.score_threshold
        drawn = draw_detections(pred["image"], pred["boxes"][keep], pred["labels"][keep], pred["scores"][keep], names)
        suffix = ".jpg" if pred["path"].suffix.lower() in (".jpg", ".jpeg") else ".png"
        target = args.out / f"{pred['path'].stem}{suffix}"
        drawn.save(target, quality=95) if suffix == ".jpg" else drawn.save(target)
        shown = [f"{names[int(l)]} {s:.2f}" for l, s in zip(pred["labels"][keep], pred["scores"][keep])]
        found = ", ".join(shown[:5]) + (f", ... (+{len(shown) - 5})" if len(shown) > 5 else "")
        print(f"{pred['path'].name}: {int(keep.sum())} detection(s) >= {args.score_threshold:g}{': ' + found if found else ''}")
    print(f"drew {len(predictions)} image(s) into {args.out}")

    if args.results_json:
        label_to_cat = {label: cat for label, cat in enumerate(cfg.model.category_ids, start=1)}
        if not label_to_cat:
            label_to_cat = {label: label for label in range(1, cfg.model.num_classes)}
        id_of = dict(zip(paths, ids))
        results = predictions_to_coco_results(predictions, [id_of[p["path"]] for p in predictions], label_to_cat)
        args.results_json.parent.mkdir(parents=True, exist_ok=True)
        args.results_json.write_text(json.dumps(results))
        print(f"wrote {len(results)} detections to {args.results_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
