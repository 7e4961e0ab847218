"""Model construction."""

from instseg.models.factory import build_model
from instseg.models.weights import load_state_dict_file

__all__ = ["build_model", "load_state_dict_file"]
