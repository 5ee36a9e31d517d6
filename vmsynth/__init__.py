"""vmsynth: small, verified VM overlays (the engine; no command-line code here)."""

__version__ = "0.1.0"
