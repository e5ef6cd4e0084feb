"""The EfficientNetV2 family: B0-B3, S, M, L, XL, exact to the official release, and its public weights.

``efficientnetv2-demo`` is NOT an official model: a tiny network from the same blocks, sized for a 2-core
CPU demo on 32-48 px Fashion-MNIST.
"""

from .config import CONFIGS, ModelConfig, StageSpec
from .efficientnetv2 import EfficientNetV2, create_model, list_models
from .flops import count_flops, count_parameters
from .weights import load_weights, read_state_dict

__all__ = ["CONFIGS", "EfficientNetV2", "ModelConfig", "StageSpec", "count_flops", "count_parameters",
           "create_model", "list_models", "load_weights", "read_state_dict"]
