// Executors (CPU worker threads, CUDA streams), events between them, and the cross-tower copies.
#include "scheduler.h"

#include <algorithm>

#include "cpu/parallel.h"

#ifdef ALEXNET_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ax {

namespace {

using Clock = std::chrono::steady_clock;

// ---- CPU: one worker thread per executor, a FIFO of tasks ---------------------------------------------
// Each worker is bound to a thread pool of its share of the cores (csrc/cpu/parallel.h), the worker itself
// counting as one of them, so the ops of `cpu,cpu` use every core between them and never more.

struct CpuEvent : Event {
    std::mutex m;
    std::condition_variable cv;
    bool set = false;
    void signal() {
        { std::lock_guard<std::mutex> l(m); set = true; }
        cv.notify_all();
    }
    void block() {
        std::unique_lock<std::mutex> l(m);
        cv.wait(l, [&] { return set; });
    }
    void synchronize() override { block(); }
};

class CpuExecutor : public Executor {
public:
    CpuExecutor(int id, int threads) : id_(id), pool_(cpu::make_pool(threads)), worker_([this] { loop(); }) {}
    ~CpuExecutor() override {
        { std::lock_guard<std::mutex> l(m_); stop_ = true; }
        cv_.notify_all();
        worker_.join();
    }
    Device device() const override { return Device{}; }
    std::string name() const override { return "cpu worker " + std::to_string(id_); }
    int threads() const { return cpu::pool_threads(*pool_); }

    void submit(const std::string& op, int tower, std::function<void()> fn) override {
        push(Task{Task::Op, op, tower, std::move(fn), nullptr});
    }
    std::shared_ptr<Event> record() override {
        auto e = std::make_shared<CpuEvent>();
        push(Task{Task::Record, "", -1, nullptr, e});
        return e;
    }
    void wait(const std::shared_ptr<Event>& e) override {
        auto ce = std::dynamic_pointer_cast<CpuEvent>(e);
        if (!ce) throw std::logic_error("scheduler: a CPU worker cannot wait on a CUDA event");
        push(Task{Task::Wait, "", -1, nullptr, ce});
    }
    void begin_step(bool trace) override {
        std::lock_guard<std::mutex> l(m_);
        error_ = nullptr;
        entries_.clear();
        trace_ = trace;
        t0_ = Clock::now();
    }
    std::exception_ptr finish(std::vector<TimelineEntry>& timeline) override {
        std::unique_lock<std::mutex> l(m_);
        done_cv_.wait(l, [&] { return queue_.empty() && !busy_; });
        timeline.insert(timeline.end(), entries_.begin(), entries_.end());
        return error_;
    }

private:
    struct Task {
        enum Kind { Op, Record, Wait } kind;
        std::string op;
        int tower;
        std::function<void()> fn;
        std::shared_ptr<CpuEvent> event;
    };
    void push(Task t) {
        { std::lock_guard<std::mutex> l(m_); queue_.push_back(std::move(t)); }
        cv_.notify_all();
    }
    void loop() {
        cpu::PoolBinding bind(pool_);
        for (;;) {
            Task t;
            {
                std::unique_lock<std::mutex> l(m_);
                cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
                if (stop_ && queue_.empty()) return;
                t = std::move(queue_.front());
                queue_.pop_front();
                busy_ = true;
            }
            if (t.kind == Task::Record) {
                t.event->signal();  // even after an error, so the other tower never waits forever
            } else if (t.kind == Task::Wait) {
                t.event->block();
            } else if (!failed()) {
                const auto start = Clock::now();
                try {
                    t.fn();
                } catch (...) {
                    std::lock_guard<std::mutex> l(m_);
                    if (!error_) error_ = std::current_exception();
                }
                const auto end = Clock::now();
                std::lock_guard<std::mutex> l(m_);
                if (trace_)  // like the CUDA executor: time ops only when the step is traced
                    entries_.push_back({t.op, t.tower, "cpu",
                                        std::chrono::duration<double, std::micro>(start - t0_).count(),
                                        std::chrono::duration<double, std::micro>(end - t0_).count()});
            }
            {
                std::lock_guard<std::mutex> l(m_);
                busy_ = false;
            }
            done_cv_.notify_all();
        }
    }
    bool failed() {
        std::lock_guard<std::mutex> l(m_);
        return static_cast<bool>(error_);
    }

