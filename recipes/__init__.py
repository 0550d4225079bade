"""Recipes shipped with the package (YAML files); ``--recipe NAME`` finds them here."""
