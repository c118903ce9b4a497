"""SROC: data refinement for fully unsupervised visual inspection with pre-trained networks."""

__version__ = "0.1.0"
