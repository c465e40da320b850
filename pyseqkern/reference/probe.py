"""Reference for the probe ops (pyseqkern.ops.probe)."""
import torch


def triad(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """STREAM triad: a + alpha * b, elementwise."""
    return a + alpha * b
