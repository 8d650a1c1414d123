"""``python -m chunkfold.cli``: the ``chunkfold`` command without its console script."""

import sys

from chunkfold.cli import main

sys.exit(main())
