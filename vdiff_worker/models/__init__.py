"""Model implementations and checkpoint loading for the worker."""

from vdiff_worker.models.base import ModelOutput
from vdiff_worker.models.errors import CheckpointError
from vdiff_worker.models.loader import LoadedModel, load_model

__all__ = ["CheckpointError", "LoadedModel", "ModelOutput", "load_model"]
