"""Writing and reading outputs: the checkpoint and its manifest (``checkpoint``), and the serving layout
that vLLM, ``transformers`` and ``peft`` read (``serving``)."""

from .checkpoint import (
                         FORMAT_VERSION,
                         LOG,
                         MANIFEST,
                         compressed_modules,
                         dequantized_base,
                         load,
                         merge_in_place,
                         read_manifest,
                         save,
)
from .output import OutputDirectory, check_output, pause_for_tests

__all__ = ["FORMAT_VERSION", "LOG", "MANIFEST", "OutputDirectory", "check_output", "compressed_modules",
           "dequantized_base", "load", "merge_in_place", "pause_for_tests", "read_manifest", "save"]
