"""TensorFlow weights, read and converted: every TF / TF.js / TF Object Detection API importer.

One place for the foreign formats: :mod:`.tf_checkpoint` reads a TF checkpoint (``.index`` +
``.data``) or a name -> array ``.npz`` with no TensorFlow installed; :mod:`.tfjs` reads a
TensorFlow.js weights folder (manifest + ``.bin`` shards, quantised tensors decoded);
:mod:`.tf_slim` maps Google's TF-slim MobileNetV1 names onto :class:`mnapps.backbones.MobileNetV1`;
:mod:`.tf_od_api` rebuilds a TF Object Detection API ``ssd_mobilenet_v1`` as an mnapps SSD. The
tasks wrap these into checkpoints (``mnapps.tasks.classification.import_tf_slim_checkpoint``,
``mnapps.tasks.detection.import_tf_od_api_ssd_checkpoint``).
"""
