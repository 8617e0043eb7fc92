"""The optimizers: one grouped-perturbation engine (:mod:`.engine`) that runs a
step plan (:mod:`.plan`) through pass runners (:mod:`.passes`) on a backend
(``sse_sam_fast.backends``); SAM, ImbSAM and SSE-SAM (:mod:`.methods`) are
configurations of it."""

from .methods import SAM, SSESAM, ImbSAM
from .plan import REUSE_POLICIES, SCHEDULES

__all__ = ["SAM", "ImbSAM", "SSESAM", "SCHEDULES", "REUSE_POLICIES"]
