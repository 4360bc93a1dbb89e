"""deim-ultra: DEIM real-time DETR (CVPR 2025) for the Ultralytics ecosystem."""

from deim_ultra.checkpoints.safe_load import allow_weights_only_loading
from deim_ultra.convert import convert_official
from deim_ultra.model import DEIM

allow_weights_only_loading()  # Ultralytics' ULTRALYTICS_SAFE_LOAD=1 loading then accepts DEIM checkpoints

__version__ = "0.1.0"
__all__ = ["DEIM", "convert_official", "__version__"]