    int id_;
    std::mutex m_;
    std::condition_variable cv_, done_cv_;
    std::deque<Task> queue_;
    bool stop_ = false, busy_ = false, trace_ = false;
    std::exception_ptr error_;
    std::vector<TimelineEntry> entries_;
    Clock::time_point t0_ = Clock::now();
    std::shared_ptr<cpu::ThreadPool> pool_;
    std::thread worker_;  // last: starts after the members it uses exist
};

// ---- CUDA: one non-blocking stream per executor; ops launch from the host thread ---------------------

#ifdef ALEXNET_WITH_CUDA
// One executor's events, kept for reuse: record() would otherwise create and destroy an event for every
// cross-stream dependency, about 100 per eager step. An event comes back here when its last holder drops it, and
// recording it again is safe then: a stream that waited on it took the record it waited for at its wait call. Held
// by the executor and by every event it handed out, so it outlives them all; any thread may drop an event.
class EventPool {
public:
    ~EventPool() {
        for (cudaEvent_t e : free_) cudaEventDestroy(e);
    }
    cudaEvent_t get() {
        {
            std::lock_guard<std::mutex> l(m_);
            if (!free_.empty()) {
                cudaEvent_t e = free_.back();
                free_.pop_back();
                return e;
            }
        }
        cudaEvent_t e = nullptr;
        cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "scheduler");
        return e;
    }
    void put(cudaEvent_t e) {
        std::lock_guard<std::mutex> l(m_);
        free_.push_back(e);
    }

private:
    std::mutex m_;
    std::vector<cudaEvent_t> free_;
};

struct CudaEvent : Event {
    cudaEvent_t e = nullptr;
    int device = 0;
    std::shared_ptr<EventPool> pool;
    ~CudaEvent() override {
        if (e) pool->put(e);
    }
    void synchronize() override { cuda_check(cudaEventSynchronize(e), "scheduler"); }
};

class CudaExecutor : public Executor {
public:
    CudaExecutor(Device d, int id, std::string label = "stream") : dev_(d), id_(id), label_(std::move(label)) {
        DeviceGuard g(d);
        cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "scheduler");
    }
    ~CudaExecutor() override {
        DeviceGuard g(dev_);
        cudaStreamSynchronize(stream_);
        for (auto& p : marks_) {
            cudaEventDestroy(p.start);
            cudaEventDestroy(p.end);
        }
        if (begin_) cudaEventDestroy(begin_);
        cudaStreamDestroy(stream_);
    }
    Device device() const override { return dev_; }
    std::string name() const override { return dev_.str() + " " + label_ + " " + std::to_string(id_); }
    void* stream() const override { return stream_; }

    void submit(const std::string& op, int tower, std::function<void()> fn) override {
        DeviceGuard g(dev_);
        StreamGuard s(dev_.index, stream_);
        cudaEvent_t a = nullptr, b = nullptr;
        if (trace_) {
            cuda_check(cudaEventCreate(&a), "scheduler");
            cuda_check(cudaEventRecord(a, stream_), "scheduler");
        }
        fn();  // launches asynchronously on stream_
        if (trace_) {
            cuda_check(cudaEventCreate(&b), "scheduler");
            cuda_check(cudaEventRecord(b, stream_), "scheduler");
            marks_.push_back({op, tower, a, b});
        }
    }
    std::shared_ptr<Event> record() override {
        DeviceGuard g(dev_);
        auto e = std::make_shared<CudaEvent>();
        e->device = dev_.index;
        e->pool = events_;
        e->e = events_->get();
        cuda_check(cudaEventRecord(e->e, stream_), "scheduler");
        return e;
    }
    void wait(const std::shared_ptr<Event>& e) override {
        auto ce = std::dynamic_pointer_cast<CudaEvent>(e);
        if (!ce) throw std::logic_error("scheduler: a CUDA stream cannot wait on a CPU event");
        DeviceGuard g(dev_);
        cuda_check(cudaStreamWaitEvent(stream_, ce->e, 0), "scheduler");
    }
    void begin_step(bool trace) override {
        trace_ = trace;
        DeviceGuard g(dev_);
        if (trace_) {
            if (!begin_) cuda_check(cudaEventCreate(&begin_), "scheduler");
            cuda_check(cudaEventRecord(begin_, stream_), "scheduler");
        }
    }
    std::exception_ptr finish(std::vector<TimelineEntry>& timeline) override {
        DeviceGuard g(dev_);
        // Complete already when Scheduler::finish_step joined this stream into the one it waited for
        // first: then a query, not a second blocking wait.
        cudaError_t err = joined ? cudaStreamQuery(stream_) : cudaStreamSynchronize(stream_);
        if (joined && err == cudaErrorNotReady) err = cudaStreamSynchronize(stream_);
        joined = false;
        std::exception_ptr error;
        if (err != cudaSuccess) {
            try {
                cuda_check(err, "train_step");
            } catch (...) {
                error = std::current_exception();
            }
        }
        for (auto& p : marks_) {
            float s = 0, e = 0;
            if (!error && cudaEventElapsedTime(&s, begin_, p.start) == cudaSuccess &&
                cudaEventElapsedTime(&e, begin_, p.end) == cudaSuccess)
                timeline.push_back({p.op, p.tower, dev_.str(), s * 1000.0, e * 1000.0});
            cudaEventDestroy(p.start);
            cudaEventDestroy(p.end);
        }
        marks_.clear();
        return error;
    }

    bool joined = false;  // set by Scheduler::finish_step: another stream waited for all of this one's work

