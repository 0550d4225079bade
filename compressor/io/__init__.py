"""Writing and reading outputs: the checkpoint and its manifest (``checkpoint``), where a run's output goes
(``sink``: in memory, or streamed with resume records), and the serving layout that vLLM, ``transformers``
and ``peft`` read (``serving``)."""

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
from .output import OutputDirectory, check_output
from .sink import Sink, open_sink

__all__ = ["FORMAT_VERSION", "LOG", "MANIFEST", "OutputDirectory", "check_output", "compressed_modules",
           "dequantized_base", "load", "merge_in_place", "open_sink", "read_manifest", "save", "Sink"]
