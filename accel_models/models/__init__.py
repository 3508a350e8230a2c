"""The model zoo: one file per architecture family, and a registry of Hugging Face architecture names."""

from accel_models.models.registry import get_model_class, supported_architectures

__all__ = ["get_model_class", "supported_architectures"]
