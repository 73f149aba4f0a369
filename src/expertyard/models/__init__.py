from expertyard.models.registry import ARCHITECTURES, get_architecture

__all__ = ["ARCHITECTURES", "get_architecture"]
