#!/usr/bin/env python
"""Write face embeddings of every image under DIR (for search or clustering), batched on the device.

The model is a distilled student (``--checkpoint best.pt``) or the FaceNet teacher
(``--teacher-weights PATH`` or ``--teacher vggface2|casia-webface``). Images should be aligned
crops (``tools/align_faces.py``). ``--out F.npz`` stores ``embeddings`` [N, D] float32 and
``files`` (paths relative to DIR); ``--out F.npy`` stores the array and writes the file list
next to it as ``F.txt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mnapps.data.faces import list_images  # noqa: E402
from mnapps.distill.teacher import PRETRAINED_TEACHERS, TeacherWeightsError, build_teacher  # noqa: E402
from mnapps.eval.face import embed_files  # noqa: E402
from mnapps.heads.face_embedding import load_face_embedder  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="example: python tools/embed_faces.py runs/aligned/deepface --checkpoint runs/face/best.pt --out emb.npz",
    )
    parser.add_argument("dir", type=Path, help="folder of face crops (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="output .npz (embeddings + files) or .npy (+ .txt list)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a student checkpoint from tools/distill_face.py")
    source.add_argument("--teacher-weights", type=Path, help="a local InceptionResnetV1 state dict (the teacher)")
    source.add_argument("--teacher", choices=sorted(PRETRAINED_TEACHERS), help="facenet-pytorch's pretrained teacher")
    parser.add_argument("--image-size", type=int, default=160, help="side the crops are resized to (default 160)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--flip-tta", action="store_true", help="average with the mirrored image's embedding")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.out.suffix not in (".npz", ".npy"):
        print(f"error: --out must end in .npz or .npy, got {args.out}", file=sys.stderr)
        return 2
    try:
        files = list_images(args.dir)
        if not files:
            raise ValueError(f"no images found under {args.dir}")
        if args.checkpoint is not None:
            model, _ = load_face_embedder(args.checkpoint, device)
        else:
            model = build_teacher(args.teacher, weights=args.teacher_weights, device=device)
        embeddings = embed_files(model, files, image_size=args.image_size, batch_size=args.batch_size,
                                 device=device, flip_tta=args.flip_tta).numpy().astype(np.float32)
    except (FileNotFoundError, ValueError, TeacherWeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = [f.relative_to(args.dir).as_posix() for f in files]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".npz":
        np.savez(args.out, embeddings=embeddings, files=np.array(names))
    else:
        np.save(args.out, embeddings)
        args.out.with_suffix(".txt").write_text("\n".join(names) + "\n")
    print(f"wrote {embeddings.shape[0]} embeddings of dimension {embeddings.shape[1]} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
