"""Networks: the Moebius student and the PixelHacker teacher (tensors in, tensors out)."""

from moebius.models.optimize import optimize
from moebius.models.student import MoebiusConfig, MoebiusUNet

__all__ = ["MoebiusConfig", "MoebiusUNet", "optimize"]

try:  # the teacher lives in its own module
    from moebius.models.teacher import PixelHackerConfig, PixelHackerUNet  # noqa: F401

    __all__ += ["PixelHackerConfig", "PixelHackerUNet"]
except ImportError:  # pragma: no cover
    pass
