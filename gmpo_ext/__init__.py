"""gmpo_ext: fused GMPO (Geometric-Mean Policy Optimization, arXiv 2507.20673)
loss kernels for PyTorch, hand-written in C (CPU) and CUDA C (GPU).

    import gmpo_ext
    loss = gmpo_ext.gmpo_loss(logps, old_logps, advantages, mask)
"""

from . import ops  # noqa: F401  (registers the torch.library custom ops)
from ._backend import _C
from .loss import GMPOLoss, GRPOLoss, gmpo_loss, grpo_loss
from .logits import gmpo_loss_from_logits, grpo_loss_from_logits, selective_logps
from .hidden import gmpo_loss_from_hidden, grpo_loss_from_hidden, linear_logps

__version__ = "0.1.0"
WITH_CUDA = bool(_C.WITH_CUDA)

__all__ = ["gmpo_loss", "grpo_loss", "GMPOLoss", "GRPOLoss", "gmpo_loss_from_logits",
           "grpo_loss_from_logits",
           "selective_logps", "gmpo_loss_from_hidden", "grpo_loss_from_hidden",
           "linear_logps", "WITH_CUDA", "__version__"]
