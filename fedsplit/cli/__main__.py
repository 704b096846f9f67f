"""``python -m fedsplit.cli``: the ``fedsplit`` command."""

import sys

from . import main

sys.exit(main())
