"""The one torch.library namespace every pyseqkern op is defined in."""
import torch

LIB = torch.library.Library("pyseqkern", "DEF")  # noqa: TOR901 - kept alive for the process lifetime
