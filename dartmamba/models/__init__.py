"""Model families, registered with timm on import."""
from .deit import DartVisionTransformer
from .vim import VisionMamba

__all__ = ["DartVisionTransformer", "VisionMamba"]
