"""Which way a CPU inference sequence (and, from 32 rows, an LSTM or GRU training one) goes, by the
machine's caches: the kernel projecting its input itself (every row before the steps, each step's rows
inside the step, or riding in a one-row sequence's recurrent tiles), or torch's GEMM projecting it (whole,
or in chunks the kernel runs between). Rules
only, each with the measurements behind it; rnn.py runs the paths they pick. The paths differ in the
last bits, so each rule reads only shapes, dtypes, the level and what the machine reported at import,
never the caller's thread count or a timing."""
from __future__ import annotations

import torch

from .. import _backend
from .._handoff import num_threads
from .rnn_modes import GATES, MODES as _MODES

_C = _backend._C

# Inference over a sequence projects its input inside the kernel, before the steps, where each thread's
# share of the input panel fits _READ_L2S of a core's L2 (the panel then stays in the cache across all
# rows). The projection runs at torch's GEMM rate; the gain (1.05-1.13x at B <= 8, ~1.0x at B=32) is in
# what surrounds it: one thread team instead of two, and no GEMM on other threads evicting the
# recurrent panel the steps read next. Larger panels go through torch's GEMM. The kernel may run
# fewer threads than torch's count on tiny work; there a thread's share is larger, the call short.
# Half an L2 until stop 21, a whole one since: on a 2-vCPU Zen 3 (512 KB L2 per core) LSTM H=256's 1 MB
# panel went to oneDNN's GEMM, the kernel's own projection before the steps beats it (in-process, 11
# rotations, time half / whole: LSTM (100,1,256) 1.13, (100,64,256) 1.04, packed B=1 1.20; GRU
# (100,1,256) 1.16, (100,64,256) 1.00), and so does projecting each step where that rule admits the
# panels (below; both rules together, packed B=32 lengths 100..10: LSTM 1.10, GRU 1.09; B=8 1.06 /
# 1.04; padded B=4 1.00 / 1.03).
_CPU = _C.cpu_isa_report()  # (sizes and vendor rules, read once)
_L2_BYTES = int(_CPU["l2_bytes"])
_READ_L2S = 1
# One-row sequences (B = 1) past the read rule: on levels with 32 vector registers the kernel projects
# each row inside the recurrent tiles of earlier steps (rnn_fwd.cpp, ride_tile), which stream the
# recurrent panel at the cache's rate with the FMA unit half idle, so the projection costs little more
# than its input panel's bytes (a group of kRideRows rows at a time): still a gain where both panels,
# streamed every step, mostly come back from L3. In-process on a 2-vCPU Zen 4 (1 MB L2, 32 MB L3), 7
# rotations, time kernel riding / torch's GEMM projecting, (mode, H = I, both panels): LSTM 512 (8 MB)
# 0.89, 640 (12.5 MB) 0.94, 768 (18 MB) 0.93; GRU 512 (6 MB) 0.87, 768 (13.5 MB) 0.96, 1024 (24 MB)
# 1.11; RNN 1024 (8 MB) 0.96; LSTM I = 256, H = 1024 (20 MB) 1.10, 1024 (32 MB) 1.58. Hence both panels
# within half the L3 (0 where the OS does not say). bfloat16 on avx512bf16 (stop 40; its pair sections, 2
# bytes a weight, counted as read): LSTM 640 (6.3 MB) 0.86, 768 (9 MB) 0.88, 1024 (16 MB) 0.94, 1280
# (25 MB) 1.45; GRU 768 (6.8 MB) 0.84, 1024 (12 MB) 0.88, 1280 (18.8 MB) 0.93; RNN 1536 (9 MB) 0.93,
# 2048 (16 MB) 1.01: the same share holds. float64 (stop 40): LSTM 384 (9.4 MB) 0.88, 512 (16 MB) 0.93,
# GRU 512 (12 MB) 0.91, RNN 1024 (16 MB) 1.01.
# On cores whose L3 streams far below their L2 (not cpu_l3_streams_fast: Intel's server cores, docs/DESIGN.md
# "Caches by vendor") the ride past the read rule loses: on a Granite Rapids-class Xeon (2 MB L2, 480 MB
# L3 reported), in-process, 5 rotations, ratio to torch.nn riding -> torch's GEMM projecting: LSTM
# (100,1,768) 1.23 -> 1.32x, (100,1,1024) 1.20 -> 1.30x, (100,1,1536) 1.15 -> 1.31x. (Within the read
# rule it rides there as anywhere: (100,1,256) LSTM / GRU / RNN 2.65 / 3.34 / 2.80x, not riding 2.64 /
# 3.28 / 2.79x.)
_L3_STREAMS_FAST = bool(_CPU["l3_streams_fast"])
_L3_BYTES = int(_CPU["l3_bytes"])
_RIDE_L3_SHARE = 0.5 if _L3_STREAMS_FAST else 0.0
_RIDE_MIN_STEPS = 9  # more than kRideRows: the first kRideRows rows are projected before the steps
# Riding, the kernel keeps x_gates in a ring of this many rows (two groups of kRideRows, rnn.h) instead of
# one row per step: 64 KB for an LSTM at H = 256, where a sequence of 100,000 steps took 400 MB (held by
# the forward scratch until empty_cache()). Where it rides, its sizes say (rnn._sizes(...)[5]: the level's
# `rides` for the dtype, B = 1).
_RIDE_RING = _C.RNN_RIDE_RING
# The choices of path below count the threads torch had when pyseqkern was imported, not the caller's
# current count: the paths differ in the last bits, and torch.get_num_threads() is per OS thread, so a
# server whose main thread set 1 thread after its pool existed got other bits in the pool's threads
# than in main for the same call (found by a concurrency sweep). The kernels' own bits do not depend on
# the count.
_PATH_THREADS = num_threads()  # (at most the CPUs: an oversubscribed count has no more caches)
# Levels where torch projects bfloat16 sequences anyway: on amx torch's bfloat16 GEMM runs on the tile unit
# too (oneDNN) and beat the kernel's own projection in-process (LSTM 100,32,256: 1.14-1.21x torch.nn
# against 0.99-1.07x). (A set, so that tests can still reach the kernel's path there.)
_TORCH_PROJECTS_BF16_ON = frozenset({"amx"})
# Where MKL's sgemm serves float32 (_backend.FP32_GEMM), it also beats the kernel's own projection for LSTM
# sequences from 4 rows a step (in-process, Emerald Rapids, 5 alternations, ratio to torch.nn:
# (100,4,256) 1.25 -> 1.32x, (100,8,256) 1.04 -> 1.15x, (100,16,256) 0.93 -> 1.03x, (100,32,256)
# 0.92 -> 0.95x, (50,16,128) 1.19 -> 1.21x), not at B=1 (1.68 -> 1.61x) nor for GRU and RNN (B=32 GRU
# 1.61 -> 1.50x; the rest within noise). Measured before projecting each step (below), which now takes
# LSTM's float32 sequences of 2 to 32 rows a step where both panels fit; this serves the larger ones.
_MKL_PROJECTS_LSTM_FROM = 4
# Not where the kernel projects before the steps on the tile unit (_projects_on_tile): that beat MKL at
# every LSTM shape measured (stop 53, in-process, 9 alternations, time tile unit / MKL, (T, B, H)):
# (100,4,512) 0.92, (100,8,512) 0.97, (100,16,512) 0.96, (100,32,512) 0.985, (100,64,512) 0.97,
# (100,32,256) 0.95, (100,64,256) 0.97; and each step / MKL at (100,B,256), B = 4 / 8 / 16: 0.85 / 0.95 / 0.95.


