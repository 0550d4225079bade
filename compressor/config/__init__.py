"""Config machinery: dataclass configs whose unknown keys are errors, ``--set`` overrides (``configs``)."""
