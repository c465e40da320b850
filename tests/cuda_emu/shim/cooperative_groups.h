#pragma once
void psk_grid_sync();
namespace cooperative_groups {
struct grid_group { void sync() const { psk_grid_sync(); } };
inline grid_group this_grid() { return grid_group{}; }
}
