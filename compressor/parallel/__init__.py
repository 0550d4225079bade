"""Runs spread over several ``torchrun`` processes (``distributed``)."""
