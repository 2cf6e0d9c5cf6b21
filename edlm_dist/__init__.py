"""edlm-dist: train and sample Energy-Based Diffusion Language Models at cluster scale."""

__version__ = "0.1.0"
