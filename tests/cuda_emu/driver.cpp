// Runs the CUDA recurrent kernels (compiled as host code, emulated blocks and warps: emu_rt.cpp) against a
// double reference of the rnn.h semantics (forward, reserve, backward), with NaN-poisoned buffers and guard
// zones. Reads one case a line from stdin (key=value words, see parse_case) and answers one line a case:
//   PASS|FAIL <the case line> :: fwd=<path that ran> blocks=.. ktile=../<kmax> etiles=.. coop=.. plain=..
//   refused=.. :: bwd=...
// followed by indented detail lines for a failure. Exit status 1 when a case failed.
#include "shim/cuda_runtime.h"
#include "shim/cuda_fp16.h"
#include "shim/cuda_bf16.h"
#include "rnn_cuda.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

// Built with -fsanitize=address (build.py's PYSEQKERN_EMU_FLAGS), the guard zones are poisoned too: a kernel
// reading into one is reported where it reads, not only where a NaN it read reaches an output.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define PSK_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define PSK_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define PSK_POISON(p, n) ((void)(p), (void)(n))
#define PSK_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

using namespace pyseqkern;

template <typename T> double tod(T v);
template <> double tod(float v) { return v; }
template <> double tod(double v) { return v; }
template <> double tod(__half v) { return __half2float(v); }
template <> double tod(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T fromd(double v);
template <> float fromd(double v) { return float(v); }
template <> double fromd(double v) { return v; }
template <> __half fromd(double v) { return __float2half_rn(float(v)); }
template <> __nv_bfloat16 fromd(double v) { return __float2bfloat16_rn(float(v)); }
template <typename T> DType dt();
template <> DType dt<float>() { return DType::Float32; }
template <> DType dt<double>() { return DType::Float64; }
template <> DType dt<__half>() { return DType::Float16; }
template <> DType dt<__nv_bfloat16>() { return DType::BFloat16; }
template <typename T> double tol();
template <> double tol<float>() { return 3e-5; }
template <> double tol<double>() { return 1e-11; }
template <> double tol<__half>() { return 4e-3; }
template <> double tol<__nv_bfloat16>() { return 3e-2; }

// guarded buffer: 0xff bytes (NaN for every float type) around and inside until written. The guard of 257
// elements leaves the data off 16-byte alignment (any alignment an op may be handed); `aligned` makes it
// 256 (16-byte aligned, as the workspaces torch allocates on a GPU are, where the kernels' staging loads
// 16-byte vectors).
template <typename E> struct Buf {
  size_t kGuard = 257;
  std::vector<E> v;
  size_t n = 0;
  Buf() = default;
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { unpoison(); }
  void alloc(size_t count, bool aligned = false) {
    unpoison();
    n = count;
    kGuard = aligned ? 256 : 257;
    v.assign(count + 2 * kGuard, E{});
    std::memset(static_cast<void*>(v.data()), 0xff, v.size() * sizeof(E));
    poison();
  }
  E* p() { return v.data() + kGuard; }
  E& operator[](size_t i) { return v[kGuard + i]; }
  bool guards_ok() const {
    unpoison();
    bool ok = true;
    const unsigned char* b = reinterpret_cast<const unsigned char*>(v.data());
    for (size_t i = 0; i < kGuard * sizeof(E); ++i)
      if (b[i] != 0xff) ok = false;
    for (size_t i = (kGuard + n) * sizeof(E); i < v.size() * sizeof(E); ++i)
      if (b[i] != 0xff) ok = false;
    poison();
    return ok;
  }
  void poison() const {
    if (v.empty()) return;
    PSK_POISON(v.data(), kGuard * sizeof(E));
    PSK_POISON(v.data() + kGuard + n, kGuard * sizeof(E));
  }
  void unpoison() const {
    if (!v.empty()) PSK_UNPOISON(v.data(), v.size() * sizeof(E));
  }
  bool untouched(size_t i) const {
    const unsigned char* b = reinterpret_cast<const unsigned char*>(v.data() + kGuard + i);
    for (size_t k = 0; k < sizeof(E); ++k)
      if (b[k] != 0xff) return false;
    return true;
  }
};

struct Case {
  RnnMode mode;
  bool reset_after;
  int64_t H, P, B, T;
  std::vector<int64_t> lengths;  // empty: padded
  bool reverse;
  bool batch_major;  // padded layout: row = b*T + t
  int64_t extra_ld;  // added to every leading dimension
  bool h0, c0, bhn, dy, dhn, dcn;
  RnnCudaPath path;
  int dev;
  uint64_t seed;
  std::string dtype, expect;  // expect: the path that must run (persistent, step), or throw (invalid_argument)
  bool skew;
  std::string capture;  // "": none; keeps / breaks: inside a graph capture that a refused launch keeps / breaks
};

struct Checker {
  std::string what;
  double max_err = 0, max_ref = 0;
  bool nan = false;
  int64_t nan_at = -1;
  void add(double got, double ref, int64_t idx) {
    if (std::isnan(got)) {
      if (!nan) nan_at = idx;
      nan = true;
      return;
    }
    max_err = std::max(max_err, std::fabs(got - ref));
    max_ref = std::max(max_ref, std::fabs(ref));
  }
  bool ok(double t) const { return !nan && max_err <= t * (1 + max_ref); }
};

// What one call launched (emu_rt.cpp's counters), as the report's "fwd=..." or "bwd=..." part.
std::string launch_summary(const char* which, RnnCudaPath ran, int64_t kmax) {
  const PskEmuStats s = psk_emu_stats();
  char m[200];
  snprintf(m, sizeof m, "%s=%s blocks=%d ktile=%d/%ld etiles=%d coop=%d plain=%d refused=%d", which,
           rnn_cuda_path_name(ran), s.plan.blocks, s.plan.ktile, long(kmax), s.plan.etiles, s.coop_launches,
           s.plain_launches, s.refused);
  return m;
}

// Runs one entry point; false (with a message) when it threw unexpectedly or ran another path than the case
// expects. *stop: it threw (its outputs are not worth comparing); a std::invalid_argument is what a case
// with expect=throw waits for.
template <typename F>
bool call_entry(const Case& c, const char* which, F&& entry, RnnCudaPath* ran, std::vector<std::string>& msgs,
                bool* stop) {
  psk_emu_reset_stats();
  if (!c.capture.empty()) psk_emu_set_capture(cudaStreamCaptureStatusActive, c.capture == "breaks");
  struct EndCapture {
    ~EndCapture() { psk_emu_set_capture(cudaStreamCaptureStatusNone, false); }
  } end_capture;
  try {
    *ran = entry();
  } catch (std::exception& e) {
    const bool is_arg = dynamic_cast<std::invalid_argument*>(&e) != nullptr;
    // A capture that a refused launch broke: the call must say so, keep the demoted plan, and run on the
    // per-step path, nothing refused, in the next capture (the warm-up's advice followed).
    if (c.capture == "breaks" && !is_arg && psk_emu_stats().refused > 0 && std::strstr(e.what(), "capture")) {
      msgs.push_back(std::string(which) + " threw inside the capture as expected: " + e.what());
      psk_emu_reset_stats();
      psk_emu_set_capture(cudaStreamCaptureStatusActive, true);
      try {
        *ran = entry();
      } catch (std::exception& again) {
        msgs.push_back(std::string(which) + " threw again in the next capture: " + again.what());
        *stop = true;
        return false;
      }
      if (psk_emu_stats().refused != 0 || *ran != RnnCudaPath::Step) {
        msgs.push_back(std::string(which) + " in the next capture ran " + rnn_cuda_path_name(*ran) + " after " +
                       std::to_string(psk_emu_stats().refused) + " refused launches; expected step, none refused");
        return false;
      }
      return true;
    }
    const bool expected = c.expect == "throw" && is_arg;
    msgs.push_back(std::string(which) + (expected ? " threw as expected: " : " threw: ") + e.what());
    *stop = true;
    return expected;
  }
  std::string want = c.path != RnnCudaPath::Auto ? rnn_cuda_path_name(c.path) : "";
  if (c.expect == "persistent" || c.expect == "step") want = c.expect;
  if (!want.empty() && want != rnn_cuda_path_name(*ran)) {
    msgs.push_back(std::string(which) + " ran " + rnn_cuda_path_name(*ran) + ", expected " + want);
    return false;
  }
  return true;
}

// a(i, j) x[j] summed over j < cols, for i < rows
template <typename F> std::vector<double> matvec(int64_t rows, int64_t cols, F&& a, const std::vector<double>& x) {
  std::vector<double> y(rows, 0.0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) y[i] += a(i, j) * x[j];
  return y;
}

template <typename T>
bool run_case(const Case& c, const std::string& label) {
  using A = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
  const int G = rnn_gate_count(c.mode);
  const int64_t H = c.H, P = c.P, K = P > 0 ? P : H, B = c.B, TT = c.T, GH = G * H;
  const bool packed = !c.lengths.empty();
  const bool lstm = c.mode == RnnMode::Lstm, gru = c.mode == RnnMode::Gru;
  const bool gru_after = gru && c.reset_after;
  std::mt19937_64 rng(c.seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  auto rnd = [&](double s) { return nd(rng) * s; };

  std::vector<int64_t> len(B), bs(TT), offs(TT);
  for (int64_t b = 0; b < B; ++b) len[b] = packed ? c.lengths[b] : TT;
  int64_t N = 0;
  for (int64_t t = 0; t < TT; ++t) {
    int64_t n = 0;
    for (int64_t b = 0; b < B; ++b) n += len[b] > t;
    bs[t] = n;
    offs[t] = N;
    N += packed ? n : 0;
  }
  if (!packed) N = TT * B;
  const int64_t rst = c.batch_major ? 1 : B, rsb = c.batch_major ? TT : 1;
  auto rowof = [&](int64_t t, int64_t b) { return packed ? offs[t] + b : t * rst + b * rsb; };

  const int64_t ldg = GH + c.extra_ld, ldy = K + c.extra_ld, lddy = K + c.extra_ld, lddgx = GH + c.extra_ld,
                lddgh = GH + c.extra_ld;
  Buf<T> xg, whh, whr, bhn, h0, c0;
  xg.alloc(N * ldg);
  for (int64_t r = 0; r < N; ++r)
    for (int64_t j = 0; j < GH; ++j) xg[r * ldg + j] = fromd<T>(rnd(0.8));
  const int64_t ldw = K + (c.extra_ld ? 3 : 0);
  whh.alloc(GH * ldw);
  for (int64_t r = 0; r < GH; ++r)
    for (int64_t k = 0; k < K; ++k) whh[r * ldw + k] = fromd<T>(rnd(1.0 / std::sqrt(double(K))));
  auto fill = [&](Buf<T>& buf, int64_t n, double scale) {
    buf.alloc(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = fromd<T>(rnd(scale));
  };
  if (P) fill(whr, P * H, 1.0 / std::sqrt(double(H)));
  if (c.bhn) fill(bhn, H, 0.3);
  if (c.h0) fill(h0, B * K, 0.5);
  if (c.c0 && lstm) fill(c0, B * H, 0.5);
  const RnnShape shape{c.mode, c.reset_after, H, P};
  const RnnSizes sz = rnn_sizes_cuda(shape, B, sizeof(A) == 8);
  Buf<A> packedw;
  packedw.alloc(sz.packed_numel);
  RnnPackParams pp{};
  pp.shape = shape;
  pp.dtype = dt<T>();
  pp.w_hh = whh.p();
  pp.ld_w_hh = ldw;
  pp.w_hr = P ? whr.p() : nullptr;
  pp.ld_w_hr = H;
  pp.out = packedw.p();
  psk_emu_set_device(c.dev);
  psk_emu_seed(c.seed * 7 + 1);
  psk_emu_set_skew(c.skew);
  rnn_pack_cuda(pp, nullptr);

  Buf<int64_t> dlen, doffs;
  if (packed) {
    dlen.alloc(B);
    doffs.alloc(TT);
    for (int64_t b = 0; b < B; ++b) dlen[b] = len[b];
    for (int64_t t = 0; t < TT; ++t) doffs[t] = offs[t];
  }
  RnnSeq seq{TT, B, packed ? bs.data() : nullptr, packed ? doffs.p() : nullptr, packed ? dlen.p() : nullptr,
             packed ? 0 : rst, packed ? 0 : rsb, c.reverse};

  Buf<T> y, hn, cn;
  Buf<A> res, ws;
  y.alloc(N * ldy);
  hn.alloc(B * K);
  if (lstm) cn.alloc(B * H);
  res.alloc(N * sz.reserve_cols);
  ws.alloc(sz.workspace_numel, true);
  RnnFwdParams fp{};
  fp.shape = shape;
  fp.dtype = dt<T>();
  fp.seq = seq;
  fp.x_gates = xg.p();
  fp.ld_gates = ldg;
  fp.b_hn = c.bhn ? bhn.p() : nullptr;
  fp.h0 = c.h0 ? h0.p() : nullptr;
  fp.c0 = (c.c0 && lstm) ? c0.p() : nullptr;
  fp.y = y.p();
  fp.ld_y = ldy;
  fp.h_n = hn.p();
  fp.c_n = lstm ? cn.p() : nullptr;
  fp.packed = packedw.p();
  fp.reserve = res.p();
  fp.workspace = ws.p();
  RnnCudaPath ran = RnnCudaPath::Auto;
  bool ok = true, stop = false;
  std::vector<std::string> msgs, stats;
  auto finish = [&]() {
    printf("%s %s", ok ? "PASS" : "FAIL", label.c_str());
    for (auto& st : stats) printf(" :: %s", st.c_str());
    printf("\n");
    for (auto& m : msgs) printf("      %s\n", m.c_str());
    fflush(stdout);
    return ok;
  };
  ok = call_entry(c, "forward", [&] { return rnn_forward_cuda(fp, c.path, nullptr); }, &ran, msgs, &stop);
  stats.push_back(launch_summary("fwd", ran, P > 0 && H > K ? H : K));
  if (stop) return finish();

  // ---- reference forward (double) ----
  const int64_t rc = sz.reserve_cols, hcol = sz.reserve_hprev;
  std::vector<double> ry(N * K, 0), rres(N * rc, 0), rhn(B * K), rcn(B * H);
  auto W = [&](int64_t r, int64_t k) { return tod(whh[r * ldw + k]); };
  auto WR = [&](int64_t p, int64_t j) { return tod(whr[p * H + j]); };
  auto sig = [](double x) { return 1 / (1 + std::exp(-x)); };
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> h(K, 0), cc(H, 0);
    if (c.h0) for (int64_t k = 0; k < K; ++k) h[k] = tod(h0[b * K + k]);
    if (c.c0 && lstm) for (int64_t j = 0; j < H; ++j) cc[j] = tod(c0[b * H + j]);
    for (int64_t s = 0; s < len[b]; ++s) {
      const int64_t t = c.reverse ? len[b] - 1 - s : s, row = rowof(t, b);
      auto X = [&](int64_t j) { return tod(xg[row * ldg + j]); };
      double* rr = &rres[row * rc];
      std::vector<double> rec = matvec(GH, K, W, h), hnew(K, 0);
      if (lstm) {
        std::vector<double> m(H);
        for (int64_t j = 0; j < H; ++j) {
          double i = sig(X(j) + rec[j]), f = sig(X(H + j) + rec[H + j]), g = std::tanh(X(2 * H + j) + rec[2 * H + j]),
                 o = sig(X(3 * H + j) + rec[3 * H + j]);
          cc[j] = f * cc[j] + i * g;
          m[j] = o * std::tanh(cc[j]);
          rr[j] = i; rr[H + j] = f; rr[2 * H + j] = g; rr[3 * H + j] = o; rr[4 * H + j] = cc[j];
          if (P) rr[5 * H + j] = m[j];
        }
        hnew = P ? matvec(P, H, WR, m) : m;
      } else if (gru) {
        std::vector<double> r(H), z(H), rh(H);
        for (int64_t j = 0; j < H; ++j) {
          r[j] = sig(X(j) + rec[j]);
          z[j] = sig(X(H + j) + rec[H + j]);
          rh[j] = r[j] * h[j];
        }
        for (int64_t j = 0; j < H; ++j) {
          double n, aux;
          if (gru_after) {
            aux = rec[2 * H + j] + (c.bhn ? tod(bhn[j]) : 0.0);
            n = std::tanh(X(2 * H + j) + r[j] * aux);
          } else {
            double sacc = 0;
            for (int64_t k = 0; k < H; ++k) sacc += W(2 * H + j, k) * rh[k];
            aux = rh[j];
            n = std::tanh(X(2 * H + j) + sacc);
          }
          hnew[j] = (1 - z[j]) * n + z[j] * h[j];
          rr[j] = r[j]; rr[H + j] = z[j]; rr[2 * H + j] = n; rr[3 * H + j] = aux;
        }
      } else {
        for (int64_t j = 0; j < H; ++j) {
          double pv = X(j) + rec[j];
          hnew[j] = c.mode == RnnMode::RnnRelu ? (pv < 0 ? 0 : pv) : std::tanh(pv);
          rr[j] = hnew[j];
        }
      }
      for (int64_t k = 0; k < K; ++k) rr[hcol + k] = h[k];
      for (int64_t k = 0; k < K; ++k) ry[row * K + k] = hnew[k];
      h = hnew;
    }
    for (int64_t k = 0; k < K; ++k) rhn[b * K + k] = h[k];
    for (int64_t j = 0; j < H; ++j) rcn[b * H + j] = cc[j];
  }
  // ---- compare forward ----
  auto report = [&](Checker& ch, double t) {
    if (!ch.ok(t)) {
      char m[300];
      snprintf(m, sizeof m, "%s: %s max_err %.3e (max_ref %.3e)%s", ch.what.c_str(), ch.nan ? "NaN" : "", ch.max_err,
               ch.max_ref, ch.nan ? (" first NaN at " + std::to_string(ch.nan_at)).c_str() : "");
      msgs.push_back(m);
      ok = false;
    }
  };
  {
    Checker cy{"y"}, ch{"h_n"}, ccn{"c_n"}, cres{"reserve"};
    bool gap_written = false;
    for (int64_t r = 0; r < N; ++r) {
      for (int64_t k = 0; k < K; ++k) cy.add(tod(y[r * ldy + k]), ry[r * K + k], r * K + k);
      for (int64_t k = K; k < ldy; ++k) gap_written |= !y.untouched(r * ldy + k);
      for (int64_t k = 0; k < rc; ++k) cres.add(double(res[r * rc + k]), rres[r * rc + k], r * rc + k);
    }
    for (int64_t i = 0; i < B * K; ++i) ch.add(tod(hn[i]), rhn[i], i);
    if (lstm)
      for (int64_t i = 0; i < B * H; ++i) ccn.add(tod(cn[i]), rcn[i], i);
    report(cy, tol<T>());
    report(ch, tol<T>());
    if (lstm) report(ccn, tol<T>());
    report(cres, sizeof(A) == 8 ? 1e-11 : 3e-5 * (std::is_same<T, float>::value ? 1 : 4));
    if (gap_written) { msgs.push_back("y: columns past K written"); ok = false; }
    if (!y.guards_ok() || !hn.guards_ok() || !res.guards_ok() || !ws.guards_ok() || (lstm && !cn.guards_ok())) {
      msgs.push_back("forward: guard zone written");
      ok = false;
    }
  }

  // ---- backward ----
  Buf<T> dy, dhn, dcn, dgx, dgh, dproj, dh0, dc0;
  Buf<A> ws2;
  if (c.dy) {
    dy.alloc(N * lddy);
    for (int64_t r = 0; r < N; ++r)
      for (int64_t k = 0; k < K; ++k) dy[r * lddy + k] = fromd<T>(rnd(1.0));
  }
  if (c.dhn) fill(dhn, B * K, 1.0);
  if (c.dcn && lstm) fill(dcn, B * H, 1.0);
  dgx.alloc(N * lddgx);
  if (gru_after) dgh.alloc(N * lddgh);
  if (P) dproj.alloc(N * P);
  dh0.alloc(B * K);
  if (lstm) dc0.alloc(B * H);
  ws2.alloc(sz.workspace_numel, true);
  RnnBwdParams bp{};
  bp.shape = shape;
  bp.dtype = dt<T>();
  bp.seq = seq;
  bp.dy = c.dy ? dy.p() : nullptr;
  bp.ld_dy = lddy;
  bp.dh_n = c.dhn ? dhn.p() : nullptr;
  bp.dc_n = (c.dcn && lstm) ? dcn.p() : nullptr;
  bp.c0 = (c.c0 && lstm) ? c0.p() : nullptr;
  bp.reserve = res.p();
  bp.packed = packedw.p();
  bp.d_gates_x = dgx.p();
  bp.ld_dgx = lddgx;
  bp.d_gates_h = gru_after ? dgh.p() : nullptr;
  bp.ld_dgh = lddgh;
  bp.d_proj = P ? dproj.p() : nullptr;
  bp.dh0 = dh0.p();
  bp.dc0 = lstm ? dc0.p() : nullptr;
  bp.workspace = ws2.p();
  if (!call_entry(c, "backward", [&] { return rnn_backward_cuda(bp, c.path, nullptr); }, &ran, msgs, &stop))
    ok = false;
  stats.push_back(launch_summary("bwd", ran, GH > P ? GH : P));
  if (stop) return finish();
  // reference backward
  std::vector<double> rdgx(N * GH, 0), rdgh(N * GH, 0), rdp(N * (P ? P : 1), 0), rdh0(B * K), rdc0(B * H);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> dh(K, 0), dc(H, 0);
    if (c.dhn) for (int64_t k = 0; k < K; ++k) dh[k] = tod(dhn[b * K + k]);
    if (c.dcn && lstm) for (int64_t j = 0; j < H; ++j) dc[j] = tod(dcn[b * H + j]);
    for (int64_t s = len[b] - 1; s >= 0; --s) {
      const int64_t t = c.reverse ? len[b] - 1 - s : s, row = rowof(t, b);
      const double* rr = &rres[row * rc];
      std::vector<double> dht(K), dG(GH, 0), dhnew(K, 0);
      for (int64_t k = 0; k < K; ++k) dht[k] = dh[k] + (c.dy ? tod(dy[row * lddy + k]) : 0.0);
      const double* hp = rr + hcol;
      if (lstm) {
        for (int64_t p = 0; p < P; ++p) rdp[row * P + p] = dht[p];
        const std::vector<double> dm = P ? matvec(H, P, [&](int64_t j, int64_t p) { return WR(p, j); }, dht) : dht;
        for (int64_t j = 0; j < H; ++j) {
          double i = rr[j], f = rr[H + j], g = rr[2 * H + j], o = rr[3 * H + j], ct = rr[4 * H + j];
          double cprev;
          if (s > 0) cprev = rres[rowof(c.reverse ? len[b] - s : s - 1, b) * rc + 4 * H + j];
          else cprev = (c.c0 ? tod(c0[b * H + j]) : 0.0);
          double tc = std::tanh(ct);
          double dcv = dc[j] + dm[j] * o * (1 - tc * tc);
          dG[j] = dcv * g * i * (1 - i);
          dG[H + j] = dcv * cprev * f * (1 - f);
          dG[2 * H + j] = dcv * i * (1 - g * g);
          dG[3 * H + j] = dm[j] * tc * o * (1 - o);
          dc[j] = dcv * f;
        }
        for (int64_t gj = 0; gj < GH; ++gj) rdgx[row * GH + gj] = dG[gj];
        for (int64_t k = 0; k < K; ++k)
          for (int64_t gj = 0; gj < GH; ++gj) dhnew[k] += W(gj, k) * dG[gj];
      } else if (gru) {
        std::vector<double> dnp(H), dzp(H), drp(H), drh(H, 0);
        for (int64_t j = 0; j < H; ++j) {
          const double z = rr[H + j], n = rr[2 * H + j];
          dnp[j] = dht[j] * (1 - z) * (1 - n * n);
          dzp[j] = dht[j] * (hp[j] - n) * z * (1 - z);
        }
        if (gru_after) {
          for (int64_t j = 0; j < H; ++j) {
            double r = rr[j], hng = rr[3 * H + j];
            drp[j] = dnp[j] * hng * r * (1 - r);
            rdgx[row * GH + j] = drp[j]; rdgx[row * GH + H + j] = dzp[j]; rdgx[row * GH + 2 * H + j] = dnp[j];
            rdgh[row * GH + j] = drp[j]; rdgh[row * GH + H + j] = dzp[j]; rdgh[row * GH + 2 * H + j] = dnp[j] * r;
          }
          for (int64_t k = 0; k < K; ++k) {
            double sacc = dht[k] * rr[H + k];
            for (int64_t gj = 0; gj < GH; ++gj) sacc += W(gj, k) * rdgh[row * GH + gj];
            dhnew[k] = sacc;
          }
        } else {
          for (int64_t j = 0; j < H; ++j)
            for (int64_t i = 0; i < H; ++i) drh[j] += W(2 * H + i, j) * dnp[i];
          for (int64_t j = 0; j < H; ++j) {
            double r = rr[j];
            drp[j] = drh[j] * hp[j] * r * (1 - r);
            rdgx[row * GH + j] = drp[j]; rdgx[row * GH + H + j] = dzp[j]; rdgx[row * GH + 2 * H + j] = dnp[j];
          }
          for (int64_t k = 0; k < K; ++k) {
            double sacc = dht[k] * rr[H + k] + drh[k] * rr[k];
            for (int64_t gj = 0; gj < 2 * H; ++gj) sacc += W(gj, k) * rdgx[row * GH + gj];
            dhnew[k] = sacc;
          }
        }
      } else {
        for (int64_t j = 0; j < H; ++j) {
          double hv = rr[j];
          double gp = c.mode == RnnMode::RnnRelu ? (hv > 0 ? dht[j] : 0.0) : dht[j] * (1 - hv * hv);
          rdgx[row * GH + j] = gp;
        }
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < H; ++j) dhnew[k] += W(j, k) * rdgx[row * GH + j];
      }
      dh = dhnew;
    }
    for (int64_t k = 0; k < K; ++k) rdh0[b * K + k] = dh[k];
    for (int64_t j = 0; j < H; ++j) rdc0[b * H + j] = dc[j];
  }
  {
    Checker cgx{"d_gates_x"}, cgh{"d_gates_h"}, cdp{"d_proj"}, ch0{"dh0"}, cc0{"dc0"};
    bool gap_written = false;
    for (int64_t r = 0; r < N; ++r) {
      for (int64_t j = 0; j < GH; ++j) cgx.add(tod(dgx[r * lddgx + j]), rdgx[r * GH + j], r * GH + j);
      for (int64_t j = GH; j < lddgx; ++j) gap_written |= !dgx.untouched(r * lddgx + j);
      if (gru_after)
        for (int64_t j = 0; j < GH; ++j) cgh.add(tod(dgh[r * lddgh + j]), rdgh[r * GH + j], r * GH + j);
      if (P)
        for (int64_t p = 0; p < P; ++p) cdp.add(tod(dproj[r * P + p]), rdp[r * P + p], r * P + p);
    }
    for (int64_t i = 0; i < B * K; ++i) ch0.add(tod(dh0[i]), rdh0[i], i);
    if (lstm)
      for (int64_t i = 0; i < B * H; ++i) cc0.add(tod(dc0[i]), rdc0[i], i);
    const double bt = tol<T>() * (std::is_same<T, float>::value ? 3 : 1);
    report(cgx, bt);
    if (gru_after) report(cgh, bt);
    if (P) report(cdp, bt);
    report(ch0, bt);
    if (lstm) report(cc0, bt);
    if (gap_written) { msgs.push_back("d_gates_x: columns past G*H written"); ok = false; }
    if (!dgx.guards_ok() || !dh0.guards_ok() || !ws2.guards_ok() || (gru_after && !dgh.guards_ok()) ||
        (P && !dproj.guards_ok()) || (lstm && !dc0.guards_ok())) {
      msgs.push_back("backward: guard zone written");
      ok = false;
    }
  }
  if (c.expect == "throw") {
    msgs.push_back("expected a std::invalid_argument, nothing threw");
    ok = false;
  }
  return finish();
}

