"""The file copied into every non-merged output (``modeling_compressor.py``): torch and transformers only."""
