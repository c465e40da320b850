"""pyseqkern's benchmark suite: `python -m pyseqkern.bench` (or `pyseqkern-bench`).

Each op family registers its cases in pyseqkern/bench/cases/; every case runs the same work through
torch and through pyseqkern in the same process, checks they agree, then times both (median of
repeats, interleaved) and reports the ratio against the machine ceilings measured first."""
