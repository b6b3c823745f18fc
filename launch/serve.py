"""torchrun entry script: ``torchrun --nproc-per-node N launch/serve.py --help``.

Thin on purpose: the program is ``megatron_coord.launch.serve`` (also run by
``torchrun ... -m megatron_coord.launch.serve`` or ``torchrun --no-python megatron-coord-serve`` once
the package is installed).
"""

import sys

from megatron_coord.launch.serve import main

if __name__ == "__main__":
    sys.exit(main())
