"""From a recipe to a compiled plan: config dataclasses (``configs``), YAML recipes (``recipe``) and the
plan every run follows (``compile``), built and validated before any weight is read."""
