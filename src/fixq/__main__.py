"""``python -m fixq ...`` is the same as the ``fixq`` command."""
import sys

from fixq.app.cli import main

sys.exit(main())
