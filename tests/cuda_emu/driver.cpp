// Check driver for the emulated CUDA backend: every op through ax::ops on "cuda:0" (cuda/*.cu running on
// the CPU fiber emulator), against a float64 reference computed here (DESIGN.md tolerances: 1e-5
// elementwise, 1e-4 reductions and convolutions) and, where the contract promises bit-exactness (ReLU,
// add, dropout, SGD, max-pool, cross-entropy backward, plumbing, augmentation, ranks), bit for bit
// against the CPU backend (ax::ops on "cpu") on the same inputs.
//
//   driver [--order forward|reverse|shuffle] [--seed S] GROUP...     (driver --list names the groups)
//
// One line per check: "ok   [crc <fnv64 of the CUDA output>] <name>: <detail>" or "FAIL ...", then
// "SUMMARY group=... checks=N failures=F ..." per group, "LAUNCH_SITE file:line kernel launches=n" for
// every launch statement that ran. Exit status 0 only when every check passed.
// Device buffers are poisoned with NaN when allocated, so an unwritten output element fails.
#include <chrono>
#include <cinttypes>
#include <cstdarg>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "cuda_runtime.h"
#include "net.h"
#include "ops.h"
#include "philox.h"
#include "tensor.h"

using namespace ax;

namespace {

constexpr double kElementwise = 1e-5, kReduction = 1e-4;
const Device GPU{Device::CUDA, 0};
const Device GPU1{Device::CUDA, 1};  // the second emulated device (no peer access): only the net group uses it
const Device HOST{};

std::mt19937_64 rng;
int g_checks = 0, g_failures = 0;

uint64_t fnv1a(const void* p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const uint8_t*>(p)[i]) * 0x100000001b3ull;
    return h;
}

