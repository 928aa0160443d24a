"""detrkd: knowledge distillation for DETR-family object detectors."""

__version__ = "0.1.0"
