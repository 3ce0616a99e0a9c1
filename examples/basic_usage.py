"""Minimal use of gmpo_ext: a GMPO step on random data, checked against the
plain-PyTorch float64 reference, with both conventions and their metrics.

    python examples/basic_usage.py
"""

import torch

import gmpo_ext
from gmpo_ext.reference import gmpo_loss_reference

torch.manual_seed(0)
B, T = 8, 512
old_logps = -torch.rand(B, T) * 3                       # log-probs of the sampled tokens
logps = (old_logps + 0.2 * torch.randn(B, T)).requires_grad_()
advantages = torch.randn(B)                              # one per completion (GRPO-style)
lengths = torch.randint(T // 4, T + 1, (B,))
mask = torch.arange(T) < lengths[:, None]                # right padding

for convention in ("trl", "verl"):
    logps.grad = None
    loss, metrics = gmpo_ext.gmpo_loss(logps, old_logps, advantages, mask,
                                       convention=convention, return_metrics=True)
    loss.backward()
    ref, _ = gmpo_loss_reference(logps.detach().double(), old_logps.double(),
                                 advantages.double(), mask, convention=convention)
    print(f"{convention}: loss {loss.item():+.6f} (float64 reference {ref.item():+.6f}), "
          f"|grad| {logps.grad.norm():.4f}")
    for name, value in metrics.items():
        print(f"    {name:28s} {value.item():.4f}")

# The GRPO baseline on the same batch, TRL's default loss type.
grpo = gmpo_ext.grpo_loss(logps, old_logps, advantages, mask, loss_type="dapo")
print(f"grpo (dapo): loss {grpo.item():+.6f}")
