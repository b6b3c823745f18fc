"""megatron_coord: a data-parallel inference coordinator for torchrun launches.

The public names below are stable (see DESIGN.md). Importing the package does not import
torch: clients and the coordinator stay light; engines and models import it themselves.
"""

from .client import InferenceClient
from .coordinator import DataParallelInferenceCoordinator
from .protocol import Headers
from .sampling_params import SamplingParams

__all__ = ["DataParallelInferenceCoordinator", "Headers", "InferenceClient", "SamplingParams"]
