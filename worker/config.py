"""Model settings: moved to :mod:`oobleck.common.modelconfig` (shared by the daemons, no torch).

These names stay importable from here for callers not yet moved.
"""

from oobleck.common.modelconfig import MODEL_NAMES, ModelConfig, parse_model_config, validate_model_config

__all__ = ["MODEL_NAMES", "ModelConfig", "parse_model_config", "validate_model_config"]
