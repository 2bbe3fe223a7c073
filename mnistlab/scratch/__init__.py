"""mnistlab.scratch: a numpy-only autograd engine that trains real models (no torch imported).

    from mnistlab.scratch import Tensor, tensor, no_grad, nn, optim, functional as F

engine.py (Tensor and its ops, each backward under its forward), functional.py (cross-entropy,
conv2d, max-pool, dropout), nn.py (Module, Linear, Conv2d, Sequential, MLP, CNN), optim.py (SGD,
Adam, AdamW). The parity tests in tests/test_scratch.py check every op against PyTorch.
"""

from mnistlab.scratch import functional, nn, optim
from mnistlab.scratch.engine import Tensor, as_tensor, no_grad, tensor

__all__ = ["Tensor", "as_tensor", "functional", "nn", "no_grad", "optim", "tensor"]
