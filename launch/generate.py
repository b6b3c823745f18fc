"""torchrun entry script: ``torchrun --nproc-per-node N launch/generate.py --help``.

Thin on purpose: the program is ``megatron_coord.launch.generate`` (also run by
``torchrun ... -m megatron_coord.launch.generate`` or ``torchrun --no-python megatron-coord-generate`` once
the package is installed).
"""

import sys

from megatron_coord.launch.generate import main

if __name__ == "__main__":
    sys.exit(main())
