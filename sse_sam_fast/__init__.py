"""Fast, drop-in SAM, ImbSAM and SSE-SAM for long-tailed learning.

>>> from sse_sam_fast import SSESAM, tail_classes, tail_mask
"""

from .longtail import tail_classes, tail_mask
from .optim import SAM, SSESAM, ImbSAM

__version__ = "0.1.0"
__all__ = ["SAM", "ImbSAM", "SSESAM", "tail_classes", "tail_mask", "__version__"]
