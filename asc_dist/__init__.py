"""asc-dist: distributed acoustic scene classification (Ye et al. recipe)."""

__version__ = "0.1.0"
