"""One module per compressor; ``registry`` imports each one explicitly."""
