"""``python -m megatron_coord.coordinator``: the standalone coordinator (see ``standalone.py``)."""

import sys

from .standalone import main

sys.exit(main())
