"""sia: Semantic Image Attack diagnosis for vision models."""

__version__ = "0.1.0"