void report(bool ok, uint64_t crc, const std::string& name, const std::string& detail) {
    ++g_checks;
    if (!ok) ++g_failures;
    printf("%s [crc %016" PRIx64 "] %s: %s\n", ok ? "ok  " : "FAIL", crc, name.c_str(), detail.c_str());
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

std::vector<float> randv(size_t n, float lo = -1.f, float hi = 1.f) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

DType dtype_of(float) { return DType::f32; }
DType dtype_of(int32_t) { return DType::i32; }
DType dtype_of(uint8_t) { return DType::u8; }

template <class T>
Tensor host_tensor(const std::vector<int64_t>& shape, const std::vector<T>& v) {
    Tensor h = Tensor::empty(shape, dtype_of(T{}), HOST);
    if (static_cast<size_t>(h.numel()) != v.size()) {
        fprintf(stderr, "driver: shape/data mismatch\n");
        abort();
    }
    if (!v.empty()) memcpy(h.raw(), v.data(), v.size() * sizeof(T));
    return h;
}

// The same data on both backends.
struct Both {
    Tensor cpu, gpu;
};
template <class T>
Both both(const std::vector<int64_t>& shape, const std::vector<T>& v) {
    Tensor h = host_tensor(shape, v);
    return {h, h.to(GPU)};
}

template <class T>
std::vector<T> down(const Tensor& t, bool* on_gpu = nullptr) {
    if (on_gpu) *on_gpu = t.device().is_cuda();
    Tensor h = t.device().is_cuda() ? t.to(HOST) : t;
    std::vector<T> v(h.numel());
    if (!v.empty()) memcpy(v.data(), h.raw(), v.size() * sizeof(T));
    return v;
}

// CUDA output vs float64 reference: relative error ||out - ref|| / ||ref|| < tol, all finite.
void check_rel(const std::string& name, const Tensor& out, const std::vector<double>& ref, double tol) {
    bool on_gpu = false;
    const auto v = down<float>(out, &on_gpu);
    double num = 0, den = 0;
    bool finite = true;
    for (size_t i = 0; i < v.size() && i < ref.size(); ++i) {
        finite = finite && std::isfinite(v[i]);
        num += (v[i] - ref[i]) * (v[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
    const bool sized = v.size() == ref.size();
    // An all-zero reference (e.g. every unit dropped, a one-class softmax) passes only with an all-zero output.
    const bool ok = on_gpu && sized && finite && (den > 0 ? rel < tol : num == 0);
    report(ok, fnv1a(v.data(), v.size() * sizeof(float)), name,
           fmt("rel %.3g (tol %.0e, n=%zu)%s%s%s%s", rel, tol, v.size(), on_gpu ? "" : " OUTPUT NOT ON CUDA",
               sized ? "" : " SIZE MISMATCH", finite ? "" : " NON-FINITE (unwritten?)",
               den > 0 ? "" : " (zero reference)"));
}

// Bit-for-bit equality of a CUDA output with expected values (CPU backend or exact recomputation).
template <class T>
void check_exact(const std::string& name, const Tensor& out, const T* expect, size_t n_expect, const char* against) {
    bool on_gpu = false;
    const auto v = down<T>(out, &on_gpu);
    size_t bad = v.size() == n_expect ? 0 : 1, first = 0;
    bool finite = true;
    for (size_t i = 0; i < v.size() && i < n_expect; ++i) {
        if (std::is_floating_point<T>::value && !std::isfinite(static_cast<double>(v[i]))) finite = false;
        if (memcmp(&v[i], &expect[i], sizeof(T)) != 0) {
            if (bad == 0) first = i;
            ++bad;
        }
    }
    const bool ok = on_gpu && bad == 0 && finite && v.size() == n_expect;
    report(ok, fnv1a(v.data(), v.size() * sizeof(T)), name,
           fmt("bit-exact vs %s, %zu mismatches%s (n=%zu)%s%s", against, bad,
               bad ? fmt(" (first at %zu)", first).c_str() : "", v.size(), on_gpu ? "" : " OUTPUT NOT ON CUDA",
               finite ? "" : " NON-FINITE"));
}
template <class T>
void check_exact(const std::string& name, const Tensor& out, const std::vector<T>& expect, const char* against) {
    check_exact(name, out, expect.data(), expect.size(), against);
}
template <class T>
void check_vs_cpu(const std::string& name, const Tensor& gpu_out, const Tensor& cpu_out) {
    if (!cpu_out.device().is_cpu() || cpu_out.dtype() != dtype_of(T{})) {
        fprintf(stderr, "driver: reference of %s not computed on the CPU backend\n", name.c_str());
        abort();
    }
    check_exact<T>(name, gpu_out, cpu_out.data<T>(), static_cast<size_t>(cpu_out.numel()), "CPU backend");
}

void check_true(const std::string& name, bool ok, const std::string& detail) { report(ok, 0, name, detail); }

std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// ---- convolution -------------------------------------------------------------------------------------

enum Pass { FWD = 1, DGRAD = 2, WGRAD = 4, BGRAD = 8, ALL = 15 };
struct ConvCase {
    int N, C, H, W, K, R, S, sh, sw, ph, pw, g;
    bool bias;
    int passes;
    const char* label;
};

void test_conv(const ConvCase& c) {
    const int P = (c.H + 2 * c.ph - c.R) / c.sh + 1, Q = (c.W + 2 * c.pw - c.S) / c.sw + 1;
    const int Cg = c.C / c.g, Kg = c.K / c.g;
    const auto x = randv(size_t(c.N) * c.C * c.H * c.W), w = randv(size_t(c.K) * Cg * c.R * c.S), b = randv(c.K);
    const auto dy = randv(size_t(c.N) * c.K * P * Q);
    std::vector<double> y(size_t(c.N) * c.K * P * Q), dx(x.size(), 0.0), dw(w.size(), 0.0), db(c.K, 0.0);
    const bool need_dx = c.passes & DGRAD, need_dw = c.passes & WGRAD, need_y = c.passes & FWD;
    for (int n = 0; n < c.N; ++n)
        for (int k = 0; k < c.K; ++k) {
            const int g = k / Kg;
            for (int p = 0; p < P; ++p)
                for (int q = 0; q < Q; ++q) {
                    double s = c.bias ? b[k] : 0.0;
                    const double d = dy[((size_t(n) * c.K + k) * P + p) * Q + q];
                    db[k] += d;
                    for (int cl = 0; cl < Cg; ++cl)
                        for (int r = 0; r < c.R; ++r) {
                            const int h = p * c.sh - c.ph + r;
                            if (h < 0 || h >= c.H) continue;
                            for (int ss = 0; ss < c.S; ++ss) {
                                const int ww = q * c.sw - c.pw + ss;
                                if (ww < 0 || ww >= c.W) continue;
                                const size_t wi = ((size_t(k) * Cg + cl) * c.R + r) * c.S + ss;
                                const size_t xi = ((size_t(n) * c.C + g * Cg + cl) * c.H + h) * c.W + ww;
                                if (need_y) s += double(w[wi]) * x[xi];
                                if (need_dw) dw[wi] += d * x[xi];
                                if (need_dx) dx[xi] += d * w[wi];
                            }
                        }
                    y[((size_t(n) * c.K + k) * P + p) * Q + q] = s;
                }
        }
    const std::string name = fmt("%s N%d C%d %dx%d K%d %dx%d s%d,%d p%d,%d g%d", c.label, c.N, c.C, c.H, c.W, c.K,
                                 c.R, c.S, c.sh, c.sw, c.ph, c.pw, c.g);
    const Tensor tx = host_tensor({c.N, c.C, c.H, c.W}, x).to(GPU), tw = host_tensor({c.K, Cg, c.R, c.S}, w).to(GPU);
    const Tensor tb = host_tensor({c.K}, b).to(GPU), tdy = host_tensor({c.N, c.K, P, Q}, dy).to(GPU);
    if (c.passes & FWD) {
        const auto bias = c.bias ? std::optional<Tensor>(tb) : std::nullopt;
        const Tensor yt = ops::conv2d_forward(tx, tw, bias, c.sh, c.sw, c.ph, c.pw, c.g);
        check_rel("conv2d_forward " + name + (c.bias ? "" : " nobias"), yt, y, kReduction);
        // The ReLU in the epilogue: the reference's relu, and relu_forward of the unfused output bit for bit.
        const Tensor yr = ops::conv2d_forward(tx, tw, bias, c.sh, c.sw, c.ph, c.pw, c.g, /*relu=*/true);
        std::vector<double> yrelu(y);
        for (double& v : yrelu) v = v > 0 ? v : 0.0;
        check_rel("conv2d_forward relu " + name, yr, yrelu, kReduction);
        check_exact<float>("conv2d_forward relu vs relu_forward " + name, yr, down<float>(ops::relu_forward(yt)),
                           "relu_forward of the unfused output");
    }
    if (c.passes & DGRAD) {
        const Tensor dxt = ops::conv2d_backward_input(tdy, tw, c.H, c.W, c.sh, c.sw, c.ph, c.pw, c.g);
        check_rel("conv2d_backward_input " + name, dxt, dx, kReduction);
        // The ReLU below folded into the epilogue, with x standing in for its output: float64 and relu_backward.
        const Tensor dxm = ops::conv2d_backward_input(tdy, tw, c.H, c.W, c.sh, c.sw, c.ph, c.pw, c.g, tx);
        std::vector<double> dxmr(dx);
        for (size_t i = 0; i < x.size(); ++i) dxmr[i] = x[i] > 0 ? dx[i] : 0.0;
        check_rel("conv2d_backward_input relu_y " + name, dxm, dxmr, kReduction);
        check_exact<float>("conv2d_backward_input relu_y vs relu_backward " + name, dxm,
                           down<float>(ops::relu_backward(dxt, tx)), "relu_backward of the unfused dx");
    }
    if (c.passes & WGRAD)
        check_rel("conv2d_backward_weight " + name,
                  ops::conv2d_backward_weight(tx, tdy, c.R, c.S, c.sh, c.sw, c.ph, c.pw, c.g), dw, kReduction);
    if (c.passes & BGRAD) check_rel("conv2d_backward_bias " + name, ops::conv2d_backward_bias(tdy), db, kReduction);
}

// Both towers in one launch (ops::conv2d_*_pair, what Net issues when the towers share a device and a stream):
// bit for bit the two single calls, on CUDA and on the CPU backend. The single calls are checked against float64
// in test_conv; a pair may take another tile than a single call (twice the blocks), which must not change a bit.
void check_same_bits(const std::string& name, const Tensor& pair_out, const Tensor& single_out) {
    const Tensor a = pair_out.to(Device{}), b = single_out.to(Device{});
    const bool ok = a.shape() == b.shape() && a.numel() > 0 &&
                    memcmp(a.data<float>(), b.data<float>(), size_t(a.numel()) * sizeof(float)) == 0;
    report(ok, 0, name, fmt("bit-exact, n=%lld", (long long)a.numel()));
}

// The GEMM launches (gemm_tiled_kernel) logged since emu::clear_launch_log().
std::vector<emu::LaunchShape> gemm_launches() {
    std::vector<emu::LaunchShape> out;
    for (const emu::LaunchShape& l : emu::launch_log())
        if (strstr(l.kernel, "gemm_tiled_kernel") != nullptr) out.push_back(l);
    return out;
}

// That the call just made ran its GEMM as both towers stacked on one B (conv.cu TowerStack, GemmStack): one
// launch of 256-thread blocks whose one row of tiles holds both towers' 48 rows, over `z` slices.
void check_stacked(const std::string& name, unsigned z) {
    const auto g = gemm_launches();
    const bool ok = g.size() == 1 && g[0].block.x == 256 && g[0].grid.y == 1 && g[0].grid.z == z;
    report(ok, 0, name, ok ? fmt("one launch, grid (%u,1,%u) x 256 threads", g[0].grid.x, z)
                           : fmt("%zu GEMM launches, the first %u threads, grid y %u z %u (want 1, 256, 1, %u)",
                                 g.size(), g.empty() ? 0u : g[0].block.x, g.empty() ? 0u : g[0].grid.y,
                                 g.empty() ? 0u : g[0].grid.z, z));
}

// shared_x: both towers read one x (as conv1's do); stack_z > 0: the forward and the weight gradient must then stack
// the towers (over stack_z slices for the weight gradient: groups x its split-K).
void test_conv_pair(const ConvCase& c, bool shared_x = false, unsigned stack_z = 0) {
    const int P = (c.H + 2 * c.ph - c.R) / c.sh + 1, Q = (c.W + 2 * c.pw - c.S) / c.sw + 1;
    const int Cg = c.C / c.g;
    const std::string name = fmt("%s N%d C%d %dx%d K%d %dx%d s%d,%d p%d,%d g%d", c.label, c.N, c.C, c.H, c.W, c.K,
                                 c.R, c.S, c.sh, c.sw, c.ph, c.pw, c.g);
    for (const Device dev : {GPU, Device{}}) {
        ops::TensorPair x, w, dy;
        std::array<std::optional<Tensor>, 2> b;
        for (int t = 0; t < 2; ++t) {
            x[t] = host_tensor({c.N, c.C, c.H, c.W}, randv(size_t(c.N) * c.C * c.H * c.W)).to(dev);
            w[t] = host_tensor({c.K, Cg, c.R, c.S}, randv(size_t(c.K) * Cg * c.R * c.S)).to(dev);
            b[t] = host_tensor({c.K}, randv(c.K)).to(dev);
            dy[t] = host_tensor({c.N, c.K, P, Q}, randv(size_t(c.N) * c.K * P * Q)).to(dev);
        }
        if (shared_x) x[1] = x[0];
        const std::string nm = name + (dev.is_cpu() ? " (cpu)" : " (cuda)");
        const bool stack = stack_z > 0 && !dev.is_cpu();
        emu::clear_launch_log();
        const auto y = ops::conv2d_forward_pair(x, w, b, c.sh, c.sw, c.ph, c.pw, c.g);
        if (stack) check_stacked("conv2d_forward_pair stacked " + nm, unsigned(c.g));
        const auto dx = ops::conv2d_backward_input_pair(dy, w, c.H, c.W, c.sh, c.sw, c.ph, c.pw, c.g);
        emu::clear_launch_log();
        const auto dw = ops::conv2d_backward_weight_pair(x, dy, c.R, c.S, c.sh, c.sw, c.ph, c.pw, c.g);
        if (stack) check_stacked("conv2d_backward_weight_pair stacked " + nm, stack_z);
        // The fused epilogues through the pair (TowerPair forwards each tower's store): the forward's ReLU, and
        // the ReLU below folded into grad-input, with each tower's x standing in for that ReLU's output.
        const auto yr = ops::conv2d_forward_pair(x, w, b, c.sh, c.sw, c.ph, c.pw, c.g, /*relu=*/true);
        const auto dxr = ops::conv2d_backward_input_pair(dy, w, c.H, c.W, c.sh, c.sw, c.ph, c.pw, c.g, {x[0], x[1]});
        const auto wb = ops::conv2d_backward_weight_bias_pair(x, dy, c.R, c.S, c.sh, c.sw, c.ph, c.pw, c.g);
        for (int t = 0; t < 2; ++t) {
            const std::string tn = fmt(" tower %d ", t) + nm;
            check_same_bits("conv2d_forward_pair == single" + tn, y[t],
                            ops::conv2d_forward(x[t], w[t], b[t], c.sh, c.sw, c.ph, c.pw, c.g));
            check_same_bits("conv2d_backward_input_pair == single" + tn, dx[t],
                            ops::conv2d_backward_input(dy[t], w[t], c.H, c.W, c.sh, c.sw, c.ph, c.pw, c.g));
            check_same_bits("conv2d_backward_weight_pair == single" + tn, dw[t],
                            ops::conv2d_backward_weight(x[t], dy[t], c.R, c.S, c.sh, c.sw, c.ph, c.pw, c.g));
            check_same_bits("conv2d_forward_pair relu == single" + tn, yr[t],
                            ops::conv2d_forward(x[t], w[t], b[t], c.sh, c.sw, c.ph, c.pw, c.g, /*relu=*/true));
            check_same_bits("conv2d_backward_input_pair relu_y == single" + tn, dxr[t],
                            ops::conv2d_backward_input(dy[t], w[t], c.H, c.W, c.sh, c.sw, c.ph, c.pw, c.g, x[t]));
            // Weight and bias gradients together (the bias slices summed in the split-K reduce launch).
            check_same_bits("conv2d_backward_weight_bias_pair dw == single" + tn, wb.dw[t],
                            ops::conv2d_backward_weight(x[t], dy[t], c.R, c.S, c.sh, c.sw, c.ph, c.pw, c.g));
            check_same_bits("conv2d_backward_weight_bias_pair db == single" + tn, wb.db[t],
                            ops::conv2d_backward_bias(dy[t]));
        }
    }
}

// ---- linear ------------------------------------------------------------------------------------------

void test_linear(int N, int I, int O, bool bias) {
    const auto x = randv(size_t(N) * I), w = randv(size_t(O) * I), b = randv(O), dy = randv(size_t(N) * O);
    std::vector<double> y(size_t(N) * O), dx(size_t(N) * I, 0.0), dw(size_t(O) * I, 0.0), db(O, 0.0);
    for (int n = 0; n < N; ++n)
        for (int o = 0; o < O; ++o) {
            double s = bias ? b[o] : 0.0;
            const double d = dy[size_t(n) * O + o];
            db[o] += d;
            for (int i = 0; i < I; ++i) {
                s += double(x[size_t(n) * I + i]) * w[size_t(o) * I + i];
                dx[size_t(n) * I + i] += d * w[size_t(o) * I + i];
                dw[size_t(o) * I + i] += d * x[size_t(n) * I + i];
            }
            y[size_t(n) * O + o] = s;
        }
    const Tensor tx = host_tensor({N, I}, x).to(GPU), tw = host_tensor({O, I}, w).to(GPU);
    const Tensor tb = host_tensor({O}, b).to(GPU), tdy = host_tensor({N, O}, dy).to(GPU);
    const std::string name = fmt("N%d I%d O%d", N, I, O);
    const auto tbias = bias ? std::optional<Tensor>(tb) : std::nullopt;
    const Tensor yt = ops::linear_forward(tx, tw, tbias);
    check_rel("linear_forward " + name + (bias ? "" : " nobias"), yt, y, kReduction);
    // The ReLU in the epilogue (or in the split-K reduction): the reference's relu, and relu_forward bit for bit.
    const Tensor yr = ops::linear_forward(tx, tw, tbias, /*relu=*/true);
    std::vector<double> yrelu(y);
    for (double& v : yrelu) v = v > 0 ? v : 0.0;
    check_rel("linear_forward relu " + name, yr, yrelu, kReduction);
    check_exact<float>("linear_forward relu vs relu_forward " + name, yr, down<float>(ops::relu_forward(yt)),
                       "relu_forward of the unfused output");
    check_rel("linear_backward_input " + name, ops::linear_backward_input(tdy, tw), dx, kReduction);
    check_rel("linear_backward_weight " + name, ops::linear_backward_weight(tx, tdy), dw, kReduction);
    check_rel("linear_backward_bias " + name, ops::linear_backward_bias(tdy), db, kReduction);
}

// Both towers' linear passes in one launch each (what Net issues when the towers share a device and a stream):
// bit for bit the single calls, on CUDA and on the CPU backend (the single calls are checked against float64 above).
void test_linear_pair(int N, int I, int O) {
    const std::string name = fmt("N%d I%d O%d", N, I, O);
    for (const Device dev : {GPU, Device{}}) {
        ops::TensorPair x, w, dy;
        std::array<std::optional<Tensor>, 2> b;
        for (int t = 0; t < 2; ++t) {
            x[t] = host_tensor({N, I}, randv(size_t(N) * I)).to(dev);
            w[t] = host_tensor({O, I}, randv(size_t(O) * I)).to(dev);
            b[t] = host_tensor({O}, randv(O)).to(dev);
            dy[t] = host_tensor({N, O}, randv(size_t(N) * O)).to(dev);
        }
        const std::string nm = name + (dev.is_cpu() ? " (cpu)" : " (cuda)");
        const auto y = ops::linear_forward_pair(x, w, b);
        const auto yr = ops::linear_forward_pair(x, w, b, /*relu=*/true);
        const auto dx = ops::linear_backward_input_pair(dy, w);
        const auto wb = ops::linear_backward_weight_bias_pair(x, dy);
        for (int t = 0; t < 2; ++t) {
            const std::string tn = fmt(" tower %d ", t) + nm;
            check_same_bits("linear_forward_pair == single" + tn, y[t], ops::linear_forward(x[t], w[t], b[t]));
            check_same_bits("linear_forward_pair relu == single" + tn, yr[t],
                            ops::linear_forward(x[t], w[t], b[t], /*relu=*/true));
            check_same_bits("linear_backward_input_pair == single" + tn, dx[t], ops::linear_backward_input(dy[t], w[t]));
            check_same_bits("linear_backward_weight_bias_pair dw == single" + tn, wb.dw[t],
                            ops::linear_backward_weight(x[t], dy[t]));
            check_same_bits("linear_backward_weight_bias_pair db == single" + tn, wb.db[t],
                            ops::linear_backward_bias(dy[t]));
        }
    }
}

// The mn-contiguous operands (grad-input's W, grad-weight's dy and x) one float past a 16-byte boundary, with
// shapes that would take the 16-byte copies when aligned: the launcher must fall back to 4-byte copies (the
// emulated cp_async16 fails on a misaligned address), and both paths give the same bits. In a pair, one tower's
// misaligned operand sends both to the 4-byte path, still bit for bit the single (16-byte) launches.
void test_linear_misaligned(int N, int I, int O) {
    const std::string name = fmt("N%d I%d O%d misaligned", N, I, O);
    const LinearParams p{N, I, O};
    auto shifted = [](const std::vector<float>& v) {  // the values at data + 1
        std::vector<float> s(v.size() + 1, 0.0f);
        std::copy(v.begin(), v.end(), s.begin() + 1);
        return host_tensor({int64_t(s.size())}, s).to(GPU);
    };
    auto out = [](int64_t r, int64_t c) { return Tensor::empty({r, c}, DType::f32, GPU); };
    ops::TensorPair x, w, dy, xs, ws, dys;
    for (int t = 0; t < 2; ++t) {
        const auto xv = randv(size_t(N) * I), wv = randv(size_t(O) * I), dyv = randv(size_t(N) * O);
        x[t] = host_tensor({N, I}, xv).to(GPU);
        w[t] = host_tensor({O, I}, wv).to(GPU);
        dy[t] = host_tensor({N, O}, dyv).to(GPU);
        xs[t] = shifted(xv);
        ws[t] = shifted(wv);
        dys[t] = shifted(dyv);
    }
    const Tensor dx0 = ops::linear_backward_input(dy[0], w[0]), dw0 = ops::linear_backward_weight(x[0], dy[0]);
    const Tensor dx1 = ops::linear_backward_input(dy[1], w[1]), dw1 = ops::linear_backward_weight(x[1], dy[1]);
    Tensor dx = out(N, I), dwx = out(O, I), dwd = out(O, I);
    cuda::linear_backward_input(p, dy[0].data<float>(), ws[0].data<float>() + 1, dx.data<float>(), nullptr);
    cuda::linear_backward_weight(p, xs[0].data<float>() + 1, dy[0].data<float>(), dwx.data<float>(), nullptr);
    cuda::linear_backward_weight(p, x[0].data<float>(), dys[0].data<float>() + 1, dwd.data<float>(), nullptr);
    cudaDeviceSynchronize();
    check_same_bits("linear_backward_input W misaligned == aligned " + name, dx, dx0);
    check_same_bits("linear_backward_weight x misaligned == aligned " + name, dwx, dw0);
    check_same_bits("linear_backward_weight dy misaligned == aligned " + name, dwd, dw0);
    // Pairs with tower 1's operand misaligned.
    Tensor pdx[2] = {out(N, I), out(N, I)}, pdw[2] = {out(O, I), out(O, I)};
    Tensor pdb[2] = {Tensor::empty({O}, DType::f32, GPU), Tensor::empty({O}, DType::f32, GPU)};
    const float* pdy[2] = {dy[0].data<float>(), dy[1].data<float>()};
    const float* pw[2] = {w[0].data<float>(), ws[1].data<float>() + 1};
    const float* px[2] = {x[0].data<float>(), xs[1].data<float>() + 1};
    float* odx[2] = {pdx[0].data<float>(), pdx[1].data<float>()};
    float* odw[2] = {pdw[0].data<float>(), pdw[1].data<float>()};
    float* odb[2] = {pdb[0].data<float>(), pdb[1].data<float>()};
    cuda::linear_backward_input_pair(p, pdy, pw, odx, nullptr);
    cuda::linear_backward_weight_bias_pair(p, px, pdy, odw, odb, nullptr);
    cudaDeviceSynchronize();
    check_same_bits("linear_backward_input_pair tower 1 misaligned == single tower 0 " + name, pdx[0], dx0);
    check_same_bits("linear_backward_input_pair tower 1 misaligned == single tower 1 " + name, pdx[1], dx1);
    check_same_bits("linear_backward_weight_bias_pair tower 1 misaligned == single tower 0 " + name, pdw[0], dw0);
    check_same_bits("linear_backward_weight_bias_pair tower 1 misaligned == single tower 1 " + name, pdw[1], dw1);
}

// ---- elementwise -------------------------------------------------------------------------------------

void test_elementwise(int64_t n) {
    const auto xv = randv(n), gv = randv(n), y2v = randv(n);
    const Both x = both({n}, xv), g = both({n}, gv), y2 = both({n}, y2v);
    const std::string sz = fmt("n=%" PRId64, n);
    {
        std::vector<double> ref(n), refb(n);
        for (int64_t i = 0; i < n; ++i) ref[i] = xv[i] > 0 ? xv[i] : 0.0;
        for (int64_t i = 0; i < n; ++i) refb[i] = y2v[i] > 0 ? gv[i] : 0.0;
        const Tensor y = ops::relu_forward(x.gpu);
        check_vs_cpu<float>("relu_forward " + sz, y, ops::relu_forward(x.cpu));
        check_rel("relu_forward vs float64 " + sz, y, ref, kElementwise);
        const Tensor d = ops::relu_backward(g.gpu, y2.gpu);
        check_vs_cpu<float>("relu_backward " + sz, d, ops::relu_backward(g.cpu, y2.cpu));
        check_rel("relu_backward vs float64 " + sz, d, refb, kElementwise);
    }
    {
        std::vector<double> ref(n);
        for (int64_t i = 0; i < n; ++i) ref[i] = double(xv[i]) + gv[i];
        const Tensor s = ops::add(x.gpu, g.gpu);
        check_vs_cpu<float>("add " + sz, s, ops::add(x.cpu, g.cpu));
        check_rel("add vs float64 " + sz, s, ref, kElementwise);
    }
    for (float p : {0.0f, 0.3f, 0.5f}) {
        const uint64_t seed = rng(), off = rng() % 1000;
        const auto r = ops::dropout_forward(x.gpu, p, seed, off);
        const auto rc = ops::dropout_forward(x.cpu, p, seed, off);
        const std::string nm = fmt("p=%.1f %s", p, sz.c_str());
        check_vs_cpu<float>("dropout_forward y " + nm, r.first, rc.first);
        check_vs_cpu<uint8_t>("dropout_forward mask " + nm, r.second, rc.second);
        // The mask is the contract's Philox draw, whatever the backend.
        std::vector<uint8_t> mref(n);
        std::vector<double> yref(n), dref(n);
        for (int64_t i = 0; i < n; ++i) {
            mref[i] = philox_u32(seed, off + i) >= dropout_threshold(p);
            yref[i] = mref[i] ? double(xv[i]) / (1.0 - p) : 0.0;
            dref[i] = mref[i] ? double(gv[i]) / (1.0 - p) : 0.0;
        }
        check_exact<uint8_t>("dropout_forward mask vs philox " + nm, r.second, mref, "philox_u32");
        check_rel("dropout_forward y vs float64 " + nm, r.first, yref, kElementwise);
        const Tensor d = ops::dropout_backward(g.gpu, r.second, p);
        check_vs_cpu<float>("dropout_backward " + nm, d, ops::dropout_backward(g.cpu, rc.second, p));
        check_rel("dropout_backward vs float64 " + nm, d, dref, kElementwise);
        // Through the ReLU whose output is y2, folded in: the CPU backend's bits.
        check_vs_cpu<float>("dropout_backward relu_y " + nm, ops::dropout_backward(g.gpu, r.second, p, true, y2.gpu),
                            ops::dropout_backward(g.cpu, rc.second, p, true, y2.cpu));
    }
    {
        const auto wv = randv(n), dwv = randv(n), vv = randv(n);
        Both w = both({n}, wv), v = both({n}, vv);
        const Both dw = both({n}, dwv);
        const float lr = 0.013f, mom = 0.9f, wd = 0.0005f;
        std::vector<double> vref(n), wref(n);
        for (int64_t i = 0; i < n; ++i) {
            vref[i] = double(mom) * vv[i] - double(wd) * lr * wv[i] - double(lr) * dwv[i];
            wref[i] = wv[i] + vref[i];
        }
        ops::sgd_update(w.gpu, dw.gpu, v.gpu, lr, mom, wd);
        ops::sgd_update(w.cpu, dw.cpu, v.cpu, lr, mom, wd);
        check_vs_cpu<float>("sgd_update w " + sz, w.gpu, w.cpu);
        check_vs_cpu<float>("sgd_update v " + sz, v.gpu, v.cpu);
        check_rel("sgd_update w vs float64 " + sz, w.gpu, wref, kElementwise);
        check_rel("sgd_update v vs float64 " + sz, v.gpu, vref, kElementwise);
    }
}

// Raw backend entry points on pointers one float past a 16-byte boundary: the scalar (non-float4) paths.
void test_unaligned(int64_t n) {
    const std::string sz = fmt("n=%" PRId64 " misaligned", n);
    const Both a = both({n + 1}, randv(n + 1)), b = both({n + 1}, randv(n + 1)), c = both({n + 1}, randv(n + 1));
    auto out = [&](const char* what, std::function<void(const Tensor&, const Tensor&, const Tensor&, Tensor&, bool)>
                                         run) {
        Tensor og = Tensor::empty({n + 1}, DType::f32, GPU), oc = Tensor::empty({n + 1}, DType::f32, HOST);
        run(a.gpu, b.gpu, c.gpu, og, true);
        run(a.cpu, b.cpu, c.cpu, oc, false);
        // Elements 1..n equal the CPU backend's bits and are finite; element 0, before the range, keeps
        // its poison on both (nothing wrote outside the range).
        const auto vg = down<float>(og);
        size_t bad = 0;
        bool finite = true;
        for (int64_t i = 0; i <= n; ++i) {
            bad += memcmp(&vg[i], oc.data<float>() + i, sizeof(float)) != 0;
            finite = finite && (i == 0 || std::isfinite(vg[i]));
        }
        report(bad == 0 && finite, fnv1a(vg.data() + 1, n * sizeof(float)), std::string(what) + " " + sz,
               fmt("bit-exact vs CPU backend incl. the untouched element before the range, %zu mismatches (n=%" PRId64
                   ")%s",
                   bad, n, finite ? "" : " NON-FINITE"));
    };
    out("relu_forward", [&](const Tensor& x, const Tensor&, const Tensor&, Tensor& y, bool gpu) {
        if (gpu) cuda::relu_forward(n, x.data<float>() + 1, y.data<float>() + 1, nullptr);
        else cpu::relu_forward(n, x.data<float>() + 1, y.data<float>() + 1);
    });
    out("relu_backward", [&](const Tensor& d, const Tensor& yy, const Tensor&, Tensor& dx, bool gpu) {
        if (gpu) cuda::relu_backward(n, d.data<float>() + 1, yy.data<float>() + 1, dx.data<float>() + 1, nullptr);
        else cpu::relu_backward(n, d.data<float>() + 1, yy.data<float>() + 1, dx.data<float>() + 1);
    });
    out("add", [&](const Tensor& u, const Tensor& v, const Tensor&, Tensor& y, bool gpu) {
        if (gpu) cuda::add(n, u.data<float>() + 1, v.data<float>() + 1, y.data<float>() + 1, nullptr);
        else cpu::add(n, u.data<float>() + 1, v.data<float>() + 1, y.data<float>() + 1);
    });
    out("sgd_update w", [&](const Tensor& w0, const Tensor& g, const Tensor& v0, Tensor& w, bool gpu) {
        Tensor v = Tensor::empty({n + 1}, DType::f32, gpu ? GPU : HOST);
        const size_t bytes = size_t(n + 1) * sizeof(float);
        if (gpu) {
            cudaMemcpy(w.raw(), w0.raw(), bytes, cudaMemcpyDeviceToDevice);
            cudaMemcpy(v.raw(), v0.raw(), bytes, cudaMemcpyDeviceToDevice);
            cuda::sgd_update(n, w.data<float>() + 1, g.data<float>() + 1, v.data<float>() + 1, 0.01f, 0.9f,
                             0.0005f, nullptr);
        } else {
            memcpy(w.raw(), w0.raw(), bytes);
            memcpy(v.raw(), v0.raw(), bytes);
            cpu::sgd_update(n, w.data<float>() + 1, g.data<float>() + 1, v.data<float>() + 1, 0.01f, 0.9f, 0.0005f);
        }
    });
}

// sgd_update_multi: 45 tensors in one call (two launches of at most 40 on CUDA) laid out in one buffer with
// gaps, every third one a float past a 16-byte boundary (scalar path), sizes from 1 to 4099, a weight decay each.
// Bit-exact vs the CPU backend over the whole buffer (the gaps stay untouched on both) and vs float64; then the
// op itself against one ops::sgd_update per tensor on the CPU.
void test_sgd_multi() {
    const int count = 45;
    const int64_t sizes[] = {1, 3, 4, 1003, 4099, 7, 64};
    std::vector<int64_t> off(count), len(count);
    std::vector<float> wds(count);
    int64_t total = 0;
    for (int i = 0; i < count; ++i) {
        total = (total + 3) / 4 * 4 + (i % 3 == 2 ? 1 : 0) + 4;  // a gap of at least 4 before each tensor
        off[i] = total;
        len[i] = sizes[i % 7];
        wds[i] = i % 2 ? 0.f : 0.0005f * (1 + i % 5);
        total += len[i];
    }
    const auto wv = randv(total), dwv = randv(total), vv = randv(total);
    Both w = both({total}, wv), dw = both({total}, dwv), v = both({total}, vv);
    const float lr = 0.013f, mom = 0.9f;
    std::vector<double> wref(wv.begin(), wv.end()), vref(vv.begin(), vv.end());
    auto segs = [&](const Both& tw, const Both& tdw, const Both& tv, bool gpu) {
        std::vector<SgdSegment> out;
        for (int i = 0; i < count; ++i) {
            const Tensor& a = gpu ? tw.gpu : tw.cpu;
            const Tensor& b = gpu ? tdw.gpu : tdw.cpu;
            const Tensor& c = gpu ? tv.gpu : tv.cpu;
            out.push_back({const_cast<float*>(a.data<float>()) + off[i], b.data<float>() + off[i],
                           const_cast<float*>(c.data<float>()) + off[i], len[i], wds[i]});
        }
        return out;
    };
    for (int i = 0; i < count; ++i)
        for (int64_t j = off[i]; j < off[i] + len[i]; ++j) {
            vref[j] = double(mom) * vv[j] - double(wds[i]) * lr * wv[j] - double(lr) * dwv[j];
            wref[j] = wv[j] + vref[j];
        }
    const auto sg = segs(w, dw, v, true), sc = segs(w, dw, v, false);
    cuda::sgd_update_multi(count, sg.data(), lr, mom, nullptr);
    cpu::sgd_update_multi(count, sc.data(), lr, mom);
    check_vs_cpu<float>("sgd_update_multi w 45 tensors", w.gpu, w.cpu);
    check_vs_cpu<float>("sgd_update_multi v 45 tensors", v.gpu, v.cpu);
    check_rel("sgd_update_multi w vs float64 45 tensors", w.gpu, wref, kElementwise);
    check_rel("sgd_update_multi v vs float64 45 tensors", v.gpu, vref, kElementwise);

    // The op: two tensors (4 x 3 weights, 1003 biases) against two ops::sgd_update calls on the CPU.
    Both w1 = both({4, 3}, randv(12)), v1 = both({4, 3}, randv(12)), b1 = both({1003}, randv(1003)),
         vb1 = both({1003}, randv(1003));
    const Both g1 = both({4, 3}, randv(12)), gb1 = both({1003}, randv(1003));
    ops::sgd_update_multi({{&w1.gpu, &g1.gpu, &v1.gpu, 0.0005f}, {&b1.gpu, &gb1.gpu, &vb1.gpu, 0.f}}, lr, mom);
    ops::sgd_update(w1.cpu, g1.cpu, v1.cpu, lr, mom, 0.0005f);
    ops::sgd_update(b1.cpu, gb1.cpu, vb1.cpu, lr, mom, 0.f);
    check_vs_cpu<float>("sgd_update_multi op w vs sgd_update", w1.gpu, w1.cpu);
    check_vs_cpu<float>("sgd_update_multi op v vs sgd_update", v1.gpu, v1.cpu);
    check_vs_cpu<float>("sgd_update_multi op bias vs sgd_update", b1.gpu, b1.cpu);
    check_vs_cpu<float>("sgd_update_multi op bias momentum vs sgd_update", vb1.gpu, vb1.cpu);
}

// ---- plumbing ----------------------------------------------------------------------------------------

void test_channels(int N, int C1, int C2, const std::vector<int64_t>& inner_shape) {
    int64_t inner = 1;
    for (auto d : inner_shape) inner *= d;
    std::vector<int64_t> sa{N, C1}, sb{N, C2};
    for (auto d : inner_shape) {
        sa.push_back(d);
        sb.push_back(d);
    }
    const Both a = both(sa, randv(N * C1 * inner)), b = both(sb, randv(N * C2 * inner));
    const std::string nm = fmt("N%d C%d+%d inner%" PRId64, N, C1, C2, inner);
    const Tensor cat = ops::concat_channels({a.gpu, b.gpu});
    const Tensor cat_cpu = ops::concat_channels({a.cpu, b.cpu});
    check_vs_cpu<float>("concat_channels " + nm, cat, cat_cpu);
    check_vs_cpu<float>("slice_channels second " + nm, ops::slice_channels(cat, C1, C1 + C2), b.cpu);
    check_vs_cpu<float>("slice_channels odd [1," + std::to_string(C1 + C2 - 1) + ") " + nm,
                        ops::slice_channels(cat, 1, C1 + C2 - 1), ops::slice_channels(cat_cpu, 1, C1 + C2 - 1));
}

// concat_channels of `count` parts (one launch on CUDA) and split_sum_channels of `count` tensors into `parts`
// slices (one launch), bit for bit against the CPU backend, which slices and adds (and the CUDA slices and adds).
void test_split_sum(int N, int count, int parts, int per, const std::vector<int64_t>& inner_shape) {
    std::vector<int64_t> shape{N, int64_t(parts) * per}, part_shape{N, per};
    int64_t inner = 1;
    for (auto d : inner_shape) {
        shape.push_back(d);
        part_shape.push_back(d);
        inner *= d;
    }
    const std::string nm = fmt("N%d %d x (C%d = %d x %d) inner%" PRId64, N, count, parts * per, parts, per, inner);
    std::vector<Both> xs;
    std::vector<Tensor> xg, xc;
    for (int t = 0; t < count; ++t) {
        xs.push_back(both(shape, randv(size_t(N) * parts * per * inner)));
        xg.push_back(xs.back().gpu);
        xc.push_back(xs.back().cpu);
    }
    const auto yg = ops::split_sum_channels(xg, parts), yc = ops::split_sum_channels(xc, parts);
    for (int u = 0; u < parts; ++u) {
        check_vs_cpu<float>(fmt("split_sum_channels slice %d ", u) + nm, yg[u], yc[u]);
        Tensor acc = ops::slice_channels(xg[0], u * per, (u + 1) * per);
        for (int t = 1; t < count; ++t) acc = ops::add(acc, ops::slice_channels(xg[t], u * per, (u + 1) * per));
        check_exact<float>(fmt("split_sum_channels slice %d vs slice_channels + add ", u) + nm, yg[u],
                           down<float>(acc), "the unfused CUDA ops");
    }
    // The parts of the concat: every tower's slice u side by side (count parts of per channels each).
    std::vector<Tensor> pg, pc;
    for (int t = 0; t < count; ++t) {
        pg.push_back(ops::slice_channels(xg[t], 0, per));
        pc.push_back(ops::slice_channels(xc[t], 0, per));
    }
    check_vs_cpu<float>(fmt("concat_channels %d parts ", count) + nm, ops::concat_channels(pg), ops::concat_channels(pc));
}

// ---- LRN ---------------------------------------------------------------------------------------------

void test_lrn(int N, int C, int H, int W, int size, float k, float alpha, float beta) {
    const auto x = randv(size_t(N) * C * H * W, -2, 2), dy = randv(x.size());
    const Tensor tx = host_tensor({N, C, H, W}, x).to(GPU), tdy = host_tensor({N, C, H, W}, dy).to(GPU);
    const auto r = ops::lrn_forward(tx, size, k, alpha, beta);
    std::vector<double> yr(x.size()), sr(x.size()), dxr(x.size());
    const int half = size / 2;
    auto idx = [&](int n, int c, int hw) { return (size_t(n) * C + c) * H * W + hw; };
    for (int n = 0; n < N; ++n)
        for (int hw = 0; hw < H * W; ++hw)
            for (int c = 0; c < C; ++c) {
                double s = 0;
                for (int j = std::max(0, c - half); j <= std::min(C - 1, c + half); ++j)
                    s += double(x[idx(n, j, hw)]) * x[idx(n, j, hw)];
                sr[idx(n, c, hw)] = k + double(alpha) * s;
                yr[idx(n, c, hw)] = x[idx(n, c, hw)] * std::pow(sr[idx(n, c, hw)], -double(beta));
            }
    for (int n = 0; n < N; ++n)
        for (int hw = 0; hw < H * W; ++hw)
            for (int c = 0; c < C; ++c) {
                double acc = 0;
                for (int j = std::max(0, c - half); j <= std::min(C - 1, c + half); ++j)
                    acc += dy[idx(n, j, hw)] * yr[idx(n, j, hw)] / sr[idx(n, j, hw)];
                dxr[idx(n, c, hw)] = dy[idx(n, c, hw)] * std::pow(sr[idx(n, c, hw)], -double(beta)) -
                                     2.0 * alpha * beta * x[idx(n, c, hw)] * acc;
            }
    const std::string nm = fmt("N%d C%d %dx%d size%d k%g alpha%g beta%g", N, C, H, W, size, k, alpha, beta);
    check_rel("lrn_forward y " + nm, r.first, yr, kElementwise);
    check_rel("lrn_forward scale " + nm, r.second, sr, kReduction);
    const Tensor dx = ops::lrn_backward(tdy, tx, r.first, r.second, size, k, alpha, beta);
    check_rel("lrn_backward " + nm, dx, dxr, kReduction);
    // The ReLU that made x folded in (x's negative half masked): float64, and relu_backward of the unfused dx.
    const Tensor dxm = ops::lrn_backward(tdy, tx, r.first, r.second, size, k, alpha, beta, /*relu=*/true);
    std::vector<double> dxmr(dxr);
    for (size_t i = 0; i < x.size(); ++i) dxmr[i] = x[i] > 0 ? dxr[i] : 0.0;
    check_rel("lrn_backward relu " + nm, dxm, dxmr, kReduction);
    check_exact<float>("lrn_backward relu vs relu_backward " + nm, dxm, down<float>(ops::relu_backward(dx, tx)),
                       "relu_backward of the unfused dx");
}

// lrn_maxpool_forward: each of its four outputs equals the unfused CUDA ops' (lrn_forward, then maxpool_forward of
// its y) bit for bit; the pooled values also within 1e-5 of float64 (reference LRN, then the max at the argmax).
void test_lrn_pool(int N, int C, int H, int W, int size, float k, float alpha, float beta, int win, int st, int pad,
                   bool gridstride = false) {
    const auto x = randv(size_t(N) * C * H * W, -2, 2);
    const Tensor tx = host_tensor({N, C, H, W}, x).to(GPU);
    const auto f = ops::lrn_maxpool_forward(tx, size, k, alpha, beta, win, win, st, st, pad, pad);
    const auto l = ops::lrn_forward(tx, size, k, alpha, beta);
    const auto p = ops::maxpool_forward(l.first, win, win, st, st, pad, pad);
    const std::string nm = fmt("N%d C%d %dx%d size%d window%d s%d p%d", N, C, H, W, size, win, st, pad);
    check_exact<float>("lrn_maxpool_forward y vs lrn_forward " + nm, f.y, down<float>(l.first), "unfused CUDA ops");
    check_exact<float>("lrn_maxpool_forward scale vs lrn_forward " + nm, f.scale, down<float>(l.second),
                       "unfused CUDA ops");
    check_exact<float>("lrn_maxpool_forward pool_y vs maxpool_forward " + nm, f.pool_y, down<float>(p.first),
                       "unfused CUDA ops");
    check_exact<int32_t>("lrn_maxpool_forward argmax vs maxpool_forward " + nm, f.argmax, down<int32_t>(p.second),
                         "unfused CUDA ops");
    if (gridstride) return;  // no float64 copy of the big case
    // float64: the LRN of x, pooled at the argmax the kernel chose (which must be a window maximum)
    const int half = size / 2, HW = H * W;
    const auto am = down<int32_t>(f.argmax);
    const int P = static_cast<int>(f.pool_y.size(2)), Q = static_cast<int>(f.pool_y.size(3));
    std::vector<double> ref(am.size());
    for (int pl = 0; pl < N * C; ++pl) {
        const int c = pl % C;
        for (int o = 0; o < P * Q; ++o) {
            const int i = am[size_t(pl) * P * Q + o];
            double s = 0;
            for (int j = std::max(0, c - half); j <= std::min(C - 1, c + half); ++j) {
                const double v = x[size_t(pl + j - c) * HW + i];
                s += v * v;
            }
            ref[size_t(pl) * P * Q + o] = x[size_t(pl) * HW + i] * std::pow(k + double(alpha) * s, -double(beta));
        }
    }
    check_rel("lrn_maxpool_forward pool_y vs float64 " + nm, f.pool_y, ref, kElementwise);
}

// ---- max-pool ----------------------------------------------------------------------------------------

void test_pool(int N, int C, int H, int W, int wh, int ww, int sh, int sw, int ph, int pw, bool ties) {
    auto x = randv(size_t(N) * C * H * W);
    if (ties)
        for (auto& v : x) v = std::round(v * 2) / 2;  // many equal values: exercises the first-maximum rule
    const int P = (H + 2 * ph - wh) / sh + 1, Q = (W + 2 * pw - ww) / sw + 1;
    const auto dy = randv(size_t(N) * C * P * Q);
    std::vector<double> yr(dy.size()), dxr(x.size(), 0.0);
    std::vector<int32_t> ar(dy.size());
    for (int pl = 0; pl < N * C; ++pl)
        for (int p = 0; p < P; ++p)
            for (int q = 0; q < Q; ++q) {
                float best = -INFINITY;
                int arg = -1;
                for (int r = 0; r < wh; ++r)
                    for (int s = 0; s < ww; ++s) {
                        const int h = p * sh - ph + r, w = q * sw - pw + s;
                        if (h < 0 || h >= H || w < 0 || w >= W) continue;
                        const float v = x[size_t(pl) * H * W + h * W + w];
                        if (v > best) {
                            best = v;
                            arg = h * W + w;
                        }
                    }
                const size_t o = size_t(pl) * P * Q + p * Q + q;
                yr[o] = best;
                ar[o] = arg;
                dxr[size_t(pl) * H * W + arg] += dy[o];
            }
    const Both tx = both({N, C, H, W}, x), tdy = both({N, C, P, Q}, dy);
    const auto r = ops::maxpool_forward(tx.gpu, wh, ww, sh, sw, ph, pw);
    const auto rc = ops::maxpool_forward(tx.cpu, wh, ww, sh, sw, ph, pw);
    const std::string nm =
        fmt("N%d C%d %dx%d window%dx%d s%d,%d p%d,%d%s", N, C, H, W, wh, ww, sh, sw, ph, pw, ties ? " ties" : "");
    check_vs_cpu<float>("maxpool_forward y " + nm, r.first, rc.first);
    check_vs_cpu<int32_t>("maxpool_forward argmax " + nm, r.second, rc.second);
    check_exact<int32_t>("maxpool_forward argmax vs first-maximum rule " + nm, r.second, ar, "reference");
    check_rel("maxpool_forward y vs float64 " + nm, r.first, yr, kElementwise);
    const Tensor dx = ops::maxpool_backward(tdy.gpu, r.second, H, W, wh, ww, sh, sw, ph, pw);
    check_vs_cpu<float>("maxpool_backward " + nm, dx, ops::maxpool_backward(tdy.cpu, rc.second, H, W, wh, ww, sh, sw, ph, pw));
    check_rel("maxpool_backward vs float64 " + nm, dx, dxr, kElementwise);
    // The ReLU whose output x is, folded in: the CPU backend's bits and float64.
    const Tensor dxm = ops::maxpool_backward(tdy.gpu, r.second, H, W, wh, ww, sh, sw, ph, pw, true, tx.gpu);
    check_vs_cpu<float>("maxpool_backward relu_y " + nm, dxm,
                        ops::maxpool_backward(tdy.cpu, rc.second, H, W, wh, ww, sh, sw, ph, pw, true, tx.cpu));
    std::vector<double> dxmr(dxr);
    for (size_t i = 0; i < x.size(); ++i) dxmr[i] = x[i] > 0 ? dxr[i] : 0.0;
    check_rel("maxpool_backward relu_y vs float64 " + nm, dxm, dxmr, kElementwise);
}

// ---- softmax -----------------------------------------------------------------------------------------

void test_softmax(int N, int C, bool ties) {
    auto x = randv(size_t(N) * C, -5, 5);
    if (ties)
        for (auto& v : x) v = std::round(v);
    std::vector<int32_t> lab(N);
    for (auto& l : lab) l = static_cast<int32_t>(rng() % C);
    std::vector<double> pr(x.size()), loss(N), d(x.size());
    std::vector<int32_t> rank(N);
    const float scale = 1.0f / N;
    for (int n = 0; n < N; ++n) {
        const float* row = &x[size_t(n) * C];
        double m = -INFINITY, s = 0;
        for (int j = 0; j < C; ++j) m = std::max(m, double(row[j]));
        for (int j = 0; j < C; ++j) s += std::exp(row[j] - m);
        for (int j = 0; j < C; ++j) pr[size_t(n) * C + j] = std::exp(row[j] - m) / s;
        loss[n] = std::log(s) - (row[lab[n]] - m);
        int cnt = 0;
        for (int j = 0; j < C; ++j) cnt += row[j] > row[lab[n]] || (row[j] == row[lab[n]] && j < lab[n]);
        rank[n] = cnt;
        for (int j = 0; j < C; ++j) d[size_t(n) * C + j] = (pr[size_t(n) * C + j] - (j == lab[n])) * scale;
    }
    const Both tx = both({N, C}, x), tl = both({N}, lab);
    const auto r = ops::softmax_cross_entropy_forward(tx.gpu, tl.gpu);
    const auto rc = ops::softmax_cross_entropy_forward(tx.cpu, tl.cpu);
    const std::string nm = fmt("N%d C%d%s", N, C, ties ? " ties" : "");
    check_rel("softmax_cross_entropy_forward probs " + nm, r.probs, pr, kReduction);
    check_rel("softmax_cross_entropy_forward loss " + nm, r.loss, loss, kReduction);
    check_vs_cpu<int32_t>("softmax_cross_entropy_forward rank " + nm, r.rank, rc.rank);
    check_exact<int32_t>("softmax_cross_entropy_forward rank vs reference " + nm, r.rank, rank, "reference");
    check_rel("softmax_forward " + nm, ops::softmax_forward(tx.gpu), pr, kReduction);
    const Tensor probs_cpu = r.probs.to(HOST);  // same probs on both backends: the backward is elementwise
    const Tensor dl = ops::softmax_cross_entropy_backward(r.probs, tl.gpu, scale);
    check_vs_cpu<float>("softmax_cross_entropy_backward " + nm, dl,
                        ops::softmax_cross_entropy_backward(probs_cpu, tl.cpu, scale));
    check_rel("softmax_cross_entropy_backward vs float64 " + nm, dl, d, kReduction);
    // The logits as parts read in place (the towers' fc8 halves; here also uneven thirds), and dlogits cut into
    // slices: the whole-tensor kernels' bits.
    for (int parts : {2, 3}) {
        if (C < parts) continue;
        // Two even halves (the net's), or thirds of uneven sizes (C/3+1, C/3-1, the rest).
        const std::vector<int> cuts = parts == 2 ? std::vector<int>{0, C / 2, C} : std::vector<int>{0, C / 3 + 1, 2 * (C / 3), C};
        std::vector<Tensor> lp;
        for (int u = 0; u < parts; ++u) lp.push_back(ops::slice_channels(tx.gpu, cuts[u], cuts[u + 1]));
        const auto rp = ops::softmax_cross_entropy_forward_parts(lp, tl.gpu);
        const std::string pn = fmt(" %d parts ", parts) + nm;
        check_exact<float>("softmax_cross_entropy_forward_parts probs" + pn, rp.probs, down<float>(r.probs),
                           "the whole-logits kernel");
        check_exact<float>("softmax_cross_entropy_forward_parts loss" + pn, rp.loss, down<float>(r.loss),
                           "the whole-logits kernel");
        check_exact<int32_t>("softmax_cross_entropy_forward_parts rank" + pn, rp.rank, rank, "reference");
        if (C % parts != 0) continue;
        const auto dp = ops::softmax_cross_entropy_backward_parts(r.probs, tl.gpu, scale, parts);
        const auto dpc = ops::softmax_cross_entropy_backward_parts(probs_cpu, tl.cpu, scale, parts);
        for (int u = 0; u < parts; ++u)
            check_vs_cpu<float>(fmt("softmax_cross_entropy_backward_parts slice %d", u) + pn, dp[u], dpc[u]);
    }
}

// ---- augmentation ------------------------------------------------------------------------------------

void test_augment(int N, int H, int W, int crop) {
    std::vector<uint8_t> img(size_t(N) * H * W * 3);
    for (auto& v : img) v = rng() & 255;
    std::vector<int32_t> off(2 * N);
    std::vector<uint8_t> flips(N);
    for (int n = 0; n < N; ++n) {
        off[2 * n] = rng() % (H - crop + 1);
        off[2 * n + 1] = rng() % (W - crop + 1);
        flips[n] = rng() % 2 ? static_cast<uint8_t>(1 + rng() % 200) : 0;  // any nonzero byte means flip
    }
    const auto light = randv(3 * N), mean = randv(size_t(3) * H * W, 0, 255);
    std::vector<double> ref(size_t(N) * 3 * crop * crop);
    for (int n = 0; n < N; ++n)
        for (int c = 0; c < 3; ++c)
            for (int y = 0; y < crop; ++y)
                for (int x = 0; x < crop; ++x) {
                    const int ys = off[2 * n] + y, xs = off[2 * n + 1] + (flips[n] ? crop - 1 - x : x);
                    ref[((size_t(n) * 3 + c) * crop + y) * crop + x] =
                        double(img[((size_t(n) * H + ys) * W + xs) * 3 + c]) - mean[(size_t(c) * H + ys) * W + xs] +
                        light[3 * n + c];
                }
    const Both ti = both({N, H, W, 3}, img), to = both({N, 2}, off), tf = both({N}, flips);
    const Both tl = both({N, 3}, light), tm = both({3, H, W}, mean);
    const Tensor out = ops::augment_batch(ti.gpu, to.gpu, tf.gpu, tl.gpu, tm.gpu, crop);
    const std::string nm = fmt("N%d %dx%d crop%d", N, H, W, crop);
    check_vs_cpu<float>("augment_batch " + nm, out, ops::augment_batch(ti.cpu, to.cpu, tf.cpu, tl.cpu, tm.cpu, crop));
    check_rel("augment_batch vs float64 " + nm, out, ref, kElementwise);
}

// ---- groups ------------------------------------------------------------------------------------------

void group_zero() {
    // Empty batches: nothing to launch for the outputs of size zero; reductions over an empty batch are zero.
    const Tensor x0 = Tensor::empty({0, 3, 5, 5}, DType::f32, GPU), w0 = host_tensor({4, 3, 3, 3}, randv(108)).to(GPU);
    const Tensor dy0 = Tensor::empty({0, 4, 3, 3}, DType::f32, GPU);
    const Tensor y0 = ops::conv2d_forward(x0, w0, std::nullopt, 1, 1, 0, 0, 1);
    check_true("conv2d_forward N=0 shape", y0.numel() == 0 && y0.shape() == std::vector<int64_t>({0, 4, 3, 3}),
               "empty output " + y0.shape_str());
    check_exact<float>("conv2d_backward_weight N=0", ops::conv2d_backward_weight(x0, dy0, 3, 3, 1, 1, 0, 0, 1),
                       std::vector<float>(108, 0.f), "zeros");
    check_exact<float>("conv2d_backward_bias N=0", ops::conv2d_backward_bias(dy0), std::vector<float>(4, 0.f), "zeros");
    const Tensor lx = Tensor::empty({0, 6}, DType::f32, GPU), ldy = Tensor::empty({0, 5}, DType::f32, GPU);
    check_exact<float>("linear_backward_weight N=0", ops::linear_backward_weight(lx, ldy), std::vector<float>(30, 0.f),
                       "zeros");
    check_exact<float>("linear_backward_bias N=0", ops::linear_backward_bias(ldy), std::vector<float>(5, 0.f), "zeros");
    const Tensor r0 = ops::relu_forward(Tensor::empty({0}, DType::f32, GPU));
    check_true("relu_forward n=0", r0.numel() == 0 && r0.device().is_cuda(), "empty output on cuda");
}

void group_elementwise() {
    for (int64_t n : {int64_t(1), int64_t(3), int64_t(1003), int64_t(4096 + 2)}) test_elementwise(n);
    test_elementwise(4096 * 9 + 1);  // 1 x 9216-feature row plus one: fc6's input size, float4 body + tail
    for (int64_t n : {int64_t(1), int64_t(7), int64_t(1029)}) test_unaligned(n);
    test_sgd_multi();
}

void group_plumbing() {
    test_channels(3, 2, 5, {3, 7});       // scalar path (odd run)
    test_channels(2, 4, 8, {2, 2});       // float4 path
    test_channels(5, 3, 1, {});           // (N, C) 2-D
    test_channels(2, 128, 128, {13, 13});  // conv2 -> conv3 cross-tower concat, batch 2
    test_channels(2, 2048, 2048, {});     // fc6 -> fc7 concat, batch 2
    test_split_sum(3, 2, 2, 3, {3, 7});    // scalar path (odd run)
    test_split_sum(2, 3, 2, 4, {2, 2});    // float4 path, three inputs
    test_split_sum(5, 2, 3, 1, {});        // (N, C) 2-D, three slices of one channel
    test_split_sum(2, 2, 2, 128, {13, 13});  // conv3's d_in (256 channels: each tower's 128) at batch 2
    test_split_sum(2, 2, 2, 2048, {});     // fc7's d_in (4096 features) at batch 2
}

void group_lrn() {
    test_lrn(2, 7, 5, 3, 5, 2.f, 1e-4f, 0.75f);
    test_lrn(1, 9, 4, 4, 3, 1.f, 0.5f, 0.6f);
    test_lrn(2, 2, 3, 3, 7, 0.5f, 1.f, 0.75f);  // window wider than the channel count
    test_lrn(1, 48, 55, 55, 5, 2.f, 1e-4f, 0.75f);   // AlexNet LRN1, one tower, batch 1
    test_lrn(1, 128, 27, 27, 5, 2.f, 1e-2f, 0.75f);  // AlexNet LRN2 shape, one tower (larger alpha)
    test_lrn(2, 70, 5, 7, 35, 1.f, 1e-2f, 0.75f);    // a window wider than the tiled backward's halo: the plain kernel
    test_lrn_pool(2, 7, 9, 10, 5, 2.f, 0.5f, 0.75f, 3, 2, 1);     // odd plane, padded windows
    test_lrn_pool(1, 48, 55, 55, 5, 2.f, 1e-2f, 0.75f, 3, 2, 0);  // AlexNet LRN1 + pool1, one tower
    test_lrn_pool(2, 128, 27, 27, 5, 2.f, 1e-2f, 0.75f, 3, 2, 0); // AlexNet LRN2 + pool2, one tower, batch 2
    test_lrn_pool(1, 3, 70, 70, 3, 1.f, 0.5f, 0.6f, 2, 2, 0);     // a plane over the shared tile: the two kernels
}

void group_pool() {
    test_pool(2, 3, 13, 11, 3, 3, 2, 2, 0, 0, false);
    test_pool(1, 2, 9, 10, 3, 2, 2, 3, 1, 1, true);
    test_pool(2, 2, 7, 7, 2, 2, 1, 1, 1, 0, true);
    test_pool(1, 48, 55, 55, 3, 3, 2, 2, 0, 0, true);   // AlexNet pool1, one tower, batch 1
    test_pool(2, 128, 13, 13, 3, 3, 2, 2, 0, 0, true);  // AlexNet pool5, one tower, batch 2
    // An argmax outside its window: the CUDA gather would drop its gradient silently, so the op checks it first.
    const int H = 7, W = 7;
    const Both x = both({1, 2, H, W}, randv(2 * H * W)), dy = both({1, 2, 3, 3}, randv(2 * 3 * 3));
    const auto r = ops::maxpool_forward(x.gpu, 3, 3, 2, 2, 0, 0);
    Tensor bad = r.second.to(Device{});
    bad.data<int32_t>()[5] = 0;  // output (1, 2)'s window starts at (2, 4): element 0 lies outside it
    std::string msg;
    try {
        ops::maxpool_backward(dy.gpu, bad.to(x.gpu.device()), H, W, 3, 3, 2, 2, 0, 0);
    } catch (const ValueError& e) {
        msg = e.what();
    }
    check_true("maxpool_backward rejects an argmax outside its window (cuda)",
               msg.find("maxpool_backward: argument 'argmax'") == 0 && msg.find("outside that output's window") != std::string::npos,
               msg.empty() ? "no error raised" : msg);
}

void group_softmax() {
    test_softmax(5, 1, false);
    test_softmax(9, 37, true);
    test_softmax(3, 300, true);    // a 512-thread block (256 up to 256 classes, 1024 beyond 512)
    test_softmax(4, 1000, false);  // AlexNet's 1000 classes
    test_softmax(2, 1000, true);
    test_softmax(2, 2100, true);   // beyond one class per thread of the widest (1024-thread) block
}

void group_augment() {
    test_augment(3, 12, 10, 7);
    test_augment(2, 9, 9, 9);
    test_augment(1, 256, 256, 224);  // AlexNet's crop
}

void group_conv() {
    test_conv({2, 3, 11, 13, 5, 3, 3, 1, 1, 1, 1, 1, true, ALL, "odd"});
    test_conv({3, 4, 9, 7, 6, 3, 2, 2, 1, 1, 0, 2, true, ALL, "odd"});
    test_conv({1, 6, 17, 15, 9, 5, 5, 3, 2, 2, 2, 3, false, ALL, "odd"});
    test_conv({2, 3, 23, 23, 8, 11, 11, 4, 4, 2, 2, 1, true, ALL, "odd"});
    test_conv({2, 4, 6, 5, 4, 1, 1, 1, 1, 0, 0, 4, true, ALL, "odd"});
    test_conv({1, 2, 3, 3, 3, 3, 3, 1, 1, 2, 2, 1, true, ALL, "odd"});  // padding larger than half the window
    test_conv({2, 4, 1, 1, 6, 1, 1, 1, 1, 0, 0, 2, true, ALL, "odd"});  // 1x1 image
    // The tap-mask loaders (windows of up to 15 x 15) on rectangular windows and at their limit, 15 x 15 (bits 14
    // and 30), and windows 16 rows tall or 17 columns wide, which take the (r, s) bounds checks in every pass.
    test_conv({1, 2, 9, 12, 3, 4, 8, 1, 1, 1, 3, 1, true, ALL, "32 taps"});
    test_conv({1, 3, 9, 10, 4, 7, 5, 1, 1, 3, 2, 1, true, ALL, "35 taps"});
    test_conv({1, 2, 17, 16, 3, 15, 15, 1, 1, 7, 6, 1, true, ALL, "15x15 window"});
    test_conv({1, 2, 18, 6, 2, 16, 3, 1, 1, 2, 1, 1, true, ALL, "16-tall window"});
    test_conv({1, 2, 5, 20, 3, 1, 17, 1, 1, 0, 3, 1, true, ALL, "17-wide window"});
    // M = 60 (out and in channels): the weight gradient on 64x128 tiles with a partial row tile, split in two
    // (Kr = 286); forward and grad-input take 48x128 here (group conv_bigtile has 64x128 for them).
    test_conv({2, 60, 13, 11, 60, 3, 3, 1, 1, 1, 1, 1, true, ALL, "wide tile"});
    // The channel-inner (tap-major) forward and grad-input: Cg or Kg a multiple of 16, windows the tap mask fits; rows
    // padded to the tile (M = 32, 16, 24), a strided forward with groups (grad-input strided: channel-major), 5x5.
    test_conv({2, 16, 9, 11, 32, 3, 3, 1, 1, 1, 1, 1, true, ALL, "channel-inner"});
    test_conv({1, 32, 11, 9, 48, 3, 3, 2, 2, 1, 0, 2, true, FWD | DGRAD, "channel-inner strided groups"});
    test_conv({1, 32, 7, 7, 32, 5, 5, 1, 1, 2, 2, 2, false, FWD | DGRAD, "channel-inner 5x5 groups"});
}

void group_conv_pair() {
    // 48x128 tiles with partial row and column tiles, the weight gradient split in two (Kr = 338).
    test_conv_pair({2, 6, 13, 13, 40, 3, 3, 1, 1, 1, 1, 1, true, ALL, "pair"});
    test_conv_pair({1, 8, 7, 7, 12, 3, 3, 1, 1, 1, 1, 2, true, ALL, "pair groups"});
    test_conv_pair({2, 4, 11, 11, 6, 3, 3, 2, 2, 1, 1, 1, true, ALL, "pair strided"});
    // M = 49, N = 16909: one tower takes 48x128 tiles, the pair's twice as many blocks 64x128.
    test_conv_pair({1, 49, 1, 16909, 49, 1, 1, 1, 1, 0, 0, 1, true, ALL, "pair tile differs"});
    // The bias gradient in 10 slices per channel, added by 8 lanes (split_reduce) in the weight gradient's reduce.
    test_conv_pair({1, 2, 100, 100, 4, 3, 3, 1, 1, 1, 1, 1, true, ALL, "pair sliced bias"});
    // The channel-inner forward (M = 48) and grad-input (M = 16 padded to a 48-row tile).
    test_conv_pair({2, 16, 9, 9, 48, 3, 3, 1, 1, 1, 1, 1, true, ALL, "pair channel-inner"});
    // Towers that read one x with 48 filters each stack on one B (TowerStack), as conv1's: its 11x11 stride-4 window,
    // N*P*Q = 338 columns (a partial column tile) and a weight gradient in 2 split-K slices; then with 2 groups
    // (a slice per group). Bits still the single calls'. With 40 filters each they run as a pair.
    test_conv_pair({2, 3, 55, 55, 48, 11, 11, 4, 4, 2, 2, 1, true, ALL, "pair shared x stacked"}, true, 2);
    test_conv_pair({1, 6, 13, 13, 96, 3, 3, 1, 1, 1, 1, 2, true, ALL, "pair shared x stacked groups"}, true, 2);
    test_conv_pair({1, 3, 13, 13, 40, 3, 3, 1, 1, 1, 1, 1, true, ALL, "pair shared x 40 filters"}, true);
    // A pair whose towers differ in shape, or in device, is refused naming the op.
    const Tensor x0 = host_tensor({1, 2, 5, 5}, randv(50)).to(GPU), x1 = host_tensor({1, 2, 5, 6}, randv(60)).to(GPU);
    const Tensor w = host_tensor({3, 2, 3, 3}, randv(54)).to(GPU);
    std::string msg;
    try {
        ops::conv2d_forward_pair({x0, x1}, {w, w}, {std::nullopt, std::nullopt}, 1, 1, 1, 1, 1);
    } catch (const ValueError& e) {
        msg = e.what();
    }
    check_true("conv2d_forward_pair rejects towers of different shapes",
               msg.find("conv2d_forward_pair: argument 'x'") == 0 && msg.find("differs from tower 0") != std::string::npos,
               msg.empty() ? "no error raised" : msg);
}

void group_conv_alexnet() {
    // Per-tower layer shapes of the two-tower net (groups=1 per tower) at batch 2, so GEMM columns cross
    // an image boundary. conv1's input gradient is never computed by the net (nothing lies below it), and
    // its 50176-column GEMM (3 rows padded to a 64-row tile) takes ~10 s per image to emulate: conv1
    // checks the forward, weight and bias passes; conv2..conv5 check all four.
    test_conv({2, 3, 224, 224, 48, 11, 11, 4, 4, 2, 2, 1, true, FWD | WGRAD | BGRAD, "alexnet conv1"});
    test_conv({2, 48, 27, 27, 128, 5, 5, 1, 1, 2, 2, 1, true, ALL, "alexnet conv2"});
    test_conv({2, 256, 13, 13, 192, 3, 3, 1, 1, 1, 1, 1, true, ALL, "alexnet conv3"});
    test_conv({2, 192, 13, 13, 192, 3, 3, 1, 1, 1, 1, 1, true, ALL, "alexnet conv4"});
    test_conv({2, 192, 13, 13, 128, 3, 3, 1, 1, 1, 1, 1, true, ALL, "alexnet conv5"});
    test_conv({1, 96, 27, 27, 256, 5, 5, 1, 1, 2, 2, 2, false, ALL, "alexnet conv2 both towers as groups"});
}

void group_conv_bigtile() {
    // Many-block shapes: 128x128 tiles without split-K for the weight gradients; forward (M = 72, 4 groups) and
    // grad-input (M = 130) take 48x128 tiles (conv_tile: 3 x 133 of them cost less than 266 big ones).
    test_conv({1, 4, 92, 92, 288, 1, 1, 1, 1, 0, 0, 4, true, FWD | WGRAD | BGRAD, "bigtile fwd"});
    test_conv({1, 130, 130, 130, 2, 1, 1, 1, 1, 0, 0, 1, true, DGRAD, "bigtile dgrad"});
    test_conv({1, 4100, 1, 1, 1100, 1, 1, 1, 1, 0, 0, 1, false, WGRAD, "bigtile wgrad"});
    // Forward and grad-input on 64x128 (M = 49) and on 128x128 (M = 97) tiles, each with partial row and column
    // tiles (smaller shapes take 48x128: conv_tile weighs a part-empty GPU by the blocks' size).
    test_conv({1, 2, 3, 11269, 49, 1, 1, 1, 1, 0, 0, 1, true, FWD, "wide fwd"});
    test_conv({1, 49, 3, 11269, 2, 1, 1, 1, 1, 0, 0, 1, true, DGRAD, "wide dgrad"});
    test_conv({1, 2, 1, 22559, 97, 1, 1, 1, 1, 0, 0, 1, true, FWD, "big fwd"});
    test_conv({1, 97, 1, 22559, 2, 1, 1, 1, 1, 0, 0, 1, true, DGRAD, "big dgrad"});
    // The channel-inner forward and grad-input on 64x128 (M = 49) and 128x128 (M = 97) tiles, rows padded.
    test_conv({1, 16, 3, 11269, 49, 1, 1, 1, 1, 0, 0, 1, true, FWD, "channel-inner wide fwd"});
    test_conv({1, 49, 3, 11269, 16, 1, 1, 1, 1, 0, 0, 1, true, DGRAD, "channel-inner wide dgrad"});
    test_conv({1, 16, 1, 22559, 97, 1, 1, 1, 1, 0, 0, 1, true, FWD, "channel-inner big fwd"});
    test_conv({1, 97, 1, 22559, 16, 1, 1, 1, 1, 0, 0, 1, true, DGRAD, "channel-inner big dgrad"});
}

void group_linear() {
    test_linear(3, 5, 7, true);
    test_linear(17, 33, 65, false);
    test_linear(130, 70, 200, true);
    test_linear(5, 1000, 7, true);  // split-K in every pass
    test_linear(128, 300, 70, true);  // M = 128 on 128x128 tiles: forward split-K, grad-input not
    test_linear(1, 1, 1, true);
    test_linear(2, 4096, 500, true);  // AlexNet fc8, one tower's half of the classes, batch 2
    test_linear(2, 4096, 2048, true);  // AlexNet fc7, one tower, batch 2 (fc6 differs only in I=9216)
    // Pairs: split-K in every pass with the reduce's lanes (fc8's shape), a 64x64 tile without split, and M = 128
    // on 128x128 tiles (forward split-K with its ReLU and bias in the reduce).
    test_linear_pair(2, 4096, 500);
    test_linear_pair(17, 33, 65);
    test_linear_pair(128, 300, 70);
    // 16-byte copies (I, O multiples of 4) on 64x64 tiles, grad-input with split-K, against misaligned pointers.
    test_linear_misaligned(5, 1000, 600);
    test_linear_misaligned(6, 264, 136);
}

void group_linear_bigtile() {
    test_linear(1100, 3, 4100, true);  // forward on 128x128 tiles; input/weight gradients split-K
    test_linear(2, 4100, 1100, true);  // weight gradient on 128x128 tiles (16-byte copies of dy and x)
}

// Launches big enough that the capped grids (grid_1d: 65536 blocks; plane_grid: 65535 planes in y, about
// 65536 blocks in all) make threads loop: each kernel's grid-stride loop runs more than once. Compared
// bit for bit with the CPU backend (no float64 copies: these are 16 M-element buffers).
void group_gridstride() {
    {
        const int64_t n = int64_t(65536) * 256 + 4099;  // dropout is one element per thread: 1-D cap
        const Both x = both({n}, randv(n));
        const uint64_t seed = rng();
        const auto r = ops::dropout_forward(x.gpu, 0.5f, seed, 12345);
        const auto rc = ops::dropout_forward(x.cpu, 0.5f, seed, 12345);
        const std::string nm = fmt("p=0.5 n=%" PRId64, n);
        check_vs_cpu<float>("dropout_forward y " + nm, r.first, rc.first);
        check_vs_cpu<uint8_t>("dropout_forward mask " + nm, r.second, rc.second);
    }
    cuda_empty_cache();  // keep the peak memory of this group near 300 MB
    {
        // 66000 planes of 2x2: blockIdx.y strides over planes in pool and LRN, over rows in the
        // cross-entropy backward, over images in the channel copy.
        const int N = 2, C = 33000, H = 2, W = 2;
        const Both x = both({N, C, H, W}, randv(size_t(N) * C * H * W)), dy = both({N, C, 1, 1}, randv(size_t(N) * C));
        const std::string nm = fmt("N%d C%d %dx%d", N, C, H, W);
        const auto r = ops::maxpool_forward(x.gpu, 2, 2, 2, 2, 0, 0);
        const auto rc = ops::maxpool_forward(x.cpu, 2, 2, 2, 2, 0, 0);
        check_vs_cpu<float>("maxpool_forward y " + nm, r.first, rc.first);
        check_vs_cpu<int32_t>("maxpool_forward argmax " + nm, r.second, rc.second);
        check_vs_cpu<float>("maxpool_backward " + nm, ops::maxpool_backward(dy.gpu, r.second, H, W, 2, 2, 2, 2, 0, 0),
                            ops::maxpool_backward(dy.cpu, rc.second, H, W, 2, 2, 2, 2, 0, 0));
        const Both l = both({1, 66000, 1, 1}, randv(66000, -2, 2));
        const auto lr = ops::lrn_forward(l.gpu, 5, 2.f, 0.5f, 0.75f);
        const auto lrc = ops::lrn_forward(l.cpu, 5, 2.f, 0.5f, 0.75f);
        // powf may differ in the last bit between the backends: the CPU result within 1e-5
        check_rel("lrn_forward y vs CPU backend N1 C66000 1x1", lr.first, to_double(down<float>(lrc.first)),
                  kElementwise);
        test_lrn_pool(1, 66000, 2, 2, 5, 2.f, 0.5f, 0.75f, 2, 2, 0, /*gridstride=*/true);  // a block per plane, 66000
        {  // lrn_backward's tiled kernel: one tile per image here, 66000 of them
            const Both xl = both({66000, 3, 1, 1}, randv(66000 * 3, -2, 2)), dl = both({66000, 3, 1, 1}, randv(66000 * 3));
            const auto fg = ops::lrn_forward(xl.gpu, 3, 1.f, 0.5f, 0.75f);
            const auto fc = ops::lrn_forward(xl.cpu, 3, 1.f, 0.5f, 0.75f);
            check_rel("lrn_backward vs CPU backend N66000 C3 1x1",
                      ops::lrn_backward(dl.gpu, xl.gpu, fg.first, fg.second, 3, 1.f, 0.5f, 0.75f),
                      to_double(down<float>(ops::lrn_backward(dl.cpu, xl.cpu, fc.first, fc.second, 3, 1.f, 0.5f, 0.75f))),
                      kReduction);
        }
        const Both s = both({66000, 3}, randv(66000 * 3, 0.f, 1.f));
        std::vector<int32_t> lab(66000);
        for (auto& v : lab) v = static_cast<int32_t>(rng() % 3);
        const Both tl = both({66000}, lab);
        check_vs_cpu<float>("softmax_cross_entropy_backward N66000 C3",
                            ops::softmax_cross_entropy_backward(s.gpu, tl.gpu, 0.25f),
                            ops::softmax_cross_entropy_backward(s.cpu, tl.cpu, 0.25f));
        const Both a = both({66000, 1}, randv(66000)), b = both({66000, 2}, randv(66000 * 2));
        check_vs_cpu<float>("concat_channels N66000 C1+2", ops::concat_channels({a.gpu, b.gpu}),
                            ops::concat_channels({a.cpu, b.cpu}));
    }
    cuda_empty_cache();
    {
        // One 4100x4100 plane: the max-pool backward (one thread per input pixel) strides in x.
        const int H = 4100, W = 4100, P = (H - 3) / 2 + 1, Q = (W - 3) / 2 + 1;
        Tensor arg_gpu, arg_cpu;
        {
            const Both x = both({1, 1, H, W}, randv(size_t(H) * W));
            arg_gpu = ops::maxpool_forward(x.gpu, 3, 3, 2, 2, 0, 0).second;
            arg_cpu = ops::maxpool_forward(x.cpu, 3, 3, 2, 2, 0, 0).second;
        }
        cuda_empty_cache();
        check_vs_cpu<int32_t>("maxpool_forward argmax N1 C1 4100x4100 window3x3 s2,2", arg_gpu, arg_cpu);
        const Both dy = both({1, 1, P, Q}, randv(size_t(P) * Q));
        check_vs_cpu<float>("maxpool_backward N1 C1 4100x4100 window3x3 s2,2",
                            ops::maxpool_backward(dy.gpu, arg_gpu, H, W, 3, 3, 2, 2, 0, 0),
                            ops::maxpool_backward(dy.cpu, arg_cpu, H, W, 3, 3, 2, 2, 0, 0));
    }
    cuda_empty_cache();
}

// ---- the scheduler and Net on emulated streams ------------------------------------------------------
// The real csrc/scheduler.cpp (CudaExecutor: non-blocking streams, events between towers, timing events,
// stream synchronization) and csrc/net.cpp drive a small two-tower AlexNet on the emulated device. Work runs
// when issued, so results alone cannot show a missing event: the runtime's vector clocks check every
// buffer a launch or copy touches for accesses from two streams with no happens-before edge between them.

constexpr int kNetSteps = 4, kNetWarmup = 2, kNetBatch = 5;
constexpr float kNetLr = 0.05f;

NetConfig small_net_config() {
    NetConfig c;
    c.input_size = 32;
    c.num_classes = 6;
    c.conv1_kernel = 5;
    c.conv1_stride = 2;
    c.conv1_padding = 2;
    c.channels = {8, 12, 16, 12, 8};
    c.fc = {16, 12};
    c.dropout = 0.5f;
    c.weight_decay = 0.0005f;
    return c;
}

struct NetInputs {
    uint64_t seed;
    int64_t step0;
    std::vector<std::vector<float>> x;
    std::vector<std::vector<int32_t>> y;
    std::vector<float> x_eval;
    std::vector<int32_t> y_eval;
};

struct NetRun {
    std::vector<double> losses;
    std::vector<int64_t> hits;  // top1, top5 per step
    std::vector<std::map<std::string, int64_t>> edges;  // per training step
    std::vector<std::pair<std::string, std::vector<float>>> state;
    std::vector<float> logits, probs;
    StepResult eval;
    std::vector<TimelineEntry> timeline;  // of the traced (last) training step
    std::vector<std::string> executors;
    std::vector<Device> devices;  // per tower
    int64_t mallocs_warm = 0, mallocs_end = 0;
    long long events_leaked = 0;  // events alive after the net is gone that were not before it
    emu::RuntimeStats rt;  // runtime calls made by this run
    std::vector<std::string> races;
    std::string error;  // the run threw: no result to compare
};

NetRun run_net(const NetConfig& cfg, const NetInputs& in, const std::vector<Device>& devs, bool shared) {
    NetRun r;
    r.devices = devs;
    emu::clear_race_reports();
    const emu::RuntimeStats rt0 = emu::runtime_stats();
    const size_t events0 = emu::live_events();
    try {
        Net net(cfg, devs, shared, in.seed);
        net.step = in.step0;
        for (int t = 0; t < cfg.towers; ++t) r.executors.push_back(net.scheduler().executor_name(t));
        for (int s = 0; s < kNetSteps; ++s) {
            net.trace = s == kNetSteps - 1;
            const StepResult sr = net.train_step(in.x[s].data(), in.y[s].data(), kNetBatch, kNetLr);
            r.losses.push_back(sr.loss);
            r.hits.push_back(sr.top1);
            r.hits.push_back(sr.top5);
            r.edges.push_back(net.scheduler().edge_bytes());
            if (s == kNetWarmup - 1) r.mallocs_warm = cuda_allocator_stats().device_mallocs;
        }
        r.mallocs_end = cuda_allocator_stats().device_mallocs;
        r.timeline = net.scheduler().timeline();
        net.trace = false;
        r.logits = down<float>(net.forward(in.x_eval.data(), kNetBatch, false));
        r.probs = down<float>(net.forward(in.x_eval.data(), kNetBatch, true));
        r.eval = net.evaluate(in.x_eval.data(), in.y_eval.data(), kNetBatch);
        for (const auto& kv : net.state()) r.state.push_back({kv.first, down<float>(kv.second)});
    } catch (const std::exception& e) {  // the executors synchronize and destroy their streams on the way out
        r.error = e.what();
    }
    const emu::RuntimeStats& rt1 = emu::runtime_stats();
    r.rt.streams_created = rt1.streams_created - rt0.streams_created;
    r.rt.streams_destroyed = rt1.streams_destroyed - rt0.streams_destroyed;
    r.rt.event_records = rt1.event_records - rt0.event_records;
    r.rt.stream_waits = rt1.stream_waits - rt0.stream_waits;
    r.rt.cross_stream_waits = rt1.cross_stream_waits - rt0.cross_stream_waits;
    r.rt.cross_device_waits = rt1.cross_device_waits - rt0.cross_device_waits;
    r.rt.peer_queries = rt1.peer_queries - rt0.peer_queries;
    for (int d = 0; d < emu::kDeviceCount; ++d)
        r.rt.calls_per_device[d] = rt1.calls_per_device[d] - rt0.calls_per_device[d];
    r.events_leaked = static_cast<long long>(emu::live_events()) - static_cast<long long>(events0);
    r.rt.elapsed_queries = rt1.elapsed_queries - rt0.elapsed_queries;
    r.rt.calls_created_streams = rt1.calls_created_streams - rt0.calls_created_streams;
    r.races = emu::race_reports();
    return r;
}

// The uint8 input path (Net::train_step_u8): the same steps from uint8 source images and their crop
// offsets, flips and lighting, augmented on the device after an upload on the device's upload stream.
constexpr int kNetSrc = 40;  // source image side; the net crops input_size (32) from it
struct U8Inputs {
    std::vector<std::vector<uint8_t>> images;  // per step (kNetBatch, kNetSrc, kNetSrc, 3)
    std::vector<std::vector<int32_t>> offsets;
    std::vector<std::vector<uint8_t>> flips;
    std::vector<std::vector<float>> light;
    std::vector<float> mean;  // (3, kNetSrc, kNetSrc)
};

// Step s's batch of u with labels y (pointers into them: they must outlive the batch).
Net::U8Batch u8_batch(const U8Inputs& u, const std::vector<std::vector<int32_t>>& y, int s) {
    Net::U8Batch b;
    b.images = u.images[s].data();
    b.n = kNetBatch;
    b.H = b.W = kNetSrc;
    b.offsets = u.offsets[s].data();
    b.flips = u.flips[s].data();
    b.light = u.light[s].data();
    b.labels = y[s].data();
    return b;
}

// How run_net_u8 feeds the steps: Net::train_step_u8 (numpy-style arrays copied into the ring), or the
// zero-copy path (Net::staging_slot filled in place, Net::train_step_staged), with each step prefetching
// the next batch from its callback, or with each step given its own slot.
enum class U8Api { copy, staged, staged_each };

struct U8Run {
    NetRun net;
    emu::CallCounters steady{};  // allocations, pageable copies and waits in the steps after the warm-up
    emu::CallCounters last{};    // the same in the last step alone (untraced: no timing events)
    long long staged_copies_last = 0;
    long long staged_copies_steady = 0;  // cross-tower copies staged through the host then (peer queries)
    bool busy_slot_handed = false;       // a hand-out returned the slot a step was reading
    int64_t mallocs_steady = 0;           // cudaMalloc calls in the steps after the warm-up
    long long host_allocs = 0, host_frees = 0, host_allocs_steady = 0;
    long long pageable_steady = 0, pinned_steady = 0;  // host<->device copies in the steps after the warm-up
    long long stream_syncs_steady = 0;
};

emu::CallCounters counters_since(const emu::CallCounters& a) {
    const emu::CallCounters& b = emu::call_counters();
    emu::CallCounters d;
    d.device_mallocs = b.device_mallocs - a.device_mallocs;
    d.device_frees = b.device_frees - a.device_frees;
    d.host_allocs = b.host_allocs - a.host_allocs;
    d.host_frees = b.host_frees - a.host_frees;
    d.pageable_copies = b.pageable_copies - a.pageable_copies;
    d.sync_copies = b.sync_copies - a.sync_copies;
    d.stream_syncs = b.stream_syncs - a.stream_syncs;
    d.device_syncs = b.device_syncs - a.device_syncs;
    d.event_syncs = b.event_syncs - a.event_syncs;
    d.event_creates = b.event_creates - a.event_creates;
    return d;
}

U8Run run_net_u8(const NetConfig& cfg, const NetInputs& in, const U8Inputs& u, const std::vector<Device>& devs,
                 U8Api api = U8Api::copy, bool shared = false) {
    U8Run r;
    r.net.devices = devs;
    emu::clear_race_reports();
    const emu::RuntimeStats rt0 = emu::runtime_stats();
    emu::RuntimeStats warm{};
    emu::CallCounters calls_warm{}, calls_last{};
    long long peer_last = 0;
    const size_t events0 = emu::live_events();
    int64_t mallocs_warm = 0;
    try {
        Net net(cfg, devs, shared, in.seed);
        net.step = in.step0;
        net.set_input_mean(u.mean.data(), kNetSrc, kNetSrc);
        for (int t = 0; t < cfg.towers; ++t) r.net.executors.push_back(net.scheduler().executor_name(t));
        auto batch = [&](int s) { return u8_batch(u, in.y, s); };
        // The zero-copy path: the batch written straight into a slot the ring hands out.
        auto fill = [&](int s) {
            Net::StagingSlot slot = net.staging_slot(kNetBatch, kNetSrc, kNetSrc);
            const Net::U8Batch b = batch(s);
            memcpy(slot.images, b.images, size_t(kNetBatch) * kNetSrc * kNetSrc * 3);
            memcpy(slot.offsets, b.offsets, sizeof(int32_t) * 2 * kNetBatch);
            memcpy(slot.flips, b.flips, kNetBatch);
            memcpy(slot.light, b.light, sizeof(float) * 3 * kNetBatch);
            memcpy(slot.labels, b.labels, sizeof(int32_t) * kNetBatch);
            return slot;
        };
        // Step 0 takes its batch; each step prefetches the next one, so steps 1.. run on prefetched batches
        // (staged_each: every step is given its own filled slot).
        std::shared_ptr<Net::HostSlot> stepping;
        for (int s = 0; s < kNetSteps; ++s) {
            net.trace = s == kNetSteps - 2;  // a step that prefetches
            const Net::U8Batch cur = batch(s);
            const Net::U8Batch next = batch(std::min(s + 1, kNetSteps - 1));
            StepResult sr;
            if (api == U8Api::copy) {
                sr = net.train_step_u8(s == 0 ? &cur : nullptr, kNetLr, s + 1 < kNetSteps ? &next : nullptr);
            } else if (api == U8Api::staged_each) {
                const Net::StagingSlot slot = fill(s);
                sr = net.train_step_staged(&slot, kNetLr);
            } else {
                std::optional<Net::StagingSlot> first;
                if (s == 0) {
                    first = fill(0);
                    stepping = first->slot;
                }
                std::shared_ptr<Net::HostSlot> filled;
                Net::PrefetchFn pf;
                if (s + 1 < kNetSteps)
                    pf = [&, s]() -> std::optional<Net::StagingSlot> {
                        Net::StagingSlot nx = fill(s + 1);
                        r.busy_slot_handed = r.busy_slot_handed || nx.slot == stepping;
                        filled = nx.slot;
                        return nx;
                    };
                sr = net.train_step_staged(first ? &*first : nullptr, kNetLr, pf);
                stepping = filled;  // the prefetched slot: what the next step reads
            }
            if (net.trace) r.net.timeline = net.scheduler().timeline();
            r.net.losses.push_back(sr.loss);
            r.net.hits.push_back(sr.top1);
            r.net.hits.push_back(sr.top5);
            if (s == kNetWarmup - 1) {
                mallocs_warm = cuda_allocator_stats().device_mallocs;
                warm = emu::runtime_stats();
                calls_warm = emu::call_counters();
            }
            if (s == kNetSteps - 2) {
                calls_last = emu::call_counters();
                peer_last = emu::runtime_stats().peer_queries;
            }
        }
        r.steady = counters_since(calls_warm);
        r.last = counters_since(calls_last);
        const emu::RuntimeStats& end = emu::runtime_stats();
        r.staged_copies_last = end.peer_queries - peer_last;
        r.staged_copies_steady = end.peer_queries - warm.peer_queries;
        r.mallocs_steady = cuda_allocator_stats().device_mallocs - mallocs_warm;
        r.host_allocs_steady = end.host_allocs - warm.host_allocs;
        r.pageable_steady = end.pageable_copies - warm.pageable_copies;
        r.pinned_steady = end.pinned_copies - warm.pinned_copies;
        r.stream_syncs_steady = end.stream_syncs - warm.stream_syncs;
        for (const auto& kv : net.state()) r.net.state.push_back({kv.first, down<float>(kv.second)});
    } catch (const std::exception& e) {
        r.net.error = e.what();
    }
    const emu::RuntimeStats& rt1 = emu::runtime_stats();
    r.host_allocs = rt1.host_allocs - rt0.host_allocs;
    r.host_frees = rt1.host_frees - rt0.host_frees;
    r.net.rt.streams_created = rt1.streams_created - rt0.streams_created;
    r.net.rt.streams_destroyed = rt1.streams_destroyed - rt0.streams_destroyed;
    r.net.events_leaked = static_cast<long long>(emu::live_events()) - static_cast<long long>(events0);
    r.net.races = emu::race_reports();
    return r;
}

double rel_err(const std::vector<float>& a, const std::vector<float>& ref, bool* finite = nullptr) {
    double num = 0, den = 0;
    bool fin = a.size() == ref.size();
    for (size_t i = 0; i < a.size() && i < ref.size(); ++i) {
        fin = fin && std::isfinite(a[i]) && std::isfinite(ref[i]);
        num += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]);
        den += double(ref[i]) * ref[i];
    }
    if (finite) *finite = fin;
    return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

uint64_t state_crc(const NetRun& r) {
    uint64_t h = fnv1a(r.losses.data(), r.losses.size() * sizeof(double));
    for (const auto& kv : r.state) h ^= fnv1a(kv.second.data(), kv.second.size() * sizeof(float)) * 31;
    return h;
}

// The edges that cross towers and their bytes per training step, from the config alone (as test_net.py).
std::map<std::string, int64_t> expected_edges(const NetConfig& c, int n) {
    auto out = [](int size, int k, int s, int p) { return (size + 2 * p - k) / s + 1; };
    const int T = c.towers;
    const int hw1 = out(out(c.input_size, c.conv1_kernel, c.conv1_stride, c.conv1_padding), 3, 2, 0);
    const int hw2 = out(hw1, 3, 2, 0), hw5 = out(hw2, 3, 2, 0);
    auto bytes = [&](int64_t per_tower) { return int64_t(n) * per_tower * 4; };
    const int64_t cross = 2 * T * (T - 1);
    return {{"conv2->conv3", cross * bytes(c.channels[1] / T * hw2 * hw2)},
            {"conv5->fc6", cross * bytes(c.channels[4] / T * hw5 * hw5)},
            {"fc6->fc7", cross * bytes(c.fc[0] / T)},
            {"fc7->fc8", cross * bytes(c.fc[1] / T)},
            {"fc8->loss", 2 * (T - 1) * bytes(c.num_classes / T)}};
}

std::string edges_str(const std::map<std::string, int64_t>& e) {
    std::string s;
    for (const auto& kv : e) s += fmt("%s%s=%" PRId64, s.empty() ? "" : " ", kv.first.c_str(), kv.second);
    return s;
}

// The race check itself must be able to fail: a buffer written on one stream and read on another, first
// without and then with an event between them.
void test_race_detector() {
    cudaStream_t a = nullptr, b = nullptr;
    cuda_check(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking), "driver");
    cuda_check(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking), "driver");
    const Tensor x = host_tensor({1000}, randv(1000)).to(GPU);
    cudaDeviceSynchronize();
    for (bool with_event : {false, true}) {
        emu::clear_race_reports();
        Tensor y, z;
        {
            StreamGuard g(0, a);
            y = ops::relu_forward(x);
        }
        cudaEvent_t e = nullptr;
        if (with_event) {
            cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "driver");
            cuda_check(cudaEventRecord(e, a), "driver");
            cuda_check(cudaStreamWaitEvent(b, e, 0), "driver");
        }
        {
            StreamGuard g(0, b);
            z = ops::relu_forward(y);
        }
        cudaDeviceSynchronize();
        if (e) cudaEventDestroy(e);
        const size_t n = emu::race_reports().size();
        if (with_event)
            check_true("race check, stream b reads stream a's output after an event", n == 0,
                       fmt("%zu race reports%s%s", n, n ? ", first: " : "", n ? emu::race_reports()[0].c_str() : ""));
        else
            check_true("race check, stream b reads stream a's output with no event", n >= 1,
                       fmt("%zu race reports (at least 1 expected)%s%s", n, n ? ", first: " : "",
                           n ? emu::race_reports()[0].c_str() : ""));
    }
    // Each device's legacy default stream is ordered with the blocking streams of its own device only: a
    // device-to-host copy on the legacy stream of cuda:0 after a blocking cuda:0 stream wrote the buffer is
    // ordered, the same copy on the legacy stream of cuda:1 is not.
    {
        cudaStream_t blocking = nullptr;
        cuda_check(cudaStreamCreate(&blocking), "driver");
        std::vector<float> h(1000);
        size_t reports[2] = {0, 0};
        for (int dev : {0, 1}) {
            emu::clear_race_reports();
            Tensor y;
            {
                StreamGuard g(0, blocking);
                y = ops::relu_forward(x);
            }
            cuda_check(cudaSetDevice(dev), "driver");
            cuda_check(cudaMemcpyAsync(h.data(), y.raw(), y.nbytes(), cudaMemcpyDeviceToHost, nullptr), "driver");
            cuda_check(cudaStreamSynchronize(nullptr), "driver");
            cuda_check(cudaSetDevice(0), "driver");
            cudaDeviceSynchronize();
            reports[dev] = emu::race_reports().size();
        }
        check_true("race check, a legacy default stream is ordered after the blocking streams of its own device only",
                   reports[0] == 0 && reports[1] >= 1,
                   fmt("%zu race reports on cuda:0's legacy stream (0 expected), %zu on cuda:1's (at least 1)",
                       reports[0], reports[1]));
        cudaStreamDestroy(blocking);
    }
    // CUDA's device rules: a launch on another device's stream fails, an event records only on its own
    // device's streams but any stream may wait on it, and these two devices have no peer access.
    {
        cudaStream_t s1 = nullptr;
        cudaEvent_t e0 = nullptr;
        cuda_check(cudaSetDevice(1), "driver");
        cuda_check(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking), "driver");
        cuda_check(cudaSetDevice(0), "driver");
        cuda_check(cudaEventCreateWithFlags(&e0, cudaEventDisableTiming), "driver");
        bool launch_failed = false;
        try {
            StreamGuard g(0, s1);
            ops::relu_forward(x);
        } catch (const std::runtime_error&) {
            launch_failed = true;
        }
        const cudaError_t rec_other = cudaEventRecord(e0, s1), rec_own = cudaEventRecord(e0, nullptr);
        const cudaError_t wait_other = cudaStreamWaitEvent(s1, e0, 0);
        int can = -1;
        const cudaError_t query = cudaDeviceCanAccessPeer(&can, 0, 1);
        const cudaError_t enable = cudaDeviceEnablePeerAccess(1, 0);
        void* p1 = nullptr;
        cuda_check(cudaSetDevice(1), "driver");
        cuda_check(cudaMalloc(&p1, 64), "driver");
        cuda_check(cudaSetDevice(0), "driver");
        const cudaError_t peer_copy = cudaMemcpyPeerAsync(p1, 1, x.raw(), 0, 64, nullptr);
        const cudaError_t d2d_copy = cudaMemcpyAsync(p1, x.raw(), 64, cudaMemcpyDeviceToDevice, nullptr);
        cudaDeviceSynchronize();
        cudaFree(p1);
        cudaEventDestroy(e0);
        cudaStreamDestroy(s1);
        int count = 0;
        cudaGetDeviceCount(&count);
        check_true("two emulated devices follow CUDA's device rules, without peer access",
                   count == 2 && launch_failed && rec_other == cudaErrorInvalidResourceHandle && rec_own == cudaSuccess &&
                       wait_other == cudaSuccess && query == cudaSuccess && can == 0 &&
                       enable == cudaErrorPeerAccessUnsupported && peer_copy == cudaErrorPeerAccessUnsupported &&
                       d2d_copy == cudaErrorPeerAccessUnsupported,
                   fmt("%d devices; launch on another device's stream %s; event record on another device's stream: "
                       "%s, on its own: %s; cross-device wait: %s; can access peer %d; enable peer access: %s; peer "
                       "copy: %s; device-to-device copy across devices: %s",
                       count, launch_failed ? "fails" : "RUNS", cudaGetErrorString(rec_other),
                       cudaGetErrorString(rec_own), cudaGetErrorString(wait_other), can, cudaGetErrorString(enable),
                       cudaGetErrorString(peer_copy), cudaGetErrorString(d2d_copy)));
    }
    emu::clear_race_reports();
    cudaStreamDestroy(a);
    cudaStreamDestroy(b);
    float ms = 0;
    cudaEvent_t t0 = nullptr, t1 = nullptr;
    cudaEventCreateWithFlags(&t0, cudaEventDisableTiming);
    cudaEventCreate(&t1);
    cudaEventRecord(t0);
    cudaEventRecord(t1);
    const cudaError_t timing_off = cudaEventElapsedTime(&ms, t0, t1);
    cudaEventDestroy(t0);
    cudaEventDestroy(t1);
    check_true("stream and event handles are checked", cudaStreamSynchronize(a) == cudaErrorInvalidResourceHandle &&
                                                          timing_off == cudaErrorInvalidResourceHandle,
               "a destroyed stream and a timing query on a cudaEventDisableTiming event are errors");
}

