from expertyard.experts.backend import ExpertBackend
from expertyard.experts.resident import ResidentExperts

__all__ = ["ExpertBackend", "ResidentExperts"]
