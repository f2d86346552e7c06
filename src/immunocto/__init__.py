"""immunocto: co-registered H&E + multiplexed IF slides -> a single-cell immune database for H&E.

Stages live in subpackages (``simulate``, ``io``, ``register``, ``segment``, ...); the
command-line interface is :mod:`immunocto.cli`. Importing the package is cheap: heavy
dependencies are imported by the stage that needs them.
"""

import logging

__version__ = "0.1.0"

# The library logs; only the CLI configures handlers.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
