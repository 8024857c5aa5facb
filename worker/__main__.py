"""``python -m oobleck.worker``: the worker process the agent spawns (see :mod:`oobleck.worker.main`)."""

import sys

from oobleck.worker.main import main

if __name__ == "__main__":
    sys.exit(main())