void group_net() {
    emu::set_race_tracking(true);
    test_race_detector();

    const NetConfig cfg = small_net_config();
    const int64_t img = int64_t(kNetBatch) * cfg.in_channels * cfg.input_size * cfg.input_size;
    auto labels = [&] {
        std::vector<int32_t> y(kNetBatch);
        for (auto& v : y) v = static_cast<int32_t>(rng() % cfg.num_classes);
        return y;
    };
    auto draw = [&] {
        NetInputs in;
        in.seed = rng() & 0x7fffffff;
        in.step0 = static_cast<int64_t>(rng() % 1000);
        for (int s = 0; s < kNetSteps; ++s) {
            in.x.push_back(randv(img, -2.f, 2.f));
            in.y.push_back(labels());
        }
        in.x_eval = randv(img, -2.f, 2.f);
        in.y_eval = labels();
        return in;
    };
    // Whether a CUDA run agrees with the CPU run within the tolerances the checks below apply.
    auto agrees = [](const NetRun& g, const NetRun& c) {
        if (!g.error.empty() || !c.error.empty() || g.state.size() != c.state.size()) return false;
        for (int s = 0; s < kNetSteps; ++s)
            if (!(std::fabs(g.losses[s] - c.losses[s]) < 1e-4 * std::fabs(c.losses[s]))) return false;
        for (size_t i = 0; i < g.state.size(); ++i) {
            bool fin = false;
            const double tol = g.state[i].first.rfind("momentum/", 0) == 0 ? 1e-3 : 1e-4;
            if (!(rel_err(g.state[i].second, c.state[i].second, &fin) < tol) || !fin) return false;
        }
        return true;
    };
    // Some draws (about 1 in 150 seeds) put a max-pool or ReLU decision of one of the 4 steps within float32
    // rounding of a tie: the CUDA and CPU runs then route one gradient element differently and disagree by
    // ~1e-3, which says nothing about the kernels. Such inputs are redrawn, at most twice; a real error fails
    // every draw. The checks below report how many draws it took.
    NetInputs in;
    NetRun cpu, two;  // two: one non-blocking stream per tower
    int draws = 0;
    do {
        in = draw();
        ++draws;
        cpu = run_net(cfg, in, {HOST, HOST}, false);
        two = run_net(cfg, in, {GPU, GPU}, false);
    } while (draws < 3 && !agrees(two, cpu));
    const NetRun one = run_net(cfg, in, {GPU, GPU}, true);    // both towers on one stream, in turn
    // A tower per device, no peer access: every cross-tower copy is staged through the host (copy_from).
    const NetRun dev2 = run_net(cfg, in, {GPU, GPU1}, false);
    const NetRun* emu_runs[3] = {&two, &one, &dev2};
    // A run that threw fails the checks that need it (and the group's check count) instead of aborting
    // the others: the emulated runs' own checks still report, e.g. when only the CPU workers break.
    auto usable = [&](std::initializer_list<const NetRun*> runs, const std::string& name) {
        for (const NetRun* r : runs)
            if (!r->error.empty()) {
                report(false, 0, name, "a run threw: " + r->error);
                return false;
            }
        return true;
    };
    const char* emu_names[3] = {"cuda:0 two streams", "cuda:0 shared stream", "cuda:0,cuda:1"};

    // Placement on one device does not change a single bit.
    if (usable({&two, &one}, "net two streams == shared stream")) {
        size_t differ = two.state.size() == one.state.size() ? 0 : 1;
        std::string first;
        for (size_t i = 0; i < two.state.size() && i < one.state.size(); ++i)
            if (two.state[i].first != one.state[i].first || two.state[i].second != one.state[i].second) {
                if (!differ) first = two.state[i].first;
                ++differ;
            }
        const bool same_loss = memcmp(two.losses.data(), one.losses.data(), sizeof(double) * kNetSteps) == 0 &&
                               two.hits == one.hits;
        report(differ == 0 && same_loss && two.state.size() == 64, state_crc(two),
               "net two streams == shared stream, losses and every parameter and momentum",
               fmt("bit-exact, %zu of %zu tensors differ%s%s, losses %s", differ, two.state.size(),
                   first.empty() ? "" : " first: ", first.c_str(), same_loss ? "equal" : "DIFFER"));
        check_true("net two streams == shared stream, forward logits and probabilities",
                   two.logits == one.logits && two.probs == one.probs && !two.logits.empty(),
                   fmt("bit-exact, n=%zu", two.logits.size()));
    }
    // Nor does a tower per device: the staged copies move the same bytes.
    if (usable({&two, &dev2}, "net cuda:0,cuda:1 == cuda:0 two streams")) {
        size_t differ = two.state.size() == dev2.state.size() ? 0 : 1;
        std::string first;
        for (size_t i = 0; i < two.state.size() && i < dev2.state.size(); ++i)
            if (two.state[i].first != dev2.state[i].first || two.state[i].second != dev2.state[i].second) {
                if (!differ) first = two.state[i].first;
                ++differ;
            }
        const bool same_loss = memcmp(two.losses.data(), dev2.losses.data(), sizeof(double) * kNetSteps) == 0 &&
                               two.hits == dev2.hits && two.eval.loss == dev2.eval.loss &&
                               two.eval.top1 == dev2.eval.top1 && two.eval.top5 == dev2.eval.top5;
        report(differ == 0 && same_loss && dev2.state.size() == 64, state_crc(dev2),
               "net cuda:0,cuda:1 == cuda:0 two streams, losses and every parameter and momentum",
               fmt("bit-exact, %zu of %zu tensors differ%s%s, losses and evaluate %s", differ, dev2.state.size(),
                   first.empty() ? "" : " first: ", first.c_str(), same_loss ? "equal" : "DIFFER"));
        check_true("net cuda:0,cuda:1 == cuda:0 two streams, forward logits and probabilities",
                   two.logits == dev2.logits && two.probs == dev2.probs && !dev2.logits.empty(),
                   fmt("bit-exact, n=%zu", dev2.logits.size()));
    }
    for (int k = 0; k < 3; ++k) {
        const NetRun& g = *emu_runs[k];
        const std::string who = emu_names[k];
        if (!usable({&g}, "net " + who + " runs")) continue;
        if (usable({&cpu}, "net " + who + " vs cpu")) {
            // Against the CPU backend's two worker threads (DESIGN.md: 1e-4 for whole-net results).
            double worst = 0;
            bool finite = true;
            for (int s = 0; s < kNetSteps; ++s) {
                finite = finite && std::isfinite(g.losses[s]);
                worst = std::max(worst, std::fabs(g.losses[s] - cpu.losses[s]) / std::fabs(cpu.losses[s]));
            }
            report(finite && worst < 1e-4, fnv1a(g.losses.data(), sizeof(double) * kNetSteps),
                   "net " + who + " losses vs cpu",
                   fmt("worst rel %.3g over %d steps (tol 1e-4), step %d loss %.6f; inputs drawn %d time(s)", worst,
                       kNetSteps, kNetSteps, g.losses.back(), draws));
            if (k == 0) {
                // Per tensor: parameters (1e-4) and momentum, the sum of the steps' gradients (1e-3: a ReLU or
                // max-pool decision at a float32 rounding tie may route one gradient element differently).
                for (size_t i = 0; i < g.state.size(); ++i) {
                    const bool mom = g.state[i].first.rfind("momentum/", 0) == 0;
                    const double tol = mom ? 1e-3 : 1e-4;
                    bool fin = false;
                    const double e = rel_err(g.state[i].second, cpu.state[i].second, &fin);
                    report(fin && e < tol && g.state[i].first == cpu.state[i].first,
                           fnv1a(g.state[i].second.data(), g.state[i].second.size() * sizeof(float)),
                           "net " + who + " " + g.state[i].first + " vs cpu",
                           fmt("rel %.3g (tol %.0e, n=%zu)%s", e, tol, g.state[i].second.size(), fin ? "" : " NON-FINITE"));
                }
                bool f1 = false, f2 = false;
                const double el = rel_err(g.logits, cpu.logits, &f1), ep = rel_err(g.probs, cpu.probs, &f2);
                report(f1 && f2 && el < 1e-4 && ep < 1e-4, fnv1a(g.logits.data(), g.logits.size() * sizeof(float)),
                       "net " + who + " forward logits and probabilities vs cpu",
                       fmt("rel %.3g / %.3g (tol 1e-4, n=%zu)", el, ep, g.logits.size()));
                const double eloss = std::fabs(g.eval.loss - cpu.eval.loss) / std::fabs(cpu.eval.loss);
                check_true("net " + who + " evaluate vs cpu",
                           std::isfinite(g.eval.loss) && eloss < 1e-4 && g.eval.top1 == cpu.eval.top1 &&
                               g.eval.top5 == cpu.eval.top5 && g.eval.n == kNetBatch,
                           fmt("loss rel %.3g (tol 1e-4), top1 %" PRId64 "/%" PRId64 ", top5 %" PRId64 "/%" PRId64, eloss,
                               g.eval.top1, cpu.eval.top1, g.eval.top5, cpu.eval.top5));
            }
            check_true("net " + who + " cross-tower bytes per step == cpu", g.edges == cpu.edges,
                       "last step " + edges_str(g.edges.back()));
        }
        // The traced step: entries of both towers, each on its tower's device, with end >= start >= 0.
        bool towers[2] = {false, false}, ordered = !g.timeline.empty();
        for (const auto& e : g.timeline) {
            const bool known = e.tower >= 0 && e.tower < 2;
            if (known) towers[e.tower] = true;
            ordered = ordered && known && e.start_us >= 0 && e.end_us >= e.start_us &&
                      e.device == g.devices[e.tower].str();
        }
        check_true("net " + who + " traced step timeline", towers[0] && towers[1] && ordered,
                   fmt("%zu entries, tower 0 %s, tower 1 %s, every entry on its tower's device (%s, %s) with end >= "
                       "start >= 0: %s",
                       g.timeline.size(), towers[0] ? "yes" : "NO", towers[1] ? "yes" : "NO",
                       g.devices[0].str().c_str(), g.devices[1].str().c_str(), ordered ? "yes" : "NO"));
        check_true("net " + who + " steady-state steps allocate no device memory",
                   g.mallocs_end == g.mallocs_warm && g.mallocs_warm > 0,
                   fmt("device_mallocs %" PRId64 " after %d warm-up steps, %" PRId64 " after %d steps", g.mallocs_warm,
                       kNetWarmup, g.mallocs_end, kNetSteps));
        check_true("net " + who + " no unordered cross-stream access", g.races.empty(),
                   fmt("%zu race reports%s%s", g.races.size(), g.races.empty() ? "" : ", first: ",
                       g.races.empty() ? "" : g.races[0].c_str()));
    }
    if (usable({&cpu}, "net cross-tower bytes on exactly the paper's edges")) {
        const auto want = expected_edges(cfg, kNetBatch);
        bool ok = true;
        for (const auto& step : cpu.edges) {
            std::map<std::string, int64_t> nonzero;
            for (const auto& kv : step)
                if (kv.second) nonzero.insert(kv);
            ok = ok && nonzero == want;
        }
        check_true("net cross-tower bytes on exactly the paper's edges", ok,
                   "expected " + edges_str(want) + ", cpu last step " + edges_str(cpu.edges.back()));
    }
    // How the runs used the runtime: two live streams that wait on each other's events, or one stream with
    // no waits; timing events only in the traced step; every stream destroyed with its net.
    if (usable({&two, &one}, "net runtime use")) {
        check_true("net two-stream run synchronizes the towers with events",
                   two.executors.size() == 2 && two.executors[0] != two.executors[1] && two.rt.streams_created == 2 &&
                       two.rt.streams_destroyed == 2 && two.rt.cross_stream_waits > 0 &&
                       two.rt.cross_stream_waits == two.rt.stream_waits && two.rt.elapsed_queries > 0,
                   fmt("executors '%s' / '%s', streams %lld created %lld destroyed, %lld cross-stream waits of %lld, "
                       "%lld elapsed-time queries",
                       two.executors[0].c_str(), two.executors[1].c_str(), two.rt.streams_created,
                       two.rt.streams_destroyed, two.rt.cross_stream_waits, two.rt.stream_waits, two.rt.elapsed_queries));
    }
    if (usable({&two, &one}, "net runtime use")) {
        check_true("net shared-stream run needs no events between towers",
                   one.executors.size() == 2 && one.executors[0] == one.executors[1] && one.rt.streams_created == 1 &&
                       one.rt.streams_destroyed == 1 && one.rt.stream_waits == 0 && one.rt.elapsed_queries > 0,
                   fmt("executor '%s', %lld streams, %lld waits", one.executors[0].c_str(), one.rt.streams_created,
                       one.rt.stream_waits));
    }
    // A stream per device; the towers order each other across devices with events (the scheduler's, and the
    // staged copy's own), peer access was asked for and refused, no event outlives the net.
    if (usable({&dev2}, "net runtime use")) {
        const auto& r = dev2.rt;
        check_true("net two-device run has a stream per device, cross-device event waits, no peer access and no event leak",
                   dev2.executors.size() == 2 && dev2.executors[0].rfind("cuda:0 ", 0) == 0 &&
                       dev2.executors[1].rfind("cuda:1 ", 0) == 0 && r.streams_created == 2 &&
                       r.streams_destroyed == 2 && r.calls_per_device[0] > 0 && r.calls_per_device[1] > 0 &&
                       r.cross_device_waits > 0 && r.cross_stream_waits == r.stream_waits && r.peer_queries > 0 &&
                       dev2.events_leaked == 0,
                   fmt("executors '%s' / '%s', streams %lld created %lld destroyed, calls on cuda:0 %lld / cuda:1 %lld, "
                       "%lld cross-device waits, %lld cross-stream waits of %lld, %lld peer-access queries, "
                       "%lld events leaked",
                       dev2.executors[0].c_str(), dev2.executors[1].c_str(), r.streams_created, r.streams_destroyed,
                       r.calls_per_device[0], r.calls_per_device[1], r.cross_device_waits, r.cross_stream_waits,
                       r.stream_waits, r.peer_queries, dev2.events_leaked));
    }

    // The uint8 path: the batches of `in` as uint8 sources (values near the mean, so the augmented images
    // stay small) with random crops, flips and lighting; the float32 path fed with ops::augment_batch's CPU
    // output of the same is the reference, bit for bit, on one device with two streams and on two devices.
    U8Inputs u;
    NetInputs aug = in;  // x: the CPU-augmented images
    {
        const int c = cfg.input_size, S = kNetSrc;
        u.mean.resize(size_t(3) * S * S);
        for (auto& v : u.mean) v = 124.f + static_cast<float>(rng() % 9);
        const Tensor mean = Tensor::empty({3, S, S}, DType::f32, HOST);
        memcpy(mean.raw(), u.mean.data(), mean.nbytes());
        for (int s = 0; s < kNetSteps; ++s) {
            std::vector<uint8_t> im(size_t(kNetBatch) * S * S * 3), fl(kNetBatch);
            std::vector<int32_t> off(2 * kNetBatch);
            for (auto& v : im) v = static_cast<uint8_t>(124 + rng() % 9);
            for (auto& v : off) v = static_cast<int32_t>(rng() % (S - c + 1));
            for (auto& v : fl) v = static_cast<uint8_t>(rng() % 2);
            std::vector<float> li = randv(3 * kNetBatch, -2.f, 2.f);
            const Tensor ti = Tensor::empty({kNetBatch, S, S, 3}, DType::u8, HOST);
            const Tensor to = Tensor::empty({kNetBatch, 2}, DType::i32, HOST);
            const Tensor tf = Tensor::empty({kNetBatch}, DType::u8, HOST);
            const Tensor tl = Tensor::empty({kNetBatch, 3}, DType::f32, HOST);
            memcpy(ti.raw(), im.data(), ti.nbytes());
            memcpy(to.raw(), off.data(), to.nbytes());
            memcpy(tf.raw(), fl.data(), tf.nbytes());
            memcpy(tl.raw(), li.data(), tl.nbytes());
            aug.x[s] = down<float>(ops::augment_batch(ti, to, tf, tl, mean, c));
            u.images.push_back(im);
            u.offsets.push_back(off);
            u.flips.push_back(fl);
            u.light.push_back(li);
        }
    }
    const NetRun ref = run_net(cfg, aug, {GPU, GPU}, false);
    const U8Run u_two = run_net_u8(cfg, in, u, {GPU, GPU});
    const U8Run u_dev2 = run_net_u8(cfg, in, u, {GPU, GPU1});
    const U8Run* u_runs[2] = {&u_two, &u_dev2};
    const char* u_names[2] = {"cuda:0 two streams", "cuda:0,cuda:1"};
    for (int k = 0; k < 2; ++k) {
        const U8Run& g = *u_runs[k];
        const std::string who = std::string("net uint8 path ") + u_names[k];
        if (!usable({&g.net, &ref}, who + " runs")) continue;
        size_t differ = g.net.state.size() == ref.state.size() ? 0 : 1;
        std::string first;
        for (size_t i = 0; i < g.net.state.size() && i < ref.state.size(); ++i)
            if (g.net.state[i].first != ref.state[i].first || g.net.state[i].second != ref.state[i].second) {
                if (!differ) first = g.net.state[i].first;
                ++differ;
            }
        const bool same_loss = memcmp(g.net.losses.data(), ref.losses.data(), sizeof(double) * kNetSteps) == 0 &&
                               g.net.hits == ref.hits && std::isfinite(ref.losses.back());
        report(differ == 0 && same_loss && g.net.state.size() == 64, state_crc(g.net),
               who + " == float32 path on the CPU-augmented images, losses and every parameter and momentum",
               fmt("bit-exact, %zu of %zu tensors differ%s%s, losses %s", differ, g.net.state.size(),
                   first.empty() ? "" : " first: ", first.c_str(), same_loss ? "equal" : "DIFFER"));
        check_true(who + " no unordered cross-stream access", g.net.races.empty(),
                   fmt("%zu race reports%s%s", g.net.races.size(), g.net.races.empty() ? "" : ", first: ",
                       g.net.races.empty() ? "" : g.net.races[0].c_str()));
        // Steady state (steps 2 and 3: one prefetch between them): no device or pinned allocation; the
        // prefetched batch's five uploads per device and the loss and ranks read back (two per step), all
        // from or to pinned memory; the only pageable copies are, on two devices without peer access, the
        // cross-tower copies staged through the host (not the input path).
        const long long steady = kNetSteps - kNetWarmup;
        check_true(who + " steady-state steps allocate no device memory", g.mallocs_steady == 0,
                   fmt("%" PRId64 " cudaMalloc in the %lld steps after the warm-up", g.mallocs_steady, steady));
        check_true(who + " steady-state steps upload from reused pinned memory",
                   g.host_allocs_steady == 0 && (k == 0 ? g.pageable_steady == 0 : g.pageable_steady > 0) &&
                       g.pinned_steady == 5 * (k == 0 ? 1 : 2) + 2 * steady && g.host_allocs == 3 &&
                       g.host_frees == 3,
                   fmt("%lld cudaHostAlloc, %lld pinned / %lld pageable host<->device copies in %lld steps (pageable: "
                       "staged cross-tower copies), %lld stream syncs; ring of 2 pinned buffers and the metrics' "
                       "one: %lld allocated, %lld freed",
                       g.host_allocs_steady, g.pinned_steady, g.pageable_steady, steady,
                       g.stream_syncs_steady, g.host_allocs, g.host_frees));
        // The traced step (a prefetched batch, prefetching the next) shows the input path: one augment per
        // device, and the next batch's upload per device (tower -1, on its own stream) issued within the
        // step after that device's augment.
        int uploads = 0, augments = 0;
        bool before = true;
        for (const auto& e : g.net.timeline)
            if (e.op == "input.upload") {
                ++uploads;
                for (const auto& a : g.net.timeline)
                    if (a.op == "input.augment" && a.device == e.device) before = before && a.end_us <= e.start_us;
            } else if (e.op == "input.augment") {
                ++augments;
            }
        const int devices = k == 0 ? 1 : 2;
        check_true(who + " traced step shows the upload and the augment",
                   uploads == devices && augments == devices && before && g.net.rt.streams_created == 2 + devices &&
                       g.net.rt.streams_destroyed == g.net.rt.streams_created && g.net.events_leaked == 0,
                   fmt("%d uploads, %d augments on %d device(s), uploads after the augments: %s; %lld "
                       "streams created, %lld destroyed, %lld events leaked",
                       uploads, augments, devices, before ? "yes" : "NO", g.net.rt.streams_created,
                       g.net.rt.streams_destroyed, g.net.events_leaked));
    }

    // The zero-copy path (Net::staging_slot + Net::train_step_staged): the same bits as train_step_u8, with
    // the next batch filled from the step's callback (prefetch) or each step given its own slot; and on
    // one stream shared by the towers. Steady-state steps allocate nothing, copy nothing through pageable
    // memory and make the host wait once (for the loss): the counters below count every call that would.
    const U8Run s_two = run_net_u8(cfg, in, u, {GPU, GPU}, U8Api::staged);
    const U8Run s_each = run_net_u8(cfg, in, u, {GPU, GPU}, U8Api::staged_each);
    const U8Run s_one = run_net_u8(cfg, in, u, {GPU, GPU}, U8Api::staged, /*shared=*/true);
    const U8Run s_dev2 = run_net_u8(cfg, in, u, {GPU, GPU1}, U8Api::staged);
    struct Pair {
        const U8Run* run;
        const U8Run* ref;
        const char* name;
    };
    const Pair pairs[4] = {{&s_two, &u_two, "cuda:0 two streams, prefetching"},
                           {&s_each, &u_two, "cuda:0 two streams, a slot per step"},
                           {&s_one, &u_two, "cuda:0 shared stream, prefetching"},
                           {&s_dev2, &u_dev2, "cuda:0,cuda:1, prefetching"}};
    for (const Pair& pr : pairs) {
        const U8Run& g = *pr.run;
        const std::string who = std::string("net staged path ") + pr.name;
        if (!usable({&g.net, &pr.ref->net}, who + " runs")) continue;
        size_t differ = g.net.state.size() == pr.ref->net.state.size() ? 0 : 1;
        for (size_t i = 0; i < g.net.state.size() && i < pr.ref->net.state.size(); ++i)
            differ += g.net.state[i].first != pr.ref->net.state[i].first ||
                      g.net.state[i].second != pr.ref->net.state[i].second;
        const bool same_loss =
            memcmp(g.net.losses.data(), pr.ref->net.losses.data(), sizeof(double) * kNetSteps) == 0 &&
            g.net.hits == pr.ref->net.hits;
        report(differ == 0 && same_loss && g.net.state.size() == 64 && g.net.races.empty() && !g.busy_slot_handed,
               state_crc(g.net), who + " == train_step_u8, losses and every parameter and momentum",
               fmt("bit-exact, %zu of %zu tensors differ, losses %s; %zu race reports%s%s; a busy slot handed out: %s",
                   differ, g.net.state.size(), same_loss ? "equal" : "DIFFER", g.net.races.size(),
                   g.net.races.empty() ? "" : ", first: ", g.net.races.empty() ? "" : g.net.races[0].c_str(),
                   g.busy_slot_handed ? "YES" : "no"));
    }
    const U8Run* c_runs[3] = {&s_two, &s_one, &s_dev2};
    const char* c_names[3] = {"cuda:0 two streams", "cuda:0 shared stream", "cuda:0,cuda:1"};
    for (int k = 0; k < 3; ++k) {
        const U8Run& g = *c_runs[k];
        const std::string who = std::string("net staged path ") + c_names[k];
        if (!usable({&g.net}, who + " steady-state calls")) continue;
        const emu::CallCounters& c = g.steady;
        const long long steady = kNetSteps - kNetWarmup, staged = g.staged_copies_steady;
        // Two devices without peer access stage each cross-tower copy through pageable host memory with two
        // stream waits (Tensor::copy_from, not the input path); one device has none.
        const bool staged_ok = k == 2 ? staged > 0 : staged == 0;
        check_true(who + " steady-state steps make no allocation, no pageable copy and one wait (the loss)",
                   staged_ok && c.device_mallocs == 0 && c.device_frees == 0 && c.host_allocs == 0 &&
                       c.host_frees == 0 && c.sync_copies == 0 && c.pageable_copies == 2 * staged &&
                       c.device_syncs == 0 && c.event_syncs == 0 && c.stream_syncs == steady + 2 * staged,
                   fmt("in %lld steps: cudaMalloc %lld, cudaFree %lld, cudaHostAlloc %lld, cudaFreeHost %lld, "
                       "cudaMemcpy/cudaMemset %lld, pageable copies %lld, stream/device/event waits %lld/%lld/%lld "
                       "(cross-tower copies staged through the host: %lld), events created %lld",
                       steady, c.device_mallocs, c.device_frees, c.host_allocs, c.host_frees, c.sync_copies,
                       c.pageable_copies, c.stream_syncs, c.device_syncs, c.event_syncs, staged, c.event_creates));
        // The events between streams come from the scheduler's pools (EventPool): an untraced step after the warm-up
        // creates none, but the one Tensor::copy_from makes per cross-tower copy it stages through the host.
        check_true(who + " an untraced steady-state step creates no event",
                   g.last.event_creates == g.staged_copies_last,
                   fmt("%lld events created in the last step, %lld cross-tower copies staged through the host",
                       g.last.event_creates, g.staged_copies_last));
    }
    emu::set_race_tracking(false);
}

