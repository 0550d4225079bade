"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class CompressorError(Exception):
    """Bad input (model, recipe, option, path): a message meant for the user, not a bug report."""
