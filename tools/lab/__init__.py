"""Benchmark harnesses: what mnapps measures about itself, apart from the library it measures.

:mod:`.models` times inference and training steps side by side with their peers
(``tools/benchmark.py``); :mod:`.coco_sim` writes a COCO-scale annotation file,
:mod:`.data_path` measures the data path on it and :mod:`.data_report` summarises the figures
(``tools/bench_data.py``).
"""
