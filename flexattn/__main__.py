"""``python -m flexattn``: the same as the ``flexattn`` command."""

import sys

from flexattn.cli import main

sys.exit(main())