# Float32 and bfloat16 inference sequences of 2 to 32 rows a step (RNN: 2 or more; on average: packed
# batches shrink) whose threads' shares of both panels (W_ih and W_hh) fit _EACH_STEP_L2S L2s project each
# step's rows inside the step instead of every row before the steps (the kernel's `fused` mode, as cells do): no
# x_gates buffer written out and read back (13 MB at LSTM 100,32,256), no phase and sync of its own;
# the threads own unit blocks. Module calls in-process, 15-31 pairs, time before / after: GRU
# (100,8,256) 1.16, (100,32,256) 1.06, (50,16,128) 1.08, packed (lengths 100..10) B=8 / 32 1.16 / 1.14;
# LSTM packed B=8 / 16 / 32 1.10 / 1.18 / 1.04, padded B=24 / 32 1.03, B=4 / 8 / 16 and (50,16,128)
# 0.98-0.995 (MKL's projection and threads owning rows do as well there; one rule kept). Not at B=1
# (each step streams W_ih too: LSTM 2.5x slower); not GRU B=64 (1.00x), float64 (no gain measured);
# proj_size not measured. The panels' budget was half a core's L2 until stop 20; on a 1 MB-L2 EPYC
# (Zen 4), where LSTM and GRU at H=256 (2 MB and 1.5 MB of panels on two threads) then projected before
# the steps, the whole L2 measured better (in-process, 15-21 rotations, ratio to torch.nn before ->
# after): LSTM (100,4,256) 1.11 -> 1.24x, (100,8,256) 0.96 -> 1.06x, (100,16,256) 0.89 -> 0.99x,
# (100,32,256) 0.94 -> 0.98x; GRU B=4 / 8 / 16 / 32 3.98 / 3.08 / 2.17 / 1.85 -> 4.45 / 3.47 / 2.37 /
# 1.91x; again later, 21 rotations, time before / after per rotation: B=8 GRU 1.09, LSTM 1.07, B=32
# GRU 1.01, LSTM 0.99 (so at 32 rows, within noise). Panels beyond it stay out: at H=512 (8 MB) LSTM
# B=8 lost (0.96 -> 0.92x).
# bfloat16 too since stop 20 (where the level has bfloat16 dot products: only there is there an input
# panel; on amx torch projects bfloat16 anyway). On that Zen 4, in-process, 21 rotations, ratio to
# torch.nn's bfloat16 layers before -> after: LSTM B=4 / 8 / 16 / 32 1.19 / 1.04 / 0.98 / 0.94 ->
# 1.27 / 1.08 / 1.00 / 0.96x, GRU 4.78 / 3.48 / 2.67 / 2.23 -> 5.68 / 4.02 / 2.88 / 2.34x. (Stop 12
# had measured no gain for bfloat16, on another machine and with the half-L2 budget.)
# RNN too since stop 20. Stops 12-13 had found it 0.90-1.00x (threads owning unit blocks) and then,
# with threads owning rows, within noise (B=8 1.03, B=32 0.99, packed 0.98) on an Emerald Rapids VM; on
# the 1 MB-L2 Zen 4 of stop 20 it gains everywhere (in-process, 15-21 rotations, time before / after,
# (T, B, H)): float32 (100,2,256) 1.18, (100,4,256) 1.26, (100,8,256) 1.20, (100,16,256) 1.12,
# (100,32,256) 1.10, (50,16,128) 1.26, packed B=32 (lengths 100..10) 1.06; bfloat16 (100,8,256) 1.24,
# (100,32,256) 1.15. And at any batch (11 rotations): (100,48,256) 1.11, (100,64,256) 1.11,
# (100,128,256) 1.07, (100,256,256) 1.16, (100,64,512) 1.03; so RNN has no row limit. (GRU and LSTM at
# 48 and 64 rows: 0.98-1.04, so theirs stays.)
# Both panels within two L2s per thread since stop 21 (one until then): on a 2-vCPU Zen 3 (512 KB L2 per
# core) LSTM and GRU at H=256 (2 MB and 1.5 MB of panels) had projected before the steps or by torch.
# In-process, 15 rotations, time one L2 / two: LSTM (100,8,256) 1.058, (100,16,256) 1.042, (100,32,256)
# 1.055; GRU B=8 / 16 / 32 1.065 / 1.076 / 1.113; RNN B=8 0.993. A thread then streams its 1 MB share
# from L3 every step, and still gains: no x_gates written out and read back, no GEMM pass of its own.
# (Stop 20's Zen 4 had found two L2s better for wide inputs as well: LSTM (100,B,256) at I=512 +10%,
# GRU +7%.) That holds where the L3 streams near the L2's rate (_L3_STREAMS_FAST); elsewhere a thread's
# share of the panels stays within half its L2 (stop 41, a Granite Rapids-class Xeon: 2 MB L2 streaming
# 189 GB/s a core to 1 MB, its L3 29). There, in-process, 5-9 rotations, ratio to torch.nn two L2s ->
# half of one: LSTM (100,8,384) 0.94 -> 1.38x, (100,32,384) 0.92 -> 1.02x, (100,8,512) 0.95 -> 1.61x,
# (100,32,512) 0.84 -> 0.98x, (100,8,320) 1.01 -> 1.11x, (100,8,288) 1.06 -> 1.12x; GRU (100,8,512) 1.16
# -> 1.53x, (100,32,512) 1.45 -> 1.62x. A quarter (H=256 out too) lost GRU (100,8,256) 2.15 -> 1.84x,
# the rest within noise.
_EACH_STEP_L2S = 2 if _L3_STREAMS_FAST else 0.5
# That budget was measured on Zen 3 and Zen 4, whose L2 streams little faster than their L3 (a Zen 4 core:
# 96-108 GB/s from its L2, 82-89 from its L3). A Zen 5 core (_L2_OUTPACES_L3) streams its L2 at twice its
# L3's rate and multiplies-adds twice as fast, so there steps of few rows, bound by the stream of both
# panels from the L3, lose to a projection before the steps, whose steps stream W_hh alone: a thread's
# share of both panels past _EACH_STEP_L2_ROOM of its L2 (no room left for the rows and the states)
# projects before the steps at _EACH_STEP_STREAM_ROWS rows a step or fewer. In-process on a 2-vCPU Zen 5
# (1 MB L2), 11-15 alternations, time before the steps / each step, float32 (T, B, H): LSTM (100,B,256)
# B = 2 / 4 / 8: 0.81 / 0.92 / 0.98 (by units, rnn_fwd.cpp's split there: 0.92-0.95), LSTM (100,8,288)
# 0.94, GRU (100,8,320) 0.98, (100,8,384) 0.97, RNN (100,8,512) 0.97. From 16 rows it is within noise
# (LSTM (100,32,256) 0.94-1.05 over five runs) and each step wins where W_hh's share passes half the L2
# (GRU (100,32,320) 1.04-1.05, (100,32,384) 1.05, LSTM (100,32,288) 1.02-1.03). docs/DESIGN.md, "Zen 5's
# L2 outpaces its L3".
_L2_OUTPACES_L3 = bool(_CPU["l2_outpaces_l3"])  # (isa.h: Zen 5, by cpuid; never without _L3_STREAMS_FAST)
_EACH_STEP_L2_ROOM = 0.875
_EACH_STEP_STREAM_ROWS = 8
# Where the projection before the steps runs on the tile unit (the amx level, float32, 32 rows or more:
# sizes[6], stop 52), it costs a few percent of what each step's FMA projection does, and a step that
# streams only W_hh gains over one that streams both panels sooner: a thread's share of both panels stays
# within 0.375 of its L2 to project each step (stop 53, the Granite Rapids-class Xeon, 2 MB L2; in-process,
# 9-11 alternations, time before the steps on the tile unit / each step): LSTM (100,B,256), half an L2,
# B = 2 / 4 / 8 / 12 / 16 / 24: 0.85 / 0.98 / 0.92 / 0.94 / 0.97 / 0.94; GRU (100,B,288) B = 4 / 8 / 16:
# 0.91 / 1.02 / 0.91; RNN (100,B,512) 0.97 / 0.90 / 0.93. At 0.375 and under each step stays: GRU
# (100,B,256) B = 2 / 4 / 8 / 16 0.88 / 0.94 / 1.03 / 0.95 (mixed, the bench's B=8 against), RNN
# (100,B,256) 0.93 / 1.06 / 1.02 / 0.93, LSTM (50,B,128) B = 4 / 8 / 16 1.09 / 1.06 / 0.98.
_EACH_STEP_TILE_L2S = min(_EACH_STEP_L2S, 0.375)
_EACH_STEP_DTYPES = (torch.float32, torch.bfloat16)
_EACH_STEP_MAX_ROWS = {"lstm": 32, "gru": 32, "rnn_tanh": 1 << 62, "rnn_relu": 1 << 62}
# Beyond 32 rows, inputs no wider than this and than the hidden size project each step too (stop 15):
# torch's GEMM with so short a contraction runs far below peak (MKL x W_ih^T at I=64: ~140 GFLOP/s).
# In-process, 11-15 pairs, time each step / before the steps (MKL projecting), (T, B, I, H): LSTM
# (30,256,64,128) 0.85, (100,64,64,128) 0.89, (20,512,64,128) 0.88, (30,256,64,64) 0.92, (100,64,64,256)
# 0.84 (0.76 -> 0.91x torch.nn), (30,256,128,128) 0.93, (100,64,128,128) / (50,128,128,128) 0.99; GRU
# (30,256,64,128) 0.89, (100,64,64,256) 0.96. Wider inputs lose: LSTM (30,256,256,128) 1.04.
_EACH_STEP_THIN_INPUT = 128


