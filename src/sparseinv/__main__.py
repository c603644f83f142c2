"""``python -m sparseinv``, which is also how torchrun starts it: ``torchrun ... -m sparseinv invert ...``."""

import sys

from sparseinv.cli import main

sys.exit(main())
