"""Pure-PyTorch oracles, written from each op's equations (never by calling the torch.nn module the op
replaces). Tests run them in float64; PYSEQKERN_REFERENCE=1 routes ops here. Each op issue adds its
module."""
from . import probe, rnn

__all__ = ["probe", "rnn"]
