"""Run the compressor CLI from a checkout: ``python cli.py compress ...`` (same app as ``compressor``)."""

from compressor.cli import main

if __name__ == "__main__":
    main()
