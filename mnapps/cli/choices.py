"""Names the command-line tools offer as choices, known without importing torch.

``--help`` must answer at once, so argument parsers cannot read the tables that hold these
names (they live beside torch code). tests/test_cli_main.py checks that each tuple equals its
table: ``mnapps.heads.HEADS``, ``mnapps.tasks.face.distill.teacher.PRETRAINED_TEACHERS``,
``mnapps.data.box_crops.CROP_GEOMETRIES``, and
``mnapps.export.det_compare.THRESHOLD_RULES`` (default first); the two defaults
below equal the library constants they name.
"""

HEAD_NAMES = ("faster_rcnn", "faster_rcnn_fpn", "ssd", "ssdlite")
PRETRAINED_TEACHER_NAMES = ("casia-webface", "vggface2")
CROP_GEOMETRY_NAMES = ("mtcnn", "square")
THRESHOLD_RULE_NAMES = ("conformal", "val-recall")

#: ``mnapps.tasks.face.data.face_check.DEFAULT_MIN_FACE_SCORE``: align_faces' default for --min-face-score.
DEFAULT_MIN_FACE_SCORE = 0.95
#: ``mnapps.tasks.face.data.persons.SAME_PERSON_DISTANCE``: eval_face's default for --same-threshold.
SAME_PERSON_DISTANCE = 1.1
