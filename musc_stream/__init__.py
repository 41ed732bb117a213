"""musc-stream: zero-shot visual inspection of production-line camera streams with MuSc."""

__version__ = "0.1.0"
