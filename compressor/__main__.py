"""``python -m compressor ...``: the command line, also as torchrun runs it (``torchrun --nproc-per-node 8
-m compressor compress MODEL --recipe R --out OUT``: ``compressor.parallel.distributed``)."""

from .cli import main

if __name__ == "__main__":
    main()
