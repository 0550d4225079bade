"""The model side: loading checkpoints (``loading``), the architecture found from the model
(``architecture``), which linears a step targets (``targets``), and the module kinds compressors emit
(``modules``)."""
