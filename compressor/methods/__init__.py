"""One module per compressor; ``compressor.registry`` imports each one explicitly."""
