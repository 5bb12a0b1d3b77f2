"""benchmarks/model.py: the occupancy calculator against hand-computed sm_90 cases and CUDA's own
cuda_occupancy.h, the ptxas/SASS parsing on a small kernel compiled here (checked against cuobjdump's resource
report and the FFMA counts the source dictates), and the launcher mirror on shapes worked out by hand."""
import glob
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import model as M  # noqa: E402


# ---- occupancy ---------------------------------------------------------------------------------------------
# Worked by hand from the sm_90 limits: 64 K registers as 4 sub-partitions of 16 K, allocated per warp in units
# of 256; 228 KB shared memory, 1 KB reserved per block, 128 B granularity; 2048 threads, 32 blocks.
HAND = [
    # threads, regs, smem, blocks/SM, why
    (128, 255, 0, 2, "255 regs -> 8192 per warp -> 2 warps per sub-partition = 8 warps = 2 blocks of 4"),
    (256, 128, 16896, 2, "128 regs -> 4096 per warp -> 4 per sub-partition = 16 warps = 2 blocks of 8"),
    (256, 79, 8704, 3, "79 regs -> 2560 per warp -> 6 per sub-partition = 24 warps = 3 blocks"),
    (256, 32, 0, 8, "threads: 2048 / 256"),
    (64, 16, 0, 32, "the 32-block limit"),
    (256, 32, 48 * 1024, 4, "233472 / (49152 + 1024) = 4.65"),
    (1024, 64, 0, 1, "64 regs -> 2048 per warp -> 8 per sub-partition = 32 warps = 1 block of 32"),
    (96, 40, 0, 16, "40 regs -> 1280 per warp -> 12 per sub-partition = 48 warps = 16 blocks of 3 "
                    "(a whole-SM count, 51 warps, would give 17)"),
    (1024, 72, 0, 0, "72 regs -> 2304 per warp x 32 warps > 64 K: cannot launch"),
    (256, 0, 100, 8, "100 + 1024 rounds up to 1152 B: smem allows 202, threads 8"),
]


@pytest.mark.parametrize("threads,regs,smem,want,why", HAND)
def test_occupancy_hand_cases(threads, regs, smem, want, why):
    assert M.blocks_per_sm(threads, regs, smem) == want, why


def test_occupancy_rejects_bad_arguments():
    with pytest.raises(ValueError, match="threads"):
        M.blocks_per_sm(0, 32, 0)
    with pytest.raises(ValueError, match="regs"):
        M.blocks_per_sm(256, 300, 0)
    with pytest.raises(ValueError, match="smem"):
        M.blocks_per_sm(256, 32, -1)


def _occupancy_header():
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"))
    for r in roots:
        p = Path(r) / "include" / "cuda_occupancy.h"
        if r and p.is_file():
            return p
    return None


OCC_MAIN = r"""
#include <cstdio>
#include "cuda_occupancy.h"
int main() {
    cudaOccDeviceProp p;
    p.computeMajor = 9; p.computeMinor = 0; p.maxThreadsPerBlock = 1024; p.maxThreadsPerMultiprocessor = 2048;
    p.regsPerBlock = 65536; p.regsPerMultiprocessor = 65536; p.warpSize = 32; p.sharedMemPerBlock = 49152;
    p.sharedMemPerMultiprocessor = 233472; p.numSms = 132; p.sharedMemPerBlockOptin = 232448;
    p.reservedSharedMemPerBlock = 1024;
    int threads, regs, smem;
    while (std::scanf("%d %d %d", &threads, &regs, &smem) == 3) {
        cudaOccFuncAttributes a;
        a.maxThreadsPerBlock = 1024; a.numRegs = regs; a.sharedSizeBytes = smem;
        a.partitionedGCConfig = PARTITIONED_GC_OFF; a.shmemLimitConfig = FUNC_SHMEM_LIMIT_DEFAULT;
        a.maxDynamicSharedSizeBytes = 0;
        cudaOccDeviceState s;
        cudaOccResult r;
        if (cudaOccMaxActiveBlocksPerMultiprocessor(&r, &p, &a, &s, threads, 0) != CUDA_OCC_SUCCESS) std::printf("-1\n");
        else std::printf("%d\n", r.activeBlocksPerMultiprocessor);
    }
}
"""


