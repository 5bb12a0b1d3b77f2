// Threads inside the CPU backend's ops: a small persistent pool of our own (no OpenMP dependency).
//
// parallel_for(begin, end, grain, fn) splits [begin, end) into at most num_threads() contiguous chunks of at
// least `grain` indices each and calls fn(lo, hi) once per chunk, the calling thread taking a share; it
// returns when every chunk has run and rethrows the first exception a chunk threw. Ops must make their
// results independent of how the range is cut (the GEMM splits output tiles, never the sum over k), so the
// bits do not depend on the thread count.
//
// Which threads an op gets: a thread bound to a pool (the scheduler binds each CPU tower's worker to a pool
// of its share of the cores, so `cpu,cpu` splits the cores between the towers without oversubscribing) uses
// that pool; any other caller (ops called straight from Python) uses the process-wide default pool of
// default_threads() threads. A parallel_for inside a chunk, or on a pool another caller is using, runs in
// the calling thread alone, so nothing waits on itself and no pool ever runs more threads than it has.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>

namespace ax {
namespace cpu {

class ThreadPool;

// Threads (the caller included) an op started on this thread may use: the bound pool's size, 1 inside a
// chunk, else default_threads().
int num_threads();

// The process-wide thread budget: ALEXNET_CPU_THREADS if set (>= 1), else the CPUs this process may run on,
// divided by the ranks on this node when an unbound MPI/SLURM job started it (OMPI_COMM_WORLD_LOCAL_SIZE,
// MPI_LOCALNRANKS, SLURM_NTASKS_PER_NODE).
// set_default_threads resizes the default pool (the old one is drained first) and applies to executors
// made afterwards; n < 1 restores the automatic value.
int default_threads();
void set_default_threads(int n);

void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// A pool of `threads` threads in all: the caller of parallel_for plus threads - 1 workers.
std::shared_ptr<ThreadPool> make_pool(int threads);
int pool_threads(const ThreadPool& pool);

// Binds the calling thread to `pool` for the scope's lifetime (nullptr: back to the default pool).
class PoolBinding {
public:
    explicit PoolBinding(std::shared_ptr<ThreadPool> pool);
    ~PoolBinding();
    PoolBinding(const PoolBinding&) = delete;
    PoolBinding& operator=(const PoolBinding&) = delete;

private:
    std::shared_ptr<ThreadPool> prev_;
};

}  // namespace cpu
}  // namespace ax
