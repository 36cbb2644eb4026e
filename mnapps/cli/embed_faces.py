"""Write face embeddings of every image under DIR (for search or clustering), batched on the device.

The model is a distilled student (``--checkpoint best.pt``) or the FaceNet teacher
(``--teacher-weights PATH`` or ``--teacher vggface2|casia-webface``). Images should be aligned
crops (``tools/align_faces.py``). ``--out F.npz`` stores ``embeddings`` [N, D] float32 and
``files`` (paths relative to DIR); ``--out F.npy`` stores the array and writes the file list
next to it as ``F.txt``. An unreadable image is an error naming it; ``--out`` may not be, or
lie inside, DIR.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from mnapps.choices import PRETRAINED_TEACHER_NAMES
from mnapps.data.image_io import list_images
from mnapps.files import atomic_write, check_output_path
from mnapps.weights import weights_arg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="example: python tools/embed_faces.py runs/aligned/deepface --checkpoint runs/face/best.pt --out emb.npz",
    )
    parser.add_argument("dir", type=Path, help="folder of face crops (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="output .npz (embeddings + files) or .npy (+ .txt list)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=weights_arg, help="a student checkpoint from tools/distill_face.py")
    source.add_argument("--teacher-weights", type=weights_arg, help="a local InceptionResnetV1 state dict (the teacher)")
    source.add_argument("--teacher", choices=list(PRETRAINED_TEACHER_NAMES), help="facenet-pytorch's pretrained teacher")
    parser.add_argument("--image-size", type=int, default=160, help="side the crops are resized to (default 160)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--flip-tta", action="store_true", help="average with the mirrored image's embedding")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    return parser.parse_args(argv)


def _check_out(args: argparse.Namespace) -> None:
    if args.out.suffix not in (".npz", ".npy"):
        raise ValueError(f"--out must end in .npz or .npy, got {args.out}")
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is an existing folder; give a .npz or .npy file name")
    inputs = [args.dir] + [p for p in (args.checkpoint, args.teacher_weights) if p is not None]
    check_output_path(args.out, inputs, what="--out file")
    if args.out.suffix == ".npy":
        check_output_path(args.out.with_suffix(".txt"), inputs, what="file list")


def _save(path: Path, data: dict[str, np.ndarray] | np.ndarray) -> None:
    buffer = io.BytesIO()
    if isinstance(data, dict):
        np.savez(buffer, **data)
    else:
        np.save(buffer, data)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Do what the parsed arguments ask; torch and the tasks are imported here, so --help never loads them."""
    import torch

    from mnapps.engine.distributed import resolve_device
    from mnapps.tasks.face import load_face_embedder
    from mnapps.tasks.face.distill.teacher import TeacherWeightsError, build_teacher
    from mnapps.tasks.face.evaluation import embed_faces

    try:
        _check_out(args)
        device = resolve_device(args.device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if not args.dir.is_dir():
            raise FileNotFoundError(f"{args.dir} is not a folder of face crops")
        files = list_images(args.dir)
        if not files:
            raise ValueError(f"no images found under {args.dir}")
        if args.checkpoint is not None:
            model, _ = load_face_embedder(args.checkpoint, device)
        else:
            model = build_teacher(args.teacher, weights=args.teacher_weights, device=device)
        embeddings = embed_faces(model, files, image_size=args.image_size, batch_size=args.batch_size,
                                 device=device, flip_tta=args.flip_tta, desc="embedding").numpy().astype(np.float32)
    except (FileNotFoundError, ValueError, TeacherWeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = [f.relative_to(args.dir).as_posix() for f in files]
    if args.out.suffix == ".npz":
        _save(args.out, {"embeddings": embeddings, "files": np.array(names)})
    else:
        _save(args.out, embeddings)
        text = ("\n".join(names) + "\n").encode()
        atomic_write(args.out.with_suffix(".txt"), lambda handle: handle.write(text))
    print(f"wrote {embeddings.shape[0]} embeddings of dimension {embeddings.shape[1]} to {args.out}")
    return 0
