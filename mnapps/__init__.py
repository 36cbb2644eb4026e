"""mnapps: one MobileNetV1 backbone feeding pluggable heads (SSD, Faster R-CNN, face embeddings)."""

__version__ = "0.1.0"
