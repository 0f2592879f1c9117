"""autoenc: train, evaluate and use autoencoders from one config-driven command line."""

__version__ = "0.1.0"
