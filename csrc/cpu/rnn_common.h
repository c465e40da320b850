// Building blocks of the recurrent CPU kernels, compiled into each per-ISA source (include only from
// sources listed in PSK_CPU_KERNEL_SOURCES, after PSK_ISA is defined). Everything lives in the ISA's
// namespace: see cpu_dispatch.h for why no shared inline code may cross ISA objects (each header refuses
// a source without PSK_ISA). One header a job:
//   rnn_vec.h          registers: lanes, bf16, loads and stores, transposes
//   rnn_activations.h  sigmoid, tanh, relu
//   rnn_tiles.h        the register tiles (FMA, vdpbf16ps) and the epilogue call
//   rnn_amx.h          the tile unit: bfloat16 passes, float32 as three pieces, amx_product
//   rnn_product.h      tiled_product, the loop every product shares
//   rnn_layout.h       packed sections, the workspace, sequence rows, thread splits
#pragma once
#include "rnn_activations.h"
#include "rnn_layout.h"
#include "rnn_product.h"
