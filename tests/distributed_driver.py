"""Run by the distributed tests under ``torchrun``: every rank compresses each job of a JSON file in turn
(``[{"model": DIR, "recipe": NAME, "overrides": [...], "out": DIR}, ...]``), as ``compressor compress``
would; rank 0 writes the outputs. One process group serves all the jobs (``compressor.parallel.distributed``)."""

from __future__ import annotations

import json
import sys

from compressor import api


def main() -> None:
    for job in json.loads(open(sys.argv[1]).read()):
        api.compress(job["model"], job["recipe"], job["out"], overrides=job["overrides"], progress=False)


if __name__ == "__main__":
    main()