private:
    struct Mark {
        std::string op;
        int tower;
        cudaEvent_t start, end;
    };
    Device dev_;
    int id_;
    std::string label_;
    cudaStream_t stream_ = nullptr;
    cudaEvent_t begin_ = nullptr;
    bool trace_ = false;
    std::vector<Mark> marks_;
    std::shared_ptr<EventPool> events_ = std::make_shared<EventPool>();
};
#endif

}  // namespace

Scheduler::Scheduler(const std::vector<Device>& tower_devices, bool shared) : devices_(tower_devices), shared_(shared) {
    if (devices_.empty()) throw ValueError("Net: argument 'devices' is empty");
    // The CPU thread budget split between the CPU executors, the first ones taking the remainder.
    const int cpu_execs = shared_ ? (devices_[0].is_cpu() ? 1 : 0)
                                  : static_cast<int>(std::count_if(devices_.begin(), devices_.end(),
                                                                   [](const Device& d) { return d.is_cpu(); }));
    const int budget = cpu::default_threads();
    int cpu_seen = 0;
    auto make = [&](Device d, int id) -> std::shared_ptr<Executor> {
        if (d.is_cpu()) {
            const int i = cpu_seen++;
            const int share = std::max(1, budget / std::max(1, cpu_execs) + (i < budget % std::max(1, cpu_execs)));
            return std::make_shared<CpuExecutor>(id, share);
        }
#ifdef ALEXNET_WITH_CUDA
        return std::make_shared<CudaExecutor>(d, id);
#else
        throw ValueError("Net: CUDA device requested but alexnet_cuda was built without CUDA");
#endif
    };
    if (shared_) {
        auto e = make(devices_[0], 0);
        unique_.push_back(e);
        exec_.assign(devices_.size(), e);
    } else {
        for (size_t t = 0; t < devices_.size(); ++t) {
            unique_.push_back(make(devices_[t], static_cast<int>(t)));
            exec_.push_back(unique_.back());
        }
    }
}

Scheduler::~Scheduler() = default;

void Scheduler::run(int tower, const std::string& op, std::function<void()> fn) {
    exec_[tower]->submit(op, tower, std::move(fn));
}

