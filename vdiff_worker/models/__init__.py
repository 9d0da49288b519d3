"""Model implementations and checkpoint loading for the worker."""

from vdiff_worker.models.base import KVCache, ModelOutput
from vdiff_worker.models.errors import CheckpointError
from vdiff_worker.models.loader import LoadedModel, load_model

__all__ = ["CheckpointError", "KVCache", "LoadedModel", "ModelOutput", "load_model"]
