"""reftbench: reproduce the ReFT paper's benchmarks on frozen language models."""

__version__ = "0.1.0"
