"""The face task's data: photos of people in, aligned crops out, and the datasets training reads.

:mod:`.faces` lists crops and their people and splits them by person; :mod:`.align` detects and
crops faces (MTCNN, or an SSD face detector through :mod:`mnapps.data.box_crops`);
:mod:`.face_check` keeps only crops a detector still calls a face; :mod:`.persons` builds a clean
person-labelled pool with the teacher's help; :mod:`.synthetic_faces` generates the embedded
offline faces; :mod:`.datasets` turns a config's folders into training and held-out sets.
"""
