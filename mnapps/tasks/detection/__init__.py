"""Detection as a task: config, data, training, checkpoints, inference and TF import.

The package holds one thing per module: :mod:`.config` (:class:`DetConfig`, the model it
describes, :func:`fine_tune_config`), :mod:`.data` (the COCO-format datasets), :mod:`.train`
(:class:`DetectionTask`, detection's :class:`mnapps.tasks.task.Task`, and :func:`train_detector`),
:mod:`.model` (:func:`load_detector`, :func:`load_detector_weights`), :mod:`.evaluate`
(:func:`evaluate_detection`), :mod:`.predict` (:func:`predict_images`, :func:`draw_detections`,
:func:`box_detector`), :mod:`.soft_targets` (a teacher detector's per-anchor outputs as extra
training targets) and :mod:`.tf_import` (:func:`import_tf_od_api_ssd_checkpoint`). Every
public name is importable from the package itself.

What the data decides (number of classes, class names, the dataset's category ids) is written
into ``cfg.model`` before training, so a checkpoint alone rebuilds the model, names its classes
and maps its labels back to the original COCO category ids.
"""

from .config import (DetConfig, DetDataConfig, DetDistillConfig, DetModelConfig, build_model, fine_tune_config,
                     model_input_size)
from .evaluate import evaluate_detection
from .data import build_det_datasets, build_eval_dataset, build_train_dataset, det_image_files
from .model import CLASS_PREDICTOR_PREFIXES, det_export_plan, load_detector, load_detector_weights
from .predict import box_detector, draw_detections, image_ids_for, predict_images
from .tf_import import import_tf_od_api_ssd_checkpoint
from .soft_targets import check_compatible, soft_target_losses, with_soft_targets
from .train import (BatchCounter, DetectionResult, DetectionRun, DetectionTask, EpochEvaluation, SoftTargetTeacher,
                    detection_losses, train_detector)

__all__ = [
    "DetModelConfig",
    "DetDataConfig",
    "DetDistillConfig",
    "check_compatible",
    "soft_target_losses",
    "with_soft_targets",
    "DetConfig",
    "build_model",
    "train_detector",
    "DetectionTask",
    "DetectionRun",
    "DetectionResult",
    "EpochEvaluation",
    "SoftTargetTeacher",
    "BatchCounter",
    "build_train_dataset",
    "build_eval_dataset",
    "build_det_datasets",
    "det_image_files",
    "load_detector",
    "predict_images",
    "model_input_size",
    "detection_losses",
    "draw_detections",
    "image_ids_for",
    "import_tf_od_api_ssd_checkpoint",
    "fine_tune_config",
    "load_detector_weights",
    "box_detector",
    "CLASS_PREDICTOR_PREFIXES",
    "det_export_plan",
    "evaluate_detection",
]
