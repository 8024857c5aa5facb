"""A real worker with a bug injected into its step: the learning-rate schedule raises a
``RuntimeError`` at the 0-based step ``$OOBLECK_TEST_BUG_AT_STEP``, after that step's commit
vote, then it runs as ``python -m oobleck.worker``. A ``RuntimeError`` that no communication
raised is a bug, not a peer gone: the worker must fail at once."""

import os
import sys

from oobleck.worker import main, optim

_lr_at = optim.lr_at
BUG_AT = int(os.environ["OOBLECK_TEST_BUG_AT_STEP"])


def lr_at(spec, step: int) -> float:
    if step == BUG_AT:
        raise RuntimeError(f"injected bug at step {step + 1}")
    return _lr_at(spec, step)


optim.lr_at = lr_at
sys.exit(main.main([]))