def _projects_each_step(mode, x2d, seq, hidden, proj, read, tile=False):
    """`read`: the input panel's bytes (_forward_projecting's); the recurrent panel's add to it. `tile`: the
    projection before the steps would run on the tile unit (_projects_on_tile) and each step's would not."""
    rows = x2d.shape[0] / max(1, seq.steps)
    if x2d.dtype not in _EACH_STEP_DTYPES or proj or mode not in _EACH_STEP_MAX_ROWS or rows < 2:
        return False
    if rows > _EACH_STEP_MAX_ROWS[mode] and not x2d.shape[1] <= min(_EACH_STEP_THIN_INPUT, hidden):
        return False
    budget = _EACH_STEP_TILE_L2S if tile else _EACH_STEP_L2S
    recurrent = GATES[mode] * hidden * hidden * x2d.element_size()
    l2s = _L2_BYTES * _PATH_THREADS
    if read + recurrent > budget * l2s:
        return False
    # (Zen 5: both panels' shares past the L2's room, few rows a step, project before the steps; above. The
    # tile unit's budget is below the room already.)
    return not (_L2_OUTPACES_L3 and read + recurrent > _EACH_STEP_L2_ROOM * l2s and rows <= _EACH_STEP_STREAM_ROWS)


def _projects_on_tile(sizes, x2d):
    """Whether the kernel's projection before the steps runs on the tile unit (rnn_fwd.cpp's project_split:
    the amx level's float32 pack has piece sections, sizes[6], and the call has that many rows or more)."""
    return sizes[6] > 0 and x2d.shape[0] >= sizes[6]


