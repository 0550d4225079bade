"""The calibration and evaluation text sources: a re-export of ``compressor.calibration``, where they live."""

from compressor.calibration import *  # noqa: F401,F403
