"""The recurrent modes: names, the kernels' codes for them (rnn.h's RnnMode) and their gate counts."""

MODES = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
NAMES = tuple(sorted(MODES, key=MODES.get))  # by code
GATES_BY_CODE = {code: GATES[name] for name, code in MODES.items()}
