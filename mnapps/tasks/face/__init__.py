"""The face task: distil a FaceNet teacher into a MobileNetV1 embedder, load it, and score it.

This package owns everything ``tools/distill_face.py``, ``eval_face.py`` and ``embed_faces.py``
do beyond parsing arguments, one thing per module:

* :mod:`.config`: :class:`FaceDistillConfig` (the YAML schema of ``configs/face_*.yaml``) and
  :func:`load_distill_config`;
* :mod:`.data`: the training and held-out crops (:func:`build_distill_data`; the embedded
  generated faces when no folder is given) and a real teacher's clean person-labelled pool;
* :mod:`.teacher`: the frozen teacher of a run (:func:`prepare_teacher`) and its cached
  embeddings;
* :mod:`.train`: :class:`FaceTask` (the face :class:`mnapps.tasks.task.Task`) and
  :func:`distill_face` (checkpoints, ``--resume``, ``--overwrite``, DDP under ``torchrun``),
  the few-face recipe's pieces (strong
  augmentation and random erasing, mixup/cutmix of two faces, the relational loss, the
  ImageNet trunk as the start, crops repeated per epoch) and the reference points and collapse
  guard of every run;
* :mod:`.model`: :func:`load_face_embedder` (a distilled student) and
  :func:`load_trunk_embedder` (any mnapps checkpoint's trunk as pooled features: the
  no-distillation baseline);
* :mod:`.verify`: :func:`evaluate_face_verification`, the pair evaluation behind
  ``tools/eval_face.py`` (alignment on request, one embedding pass per model, metrics, spread,
  ROC curves);

Every public name is importable from the package itself.
"""

from .config import FaceDataConfig, FaceDistillConfig, TeacherConfig, load_distill_config
from .data.datasets import FaceDistillData, build_distill_data, face_datasets, face_image_files
from .model import face_export_plan, load_face_embedder, load_face_task, load_trunk_embedder
from .teacher import prepare_teacher
from .train import FaceResult, FaceRun, FaceTask, distill_face, pair_agreement
from .verify import VerificationResult, align_pair_images, evaluate_face_verification

__all__ = [
    "TeacherConfig",
    "FaceDataConfig",
    "FaceDistillConfig",
    "FaceDistillData",
    "build_distill_data",
    "prepare_teacher",
    "distill_face",
    "FaceTask",
    "FaceRun",
    "FaceResult",
    "load_distill_config",
    "load_face_embedder",
    "load_trunk_embedder",
    "pair_agreement",
    "align_pair_images",
    "evaluate_face_verification",
    "VerificationResult",
    "load_face_task",
    "face_export_plan",
    "face_datasets",
    "face_image_files",
]