# Where torch's GEMM projects a CPU inference sequence (panels too large for the kernel, MKL's share of
# LSTM), it projects _CHUNK_BYTES of x_gates at a time and the kernel runs those steps before the next chunk
# is projected, the states carried from one kernel call to the next. Whole, x_gates is written to memory
# and read back (105 MB at LSTM (200,64,512)), and torch's oneDNN linear, which takes no output buffer,
# gets it as fresh pages every call: that GEMM alone ran 168 GFLOP/s whole against 191-206 in chunks of
# 640-2560 rows (12800 x 512 @ 512 x 2048, the same bits). Module calls in-process, 11 A B B A rounds,
# time by chunks / whole, steps per chunk: LSTM (200,64,512) 5 / 10 / 20 / 50: 0.97 / 0.94 / 0.92 / 0.95;
# GRU (200,64,512) 26 / 52: 0.94 / 0.93; LSTM (50,256,512) 5 / 10: 0.94 / 0.93; at this budget, LSTM
# (110,64,512) 0.98, bidirectional GRU (100,64,512) 0.94; packed (lengths spread down to a tenth), LSTM
# (400,64,512) 0.89, (200,64,512) 0.99, bidirectional GRU (100,64,512) 1.01. The gain grows with x_gates
# (57 MB at the packed LSTM of 200 steps, 113 MB at 400) and is within noise below. Chunks end where the rows
# so far pass a multiple of the rows over the chunk count, so a padded sequence's chunks differ by one
# step at most (its shape adds at most two row counts to oneDNN's, rnn_gemms._ONEDNN_ROWS) and keep rows
# enough to stay clear of the few-row paths (oneDNN's 32-row floor, MKL's rnn_gemms._narrow_and_long),
# whose sums differ.
# float32 only: a bfloat16 kernel carries its states in float32 from step to step, which a chunk's end
# would round to bfloat16; and MKL's dgemm gave some rows other bits in chunks of odd row counts
# (3000 x 300 @ 300 x 1200 in chunks of 257), which its sgemm and oneDNN did not.
_CHUNK_BYTES = 12 << 20
_CHUNK_MIN_ROWS = 256


