"""compressor: post-training compression of large language models.

Public API (what the CLI calls):
    compress(model, recipe, out, ...)   → compress a model with a recipe and save it
    load(path)                          → rebuild a saved compressed model
    evaluate(model_or_path, ...)        → perplexity, parameters, bytes on disk, tokens/s
"""

__version__ = "0.1.0"

from .errors import CompressorError  # noqa: E402


def _checkout_layout() -> None:
    """In a checkout (not installed), ``recipes/`` and ``calibration/`` sit beside the package and are
    mapped into it only by the installer; adding the checkout root to the package's search path makes
    ``compressor.recipes`` and ``compressor.calibration`` importable there too (``python cli.py``)."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    if not (here / "calibration").is_dir() and (here.parent / "calibration" / "__init__.py").is_file():
        __path__.append(str(here.parent))  # noqa: F821 (the package's own __path__)


_checkout_layout()

__all__ = ["CompressorError", "__version__", "compress", "load", "evaluate"]


def __getattr__(name):  # lazy: importing the package stays cheap (no torch/transformers at import)
    if name == "compress":
        from .api import compress

        return compress
    if name == "load":
        from .io import load

        return load
    if name == "evaluate":
        from .evaluate import evaluate

        return evaluate
    raise AttributeError(name)
