// The CPU backend's thread pool (parallel.h).
#include "parallel.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace ax {
namespace cpu {

class ThreadPool {
public:
    explicit ThreadPool(int threads) : n_(std::max(1, threads)) {
        for (int i = 1; i < n_; ++i) workers_.emplace_back([this] { loop(); });
    }
    ~ThreadPool() {
        {
            std::lock_guard<std::mutex> l(m_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
    }
    int size() const { return n_; }

    // Runs chunk(0 .. nchunks-1) on the caller and the workers. False, with nothing run, when another
    // caller holds the pool (the caller then runs the range alone).
    bool run(int64_t nchunks, const std::function<void(int64_t)>& chunk) {
        std::unique_lock<std::mutex> use(use_, std::try_to_lock);
        if (!use.owns_lock()) return false;
        {
            std::lock_guard<std::mutex> l(m_);
            job_ = &chunk;
            nchunks_ = nchunks;
            next_.store(0);
            done_ = 0;
            error_ = nullptr;
            ++gen_;
        }
        cv_.notify_all();
        const int64_t mine = work(chunk, nchunks);
        std::unique_lock<std::mutex> l(m_);
        done_ += mine;
        done_cv_.wait(l, [&] { return done_ == nchunks_ && active_ == 0; });
        job_ = nullptr;  // a worker waking late sees no job rather than this finished one
        std::exception_ptr e = error_;
        error_ = nullptr;
        l.unlock();
        if (e) std::rethrow_exception(e);
        return true;
    }

private:
    int64_t work(const std::function<void(int64_t)>& chunk, int64_t nchunks) {
        int64_t count = 0;
        for (int64_t i; (i = next_.fetch_add(1)) < nchunks;) {
            try {
                chunk(i);
            } catch (...) {
                std::lock_guard<std::mutex> l(m_);
                if (!error_) error_ = std::current_exception();
            }
            ++count;
        }
        return count;
    }
    void loop();

    const int n_;
    std::mutex use_;  // held by the one parallel_for running on this pool
    std::mutex m_;
    std::condition_variable cv_, done_cv_;
    const std::function<void(int64_t)>* job_ = nullptr;
    int64_t nchunks_ = 0, done_ = 0;
    std::atomic<int64_t> next_{0};
    uint64_t gen_ = 0;
    int active_ = 0;  // workers inside the current job
    bool stop_ = false;
    std::exception_ptr error_;
    std::vector<std::thread> workers_;
};

namespace {

thread_local std::shared_ptr<ThreadPool> t_pool;  // bound by PoolBinding
thread_local bool t_in_chunk = false;

std::mutex g_mutex;
int g_override = 0;  // set_default_threads; 0: automatic
// Deliberately leaked (never destroyed at exit): a forked child inherits the pointer but not the threads,
// and joining them there would fail; the child makes a fresh pool instead (see the atfork handler).
std::shared_ptr<ThreadPool>* g_default = nullptr;

int automatic_threads() {
    if (const char* s = std::getenv("ALEXNET_CPU_THREADS")) {
        char* end = nullptr;
        const long v = std::strtol(s, &end, 10);
        if (end != s && *end == '\0' && v >= 1) return static_cast<int>(std::min<long>(v, 1024));
    }
    const int online = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    cpu_set_t set;
    int n = online;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) >= 1) n = CPU_COUNT(&set);
    // Several ranks of an MPI or SLURM job on this node, not bound to CPUs of their own by the launcher (the
    // affinity mask is the whole machine): each takes its share, so they do not oversubscribe the cores.
    if (n >= online)
        for (const char* var : {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"})
            if (const char* s = std::getenv(var)) {
                const long ranks = std::strtol(s, nullptr, 10);  // SLURM may append "(x2)": the number leads
                if (ranks > 1) return std::max(1, n / static_cast<int>(std::min<long>(ranks, n)));
                break;
            }
    return n;
}

void forget_default_in_child() { g_default = nullptr; }  // the old pool's threads do not exist here

std::shared_ptr<ThreadPool> default_pool() {
    static const bool registered = (pthread_atfork(nullptr, nullptr, forget_default_in_child), true);
    (void)registered;
    std::lock_guard<std::mutex> l(g_mutex);
    const int want = g_override > 0 ? g_override : automatic_threads();
    if (!g_default || (*g_default)->size() != want) {
        // The previous pool (if any) lives on while a running parallel_for still holds it.
        g_default = new std::shared_ptr<ThreadPool>(std::make_shared<ThreadPool>(want));
    }
    return *g_default;
}

}  // namespace

void ThreadPool::loop() {
    uint64_t seen = 0;
    t_in_chunk = true;  // nested parallel_for calls from a chunk run serially
    for (;;) {
        const std::function<void(int64_t)>* job;
        int64_t nchunks;
        {
            std::unique_lock<std::mutex> l(m_);
            cv_.wait(l, [&] { return stop_ || (job_ && gen_ != seen); });
            if (stop_) return;
            seen = gen_;
            job = job_;
            nchunks = nchunks_;
            ++active_;
        }
        const int64_t mine = work(*job, nchunks);
        {
            std::lock_guard<std::mutex> l(m_);
            done_ += mine;
            --active_;
        }
        done_cv_.notify_all();
    }
}

int default_threads() {
    std::lock_guard<std::mutex> l(g_mutex);
    return g_override > 0 ? g_override : automatic_threads();
}

void set_default_threads(int n) {
    std::lock_guard<std::mutex> l(g_mutex);
    g_override = n > 0 ? n : 0;
}

int num_threads() {
    if (t_in_chunk) return 1;
    if (t_pool) return t_pool->size();
    return default_threads();
}

void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    const int64_t n = end - begin;
    if (n <= 0) return;
    grain = std::max<int64_t>(1, grain);
    if (t_in_chunk) {
        fn(begin, end);
        return;
    }
    std::shared_ptr<ThreadPool> pool = t_pool ? t_pool : nullptr;
    const int64_t max_chunks = (n + grain - 1) / grain;
    const int threads = pool ? pool->size() : default_threads();
    const int64_t chunks = std::min<int64_t>(threads, max_chunks);
    if (chunks <= 1) {
        fn(begin, end);
        return;
    }
    if (!pool) pool = default_pool();
    auto chunk = [&](int64_t c) {
        const bool outer = t_in_chunk;
        t_in_chunk = true;
        struct Restore {
            bool v;
            ~Restore() { t_in_chunk = v; }
        } restore{outer};
        fn(begin + n * c / chunks, begin + n * (c + 1) / chunks);
    };
    if (!pool->run(chunks, chunk)) fn(begin, end);
}

std::shared_ptr<ThreadPool> make_pool(int threads) { return std::make_shared<ThreadPool>(threads); }

int pool_threads(const ThreadPool& pool) { return pool.size(); }

PoolBinding::PoolBinding(std::shared_ptr<ThreadPool> pool) : prev_(t_pool) { t_pool = std::move(pool); }

PoolBinding::~PoolBinding() { t_pool = std::move(prev_); }

}  // namespace cpu
}  // namespace ax
