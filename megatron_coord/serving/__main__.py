"""``python -m megatron_coord.serving``: see ``cli.py``."""

from .cli import main

main()
