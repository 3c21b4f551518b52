"""dus: depth up-scaling and seam healing for Hugging Face decoder-only language models."""

__version__ = "0.1.0"
