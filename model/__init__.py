"""The EfficientNetV2 family: B0-B3, S, M, L, XL, exact to the official release, and its public weights.

``efficientnetv2-demo`` is NOT an official model: a tiny network from the same blocks, sized for a 2-core
CPU demo on 32-48 px Fashion-MNIST. A model can also be a config file (``save_config``/``load_config``), e.g.
one that ``effnetv2.model.search`` found; ``get_config`` looks up either.
"""

from .config import CONFIGS, ModelConfig, StageSpec
from .config_file import ConfigFileError, get_config, load_config, save_config
from .efficientnetv2 import EfficientNetV2, create_model, list_models
from .flops import count_flops, count_parameters
from .weights import load_weights, read_state_dict

__all__ = ["CONFIGS", "ConfigFileError", "EfficientNetV2", "ModelConfig", "StageSpec", "count_flops",
           "count_parameters", "create_model", "get_config", "list_models", "load_config", "load_weights",
           "read_state_dict", "save_config"]
