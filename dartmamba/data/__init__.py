"""Data sets that ship with the package (nothing is downloaded)."""
from .canvas import CanvasSample, ClutteredCanvas, digits_source

__all__ = ["CanvasSample", "ClutteredCanvas", "digits_source"]
