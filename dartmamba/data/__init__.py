"""Data sets that ship with the package (nothing is downloaded)."""
from .canvas import MASK_THRESHOLD, CanvasSample, ClutteredCanvas, digits_source
from .video_canvas import ClipSample, MovingDigitClips

__all__ = ["CanvasSample", "ClutteredCanvas", "digits_source", "MASK_THRESHOLD", "ClipSample", "MovingDigitClips"]
