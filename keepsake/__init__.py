"""Keepsake: version control for machine learning."""

from keepsake.errors import KeepsakeError
from keepsake.repository import Repository

__version__ = "0.1.0"

__all__ = ["KeepsakeError", "Repository", "__version__"]