// One case a line: key=value words. dtype f32|f64|f16|bf16, mode lstm|gru|tanh|relu, ra (GRU reset_after),
// H P B T, len (comma list: packed; absent: padded), rev, bm (padded batch-major), xld (added to leading
// dimensions), h0 c0 bhn dy dhn dcn (optional inputs present), path auto|persistent|step, dev (emu_rt.cpp's
// table), seed, sched random|skew, expect persistent|step|throw, capture keeps|breaks (the calls run inside an
// emulated graph capture, which a refused cooperative launch keeps active or invalidates).
Case parse_case(const std::string& line) {
  Case c{RnnMode::Lstm, true, 1, 0, 1, 1, {}, false, false, 0, true, true, true, true, true, true,
         RnnCudaPath::Auto, 0, 1, "f32", "", false, ""};
  std::istringstream words(line);
  std::string w;
  while (words >> w) {
    const size_t eq = w.find('=');
    if (eq == std::string::npos) throw std::invalid_argument("not key=value: " + w);
    const std::string k = w.substr(0, eq), v = w.substr(eq + 1);
    auto flag = [&] { return v == "1"; };
    auto num = [&] { return int64_t(std::stoll(v)); };
    if (k == "dtype") c.dtype = v;
    else if (k == "mode")
      c.mode = v == "lstm" ? RnnMode::Lstm : v == "gru" ? RnnMode::Gru : v == "tanh" ? RnnMode::RnnTanh
             : v == "relu" ? RnnMode::RnnRelu : throw std::invalid_argument("mode " + v);
    else if (k == "ra") c.reset_after = flag();
    else if (k == "H") c.H = num();
    else if (k == "P") c.P = num();
    else if (k == "B") c.B = num();
    else if (k == "T") c.T = num();
    else if (k == "len") {
      std::istringstream ls(v);
      for (std::string n; std::getline(ls, n, ',');) c.lengths.push_back(std::stoll(n));
    } else if (k == "rev") c.reverse = flag();
    else if (k == "bm") c.batch_major = flag();
    else if (k == "xld") c.extra_ld = num();
    else if (k == "h0") c.h0 = flag();
    else if (k == "c0") c.c0 = flag();
    else if (k == "bhn") c.bhn = flag();
    else if (k == "dy") c.dy = flag();
    else if (k == "dhn") c.dhn = flag();
    else if (k == "dcn") c.dcn = flag();
    else if (k == "path")
      c.path = v == "auto" ? RnnCudaPath::Auto : v == "persistent" ? RnnCudaPath::Persistent
             : v == "step" ? RnnCudaPath::Step : throw std::invalid_argument("path " + v);
    else if (k == "dev") c.dev = int(num());
    else if (k == "seed") c.seed = uint64_t(num());
    else if (k == "sched") c.skew = v == "skew" ? true : v == "random" ? false : throw std::invalid_argument("sched " + v);
    else if (k == "expect") c.expect = v;
    else if (k == "capture") c.capture = v == "keeps" || v == "breaks" ? v : throw std::invalid_argument("capture " + v);
    else throw std::invalid_argument("unknown key " + k);
  }
  if (!c.lengths.empty() && int64_t(c.lengths.size()) != c.B) throw std::invalid_argument("len needs B entries");
  return c;
}

int main() {
  int total = 0, failed = 0;
  for (std::string line; std::getline(std::cin, line);) {
    if (line.find_first_not_of(" \t") == std::string::npos || line[0] == '#') continue;
    ++total;
    bool ok = false;
    try {
      const Case c = parse_case(line);
      ok = c.dtype == "f32" ? run_case<float>(c, line)
         : c.dtype == "f64" ? run_case<double>(c, line)
         : c.dtype == "f16" ? run_case<__half>(c, line)
         : c.dtype == "bf16" ? run_case<__nv_bfloat16>(c, line)
         : throw std::invalid_argument("dtype " + c.dtype);
    } catch (std::invalid_argument& e) {
      printf("FAIL %s\n      bad case line: %s\n", line.c_str(), e.what());
    }
    failed += !ok;
  }
  printf("%d/%d cases failed\n", failed, total);
  return failed != 0;
}
