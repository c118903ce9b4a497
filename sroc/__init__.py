"""SROC: data refinement for fully unsupervised visual inspection with pre-trained networks."""

from sroc.clean import clean

__all__ = ["clean"]
__version__ = "0.1.0"
