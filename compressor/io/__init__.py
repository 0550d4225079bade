"""Writing and reading outputs: the checkpoint and its manifest (``checkpoint``), and the serving layout
that vLLM, ``transformers`` and ``peft`` read (``serving``)."""

from .checkpoint import (
                         FORMAT_VERSION,
                         LOG,
                         MANIFEST,
                         check_output,
                         compressed_modules,
                         load,
                         merge_in_place,
                         read_manifest,
                         save,
)

__all__ = ["FORMAT_VERSION", "LOG", "MANIFEST", "check_output", "compressed_modules", "load", "merge_in_place",
           "read_manifest", "save"]
