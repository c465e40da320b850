"""Drop-in replacements for torch.nn's recurrent modules, running on pyseqkern.ops.rnn.

Each class subclasses its torch.nn counterpart (same constructor, parameters, state_dict and forward
contract); only forward differs: argument handling here, then one op call per layer and direction
(sequence modules) or per step (cells). GRU and GRUCell add a keyword-only reset_after=True.
pyseqkern.convert(model) swaps these in for the torch.nn modules of an existing model."""
from .cells import GRUCell, LSTMCell, RNNCell
from .recurrent import GRU, LSTM, RNN

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]
