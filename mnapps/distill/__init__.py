"""Face-embedding distillation (paper Sec. 4.7): the frozen FaceNet teacher, the losses, and the
training glue on the shared engine (:mod:`.teacher`, :mod:`.losses`, :mod:`.train`)."""