void Scheduler::transfer(int from, int to, const Tensor* src, Tensor* dst, const std::string& edge) {
    if (from == to) {
        run(to, edge + " (own)", [src, dst] { *dst = *src; });
        return;
    }
    Executor& producer = *exec_[from];
    Executor& consumer = *exec_[to];
    const Device dd = devices_[to];
    // The bytes are known from the producer's shape only once it ran; count them when the copy runs.
    if (&producer == &consumer && devices_[from] == dd && dd.is_cuda()) {
        run(to, "share " + edge, [this, src, dst, edge] {
            *dst = *src;
            count_edge(edge, static_cast<int64_t>(src->nbytes()));
        });
        return;
    }
    if (&producer != &consumer) consumer.wait(producer.record());
    int64_t* counter = nullptr;
    {
        std::lock_guard<std::mutex> l(edge_mutex_);  // count_edge may insert from an executor's thread
        counter = &edge_bytes_[edge];
    }
    run(to, "copy " + edge, [this, src, dst, dd, counter] {
        *dst = src->to(dd);
        std::lock_guard<std::mutex> l(edge_mutex_);
        *counter += static_cast<int64_t>(src->nbytes());
    });
}

void Scheduler::count_edge(const std::string& edge, int64_t bytes) {
    std::lock_guard<std::mutex> l(edge_mutex_);
    edge_bytes_[edge] += bytes;
}

void Scheduler::upload(int tower, const std::string& op, std::function<void()> fn) {
    const Device d = devices_[tower];
    if (d.is_cpu()) {
        run(tower, op, std::move(fn));
        return;
    }
    upload_executor(tower)->submit(op, -1, std::move(fn));  // tower -1: the device's input path, no tower's work
}

std::shared_ptr<Executor> Scheduler::upload_executor(int tower) {
    const Device d = devices_[tower];
    auto it = upload_.find(d.str());
    if (it == upload_.end()) {
#ifdef ALEXNET_WITH_CUDA
        auto e = std::make_shared<CudaExecutor>(d, static_cast<int>(unique_.size()), "upload stream");
        if (in_step_) e->begin_step(trace_);
        it = upload_.emplace(d.str(), e).first;
        unique_.push_back(e);
#else
        throw std::logic_error("scheduler: a CUDA upload stream in a build without CUDA");
#endif
    }
    return it->second;
}

void Scheduler::upload_wait(int tower, const std::shared_ptr<Event>& e) {
    if (devices_[tower].is_cpu()) exec_[tower]->wait(e);
    else upload_executor(tower)->wait(e);
}

std::shared_ptr<Event> Scheduler::upload_done(int tower) {
    auto it = upload_.find(devices_[tower].str());
    return it == upload_.end() ? exec_[tower]->record() : it->second->record();
}

void Scheduler::order(int from, int to) {
    if (exec_[from] != exec_[to]) exec_[to]->wait(exec_[from]->record());
}

void Scheduler::begin_step(bool trace) {
    trace_ = trace;
    edge_bytes_.clear();
    timeline_.clear();
    t0_ = std::chrono::steady_clock::now();
    for (auto& e : unique_) e->begin_step(trace);
    in_step_ = true;
}

void Scheduler::finish_step() {
    // On CUDA the first executor's stream waits for every other one, so the host blocks once, there, and
    // finds the rest complete (one synchronization per step, whatever the placement).
    if (unique_.size() > 1 && unique_[0]->device().is_cuda()) {
#ifdef ALEXNET_WITH_CUDA
        try {
            for (size_t i = 1; i < unique_.size(); ++i) {
                unique_[0]->wait(unique_[i]->record());
                if (auto* c = dynamic_cast<CudaExecutor*>(unique_[i].get())) c->joined = true;
            }
        } catch (...) {  // each executor's finish still waits for its own work and reports the error
        }
#endif
    }
    std::exception_ptr first;
    for (auto& e : unique_) {
        auto err = e->finish(timeline_);
        if (err && !first) first = err;
    }
    in_step_ = false;
    step_wall_us_ = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0_).count();
    std::sort(timeline_.begin(), timeline_.end(),
              [](const TimelineEntry& a, const TimelineEntry& b) { return a.start_us < b.start_us; });
    if (first) std::rethrow_exception(first);
}

}  // namespace ax
