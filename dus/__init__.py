"""dus: depth up-scaling and seam healing for Hugging Face decoder-only language models."""

from dus.library_logs import drop_misleading_library_logs
from dus.no_hub_code import refuse_hub_kernels

__version__ = "0.1.0"

drop_misleading_library_logs()
refuse_hub_kernels()
