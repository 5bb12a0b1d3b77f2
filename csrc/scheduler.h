// The two-tower scheduler: one executor per tower (a CUDA stream, or a CPU worker thread), explicit
// events between them, cross-tower copies that count their bytes per edge, and a per-step timeline.
//
// The host thread issues each tower's ops in program order. A CUDA executor launches them at once,
// asynchronously on its stream; a CPU executor queues them for its worker thread. Either way an op's
// inputs are ready when it runs: ops of one tower run in issue order, and a tower that consumes another
// tower's tensor waits on an event the producer recorded after making it.
#pragma once
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tensor.h"

namespace ax {

struct TimelineEntry {
    std::string op;
    int tower;
    std::string device;
    double start_us, end_us;  // from the step's start
};

struct Event {
    virtual ~Event() = default;
    virtual void synchronize() = 0;  // blocks the host until the work recorded before the event is done
};

class Executor {
public:
    virtual ~Executor() = default;
    virtual Device device() const = 0;
    virtual std::string name() const = 0;
    // Runs fn after everything issued before it on this executor.
    virtual void submit(const std::string& op, int tower, std::function<void()> fn) = 0;
    virtual std::shared_ptr<Event> record() = 0;
    virtual void wait(const std::shared_ptr<Event>& e) = 0;
    virtual void begin_step(bool trace) = 0;
    // Blocks until all issued work is done; appends timed entries; returns the first error, if any.
    virtual std::exception_ptr finish(std::vector<TimelineEntry>& timeline) = 0;
    virtual void* stream() const { return nullptr; }  // the cudaStream_t of a CUDA executor
};

class Scheduler {
public:
    // One executor per tower; `shared` puts every tower on a single executor (one device in turn).
    Scheduler(const std::vector<Device>& tower_devices, bool shared);
    ~Scheduler();
    int towers() const { return static_cast<int>(devices_.size()); }
    Device device(int tower) const { return devices_[tower]; }
    bool shared() const { return shared_; }
    std::string executor_name(int tower) const { return exec_[tower]->name(); }

    void run(int tower, const std::string& op, std::function<void()> fn);
    // dst = copy of *src (produced on tower `from`) on tower `to`'s device, issued on `to`, counted on `edge`.
    // A tower reading its own tensor gets it without a copy; so does one on the same CUDA device and stream as
    // the producer (nothing can reorder them; the consumers only read), still counted on the edge.
    void transfer(int from, int to, const Tensor* src, Tensor* dst, const std::string& edge);
    // Counts bytes on `edge` that an op moved between towers without a transfer (an op that reads every
    // tower's tensor where it lies, on a shared device and stream). Safe from any executor.
    void count_edge(const std::string& edge, int64_t bytes);

    // The input path. `upload` runs fn on the upload executor of tower's device: on a CUDA device its own
    // non-blocking stream (made on first use, shared by the towers on that device), so host-to-device copies
    // do not queue behind a tower's kernels; on the CPU the tower's own executor. `upload_done` is an event
    // after everything issued there so far; `wait` makes a tower's executor wait for an event.
    void upload(int tower, const std::string& op, std::function<void()> fn);
    std::shared_ptr<Event> upload_done(int tower);
    // Makes the upload executor of tower's device wait for an event (on the CPU: the tower's own executor). So
    // work that must not hold up the towers (the gradient all-reduce of alexnet_cuda.distributed) runs there,
    // after what the event marks.
    void upload_wait(int tower, const std::shared_ptr<Event>& e);
    std::shared_ptr<Event> record(int tower) { return exec_[tower]->record(); }
    void wait(int tower, const std::shared_ptr<Event>& e) { exec_[tower]->wait(e); }
    // Orders tower `to` after everything issued so far on tower `from` (nothing when they share an executor).
    void order(int from, int to);

    void begin_step(bool trace);
    // Waits for every tower; rethrows the first error of the step.
    void finish_step();

    const std::map<std::string, int64_t>& edge_bytes() const { return edge_bytes_; }
    // A step replayed as a CUDA graph issues no transfer: it reports the bytes its captured step counted.
    void set_edge_bytes(const std::map<std::string, int64_t>& e) { edge_bytes_ = e; }
    // The cudaStream_t of tower's executor (nullptr on the CPU): where a CUDA graph is captured and launched.
    void* stream(int tower) const { return exec_[tower]->stream(); }
    const std::vector<TimelineEntry>& timeline() const { return timeline_; }
    double step_wall_us() const { return step_wall_us_; }

private:
    std::shared_ptr<Executor> upload_executor(int tower);  // the CUDA device's upload stream, made on first use
    std::vector<Device> devices_;
    bool shared_;
    std::vector<std::shared_ptr<Executor>> exec_;  // per tower (may repeat)
    std::vector<std::shared_ptr<Executor>> unique_;  // every executor, the upload ones included
    std::map<std::string, std::shared_ptr<Executor>> upload_;  // per CUDA device
    bool trace_ = false;
    std::map<std::string, int64_t> edge_bytes_;
    std::mutex edge_mutex_;  // the counts are added from the executors' threads
    std::vector<TimelineEntry> timeline_;
    std::chrono::steady_clock::time_point t0_;
    double step_wall_us_ = 0;
    bool in_step_ = false;
};

}  // namespace ax