def test_occupancy_matches_cuda_occupancy_header(tmp_path):
    hdr = _occupancy_header()
    cxx = shutil.which("g++") or shutil.which("c++")
    if hdr is None or cxx is None:
        pytest.skip("cuda_occupancy.h or a C++ compiler is absent")
    src = tmp_path / "occ.cpp"
    src.write_text(OCC_MAIN)
    exe = tmp_path / "occ"
    subprocess.run([cxx, "-O1", "-I", str(hdr.parent), str(src), "-o", str(exe)], check=True, timeout=120)
    rng = random.Random()
    # Static smem stays under the 48 KB a kernel may declare without opting in.
    cases = [(rng.randint(1, 1024), rng.randint(1, 255), rng.choice([0, rng.randint(0, 48 * 1024)]))
             for _ in range(400)] + [(t, r, s) for t, r, s, _, _ in HAND if r > 0]
    out = subprocess.run([str(exe)], input="\n".join(f"{t} {r} {s}" for t, r, s in cases), capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    assert len(out) == len(cases)
    for (t, r, s), ref in zip(cases, out):
        assert M.blocks_per_sm(t, r, s) == max(0, int(ref)), (t, r, s)


# ---- ptxas and SASS parsing on a kernel compiled here ------------------------------------------------------
SMALL_CU = r"""
__global__ void two_loops(const float* __restrict__ a, float* __restrict__ out, int n) {
    __shared__ float s[300];
    float c0 = 0, c1 = 0, c2 = 0, c3 = 0, c4 = 0, c5 = 0, c6 = 0, c7 = 0;
#pragma unroll 1
    for (int i = threadIdx.x; i < n; i += 32) {  // 8 independent FMA chains: 8 FFMA per iteration
        const float v = a[i];
        c0 = fmaf(v, 1.5f, c0); c1 = fmaf(v, 2.5f, c1); c2 = fmaf(v, 3.5f, c2); c3 = fmaf(v, 4.5f, c3);
        c4 = fmaf(v, 5.5f, c4); c5 = fmaf(v, 6.5f, c5); c6 = fmaf(v, 7.5f, c6); c7 = fmaf(v, 8.5f, c7);
    }
    float d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma unroll 1
    for (int i = threadIdx.x; i < n; i += 64) {  // 4 per iteration
        const float v = a[i + 1];
        d0 = fmaf(v, 0.25f, d0); d1 = fmaf(v, 0.75f, d1); d2 = fmaf(v, 1.25f, d2); d3 = fmaf(v, 1.75f, d3);
    }
    s[threadIdx.x] = c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7 + d0 + d1 + d2 + d3;
    __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % 300];
}

// A loop whose table entries only threads 0..15 build, as the GEMM loop's gather table.
__global__ void guarded_loop(const float* __restrict__ a, const int* __restrict__ b, float* __restrict__ out, int n) {
    __shared__ float tab[2][16];
    float c0 = 0.f, c1 = 0.f, c2 = 0.f, c3 = 0.f;
    for (int i = 0; i < n; ++i) {
        if (threadIdx.x < 16) {
            const int k = b[i * 16 + threadIdx.x];
            tab[i & 1][threadIdx.x] = a[(k / 7) * 3 + k % 5] * static_cast<float>(k % 11);
        }
        __syncthreads();
        const float v = tab[i & 1][(threadIdx.x + i) & 15];
        c0 = fmaf(v, 0.5f, c0); c1 = fmaf(v, 1.5f, c1); c2 = fmaf(v, 2.5f, c2); c3 = fmaf(v, 3.5f, c3);
    }
    out[threadIdx.x] = c0 + c1 + c2 + c3;
}

__global__ void straight(const float* __restrict__ a, float* __restrict__ out) {
    out[threadIdx.x] = fmaf(a[threadIdx.x], 2.0f, 1.0f);
}
"""


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    nvcc = M.find_tool("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is absent")
    d = tmp_path_factory.mktemp("model")
    (d / "small.cu").write_text(SMALL_CU)
    r = subprocess.run([nvcc, "-cubin", "-arch=sm_90", "-O3", "-Xptxas", "-v", "small.cu", "-o", "small.cubin"],
                       cwd=d, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return d, r.stderr + r.stdout


def test_ptxas_report_parsed(small_build):
    d, report = small_build
    info = M.parse_ptxas(report, "small.cu")
    loops = [k for k in info if "two_loops" in k]
    flat = [k for k in info if "straight" in k]
    assert len(loops) == 1 and len(flat) == 1
    k = info[loops[0]]
    assert k.smem == 300 * 4  # the one __shared__ array
    assert 1 <= k.regs <= 255 and k.spill_stores == 0 and k.spill_loads == 0 and k.stack == 0
    assert info[flat[0]].smem == 0
    cuobjdump = M.find_tool("cuobjdump")
    if cuobjdump:  # an independent reading of the same cubin
        res = subprocess.run([cuobjdump, "-res-usage", str(d / "small.cubin")], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        for name, ki in info.items():
            block = res[res.index(name):]
            fields = dict(f.split(":", 1) for f in block.splitlines()[1].split())
            # cuobjdump counts the 1 KB the driver reserves in SHARED of a kernel that uses shared memory.
            assert int(fields["REG"]) == ki.regs and int(fields["STACK"]) == ki.stack, (name, fields)
            assert int(fields["SHARED"]) in (ki.smem, ki.smem + 1024), (name, fields)


def test_ptxas_spills_parsed():
    text = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\n"
            "ptxas info    : Function properties for _Z1kv\n"
            "    40 bytes stack frame, 40 bytes spill stores, 48 bytes spill loads\n"
            "ptxas info    : Used 128 registers, used 1 barriers, 40 bytes cumulative stack size, 16896 bytes smem\n")
    k = M.parse_ptxas(text)["_Z1kv"]
    assert (k.regs, k.stack, k.spill_stores, k.spill_loads, k.smem) == (128, 40, 40, 48, 16896)


def test_sass_main_loop(small_build):
    d, _ = small_build
    tool = M.sass_tool()
    if tool is None:
        pytest.skip("cuobjdump or nvdisasm is absent (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    cuobjdump, env = tool
    sass = subprocess.run([cuobjdump, "-sass", str(d / "small.cubin")], capture_output=True, text=True, check=True,
                          timeout=60, env=env).stdout
    funcs = M.parse_sass(sass)
    two = next(v for k, v in funcs.items() if "two_loops" in k)
    flat = next(v for k, v in funcs.items() if "straight" in k)
    loops = M.sass_loops(two)
    assert sorted(l["ffma"] for l in loops) == [4, 8]
    ml = M.main_loop(two)
    assert ml["ffma"] == 8
    # The body is the FFMAs plus the load, the index step, the compare and the branch at least.
    assert ml["instr"] >= 8 + 4 and ml["local"] == 0
    assert M.main_loop(flat) is None
    assert ml["first16"] == 0  # no branch on the thread index in two_loops
    # guarded_loop: the branch only threads 0..15 take is counted apart, and issued once per block of warps.
    g = M.main_loop(next(v for k, v in funcs.items() if "guarded_loop" in k))
    assert g["ffma"] >= 4 and 4 * 10 <= g["first16"] < g["instr"] - g["ffma"]
    k = M.KernelInfo("guarded_loop", "small.cu", loop_ffma=g["ffma"], loop_instr=g["instr"], loop_first16=g["first16"])
    f = g["first16"]
    assert k.issued_share(128) == pytest.approx(g["ffma"] / (g["instr"] - f + f / 4))
    assert k.issued_share(32) == pytest.approx(k.ffma_share) and k.issued_share(256) > k.issued_share(128)


def test_first16_spans_need_the_thread_index():
    body = [(0x00, "S2R R5, SR_TID.X"), (0x10, "ISETP.GT.U32.AND P0, PT, R5.reuse, 0xf, PT"),
            (0x20, "@P0 BRA 0x50"), (0x30, "IADD3 R1, R2, R3, RZ"), (0x40, "STS [R1], R2"),
            (0x50, "BAR.SYNC.DEFER_BLOCKING 0x0")]
    assert M.first16_spans(body) == [(0x30, 0x50)]
    # R5 no longer holds threadIdx.x at the compare, or the branch is backward, or on another compare: not guarded
    overwritten = body[:1] + [(0x08, "IADD3 R5, R5, 0x20, RZ")] + body[1:]
    assert M.first16_spans(overwritten) == []
    assert M.first16_spans(body[:2] + [(0x20, "@P0 BRA 0x0")] + body[3:]) == []
    other = [body[0], (0x10, "ISETP.GT.U32.AND P0, PT, R5, 0x1f, PT")] + body[2:]
    assert M.first16_spans(other) == []


# ---- the launchers' choices --------------------------------------------------------------------------------


def test_plan_gemm_matches_the_launchers():
    # conv2 grad-input, one tower: M = 48 input channels -> 48x128 tiles (same 729 tiles as 64x128, less
    # padding), N = 128*27*27 pixels.
    g = M.plan_gemm("conv_dgrad", 48, 128 * 27 * 27, 128 * 25)
    assert (g.tile, g.bn, g.splits, g.blocks) == (48, 128, 1, 729)
    assert M.gemm_threads(48, 128) == 128 and M.gemm_threads(64, 128) == 128 and M.gemm_threads(128, 128) == 256
    # conv3 forward, one tower: 192 x 21632. 128x128: 338 blocks, 3 per SM at most, in rounds of 2 + 1 (the
    # lone block costs as two): 4 x 128*128; 64x128: 3 x 169 = 507 blocks, one round of 4: 4 x 64*128;
    # 48x128: 4 x 169 = 676 blocks, 6 per SM in a round of 4 and one of 2 that costs as 4: 8 x 48*128; each
    # weighed by its loop's issue slots per 100 FFMA.
    assert M.tile_cost(192, 128 * 169, 1, 128, 128) == 4 * 128 * 128 * 116
    assert M.tile_cost(192, 128 * 169, 1, 64, 128) == 4 * 64 * 128 * 118
    assert M.tile_cost(192, 128 * 169, 1, 48, 128) == 8 * 48 * 128 * 123
    # conv5 forward, both towers: 128 x 21632 x 2. 338 big blocks in rounds of 2, 2, 2 (the last one short)
    # cost more than 3 x 169 x 2 = 1014 of 48x128 in two full rounds of 4 each, despite the narrower tile's
    # costlier loop.
    assert M.conv_tile(128, 128 * 169, 2) == (48, 128)
    g = M.plan_gemm("conv_fwd", 192, 128 * 169, 256 * 9)
    assert (g.tile, g.bn, g.blocks) == (64, 128, 507)
    # conv2 forward: 128 x 93312 -> 729 big tiles, 6 per SM in 3 full rounds; 64x128 costs the same: big.
    g = M.plan_gemm("conv_fwd", 128, 128 * 729, 48 * 25)
    assert (g.tile, g.bn, g.blocks) == (128, 128, 729)
    # fc6 forward, one tower: 128 x 2048, K = 9216: M a multiple of 128 -> 16 big tiles < 132 -> floor(264/16)
    # = 16 slices of 576.
    g = M.plan_gemm("linear_fwd", 128, 2048, 9216)
    assert (g.tile, g.bn, g.splits, g.chunk, g.blocks) == (128, 128, 16, 576, 256)
    # fc8 grad-input: 128 x 4096 with K = 500: 32 big tiles, at most 500 // 128 = 3 slices of 167 -> 176 (a
    # multiple of the 16-deep k-step).
    g = M.plan_gemm("linear_dgrad", 128, 4096, 500)
    assert (g.tile, g.splits, g.chunk, g.blocks) == (128, 3, 176, 96)
    # Too short to split (K <= 256): one slice.
    g = M.plan_gemm("linear_dgrad", 128, 4096, 256)
    assert (g.tile, g.splits, g.blocks) == (128, 1, 32)
    # fc8 grad-weight, one tower: M = 500 is no multiple of 128 -> 64x64 tiles, 8 x 64 = 512 of them, no split.
    g = M.plan_gemm("linear_wgrad", 500, 4096, 128)
    assert (g.tile, g.bn, g.splits, g.blocks) == (64, 64, 1, 512)
    # conv1 grad-weight: 48 x 363 -> 3 tiles of 48x128; K = 128*55*55 = 387200: want 528/3 = 176 slices of
    # 2200 -> 2208.
    g = M.plan_gemm("conv_wgrad", 48, 363, 387200)
    assert (g.tile, g.bn, g.splits, g.chunk) == (48, 128, 176, 2208)
    # conv3 grad-weight: M = 192 -> 64x128 tiles (3 x 18 = 54), 528/54 = 9 slices.
    g = M.plan_gemm("conv_wgrad", 192, 2304, 128 * 169)
    assert (g.tile, g.bn, g.splits) == (64, 128, 9)
    # Both towers in one launch: conv2 grad-input's 2 x 729 blocks of 48x128 (12 per SM in three full rounds);
    # conv2 grad-weight keeps one tower's 128x128 tile and 26 slices, twice the blocks.
    g = M.plan_gemm("conv_dgrad", 48, 128 * 27 * 27, 128 * 25, 1, towers=2)
    assert (g.tile, g.bn, g.splits, g.blocks) == (48, 128, 1, 1458)
    one = M.plan_gemm("conv_wgrad", 128, 1200, 128 * 729)
    two = M.plan_gemm("conv_wgrad", 128, 1200, 128 * 729, 1, towers=2)
    assert (one.tile, one.splits, one.blocks) == (128, 26, 260) and (two.tile, two.splits, two.blocks) == (128, 26, 520)


def test_plan_stacks_conv1_towers_on_one_b():
    # conv1's towers both read the images: forward and grad-weight stack both towers' 48 rows in 96x128 tiles of 256
    # threads (conv.cu TowerStack), one row of tiles: 3025 forward blocks instead of the pair's 2 x 3025.
    assert M.gemm_threads(96, 128) == 256 and M.gemm_threads(48, 128) == 128
    f = M.plan_gemm("conv_fwd", 48, 387200, 363, 1, towers=2, shared_b=True)
    assert f.stacked and (f.tile, f.bn, f.splits, f.blocks) == (96, 128, 1, 3025)
    # The grad-weight keeps one tower's 48x128 split-K (176 slices), so its bits are a single launch's: 3 x 176 blocks.
    one = M.plan_gemm("conv_wgrad", 48, 363, 387200)
    w = M.plan_gemm("conv_wgrad", 48, 363, 387200, 1, towers=2, shared_b=True)
    assert w.stacked and (w.tile, w.bn, w.splits, w.chunk, w.blocks) == (96, 128, one.splits, one.chunk, 3 * one.splits)
    # No stacking: towers that read different inputs, another M, the channel-inner or (r, s)-checked loaders.
    assert not M.plan_gemm("conv_fwd", 48, 387200, 363, 1, towers=2).stacked
    assert not M.plan_gemm("conv_fwd", 64, 387200, 363, 1, towers=2, shared_b=True).stacked
    assert not M.plan_gemm("conv_fwd_tap", 48, 387200, 432, 1, towers=2, shared_b=True).stacked
    assert not M.plan_gemm("conv_fwd_nomask", 48, 387200, 363, 1, towers=2, shared_b=True).stacked
    assert not M.plan_gemm("conv_wgrad_nomask", 48, 363, 387200, 1, towers=2, shared_b=True).stacked


def test_comparison_pairs_rows_of_the_same_commit():
    docs = [dict(commit="abc-dirty", _path="x.json", rows=[
        dict(family="conv", op="conv2", pass_="forward", our_ms=2.0),
        dict(family="elementwise", op="relu", pass_="forward", our_ms=1.0),
        dict(family="train_step", op="train_step", pass_="vs PyTorch eager", our_ms=40.0)]),
        dict(commit="other", _path="y.json", rows=[dict(family="conv", op="conv2", pass_="forward", our_ms=9.0)])]
    rows = M.comparison(docs, "abc", {("conv2", "forward"): 2.5}, 30.0)
    assert [(r["op"], r["measured_ms"]) for r in rows] == [("conv2", 2.0), ("train_step", 40.0)]
    assert rows[0]["error"] == pytest.approx(0.25) and rows[1]["error"] == pytest.approx(-0.25)


def test_gemm_time_is_the_wave_quantised_issue_bound():
    # A fake ConvFwd 128x128 kernel: 128 registers and 16896 B of smem (2 blocks/SM), FFMA 1 of 2 loop instructions.
    k = M.KernelInfo("gemm_tiled_kernel GemmCfgILi128ELi128E 7ConvFwdILb1E", "conv.cu", regs=128, smem=16896,
                     loop_ffma=256, loop_instr=512, loop_local=0)
    m = M.Model({"conv.cu:" + k.name: k}, bw=4.0e12, sass=True)
    # A forward with M = 250 in 2 row tiles (fill 250/256), N = 22656 = 177 column tiles, K = 2304: 354 blocks
    # of 128x128 cost less than 708 of 64x128 or 1062 of 48x128 (conv_tile keeps the big ones).
    assert M.conv_tile(250, 22656, 1) == (128, 128)
    (p,) = m.gemm("conv3", "forward", "conv_fwd", 250, 22656, 2304)
    flops = 2.0 * 250 * 22656 * 2304
    waves = 354 / (2 * 132)
    want = flops / (66.9e12 * 0.5 * 250 / 256) * (math.ceil(waves) / waves) + 2e-6
    assert p.grid == 354 and p.bps == 2 and p.fill == pytest.approx(250 / 256)
    assert p.ms == pytest.approx(want * 1e3, rel=1e-12)


def _stream_model():
    fake = {}
    for key, (file, sub) in M.KERNELS.items():
        k = M.KernelInfo(f"{sub}_fake", file, regs=32, smem=0)  # 32 regs, 256 threads: 8 blocks/SM
        fake[f"{file}:{k.name}"] = k
    return M.Model(fake, bw=4.0e12, sass=True)


def test_memory_rows_at_bandwidth_and_parallelism():
    m = _stream_model()
    n = 128 * 96 * 55 * 55
    # ReLU over conv1's merged output: 36300 blocks of float4 work, every SM full -> bytes / 4 TB/s + 2 us.
    row = dict(family="elementwise", op="relu (conv1)", pass_="forward", shape="128x96x55x55", bytes=8 * n)
    assert M.bench_memory_prediction(m, row) == pytest.approx((8 * n / 4.0e12 + 2e-6) * 1e3, rel=1e-12)
    # pool5 forward: 128*256 planes of 6x6 outputs, a thread per output: 4608 full blocks, every SM full.
    n_in, n_out = 128 * 256 * 13 * 13, 128 * 256 * 36
    row = dict(family="lrn_pool", op="maxpool 3/2 (pool5)", pass_="forward", shape="128x256x13x13",
               bytes=4 * n_in + 8 * n_out)
    want = (4 * n_in + 8 * n_out) / 4.0e12 + 2e-6
    assert M.bench_memory_prediction(m, row) == pytest.approx(want * 1e3, rel=1e-12)
    # Its backward: the grid covers the 13x13 input, 169 active threads per plane: 1056 x 169 > 135168, full rate.
    row = dict(row, pass_="backward", shape="128x256x6x6", bytes=8 * n_out + 4 * n_in)
    want = (8 * n_out + 4 * n_in) / 4.0e12 + 2e-6
    assert M.bench_memory_prediction(m, row) == pytest.approx(want * 1e3, rel=1e-12)
    assert M.bench_memory_prediction(m, dict(family="elementwise", op="mystery", pass_="x", shape="4x4", bytes=64)) is None


def test_trace_comparison_sums_both_towers(tmp_path):
    import json
    summ = dict(commit="abc", device="NVIDIA H200", config="paper", union_busy_ms=30.0, step_wall_ms=50.0)
    (tmp_path / "H200_2026-01-01_trace_summary.json").write_text(json.dumps(summ))
    ev = [dict(name="conv2.dgrad", dur=1500.0), dict(name="conv2.dgrad", dur=1700.0),
          dict(name="conv2.input", dur=3.0)]
    (tmp_path / "H200_2026-01-01_trace.json").write_text(json.dumps(dict(traceEvents=ev)))
    p = M.Pass("conv2", "grad-input", "conv_dgrad", ms=1.6, count=2, op="conv2.dgrad")
    rows = M.trace_comparison(tmp_path, "abc-dirty", [p], 25.0)
    assert [(r["op"], r["pass_"]) for r in rows] == [("conv2.dgrad", "traced op"), ("step", "traced GPU busy"),
                                                    ("step", "traced step wall")]
    assert rows[0]["measured_ms"] == pytest.approx(3.2) and rows[0]["error"] == pytest.approx(0.0)
    assert rows[1]["error"] == pytest.approx(25.0 / 30.0 - 1) and rows[2]["measured_ms"] == 50.0
    assert M.trace_comparison(tmp_path, "other", [p], 25.0) == []


def test_step_launch_list_names_the_nets_own_ops(rng, monkeypatch):
    """Every pass of the model's step maps to a scheduler op that a real traced step of the net runs (tiny config,
    two CPU towers): the launch list follows the net's fusions (no ReLU ops, LRN + pool as one op, one update)."""
    import numpy as np

    import alexnet_cuda as ax
    from alexnet_cuda.config import tiny_config

    cfg = tiny_config()
    # Any kernel the passes ask for (the times do not matter here, only the list and its names).
    monkeypatch.setattr(M, "find_kernel", lambda kernels, file, *subs, **kw: M.KernelInfo(
        "_".join(subs), file, regs=32, smem=0, loop_ffma=1, loop_instr=2, loop_local=0))
    passes = M.step_passes(M.Model({}, bw=4.0e12, sass=True), cfg, 4)
    M.name_sched_ops(passes, cfg)
    want = {p.op for p in passes if p.in_step and not p.op.startswith("copy ")}
    assert all(p.op for p in passes if p.in_step), [p.pass_ for p in passes if p.in_step and not p.op]

    net = ax.Net(cfg, devices=("cpu", "cpu"), seed=1)
    net.set_tracing(True)
    S = cfg["input_size"]
    x = rng.standard_normal((4, 3, S, S), dtype=np.float32)
    net.train_step(x, rng.integers(0, cfg["num_classes"], 4).astype(np.int32), 0.01)
    ran = {e["op"] for e in net.last_step_stats()["timeline"]}
    assert want <= ran, sorted(want - ran)
    assert {"conv1.lrn_pool", "conv2.lrn_pool", "sgd"} <= ran and not any(o.endswith(".relu") for o in ran)
    assert sum(p.launches * p.count for p in passes if p.kernel == "sgd") == 1
