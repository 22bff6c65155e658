"""qubrid_lab: the hosted inference and fine-tuning platform's API, on your own machine."""

__version__ = "0.1.0"
