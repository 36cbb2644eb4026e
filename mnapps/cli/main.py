"""`mnapps <verb> ...`: the one command in front of every tool (mnapps --help lists the verbs).

Each verb runs the main() of its module in mnapps.cli, the same one `python tools/<verb>.py` runs
from a source checkout; there is no other console command. The table below is the only list,
and a verb's module is imported only when it runs, so `mnapps --help` and `mnapps <verb> --help`
answer at once. Output piped into a reader that stops early (`mnapps --help | head -1`) ends
quietly, as with other command-line tools, instead of with a BrokenPipeError traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from mnapps import __version__

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
        "mnapps --version prints the version. From a source checkout, python tools/<verb>.py runs the same verb",
        "(python tools/train_det.py --head ssd).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return run_verb(list(sys.argv[1:] if argv is None else argv))
        finally:
            sys.stdout.flush()  # a reader that has gone away shows up here (also after a verb's --help exit)
    except BrokenPipeError:
        # Python would flush stdout again at exit and print the same error: point it at devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run_verb(argv: list[str]) -> int:
    """Print the usage or the version, or run the verb ``argv[0]`` with the rest of the arguments."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"mnapps {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        close = [v for v in VERBS if v.startswith(verb[:3])] or list(VERBS)[:4]
        print(f"mnapps: unknown verb {verb!r}; did you mean {' or '.join(close)}? (mnapps --help lists them)",
              file=sys.stderr)  # fmt: skip
        return 2
    module = importlib.import_module(f"mnapps.cli.{VERBS[verb][0]}")
    sys.argv[0] = f"mnapps {verb}"  # argparse's usage line then reads "usage: mnapps train-det ..."
    return module.main(rest) or 0
