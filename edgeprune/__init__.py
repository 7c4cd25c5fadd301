"""edgeprune: compile convolutional networks for edge devices under a latency budget."""

__version__ = "0.1.0"
