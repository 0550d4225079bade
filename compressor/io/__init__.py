"""Writing and reading outputs: the checkpoint and its manifest (``checkpoint``), and the serving layout
that vLLM, ``transformers`` and ``peft`` read (``serving``)."""

from .checkpoint import LOG, MANIFEST, check_output, compressed_modules, load, read_manifest, save

__all__ = ["LOG", "MANIFEST", "check_output", "compressed_modules", "load", "read_manifest", "save"]
