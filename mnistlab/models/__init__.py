"""The model zoo. `create_model(name, **kwargs)`, `list_models()`; see registry.py for the interface."""

from mnistlab.models.registry import ModelArgError, create_model, list_models, model_entry, register_model

__all__ = ["ModelArgError", "create_model", "list_models", "model_entry", "register_model"]
