"""Face-embedding distillation (paper Sec. 4.7): the frozen FaceNet teacher (:mod:`.teacher`), the
losses (:mod:`.losses`), mixed views for a teacher that embeds each view (:mod:`.views`) and the
closed-form start of the student's embedding layer (:mod:`.warm_start`). The training task
itself is :mod:`mnapps.tasks.face`."""