// ---- CUDA graphs: stream capture in the runtime, then Net's graph path ------------------------------------

// The emulated runtime's capture: a captured fork/join replays the recorded work (and only then computes), the
// race check sees a missing edge inside a graph, and calls CUDA forbids during a capture fail as on a GPU.
void test_capture_runtime() {
    cudaStream_t a = nullptr, b = nullptr;
    cuda_check(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking), "driver");
    cuda_check(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking), "driver");
    const int n = 1000;
    std::vector<float> xv = randv(n);
    Tensor x = host_tensor({n}, xv).to(GPU);
    Tensor y = Tensor::empty({n}, DType::f32, GPU), z = Tensor::empty({n}, DType::f32, GPU);
    cudaDeviceSynchronize();
    const long long launches0 = emu::runtime_stats().graph_launches;
    const size_t graphs0 = emu::live_graphs();
    auto ev = [] {
        cudaEvent_t e = nullptr;
        cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "driver");
        return e;
    };
    // y = x + x on a; b forks from a, z = y + x there; a joins b. Nothing runs until the graph is launched.
    emu::clear_race_reports();
    cudaEvent_t e1 = ev(), e2 = ev();
    cudaGraph_t g = nullptr;
    cudaGraphExec_t exec = nullptr;
    cudaStreamCaptureStatus st_b = cudaStreamCaptureStatusNone, st_after = cudaStreamCaptureStatusActive;
    cuda_check(cudaStreamBeginCapture(a, cudaStreamCaptureModeGlobal), "driver");
    ax::cuda::add(n, x.data<float>(), x.data<float>(), y.data<float>(), a);
    cuda_check(cudaEventRecord(e1, a), "driver");
    cuda_check(cudaStreamWaitEvent(b, e1, 0), "driver");
    ax::cuda::add(n, y.data<float>(), x.data<float>(), z.data<float>(), b);
    cudaStreamIsCapturing(b, &st_b);
    cuda_check(cudaEventRecord(e2, b), "driver");
    cuda_check(cudaStreamWaitEvent(a, e2, 0), "driver");
    const cudaError_t end = cudaStreamEndCapture(a, &g);
    cudaStreamIsCapturing(b, &st_after);
    const std::vector<float> y_before = down<float>(y);
    bool untouched = true;
    for (float v : y_before) untouched = untouched && std::isnan(v);
    cuda_check(cudaGraphInstantiate(&exec, g, 0), "driver");
    bool exact = true;
    for (int round = 0; round < 2; ++round) {
        if (round == 1) {  // new input in the same buffer: the replay reads it
            xv = randv(n);
            x.copy_from(host_tensor({n}, xv));
        }
        cuda_check(cudaGraphLaunch(exec, a), "driver");
        cuda_check(cudaStreamSynchronize(a), "driver");
        const std::vector<float> zv = down<float>(z);
        for (int i = 0; i < n; ++i) exact = exact && zv[i] == (xv[i] + xv[i]) + xv[i];
    }
    const size_t races_ok = emu::race_reports().size();
    check_true("graph capture of a fork/join replays the recorded work, race-free",
               end == cudaSuccess && st_b == cudaStreamCaptureStatusActive && st_after == cudaStreamCaptureStatusNone &&
                   untouched && exact && races_ok == 0 && emu::runtime_stats().graph_launches - launches0 == 2,
               fmt("end capture: %s; b capturing %d, after %d; nothing ran while capturing: %s; two launches == "
                   "(x+x)+x bit for bit: %s; %zu race reports; %lld launches",
                   cudaGetErrorString(end), int(st_b), int(st_after), untouched ? "yes" : "NO", exact ? "yes" : "NO",
                   races_ok, emu::runtime_stats().graph_launches - launches0));
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(g);
    // b forked before a wrote y, and reads it with no edge after the write: a race inside the graph.
    emu::clear_race_reports();
    cuda_check(cudaStreamBeginCapture(a, cudaStreamCaptureModeGlobal), "driver");
    cuda_check(cudaEventRecord(e1, a), "driver");
    cuda_check(cudaStreamWaitEvent(b, e1, 0), "driver");
    ax::cuda::add(n, x.data<float>(), x.data<float>(), y.data<float>(), a);
    ax::cuda::add(n, y.data<float>(), x.data<float>(), z.data<float>(), b);
    cuda_check(cudaEventRecord(e2, b), "driver");
    cuda_check(cudaStreamWaitEvent(a, e2, 0), "driver");
    cuda_check(cudaStreamEndCapture(a, &g), "driver");
    cuda_check(cudaGraphInstantiate(&exec, g, 0), "driver");
    cuda_check(cudaGraphLaunch(exec, a), "driver");
    cuda_check(cudaStreamSynchronize(a), "driver");
    const size_t races_missing = emu::race_reports().size();
    check_true("graph replay race check sees a missing edge between captured streams", races_missing >= 1,
               fmt("%zu race reports (at least 1 expected)%s%s", races_missing, races_missing ? ", first: " : "",
                   races_missing ? emu::race_reports()[0].c_str() : ""));
    emu::clear_race_reports();
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(g);

    // Calls CUDA forbids while capturing: each returns CUDA's error, and ending the capture then fails.
    std::string bad;
    auto expect = [&](const char* what, cudaError_t got, cudaError_t want) {
        if (got != want)
            bad += fmt("%s%s gave '%s', expected '%s'", bad.empty() ? "" : "; ", what, cudaGetErrorString(got),
                       cudaGetErrorString(want));
    };
    auto illegal = [&](const char* what, cudaError_t want, const std::function<cudaError_t()>& call,
                       cudaError_t want_end = cudaErrorStreamCaptureInvalidated) {
        cuda_check(cudaStreamBeginCapture(a, cudaStreamCaptureModeGlobal), "driver");
        ax::cuda::add(n, x.data<float>(), x.data<float>(), y.data<float>(), a);
        expect(what, call(), want);
        cudaGraph_t dead = nullptr;
        expect((std::string("ending the capture after ") + what).c_str(), cudaStreamEndCapture(a, &dead), want_end);
        if (dead && want_end != cudaSuccess) bad += std::string("; a graph came out of the capture after ") + what;
        if (dead) cudaGraphDestroy(dead);
        cudaGetLastError();
    };
    std::vector<float> hbuf(n);
    void* fresh = nullptr;
    illegal("cudaStreamSynchronize of the capturing stream", cudaErrorStreamCaptureUnsupported,
            [&] { return cudaStreamSynchronize(a); });
    illegal("cudaStreamQuery of the capturing stream", cudaErrorStreamCaptureUnsupported, [&] { return cudaStreamQuery(a); });
    illegal("cudaMalloc", cudaErrorStreamCaptureUnsupported, [&] { return cudaMalloc(&fresh, 64); });
    illegal("synchronous cudaMemcpy", cudaErrorStreamCaptureUnsupported,
            [&] { return cudaMemcpy(hbuf.data(), x.raw(), x.nbytes(), cudaMemcpyDeviceToHost); });
    illegal("cudaDeviceSynchronize", cudaErrorStreamCaptureUnsupported, [&] { return cudaDeviceSynchronize(); });
    cudaEvent_t outside = ev();
    cuda_check(cudaEventRecord(outside, b), "driver");
    illegal("a wait on an event recorded outside the capture", cudaErrorStreamCaptureIsolation,
            [&] { return cudaStreamWaitEvent(a, outside, 0); });
    illegal("a fork never joined back", cudaSuccess, [&] {
        cudaError_t r = cudaEventRecord(e1, a);
        if (r == cudaSuccess) r = cudaStreamWaitEvent(b, e1, 0);
        ax::cuda::add(n, x.data<float>(), x.data<float>(), z.data<float>(), b);
        return r;
    }, cudaErrorStreamCaptureUnjoined);
    illegal("cudaEventSynchronize of an event recorded in the capture", cudaErrorCapturedEvent, [&] {
        cudaEventRecord(e1, a);
        return cudaEventSynchronize(e1);
    }, cudaSuccess);
    illegal("cudaStreamEndCapture on a stream that joined, not the origin", cudaErrorStreamCaptureUnmatched, [&] {
        cudaEventRecord(e1, a);
        cudaStreamWaitEvent(b, e1, 0);
        cudaGraph_t gb = nullptr;
        return cudaStreamEndCapture(b, &gb);
    });
    // The code under test: a host-to-device copy (copy_from synchronizes its stream) inside a captured step.
    bool copy_caught = false;
    cuda_check(cudaStreamBeginCapture(a, cudaStreamCaptureModeGlobal), "driver");
    try {
        StreamGuard guard(0, a);
        Tensor t = Tensor::empty({n}, DType::f32, GPU);  // from the cache, as the net's steady state
        t.copy_from(host_tensor({n}, xv));
    } catch (const std::runtime_error& e) {
        copy_caught = std::string(e.what()).find("capturing") != std::string::npos;
    }
    {
        cudaGraph_t dead = nullptr;
        expect("ending the capture after copy_from", cudaStreamEndCapture(a, &dead), cudaErrorStreamCaptureInvalidated);
        if (dead) cudaGraphDestroy(dead);
    }
    cudaError_t legacy = cudaStreamBeginCapture(nullptr, cudaStreamCaptureModeGlobal);
    cuda_check(cudaStreamBeginCapture(a, cudaStreamCaptureModeGlobal), "driver");
    const cudaError_t twice = cudaStreamBeginCapture(a, cudaStreamCaptureModeGlobal);
    cuda_check(cudaStreamEndCapture(a, &g), "driver");  // an empty capture is a valid (empty) graph
    cudaGraphDestroy(g);
    expect("cudaStreamBeginCapture on the legacy stream", legacy, cudaErrorStreamCaptureUnsupported);
    expect("cudaStreamBeginCapture twice", twice, cudaErrorIllegalState);
    cudaGetLastError();
    check_true("graph capture: calls CUDA forbids during a capture fail with its errors and invalidate the capture",
               bad.empty() && copy_caught,
               bad.empty() ? std::string("stream sync/query, cudaMalloc, cudaMemcpy, device sync, outside-event wait, "
                                         "unjoined fork, captured-event sync, unmatched end, legacy/double begin; "
                                         "copy_from in a capture: ") + (copy_caught ? "caught" : "NOT CAUGHT")
                           : bad + (copy_caught ? "" : "; copy_from in a capture NOT CAUGHT"));
    cudaEventDestroy(e1);
    cudaEventDestroy(e2);
    cudaEventDestroy(outside);
    cudaStreamDestroy(a);
    cudaStreamDestroy(b);
    cudaDeviceSynchronize();
    check_true("graph capture: every graph and executable graph destroyed", emu::live_graphs() == graphs0,
               fmt("%zu alive, %zu before", emu::live_graphs(), graphs0));
    emu::clear_race_reports();
}

