from expertyard.loader.load import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
