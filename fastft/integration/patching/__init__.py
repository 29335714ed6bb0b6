"""One-call patching of Hugging Face models: `patch_model` / `unpatch_model` (see patch.py, table.py)."""
from fastft.integration.patching.patch import patch_model, supported_architectures, unpatch_model

__all__ = ["patch_model", "supported_architectures", "unpatch_model"]