// GraphMemoryPool: a block used while capturing belongs to the pool, is never handed to a tensor outside the capture
// while the pool lives, and goes back to the shared cache with the pool; a capture never calls cudaMalloc.
void test_graph_memory_pool() {
    cudaStream_t s = nullptr;
    cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "driver");
    StreamGuard guard(0, s);
    const int64_t n = 777;
    void* x = Tensor::empty({n}, DType::f32, GPU).raw();  // freed at once: cached for (stream, size)
    void *in_capture = nullptr, *outside = nullptr, *after = nullptr;
    std::string miss;
    {
        GraphMemoryPool pool(GPU);
        pool.begin_capture();
        in_capture = Tensor::empty({n}, DType::f32, GPU).raw();  // from the shared cache, now the pool's, freed to it
        try {
            Tensor::empty({n + 100000}, DType::f32, GPU);  // nothing cached of that size
        } catch (const std::runtime_error& e) {
            miss = e.what();
        }
        pool.end_capture();
        Tensor keep = Tensor::empty({n}, DType::f32, GPU);  // outside the capture: not the pool's block
        outside = keep.raw();
    }
    after = Tensor::empty({n}, DType::f32, GPU).raw();  // the pool is gone: its block is cached again
    cudaDeviceSynchronize();
    cudaStreamDestroy(s);
    check_true("graph memory pool keeps its blocks from other tensors and gives them back when destroyed",
               in_capture == x && outside != x && after == x && miss.find("while capturing a CUDA graph") != std::string::npos,
               fmt("capture took the cached block: %s; a tensor outside the capture got it: %s; back after the pool: "
                   "%s; a miss during the capture: %s",
                   in_capture == x ? "yes" : "NO", outside == x ? "YES" : "no", after == x ? "yes" : "NO",
                   miss.empty() ? "NOT REFUSED" : miss.c_str()));
}

