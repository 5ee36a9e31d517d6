"""vmsynth: small, verified VM overlays (the engine; no command-line code here)."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
