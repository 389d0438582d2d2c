"""fusion: multimodal fusion Transformers that explain themselves."""

from transformers import AutoConfig, AutoModel

from .configuration import FusionConfig
from .explain import METHODS
from .modalities import MODALITIES, PRECISIONS
from .modeling import FusionForClassification, FusionModel, FusionOutput
from .pipeline import FusionPipeline, Prediction
from .processing import FusionInputError, FusionProcessor

# Registration only: lets `AutoConfig`/`AutoModel` read a folder whose config says model_type "fusion".
AutoConfig.register("fusion", FusionConfig, exist_ok=True)
AutoModel.register(FusionConfig, FusionModel, exist_ok=True)

__all__ = [
    "METHODS",
    "MODALITIES",
    "PRECISIONS",
    "FusionConfig",
    "FusionForClassification",
    "FusionInputError",
    "FusionModel",
    "FusionOutput",
    "FusionPipeline",
    "FusionProcessor",
    "Prediction",
]
