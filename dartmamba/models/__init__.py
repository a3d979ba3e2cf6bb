"""Model families, registered with timm on import (``FAMILIES``: each family's sizes and model names)."""
from ._common import FAMILIES, ModelFamily, register_family
from .deit import DartVisionTransformer
from .videomamba import VideoMamba
from .vim import VisionMamba

__all__ = ["DartVisionTransformer", "VisionMamba", "VideoMamba", "FAMILIES", "ModelFamily", "register_family"]