def _chunks(seq, x2d, w_hh):
    """The chunks of an inference sequence that torch projects (_forward_by_chunks), as (start, stop)
    steps in time order; None: whole. n chunks of about _CHUNK_BYTES of x_gates and _CHUNK_MIN_ROWS rows
    or more, each ending at the first step whose rows so far reach its share of all rows (k / n of
    them); a packed chunk left with fewer than a quarter of _CHUNK_MIN_ROWS rows joins a neighbour."""
    if x2d.dtype != torch.float32:
        return None
    rows = x2d.shape[0]
    n = min(-(-rows * w_hh.shape[0] * x2d.element_size() // _CHUNK_BYTES), rows // _CHUNK_MIN_ROWS)
    if n < 2:
        return None
    if seq.batch_sizes is None:
        ends = [-(-k * seq.steps // n) for k in range(1, n + 1)]
    else:
        ends, cum, done = [], [0], 0
        for step, size in enumerate(seq.batch_sizes.tolist()):
            done += size
            cum.append(done)
            if done * n >= (len(ends) + 1) * rows:
                ends.append(step + 1)
        ends[-1] = seq.steps  # (steps of no rows after the last)
        kept = []
        for e in ends:
            if cum[e] - cum[kept[-1] if kept else 0] >= _CHUNK_MIN_ROWS // 4 or e == seq.steps:
                kept.append(e)
        if len(kept) > 1 and cum[-1] - cum[kept[-2]] < _CHUNK_MIN_ROWS // 4:
            del kept[-2]
        ends = kept
    return list(zip([0] + ends[:-1], ends)) if len(ends) > 1 else None


# On the amx level (float32, whose pack has piece sections: sizes[6]) a one-row sequence whose panels
# exceed _RIDE_TILES_L2_SHARE of a core's L2 per thread does not ride: it projects every row before the
# steps, on the tile unit from kSplitRows rows (rnn_fwd.cpp, FwdCtx::project_split), at 1.5-2x the FMA
# tiles' rate, and its steps stream the recurrent panel alone (riding, LSTM (100,1,256)'s tile took 4.9 us a
# step where the same stream without its riding rows took 3.1; stop 51). On the Granite Rapids-class Xeon
# (2 MB L2), in-process, 5-15 alternating processes, time not riding / riding (threads' share of both
# panels): LSTM (100,1,256) 0.91-0.92 (1 MB), (200,1,256) 0.87, (32,1,256) 0.94, proj_size=128 0.89 (820 KB),
# 2 layers 0.87, bidirectional 0.89, (100,1,512) 0.71 (4 MB); GRU (100,1,512) 0.71 (3 MB); RNN (100,1,512)
# 0.92 (1 MB), (50,1,1024) 0.74 (4 MB). Smaller panels keep riding: GRU (100,1,256) 1.01 (768 KB), LSTM
# I = 64, H = 256 1.04 (640 KB), RNN (100,1,256) 1.09 (256 KB), LSTM (100,1,128) 1.01, (500,1,32) 1.05.
_RIDE_TILES_L2_SHARE = 0.375


def _kernel_rides(sizes, seq, x2d, panels):
    """Whether a kernel that projects this inference sequence before its steps carries the projection in
    its recurrent tiles instead (rnn_fwd.cpp, FwdCtx::ride; rnn_forward's `ride`): its `sizes`
    (rnn._sizes(...) at the sequence's batch and dtype) report a ride ring, every step has its one row,
    more than kRideRows of them, and on the amx level both panels (`panels`: the bytes its products
    read) fit _RIDE_TILES_L2_SHARE of the L2s. Its x_gates buffer is then a ring of _RIDE_RING rows."""
    return (sizes[5] > 0 and x2d.shape[0] == seq.steps >= _RIDE_MIN_STEPS
            and not (sizes[6] > 0 and panels > _RIDE_TILES_L2_SHARE * _L2_BYTES * _PATH_THREADS))


def _rides(sizes, seq, x2d, panels):
    """Whether the kernel projects a sequence with the read rule exceeded: it rides (_kernel_rides) with
    both panels within _RIDE_L3_SHARE of the L3. (Its ring keeps x_gates small at any length.)"""
    return _kernel_rides(sizes, seq, x2d, panels) and panels <= _RIDE_L3_SHARE * _L3_BYTES


# Training forwards (plain eager, recording) of these modes and dtypes from this many rows a step take
# _projection_path's answer too (rnn._forward_projecting's `recording`): where it says the kernel projects,
# the kernel projects (its input panel packed for the call), and the outputs are the inference call's bits.
# In-process, ratio to torch.nn, torch's projection -> the kernel's: GRU (100,32,256) 1.99-2.02 -> 2.06-2.10x,
# (50,48,128) 2.08 -> 2.15x, LSTM (100,32,256) 1.03-1.04 -> 1.03-1.07x; below 32 rows it lost (LSTM
# (100,1,256) 1.45 -> 1.25x, (100,8,256) 0.98 -> 0.94x, GRU (100,8,256) 2.57 -> 2.48x). Not RNN: a chaotic
# tanh RNN's weight gradients no longer track torch.nn's rounding (docs/DESIGN.md, "Open (LSTM)").
_RECORDS_PROJECTING = {"lstm", "gru"}
_RECORDS_PROJECTING_DTYPES = (torch.float32,)
_RECORDS_PROJECTING_FROM = 32


def _records_projecting(mode, dtype, batch):
    return mode in _RECORDS_PROJECTING and dtype in _RECORDS_PROJECTING_DTYPES and batch >= _RECORDS_PROJECTING_FROM


def _projection_path(mode, sizes, seq, x2d, w_dtype, hidden, proj, recurrent_numel):
    """(each_step, ring) where the kernel projects this inference sequence's input itself (given an input
    panel: rnn._input_panel), or None where torch's GEMM does it (a panel too large, or torch's faster).
    sizes: the kernel's (rnn._sizes(...) at the sequence's batch and x2d's dtype); w_dtype: the weights';
    recurrent_numel: W_hh's and W_hr's values. Reads only x2d's shape and dtype. None where this level has
    no input panel for the dtype and input size (bfloat16 at an odd size, or without dot products: the
    thin path had asked for plans there that had no kernel entry, stop 57; whether one exists does not
    depend on reset_after)."""
    if x2d.shape[1] < 1 or not _C.rnn_input_panel_numel(_MODES[mode], True, hidden, x2d.shape[1],
                                                         str(x2d.dtype).split(".")[-1]):
        return None
    size = 2 if x2d.dtype == torch.bfloat16 else x2d.element_size()  # (bfloat16: pair sections, read as such)
    read = GATES[mode] * hidden * x2d.shape[1] * size
    panels = read + recurrent_numel * size
    if x2d.dtype != w_dtype or read > _READ_L2S * _L2_BYTES * _PATH_THREADS and not _rides(sizes, seq, x2d, panels):
        return None
    if x2d.dtype == torch.bfloat16 and _backend.active_isa() in _TORCH_PROJECTS_BF16_ON:
        return None
    tile = _projects_on_tile(sizes, x2d)
    # (a batch of sizes[6] rows or more projects each step on the tile unit too: the budget as elsewhere)
    each_step = _projects_each_step(mode, x2d, seq, hidden, proj, read, tile and seq.batch < sizes[6])
    if (not each_step and not tile and mode == "lstm" and seq.batch >= _MKL_PROJECTS_LSTM_FROM
            and x2d.dtype == torch.float32 and _backend.FP32_GEMM == "mkl"):
        return None
    return each_step, not each_step and _kernel_rides(sizes, seq, x2d, panels)
