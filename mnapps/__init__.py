"""mnapps: one MobileNetV1 backbone feeding pluggable heads (SSD, Faster R-CNN, face embeddings)."""

import os as _os

# albumentations checks PyPI for a newer release on import; mnapps runs offline (edge boxes,
# clusters without internet), so that check is off unless the user turns it back on.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
