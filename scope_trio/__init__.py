"""scope-trio: Daydream Scope's remote-inference backend on Trio structured concurrency."""

__version__ = "0.1.0"
