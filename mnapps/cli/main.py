"""`mnapps <verb> ...`: one command in front of every tool (mnapps --help lists the verbs).

Each verb runs the same main() as its `mnapps-<verb>` entry point and `tools/<verb>.py`; the
table below is the only list, and a verb's module is imported only when it runs, so
`mnapps --help` and `mnapps <verb> --help` answer at once.
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module in mnapps.cli, one line for `mnapps --help`), in the order a user meets them.
VERBS: dict[str, tuple[str, str]] = {
    "weights": ("weights", "list, download and import pretrained weights by name"),
    "train-det": ("train_det", "train a detector (SSD, SSDLite, Faster R-CNN) and print COCO metrics"),
    "eval-det": ("eval_det", "COCO-evaluate a detector checkpoint or a results file"),
    "infer-det": ("infer_det", "run a detector on images: drawn boxes, JSON, COCO results"),
    "distill-face": ("distill_face", "distil a FaceNet teacher into a MobileNetV1 face embedder"),
    "pseudo-label": ("pseudo_label", "label photos with a teacher detector: a COCO annotation file"),
    "make-student": ("make_student", "a smaller/narrower detector started from a teacher, BatchNorm recalibrated"),
    "compare-detectors": ("compare_detectors", "detectors side by side: MACs, ms in PyTorch/ONNX/int8, COCO AP"),
    "align-faces": ("align_faces", "detect and crop faces (MTCNN or an SSD face detector)"),
    "embed-faces": ("embed_faces", "write face embeddings of a folder of crops"),
    "eval-face": ("eval_face", "face verification: ROC AUC, EER, accuracy on labelled pairs"),
    "train-cls": ("train_cls", "train a MobileNetV1 classifier"),
    "classify": ("classify", "classify images with a classifier checkpoint (e.g. ImageNet)"),
    "export": ("export", "export a checkpoint to ONNX (BatchNorm folded, parity-checked), optionally int8"),
    "import-weights": ("import_weights", "convert TF-slim / TF OD API / TF.js weights into a checkpoint"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [
        "usage: mnapps <verb> [options]      (mnapps <verb> --help for a verb's options)",
        "",
        "MobileNetV1 detectors, classifiers and face embedders: train, evaluate, run, export.",
        "",
        "verbs:",
        *(f"  {verb:<{width}}  {summary}" for verb, (_, summary) in VERBS.items()),
        "",
        "Every verb is also a command of its own (mnapps-train-det, ...) and a script (tools/train_det.py).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        close = [v for v in VERBS if v.startswith(verb[:3])] or list(VERBS)[:4]
        print(f"mnapps: unknown verb {verb!r}; did you mean {' or '.join(close)}? (mnapps --help lists them)",
              file=sys.stderr)  # fmt: skip
        return 2
    module = importlib.import_module(f"mnapps.cli.{VERBS[verb][0]}")
    sys.argv[0] = f"mnapps {verb}"  # argparse's usage line then reads "usage: mnapps train-det ..."
    return module.main(rest) or 0
