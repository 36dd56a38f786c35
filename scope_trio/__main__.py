"""``python -m scope_trio`` is the ``scope-trio`` command."""

import sys

from scope_trio.cli import main

sys.exit(main())
