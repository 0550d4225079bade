"""compressor: post-training compression of large language models.

Public API (what the CLI calls):
    compress(model, recipe, out, ...)   → compress a model with a recipe (and heal it, if the recipe says so) and save it
    load(path)                          → rebuild a saved compressed model
    evaluate(model_or_path, ...)        → perplexity, parameters, bytes on disk, tokens/s
"""

from .errors import CompressorError
from .version import __version__

__all__ = ["CompressorError", "__version__", "compress", "load", "evaluate"]


def __getattr__(name):  # lazy: importing the package stays cheap (no torch/transformers at import)
    if name == "compress":  # api.compress, and the recipe's heal: section when it has one
        from .run import compress

        return compress
    if name == "load":
        from .io import load

        return load
    if name == "evaluate":
        from .evaluation.evaluate import evaluate

        return evaluate
    raise AttributeError(name)
