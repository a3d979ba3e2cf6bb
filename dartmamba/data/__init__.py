"""Data sets that ship with the package (nothing is downloaded)."""
from .canvas import MASK_THRESHOLD, CanvasSample, ClutteredCanvas, digits_source

__all__ = ["CanvasSample", "ClutteredCanvas", "digits_source", "MASK_THRESHOLD"]
