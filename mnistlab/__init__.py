"""mnistlab: a deep-learning lab around MNIST and its family, with no black boxes.

Importing the package stays cheap: torch, numpy and matplotlib are imported by the submodules
that need them, never here.
"""

__version__ = "0.1.0"