constexpr int kGraphSteps = 10;
struct GraphNetRun {
    std::vector<double> losses;
    std::vector<int64_t> hits;
    std::vector<std::map<std::string, int64_t>> edges;
    std::vector<std::pair<std::string, std::vector<float>>> state;
    std::vector<float> logits;  // an eager forward between graph steps
    Net::GraphStats stats;
    std::vector<bool> graph_steps;
    int64_t mallocs_replays = -1;    // cudaMalloc calls over the replays after the first capture
    long long host_allocs_replays = -1, graph_launches = 0;
    long long events_leaked = 0;
    size_t graphs_leaked = 0;
    std::vector<std::string> races;
    std::string error;
};

// The runtime's counters when a graph run starts (race reports cleared), and finish(): what the run added to them
// (graph launches, events and graphs left alive, races).
struct GraphRunBaseline {
    GraphRunBaseline() { emu::clear_race_reports(); }
    size_t events0 = emu::live_events(), graphs0 = emu::live_graphs();
    long long launches0 = emu::runtime_stats().graph_launches;
    void finish(GraphNetRun& r) const {
        r.graph_launches = emu::runtime_stats().graph_launches - launches0;
        r.events_leaked = static_cast<long long>(emu::live_events()) - static_cast<long long>(events0);
        r.graphs_leaked = emu::live_graphs() - graphs0;
        r.races = emu::race_reports();
    }
};

