"""``python -m megatron_coord.serving``: see ``cli.py``."""

import sys

from .cli import main

sys.exit(main())
