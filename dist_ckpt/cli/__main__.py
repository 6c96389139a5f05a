"""``python -m dist_ckpt.cli``: the same as the ``dist-ckpt`` console script."""

import sys

from dist_ckpt.cli import main

sys.exit(main())