bool same_state(const std::vector<std::pair<std::string, std::vector<float>>>& a,
                const std::vector<std::pair<std::string, std::vector<float>>>& b, std::string* first) {
    if (a.size() != b.size() || a.empty()) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (a[i].first != b[i].first || a[i].second != b[i].second) {
            *first = a[i].first;
            return false;
        }
    return true;
}

// kGraphSteps float32 steps, each with its own learning rate; the batch is 5 but 3 at step 5 (a shape change
// between two captures: steps 0-1 warm up, 2 is captured, 3-4 replay, 5 is eager at n = 3, 6-7 warm up again, 8 is
// captured again, 9 replays); an eager forward after step 4, while a graph exists.
GraphNetRun run_graph_net(const NetConfig& cfg, const std::vector<Device>& devs, bool shared, const std::string& mode,
                          uint64_t seed, int64_t step0, const std::vector<std::vector<float>>& x,
                          const std::vector<std::vector<int32_t>>& y) {
    GraphNetRun r;
    const GraphRunBaseline base;
    try {
        Net net(cfg, devs, shared, seed);
        net.step = step0;
        net.set_cuda_graph(mode);
        int64_t mallocs_after_capture = 0;
        for (int s = 0; s < kGraphSteps; ++s) {
            const int n = s == 5 ? 3 : kNetBatch;
            const float lr = kNetLr * (1.f + 0.37f * static_cast<float>(s));
            const StepResult sr = net.train_step(x[s].data(), y[s].data(), n, lr);
            r.losses.push_back(sr.loss);
            r.hits.push_back(sr.top1);
            r.hits.push_back(sr.top5);
            r.edges.push_back(net.scheduler().edge_bytes());
            r.graph_steps.push_back(net.graph_stats().last_step_graph);
            if (s == 2) mallocs_after_capture = cuda_allocator_stats().device_mallocs;
            if (s == 4) {
                r.mallocs_replays = cuda_allocator_stats().device_mallocs - mallocs_after_capture;
                r.logits = down<float>(net.forward(x[9].data(), kNetBatch, false));
            }
        }
        r.stats = net.graph_stats();
        for (const auto& kv : net.state()) r.state.push_back({kv.first, down<float>(kv.second)});
    } catch (const std::exception& e) {
        r.error = e.what();
    }
    base.finish(r);
    return r;
}

