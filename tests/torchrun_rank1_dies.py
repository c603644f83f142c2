"""A torchrun worker for tests: the ``sparseinv`` command, except that rank 1 kills itself
(SIGKILL, no clean-up) the moment it starts its second batch, i.e. with one batch committed
and one in flight. The test then waits on the launcher's exit, not on a clock.

Commits run in the background; rank 1 waits for each here, so "one batch committed" is
exactly so when the kill comes (a SIGKILL during a commit loses that batch too, by design).
"""

import os
import signal
import sys

import sparseinv.inversion.loop as loop
from sparseinv.cli import main
from sparseinv.pool import PoolWriter

if os.environ.get("RANK") == "1":
    real_invert_batch = loop.invert_batch
    started = []

    def invert_batch(*args, **kwargs):
        started.append(True)
        if len(started) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_invert_batch(*args, **kwargs)

    loop.invert_batch = invert_batch
    real_add_batch = PoolWriter.add_batch

    def add_batch(self, *args, **kwargs):
        real_add_batch(self, *args, **kwargs)
        self.wait()

    PoolWriter.add_batch = add_batch

sys.exit(main())
