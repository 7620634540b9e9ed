"""``python -m fixq ...`` is the same as the ``fixq`` command."""
import sys

from .cli import main

sys.exit(main())