// The uint8 path: kGraphSteps - 4 steps, step 0 given its batch and each prefetching the next, each with its own rate.
GraphNetRun run_graph_net_u8(const NetConfig& cfg, const std::vector<Device>& devs, bool shared, const std::string& mode,
                             uint64_t seed, int64_t step0, const U8Inputs& u, const std::vector<std::vector<int32_t>>& y) {
    GraphNetRun r;
    const GraphRunBaseline base;
    const int steps = static_cast<int>(u.images.size());
    try {
        Net net(cfg, devs, shared, seed);
        net.step = step0;
        net.set_cuda_graph(mode);
        net.set_input_mean(u.mean.data(), kNetSrc, kNetSrc);
        auto batch = [&](int s) { return u8_batch(u, y, s); };
        int64_t mallocs3 = 0;
        long long host3 = 0;
        for (int s = 0; s < steps; ++s) {
            const Net::U8Batch cur = batch(s), next = batch(std::min(s + 1, steps - 1));
            const float lr = kNetLr * (1.f + 0.37f * static_cast<float>(s));
            const StepResult sr = net.train_step_u8(s == 0 ? &cur : nullptr, lr, s + 1 < steps ? &next : nullptr);
            r.losses.push_back(sr.loss);
            r.hits.push_back(sr.top1);
            r.hits.push_back(sr.top5);
            r.graph_steps.push_back(net.graph_stats().last_step_graph);
            if (s == 2) {
                mallocs3 = cuda_allocator_stats().device_mallocs;
                host3 = emu::runtime_stats().host_allocs;
            }
        }
        r.mallocs_replays = cuda_allocator_stats().device_mallocs - mallocs3;
        r.host_allocs_replays = emu::runtime_stats().host_allocs - host3;
        r.stats = net.graph_stats();
        for (const auto& kv : net.state()) r.state.push_back({kv.first, down<float>(kv.second)});
    } catch (const std::exception& e) {
        r.error = e.what();
    }
    base.finish(r);
    return r;
}

void compare_graph_run(const std::string& who, const GraphNetRun& g, const GraphNetRun& eager, bool u8) {
    if (!g.error.empty() || !eager.error.empty()) {
        check_true(who + " runs", false, "graph run: " + (g.error.empty() ? "ok" : g.error) +
                                             "; eager run: " + (eager.error.empty() ? "ok" : eager.error));
        return;
    }
    std::string first;
    const bool state = same_state(g.state, eager.state, &first);
    const bool losses = g.losses.size() == eager.losses.size() && g.hits == eager.hits &&
                        memcmp(g.losses.data(), eager.losses.data(), sizeof(double) * g.losses.size()) == 0 &&
                        std::isfinite(g.losses.back());
    const bool logits = g.logits == eager.logits;
    report(state && losses && logits && g.edges == eager.edges, fnv1a(g.losses.data(), sizeof(double) * g.losses.size()),
           who + " == eager steps, losses and every parameter and momentum bit for bit",
           fmt("%zu tensors%s%s%s, losses %s, forward between graph steps %s, cross-tower bytes %s", g.state.size(),
               state ? " equal" : " DIFFER", first.empty() ? "" : ", first: ", first.c_str(), losses ? "equal" : "DIFFER",
               logits ? "equal" : "DIFFERS", g.edges == eager.edges ? "equal" : "DIFFER"));
    // Which steps ran as a graph: the warm-up eager, then captured and replayed (float32: again after the
    // shape change at step 5).
    std::vector<bool> want;
    for (size_t s = 0; s < g.graph_steps.size(); ++s)
        want.push_back(u8 ? s >= 2 : (s >= 2 && s <= 4) || s >= 8);
    const int64_t captures = u8 ? 1 : 2;
    const int64_t replays = static_cast<int64_t>(std::count(want.begin(), want.end(), true));
    std::string steps;
    for (bool b : g.graph_steps) steps += b ? 'G' : 'e';
    check_true(who + " warms up, captures, replays and re-captures after a shape change",
               g.graph_steps == want && g.stats.captures == captures && g.stats.replays == replays &&
                   g.stats.failures == 0 && g.graph_launches == replays,
               fmt("steps %s (G: graph), %" PRId64 " captures (%" PRId64 " expected), %" PRId64 " graph steps, %lld "
                   "launches, %" PRId64 " failed captures%s%s",
                   steps.c_str(), g.stats.captures, captures, g.stats.replays, g.graph_launches, g.stats.failures,
                   g.stats.last_failure.empty() ? "" : ": ", g.stats.last_failure.c_str()));
    check_true(who + " replays allocate nothing, no unordered access, nothing leaked",
               g.mallocs_replays == 0 && (!u8 || g.host_allocs_replays == 0) && g.races.empty() &&
                   g.events_leaked == 0 && g.graphs_leaked == 0,
               fmt("%" PRId64 " cudaMalloc, %lld cudaHostAlloc over the replays; %zu race reports%s%s; %lld events, "
                   "%zu graphs leaked",
                   g.mallocs_replays, g.host_allocs_replays, g.races.size(), g.races.empty() ? "" : ", first: ",
                   g.races.empty() ? "" : g.races[0].c_str(), g.events_leaked, g.graphs_leaked));
}

void group_graph() {
    emu::set_race_tracking(true);
    test_capture_runtime();
    test_graph_memory_pool();

    const NetConfig cfg = small_net_config();
    const int64_t img = int64_t(kNetBatch) * cfg.in_channels * cfg.input_size * cfg.input_size;
    const uint64_t seed = rng() & 0x7fffffff;
    const int64_t step0 = static_cast<int64_t>(rng() % 1000);
    std::vector<std::vector<float>> x;
    std::vector<std::vector<int32_t>> y;
    for (int s = 0; s < kGraphSteps; ++s) {
        x.push_back(randv(img, -2.f, 2.f));
        std::vector<int32_t> l(kNetBatch);
        for (auto& v : l) v = static_cast<int32_t>(rng() % cfg.num_classes);
        y.push_back(l);
    }
    struct Placement {
        const char* name;
        std::vector<Device> devs;
        bool shared;
    };
    const Placement placements[2] = {{"cuda:0 two streams", {GPU, GPU}, false}, {"cuda:0 one shared stream", {GPU, GPU}, true}};
    for (const Placement& p : placements) {
        const GraphNetRun eager = run_graph_net(cfg, p.devs, p.shared, "off", seed, step0, x, y);
        const GraphNetRun graph = run_graph_net(cfg, p.devs, p.shared, "on", seed, step0, x, y);
        compare_graph_run(std::string("graph ") + p.name, graph, eager, false);
    }
    // Towers on two devices stay eager: "on" is refused, "auto" takes no graph and changes nothing.
    {
        std::string refused;
        try {
            Net net(cfg, {GPU, GPU1}, false, seed);
            net.set_cuda_graph("on");
        } catch (const ValueError& e) {
            refused = e.what();
        }
        const GraphNetRun eager = run_graph_net(cfg, {GPU, GPU1}, false, "off", seed, step0, x, y);
        const GraphNetRun autom = run_graph_net(cfg, {GPU, GPU1}, false, "auto", seed, step0, x, y);
        std::string first;
        const bool same = eager.error.empty() && autom.error.empty() && same_state(autom.state, eager.state, &first) &&
                          autom.losses == eager.losses;
        check_true("graph cuda:0,cuda:1 stays eager",
                   refused.find("two devices") != std::string::npos && same && autom.stats.captures == 0 &&
                       autom.graph_launches == 0,
                   fmt("'on' refused: %s; 'auto': %" PRId64 " captures, results %s", refused.empty() ? "NO" : refused.c_str(),
                       autom.stats.captures, same ? "equal to eager" : "DIFFER"));
    }
    // The uint8 path, with prefetching: two streams and one shared stream.
    U8Inputs u;
    {
        const int c = cfg.input_size, S = kNetSrc;
        u.mean.resize(size_t(3) * S * S);
        for (auto& v : u.mean) v = 124.f + static_cast<float>(rng() % 9);
        for (int s = 0; s < kGraphSteps - 4; ++s) {
            std::vector<uint8_t> im(size_t(kNetBatch) * S * S * 3), fl(kNetBatch);
            std::vector<int32_t> off(2 * kNetBatch);
            for (auto& v : im) v = static_cast<uint8_t>(124 + rng() % 9);
            for (auto& v : off) v = static_cast<int32_t>(rng() % (S - c + 1));
            for (auto& v : fl) v = static_cast<uint8_t>(rng() % 2);
            u.images.push_back(im);
            u.offsets.push_back(off);
            u.flips.push_back(fl);
            u.light.push_back(randv(3 * kNetBatch, -2.f, 2.f));
        }
    }
    for (const Placement& p : placements) {
        const GraphNetRun eager = run_graph_net_u8(cfg, p.devs, p.shared, "off", seed, step0, u, y);
        const GraphNetRun graph = run_graph_net_u8(cfg, p.devs, p.shared, "on", seed, step0, u, y);
        compare_graph_run(std::string("graph uint8 path ") + p.name, graph, eager, true);
    }
    emu::set_race_tracking(false);
}

struct Group {
    const char* name;
    void (*run)();
};
const Group kGroups[] = {
    {"zero", group_zero},         {"elementwise", group_elementwise}, {"plumbing", group_plumbing},
    {"lrn", group_lrn},           {"pool", group_pool},               {"softmax", group_softmax},
    {"augment", group_augment},   {"conv", group_conv},               {"conv_alexnet", group_conv_alexnet},
    {"conv_pair", group_conv_pair},
    {"conv_bigtile", group_conv_bigtile}, {"linear", group_linear},   {"linear_bigtile", group_linear_bigtile},
    {"gridstride", group_gridstride}, {"net", group_net}, {"graph", group_graph},
};

int usage() {
    fprintf(stderr, "usage: driver [--order forward|reverse|shuffle] [--seed S] GROUP... | --list\n");
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);  // every check line is out before a crash
    uint64_t seed = 1;
    emu::Order order = emu::Order::forward;
    std::vector<const Group*> todo;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--list") {
            for (const auto& g : kGroups) printf("%s\n", g.name);
            return 0;
        } else if (a == "--seed" && i + 1 < argc) {
            seed = std::stoull(argv[++i]);
        } else if (a == "--order" && i + 1 < argc) {
            const std::string o = argv[++i];
            if (o == "forward") order = emu::Order::forward;
            else if (o == "reverse") order = emu::Order::reverse;
            else if (o == "shuffle") order = emu::Order::shuffle;
            else return usage();
        } else {
            const Group* found = nullptr;
            for (const auto& g : kGroups)
                if (a == g.name) found = &g;
            if (!found) {
                fprintf(stderr, "driver: unknown group '%s'\n", a.c_str());
                return usage();
            }
            todo.push_back(found);
        }
    }
    if (todo.empty()) return usage();
    emu::configure(order, seed);
    set_poison_allocations(true);
    if (!cuda_available()) {
        printf("FAIL: emulated device not available\n");
        return 1;
    }
    for (const Group* g : todo) {
        // Inputs depend on (seed, group) only, so a group's checksums are comparable across runs and orders.
        rng.seed(seed * 0x9e3779b97f4a7c15ull ^ fnv1a(g->name, strlen(g->name)));
        const int c0 = g_checks, f0 = g_failures;
        const auto s0 = emu::stats();
        const auto t0 = std::chrono::steady_clock::now();
        try {
            g->run();
        } catch (const std::exception& e) {
            report(false, 0, std::string("group ") + g->name, std::string("exception: ") + e.what());
        }
        const auto& s = emu::stats();
        printf("SUMMARY group=%s checks=%d failures=%d launches=%lld blocks=%lld threads=%lld barriers=%lld "
               "seconds=%.2f\n",
               g->name, g_checks - c0, g_failures - f0, s.launches - s0.launches, s.blocks - s0.blocks,
               s.threads - s0.threads, s.barriers - s0.barriers,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    for (const auto& site : emu::launch_sites())
        printf("LAUNCH_SITE %s:%d %s launches=%lld\n", site.file, site.line, site.kernel, site.launches);
    printf("TOTAL checks=%d failures=%d\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
