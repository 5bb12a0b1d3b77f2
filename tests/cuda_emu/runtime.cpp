// The emulated CUDA runtime (include/cuda_runtime.h): two devices without peer access, memory on the host
// heap, and streams and events as checked handles. Work runs to completion when it is issued, in issue
// order, which is one valid serialization of what CUDA allows; what this file adds is the ordering CUDA
// *guarantees*, as vector clocks: per stream (agent) a clock advanced by each op, joined by
// cudaStreamWaitEvent (the event's clock at record time, from any device), by each device's legacy default
// stream's implicit barriers against the blocking streams of *that* device, and into the host's clock by
// stream/event/device synchronization (work issued afterwards inherits it).
// With race tracking on, every device allocation a launch or copy touches is checked, FastTrack style,
// against its last writer and the readers since: two accesses from different streams, one a write, with no
// happens-before edge between them would be a race on a GPU even though the serialized run here was fine.
// The device rules follow the CUDA programming guide's "Stream and Event Behavior": the current device is
// per host thread; a kernel launch fails on a stream of another device, a copy does not; an event records
// only on a stream of its own device, but any stream may wait on it. A kernel that touches another
// device's memory is an emulator error (no peer access: a real GPU faults).
// Not thread-safe, like the fiber scheduler: one host thread issues all CUDA work.
#include <chrono>
#include <map>
#include <set>

#include "cuda_runtime.h"

namespace emu {
struct Capture;
}
struct CUstream_st {
    int agent;
    int device;
    bool nonblocking;
    emu::Capture* cap = nullptr;  // the capture this stream is part of (stream capture), else nullptr
    int slot = -1;                // its index among that capture's streams
};
struct CUevent_st {
    unsigned flags;
    int device;                    // current device at creation: it records only on that device's streams
    bool recorded = false;
    int agent = -1;                // stream it was last recorded on
    std::vector<uint64_t> clock;   // that stream's clock at the record
    std::chrono::steady_clock::time_point when;
    int capture_id = 0;            // last recorded in this capture (0: outside any capture)
    int token = -1;                // the record's index in that capture
};

namespace emu {

namespace {

// Agents: the host, each device's legacy default stream, then created streams (never reused).
constexpr int kHost = 0;
constexpr int legacy_agent(int device) { return 1 + device; }
constexpr int kFirstCreated = 1 + kDeviceCount;
using Clock = std::vector<uint64_t>;

struct Agent {
    Clock clock;
    int device = -1;  // -1: the host
    bool live = true, nonblocking = false, legacy = false;
};
std::vector<Agent> initial_agents() {
    std::vector<Agent> v(kFirstCreated);
    for (int d = 0; d < kDeviceCount; ++d) {
        v[legacy_agent(d)].device = d;
        v[legacy_agent(d)].legacy = true;
    }
    return v;
}
std::vector<Agent> g_agents = initial_agents();
std::set<CUstream_st*> g_streams;
std::set<CUevent_st*> g_events;
RuntimeStats g_rt;
bool g_tracking = false;
std::vector<std::string> g_races;
thread_local int t_device = 0;  // cudaSetDevice: per host thread, as in CUDA

struct Epoch {
    int agent = -1;
    uint64_t at = 0;
    const char* op = "";
};
struct Alloc {
    size_t bytes;
    int device;
    Epoch write;                    // last writer
    std::map<int, Epoch> reads;     // readers since, per agent
};
std::map<uintptr_t, Alloc> g_allocs;  // base -> allocation
std::map<uintptr_t, size_t> g_host_allocs;  // cudaHostAlloc blocks not yet freed: base -> bytes

// ---- stream capture ----
struct Node {
    enum Kind { op, record, wait } kind;
    int slot;                          // the capture stream that issued it
    int token;                         // record / wait: the event record it makes or waits for
    const char* what;
    std::function<void(int)> fn;       // op: runs it on the replay agent of its stream
    std::vector<const void*> ptrs;     // op: the device pointers it was given (checked live at replay)
};
using SlotClock = std::vector<uint64_t>;  // per capture stream: how many of its nodes are known to precede
struct GraphBody {
    std::vector<Node> nodes;
    int slots = 0, device = 0;
};
}  // namespace
struct Capture {
    int id = 0;
    cudaStream_t origin = nullptr;
    cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
    bool invalidated = false;
    std::vector<cudaStream_t> members;  // by slot
    std::vector<SlotClock> seen;        // by slot
    std::vector<SlotClock> tokens;      // by event record: the recording slot's clock then
    GraphBody body;
};
namespace {
std::map<int, Capture*> g_captures;  // live captures by id
int g_next_capture = 1;
}  // namespace
}  // namespace emu
struct CUgraph_st {
    emu::GraphBody body;
};
struct CUgraphExec_st {
    emu::GraphBody body;
};
namespace emu {
namespace {
std::set<CUgraph_st*> g_graphs;
std::set<CUgraphExec_st*> g_execs;

bool is_pinned(const void* p) {
    const auto u = reinterpret_cast<uintptr_t>(p);
    auto it = g_host_allocs.upper_bound(u);
    if (it == g_host_allocs.begin()) return false;
    --it;
    return u < it->first + it->second;
}

uint64_t at(const Clock& c, int a) { return a < static_cast<int>(c.size()) ? c[a] : 0; }
void join(Clock& into, const Clock& from) {
    if (into.size() < from.size()) into.resize(from.size(), 0);
    for (size_t i = 0; i < from.size(); ++i) into[i] = std::max(into[i], from[i]);
}
Agent& agent(int a) { return g_agents[a]; }
bool valid_device(int d) { return d >= 0 && d < kDeviceCount; }

// A null stream is the legacy default stream of the calling thread's current device.
int agent_of(cudaStream_t s, const char* what) {
    if (!s) return legacy_agent(t_device);
    if (!g_streams.count(s)) fail("%s: stream %p is not a live stream (destroyed, or never created)", what, (void*)s);
    return s->agent;
}

// The agent that issued an op "happens before" the op at `e` ran, as known by agent `a`?
bool ordered(const Epoch& e, int a) { return e.agent < 0 || e.agent == a || at(agent(a).clock, e.agent) > e.at; }

const char* agent_name(int a, char* buf, size_t n) {
    if (a == kHost) return "the host";
    if (agent(a).legacy)
        snprintf(buf, n, "the legacy default stream of cuda:%d", agent(a).device);
    else
        snprintf(buf, n, "stream #%d of cuda:%d", a - kFirstCreated, agent(a).device);
    return buf;
}

void race(const char* kind, const Alloc& al, uintptr_t base, const Epoch& prior, int a, const char* op,
          const char* file, int line) {
    char b1[64], b2[64], where[300] = "", msg[1000];
    if (file) snprintf(where, sizeof where, " (%s:%d)", file, line);
    snprintf(msg, sizeof msg,
             "%s race on device buffer %#zx (%zu bytes, cuda:%d): %s on %s%s is not ordered after %s on %s "
             "(no event/stream wait or host synchronization between them)",
             kind, static_cast<size_t>(base), al.bytes, al.device, op, agent_name(a, b1, sizeof b1), where, prior.op,
             agent_name(prior.agent, b2, sizeof b2));
    if (g_races.size() < 1000) g_races.push_back(msg);
}

Alloc* find_alloc(const void* p, uintptr_t* base = nullptr) {
    const uintptr_t u = reinterpret_cast<uintptr_t>(p);
    auto it = g_allocs.upper_bound(u);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    if (u >= it->first + it->second.bytes) return nullptr;
    if (base) *base = it->first;
    return &it->second;
}

void access(int a, const void* p, bool write, const char* op, const char* file, int line) {
    uintptr_t base = 0;
    Alloc* al = find_alloc(p, &base);
    if (!al) return;  // host memory
    const Epoch now{a, at(agent(a).clock, a), op};
    if (!ordered(al->write, a)) race(write ? "write-after-write" : "read-after-write", *al, base, al->write, a, op, file, line);
    if (write) {
        for (auto& r : al->reads)
            if (!ordered(r.second, a)) race("write-after-read", *al, base, r.second, a, op, file, line);
        al->reads.clear();
        al->write = now;
    } else {
        al->reads[a] = now;
    }
}

// Host-side synchronization: the host now knows everything `c` knew.
void host_learns(const Clock& c) { join(agent(kHost).clock, c); }
// Everything issued to device `d` so far is done (cudaDeviceSynchronize on it, cudaFree of its memory).
void host_syncs_device(int d) {
    for (size_t a = 0; a < g_agents.size(); ++a)
        if (g_agents[a].device == d) host_learns(g_agents[a].clock);
}

bool is_device(const void* p) { return find_alloc(p) != nullptr; }

CallCounters g_calls;  // call_counters(); each count_* is one line in the call it counts
void count_device_malloc() { ++g_calls.device_mallocs; }
void count_device_free() { ++g_calls.device_frees; }
void count_host_alloc() { ++g_calls.host_allocs; }
void count_host_free() { ++g_calls.host_frees; }
void count_copy(bool pageable) { g_calls.pageable_copies += pageable; }
void count_sync_copy() { ++g_calls.sync_copies; }
void count_stream_sync() { ++g_calls.stream_syncs; }
void count_device_sync() { ++g_calls.device_syncs; }
void count_event_sync() { ++g_calls.event_syncs; }
void count_event_create() { ++g_calls.event_creates; }

// A copy between two buffers on stream st: direction checked against the kind, accesses tracked. With no
// peer access, a device-to-device copy between two devices is refused: real CUDA would stage it inside
// the driver, but the code under test must take its own staged path (copy_from), so that path is what runs.
void copy_on(int a, void* d, const void* s, size_t n, bool dd, bool sd, const char* what) {
    // A host side outside page-locked memory: real CUDA stages it through a driver buffer (a pageable copy).
    if (dd != sd) ++(is_pinned(dd ? s : d) ? g_rt.pinned_copies : g_rt.pageable_copies);
    if (dd != sd) count_copy(!is_pinned(dd ? s : d));
    memcpy(d, s, n);
    if (g_tracking) {
        access(a, s, false, what, nullptr, 0);
        access(a, d, true, what, nullptr, 0);
    }
    stream_end(a);
}

// A call CUDA forbids while a capture is under way in the default (global) mode, as on this thread: every
// such capture is invalidated and the call fails (relaxed captures tolerate it).
cudaError_t unsafe_during_capture() {
    bool any = false;
    for (auto& kv : g_captures)
        if (kv.second->mode != cudaStreamCaptureModeRelaxed) {
            kv.second->invalidated = true;
            any = true;
        }
    if (!any) return cudaSuccess;
    ++g_rt.capture_errors;
    return cudaErrorStreamCaptureUnsupported;
}
// A call that conflicts with the capture `s` belongs to (synchronizing or querying it): invalidates it.
cudaError_t capture_conflict(cudaStream_t s, cudaError_t e) {
    s->cap->invalidated = true;
    ++g_rt.capture_errors;
    return e;
}
// Ordinary work on a device's legacy default stream while a blocking stream of that device captures: the
// implicit synchronization would join uncaptured work into the graph.
cudaError_t legacy_implicit(cudaStream_t s) {
    if (s) return cudaSuccess;
    for (CUstream_st* x : g_streams)
        if (x->cap && !x->nonblocking && x->device == t_device) return capture_conflict(x, cudaErrorStreamCaptureImplicit);
    return cudaSuccess;
}

cudaError_t copy(void* d, const void* s, size_t n, cudaMemcpyKind kind, cudaStream_t st, const char* what) {
    if (const cudaError_t e = legacy_implicit(st)) return e;
    if (n == 0) return cudaSuccess;
    const Alloc *da = find_alloc(d), *sa = find_alloc(s);
    const bool dd = da != nullptr, sd = sa != nullptr;
    const bool ok = kind == cudaMemcpyDefault || (kind == cudaMemcpyHostToDevice && dd && !sd) ||
                    (kind == cudaMemcpyDeviceToHost && !dd && sd) || (kind == cudaMemcpyDeviceToDevice && dd && sd) ||
                    (kind == cudaMemcpyHostToHost && !dd && !sd);
    if (!ok) return cudaErrorInvalidValue;  // a pointer on the wrong side for `kind`
    if (dd && sd && da->device != sa->device) return cudaErrorPeerAccessUnsupported;
    if (st && g_streams.count(st) && st->cap) {  // captured: runs at each replay
        std::vector<const void*> ptrs;
        if (dd) ptrs.push_back(d);
        if (sd) ptrs.push_back(s);
        return capture_node(st, what, false, [d, s, n, dd, sd, what](int a) { copy_on(a, d, s, n, dd, sd, what); }, ptrs);
    }
    const int a = stream_begin(st, what);  // a stream of any device may carry a copy (CUDA allows it)
    copy_on(a, d, s, n, dd, sd, what);
    return cudaSuccess;
}

}  // namespace

int stream_begin(cudaStream_t s, const char* what) {
    const int a = agent_of(s, what);
    Agent& me = agent(a);
    join(me.clock, agent(kHost).clock);  // whatever the host has seen complete precedes what it issues now
    // A device's legacy default stream waits for every blocking stream of that device, and they wait for
    // it; streams of other devices, and non-blocking streams, are not ordered by it.
    if (me.legacy) {
        for (size_t b = kFirstCreated; b < g_agents.size(); ++b)
            if (g_agents[b].live && !g_agents[b].nonblocking && g_agents[b].device == me.device)
                join(me.clock, g_agents[b].clock);
        ++g_rt.calls_default_stream;
    } else {
        if (!me.nonblocking) join(me.clock, agent(legacy_agent(me.device)).clock);
        ++g_rt.calls_created_streams;
    }
    ++g_rt.calls_per_device[me.device];
    return a;
}

void count_call(int a) {
    Agent& me = agent(a);
    ++(me.legacy ? g_rt.calls_default_stream : g_rt.calls_created_streams);
    ++g_rt.calls_per_device[me.device];
}
int agent_device(int a) { return agent(a).device; }

bool is_capturing(cudaStream_t s) { return s && g_streams.count(s) && s->cap; }

cudaError_t capture_node(cudaStream_t s, const char* what, bool launch, std::function<void(int)> fn,
                         std::vector<const void*> ptrs) {
    Capture* c = s->cap;
    if (c->invalidated) return cudaErrorStreamCaptureInvalidated;
    if (launch && s->device != t_device) return cudaErrorInvalidResourceHandle;  // as an uncaptured launch
    c->body.nodes.push_back({Node::op, s->slot, -1, what, std::move(fn), std::move(ptrs)});
    ++c->seen[s->slot][s->slot];
    return cudaSuccess;
}

void stream_end(int a) {
    Clock& c = agent(a).clock;
    if (c.size() <= static_cast<size_t>(a)) c.resize(a + 1, 0);
    ++c[a];
}

int launch_begin(cudaStream_t s, const char* name) {
    const int a = agent_of(s, name);
    if (agent(a).device != t_device) return -1;  // CUDA: a launch fails on a stream of another device
    return stream_begin(s, name);
}

void AccessList::add(const void* p, Access k) {
    if (!p || !is_device(p)) return;
    items.push_back({p, k, {}});
}
void AccessList::snapshot() {
    for (auto& it : items)
        if (it.kind == Access::unknown) {
            uintptr_t base = 0;
            const Alloc* al = find_alloc(it.ptr, &base);
            const auto* b = reinterpret_cast<const unsigned char*>(base);
            it.before.assign(b, b + al->bytes);
        }
}
void AccessList::resolve() {
    for (auto& it : items)
        if (it.kind == Access::unknown) {
            uintptr_t base = 0;
            find_alloc(it.ptr, &base);  // still allocated: nothing frees memory during a launch
            it.kind = memcmp(it.before.data(), reinterpret_cast<const void*>(base), it.before.size()) != 0 ? Access::write
                                                                                                     : Access::read;
            it.before.clear();
        }
}
void AccessList::check_device(int a, const char* kernel, const char* file, int line) const {
    for (const auto& it : items) {
        const Alloc* al = find_alloc(it.ptr);
        if (al && al->device != agent(a).device)
            fail("%s:%d: kernel %s on cuda:%d is passed %p, memory of cuda:%d: the emulated devices have no peer "
                 "access (a real GPU faults)",
                 file, line, kernel, agent(a).device, it.ptr, al->device);
    }
}

bool race_tracking() { return g_tracking; }
void set_race_tracking(bool on) { g_tracking = on; }
void record_accesses(int a, const AccessList& acc, const char* op, const char* file, int line) {
    for (const auto& it : acc.items) access(a, it.ptr, it.kind == Access::write, op, file, line);
}
const std::vector<std::string>& race_reports() { return g_races; }
void clear_race_reports() { g_races.clear(); }
bool is_device_pointer(const void* p) { return is_device(p); }
const RuntimeStats& runtime_stats() { return g_rt; }
const CallCounters& call_counters() { return g_calls; }
size_t live_events() { return g_events.size(); }

}  // namespace emu

using namespace emu;

const char* cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorInvalidResourceHandle: return "invalid resource handle";
        case cudaErrorNotReady: return "device not ready";
        case cudaErrorPeerAccessUnsupported: return "peer access is not supported between these two devices";
        case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
        case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
        case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
        case cudaErrorStreamCaptureMerge: return "operation would result in a merge of separate capture sequences";
        case cudaErrorStreamCaptureUnmatched: return "capture was not ended in the same stream as it began";
        case cudaErrorStreamCaptureUnjoined: return "capturing stream has unjoined work";
        case cudaErrorStreamCaptureIsolation: return "dependency created on uncaptured work in another stream";
        case cudaErrorStreamCaptureImplicit: return "operation would make the legacy stream depend on a capturing blocking stream";
        case cudaErrorCapturedEvent: return "operation not permitted on an event last recorded in a capturing stream";
        default: return "emulated CUDA error";
    }
}

cudaError_t cudaMalloc(void** p, size_t n) {
    if (const cudaError_t e = unsafe_during_capture()) return e;
    if (posix_memalign(p, 256, n ? n : 1) != 0) return cudaErrorMemoryAllocation;
    g_allocs[reinterpret_cast<uintptr_t>(*p)] = Alloc{n ? n : 1, t_device, {}, {}};
    count_device_malloc();
    return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
    if (const cudaError_t e = unsafe_during_capture()) return e;
    if (!p) return cudaSuccess;
    auto it = g_allocs.find(reinterpret_cast<uintptr_t>(p));
    if (it == g_allocs.end()) return cudaErrorInvalidValue;
    host_syncs_device(it->second.device);  // cudaFree synchronizes the memory's device (no more is assumed)
    g_allocs.erase(it);
    free(p);
    count_device_free();
    return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** p, size_t n, unsigned flags) {
    if (!p || flags != cudaHostAllocDefault) return cudaErrorInvalidValue;
    if (const cudaError_t e = unsafe_during_capture()) return e;
    if (posix_memalign(p, 256, n ? n : 1) != 0) return cudaErrorMemoryAllocation;
    g_host_allocs[reinterpret_cast<uintptr_t>(*p)] = n ? n : 1;
    ++g_rt.host_allocs;
    count_host_alloc();
    return cudaSuccess;
}
cudaError_t cudaFreeHost(void* p) {
    if (const cudaError_t e = unsafe_during_capture()) return e;
    if (!p) return cudaSuccess;
    if (!g_host_allocs.erase(reinterpret_cast<uintptr_t>(p))) return cudaErrorInvalidValue;
    for (int d = 0; d < kDeviceCount; ++d) host_syncs_device(d);
    ++g_rt.host_frees;
    count_host_free();
    free(p);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s) {
    if (n == 0) return cudaSuccess;
    if (!is_device(p)) return cudaErrorInvalidValue;
    auto run = [p, v, n](int a) {
        memset(p, v, n);
        if (g_tracking) access(a, p, true, "cudaMemsetAsync", nullptr, 0);
        stream_end(a);
    };
    if (is_capturing(s)) return capture_node(s, "cudaMemsetAsync", false, run, {p});
    if (const cudaError_t e = legacy_implicit(s)) return e;
    run(stream_begin(s, "cudaMemsetAsync"));
    return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
    if (const cudaError_t e = unsafe_during_capture()) return e;
    const cudaError_t e = cudaMemsetAsync(p, v, n, nullptr);
    host_learns(agent(legacy_agent(t_device)).clock);
    count_sync_copy();
    return e;
}
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind kind, cudaStream_t st) {
    return copy(d, s, n, kind, st, "cudaMemcpyAsync");
}
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind kind) {
    if (const cudaError_t e = unsafe_during_capture()) return e;
    const cudaError_t e = copy(d, s, n, kind, nullptr, "cudaMemcpy");
    host_learns(agent(legacy_agent(t_device)).clock);
    count_sync_copy();
    return e;
}
// Within one device a plain device-to-device copy; between the two emulated devices refused, as in copy().
cudaError_t cudaMemcpyPeerAsync(void* d, int dd, const void* s, int sd, size_t n, cudaStream_t st) {
    if (!valid_device(dd) || !valid_device(sd)) return cudaErrorInvalidDevice;
    const Alloc *da = find_alloc(d), *sa = find_alloc(s);
    if (n && (!da || !sa || da->device != dd || sa->device != sd)) return cudaErrorInvalidValue;
    if (dd != sd) return cudaErrorPeerAccessUnsupported;
    return copy(d, s, n, cudaMemcpyDeviceToDevice, st, "cudaMemcpyPeerAsync");
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
    if (!s || (flags & ~cudaStreamNonBlocking)) return cudaErrorInvalidValue;
    Agent a;
    a.device = t_device;
    a.nonblocking = flags & cudaStreamNonBlocking;
    a.clock = agent(kHost).clock;  // a new stream starts after what the host has seen
    g_agents.push_back(a);
    *s = new CUstream_st{static_cast<int>(g_agents.size()) - 1, t_device, a.nonblocking};
    g_streams.insert(*s);
    ++g_rt.streams_created;
    return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (!s || !g_streams.count(s)) return cudaErrorInvalidResourceHandle;
    if (s->cap) return capture_conflict(s, cudaErrorStreamCaptureUnsupported);
    agent(s->agent).live = false;  // its clock stays: events recorded on it may still be waited on
    g_streams.erase(s);
    delete s;
    ++g_rt.streams_destroyed;
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    if (s && !g_streams.count(s)) return cudaErrorInvalidResourceHandle;
    if (s && s->cap) return capture_conflict(s, cudaErrorStreamCaptureUnsupported);
    if (const cudaError_t e = legacy_implicit(s)) return e;
    const int a = s ? s->agent : legacy_agent(t_device);
    if (agent(a).legacy) stream_begin(nullptr, "cudaStreamSynchronize");  // its implicit barriers
    host_learns(agent(a).clock);
    ++g_rt.stream_syncs;
    count_stream_sync();
    return cudaSuccess;
}
cudaError_t cudaStreamQuery(cudaStream_t s) {
    if (s && !g_streams.count(s)) return cudaErrorInvalidResourceHandle;
    if (s && s->cap) return capture_conflict(s, cudaErrorStreamCaptureUnsupported);
    return cudaSuccess;  // all issued work is done
}
// The stream and the event may belong to different devices: this is how CUDA orders work across devices.
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags) {
    if (flags != 0 || !g_events.count(e)) return cudaErrorInvalidResourceHandle;
    if (s && !g_streams.count(s)) return cudaErrorInvalidResourceHandle;
    if (e->capture_id) {
        // An event recorded in a capture: a wait on it puts s in that capture (the fork), or is an edge
        // within it; once the capture has ended nothing may wait on it.
        auto c = g_captures.find(e->capture_id);
        if (c == g_captures.end() || !s) {
            ++g_rt.capture_errors;
            return cudaErrorCapturedEvent;
        }
        Capture* cap = c->second;
        if (s->cap && s->cap != cap) {
            capture_conflict(s, cudaErrorStreamCaptureMerge);
            cap->invalidated = true;
            return cudaErrorStreamCaptureMerge;
        }
        if (!s->cap) {
            s->cap = cap;
            s->slot = static_cast<int>(cap->members.size());
            cap->members.push_back(s);
            cap->seen.push_back(SlotClock());
        }
        SlotClock& mine = cap->seen[s->slot];
        const SlotClock& t = cap->tokens[e->token];
        if (mine.size() < cap->members.size()) mine.resize(cap->members.size(), 0);
        for (size_t i = 0; i < t.size(); ++i) mine[i] = std::max(mine[i], t[i]);
        ++mine[s->slot];  // a stream that joined must be joined back, even with no work of its own
        cap->body.nodes.push_back({Node::wait, s->slot, e->token, "cudaStreamWaitEvent", nullptr, {}});
        ++g_rt.stream_waits;
        return cudaSuccess;
    }
    if (s && s->cap) {  // a captured stream waiting on uncaptured work: the graph could not hold that edge
        ++g_rt.capture_errors;
        s->cap->invalidated = true;
        return cudaErrorStreamCaptureIsolation;
    }
    if (const cudaError_t err = legacy_implicit(s)) return err;
    const int a = stream_begin(s, "cudaStreamWaitEvent");
    ++g_rt.stream_waits;
    if (e->recorded) {  // waiting on a never-recorded event is a no-op in CUDA
        join(agent(a).clock, e->clock);
        if (e->agent != a) ++g_rt.cross_stream_waits;
        if (agent(e->agent).device != agent(a).device) ++g_rt.cross_device_waits;
    }
    return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
    if (!e || (flags & ~(cudaEventBlockingSync | cudaEventDisableTiming))) return cudaErrorInvalidValue;
    *e = new CUevent_st{flags, t_device};
    g_events.insert(*e);
    count_event_create();
    return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }
cudaError_t cudaEventDestroy(cudaEvent_t e) {
    if (!g_events.count(e)) return cudaErrorInvalidResourceHandle;
    g_events.erase(e);
    delete e;
    return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    if (!g_events.count(e)) return cudaErrorInvalidResourceHandle;
    if (agent(agent_of(s, "cudaEventRecord")).device != e->device) return cudaErrorInvalidResourceHandle;
    if (is_capturing(s)) {  // an edge of the graph: what s captured so far, for whoever waits on it
        Capture* cap = s->cap;
        SlotClock& mine = cap->seen[s->slot];
        if (mine.size() < cap->members.size()) mine.resize(cap->members.size(), 0);
        e->capture_id = cap->id;
        e->token = static_cast<int>(cap->tokens.size());
        cap->tokens.push_back(mine);
        cap->body.nodes.push_back({Node::record, s->slot, e->token, "cudaEventRecord", nullptr, {}});
        ++g_rt.event_records;
        return cudaSuccess;
    }
    if (const cudaError_t err = legacy_implicit(s)) return err;
    e->capture_id = 0;
    const int a = stream_begin(s, "cudaEventRecord");
    e->recorded = true;
    e->agent = a;
    e->clock = agent(a).clock;  // every op issued on the stream so far (each advanced the clock past itself)
    e->when = std::chrono::steady_clock::now();
    ++g_rt.event_records;
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    if (!g_events.count(e)) return cudaErrorInvalidResourceHandle;
    if (e->capture_id) return ++g_rt.capture_errors, cudaErrorCapturedEvent;
    if (e->recorded) host_learns(e->clock);
    count_event_sync();
    return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
    if (!g_events.count(e)) return cudaErrorInvalidResourceHandle;
    if (e->capture_id) return ++g_rt.capture_errors, cudaErrorCapturedEvent;
    ++g_rt.event_queries;
    // Work runs when issued, so every recorded event is complete; a host that saw it complete is ordered
    // after its work, as with cudaEventSynchronize.
    if (e->recorded) host_learns(e->clock);
    return cudaSuccess;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
    if (!ms || !g_events.count(start) || !g_events.count(end)) return cudaErrorInvalidResourceHandle;
    if ((start->flags | end->flags) & cudaEventDisableTiming) return cudaErrorInvalidResourceHandle;
    if (start->capture_id || end->capture_id) return ++g_rt.capture_errors, cudaErrorCapturedEvent;
    if (!start->recorded || !end->recorded || start->device != end->device) return cudaErrorInvalidResourceHandle;
    ++g_rt.elapsed_queries;
    // Host clock between the two records: work ran when issued, so this is the time it took to issue and run.
    *ms = std::chrono::duration<float, std::milli>(end->when - start->when).count();
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {  // the current device only
    if (const cudaError_t e = unsafe_during_capture()) return e;
    host_syncs_device(t_device);
    ++g_rt.device_syncs;
    count_device_sync();
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
    *d = t_device;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
    if (!valid_device(d)) return cudaErrorInvalidDevice;
    t_device = d;
    return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* n) {
    *n = kDeviceCount;
    return cudaSuccess;
}
cudaError_t cudaDeviceCanAccessPeer(int* c, int d, int peer) {
    if (!valid_device(d) || !valid_device(peer)) return cudaErrorInvalidDevice;
    *c = 0;  // no peer access between the emulated devices (and a device is never its own peer)
    ++g_rt.peer_queries;
    return cudaSuccess;
}
cudaError_t cudaDeviceEnablePeerAccess(int peer, unsigned flags) {
    if (flags != 0) return cudaErrorInvalidValue;
    if (!valid_device(peer) || peer == t_device) return cudaErrorInvalidDevice;
    return cudaErrorPeerAccessUnsupported;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
    if (!valid_device(d)) return cudaErrorInvalidDevice;
    memset(p, 0, sizeof *p);
    strcpy(p->name, "CPU fiber emulator");
    p->multiProcessorCount = 132;
    p->major = 9;
    p->minor = 0;
    p->totalGlobalMem = size_t(16) << 30;
    return cudaSuccess;
}

// ---- CUDA graphs -------------------------------------------------------------------------------------

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode) {
    if (!s) return cudaErrorStreamCaptureUnsupported;  // the legacy default stream cannot capture
    if (!g_streams.count(s)) return cudaErrorInvalidResourceHandle;
    if (s->cap) return cudaErrorIllegalState;
    if (mode != cudaStreamCaptureModeGlobal && mode != cudaStreamCaptureModeThreadLocal &&
        mode != cudaStreamCaptureModeRelaxed)
        return cudaErrorInvalidValue;
    auto* c = new Capture;
    c->id = g_next_capture++;
    c->origin = s;
    c->mode = mode;
    c->members.push_back(s);
    c->seen.push_back(SlotClock(1, 0));
    c->body.device = s->device;
    g_captures[c->id] = c;
    s->cap = c;
    s->slot = 0;
    ++g_rt.captures;
    return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* graph) {
    if (!graph) return cudaErrorInvalidValue;
    *graph = nullptr;
    if (!s || !g_streams.count(s)) return cudaErrorInvalidResourceHandle;
    if (!s->cap) return cudaErrorIllegalState;
    Capture* c = s->cap;
    if (s != c->origin) {
        c->invalidated = true;
        ++g_rt.capture_errors;
        return cudaErrorStreamCaptureUnmatched;
    }
    cudaError_t err = c->invalidated ? cudaErrorStreamCaptureInvalidated : cudaSuccess;
    // Every stream that joined must be joined back: the origin has waited for all of its work.
    SlotClock& origin = c->seen[0];
    origin.resize(c->members.size(), 0);
    for (size_t j = 1; j < c->members.size() && !err; ++j)
        if (origin[j] < c->seen[j][j]) err = cudaErrorStreamCaptureUnjoined;
    for (CUstream_st* m : c->members) {
        m->cap = nullptr;
        m->slot = -1;
    }
    g_captures.erase(c->id);
    if (!err) {
        auto* g = new CUgraph_st{std::move(c->body)};
        g->body.slots = static_cast<int>(c->members.size());
        g_graphs.insert(g);
        g_rt.graph_nodes += static_cast<long long>(g->body.nodes.size());
        *graph = g;
    } else {
        ++g_rt.capture_errors;
    }
    delete c;
    return err;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status) {
    if (!status) return cudaErrorInvalidValue;
    if (s && !g_streams.count(s)) return cudaErrorInvalidResourceHandle;
    *status = !s || !s->cap ? cudaStreamCaptureStatusNone
                            : (s->cap->invalidated ? cudaStreamCaptureStatusInvalidated : cudaStreamCaptureStatusActive);
    return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long flags) {
    if (!exec || !g_graphs.count(graph) || flags != 0) return cudaErrorInvalidValue;
    *exec = new CUgraphExec_st{graph->body};
    g_execs.insert(*exec);
    return cudaSuccess;
}

// Replays the graph: its nodes in the captured order, each capture stream's on an agent of its own that starts
// where the launch stream is, the captured records and waits joining them; the launch stream then continues
// after all of them. A node given a pointer that is no longer allocated is an emulator error: the graph would
// replay with a stale pointer.
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
    if (!g_execs.count(exec)) return cudaErrorInvalidValue;
    if (is_capturing(s)) fail("cudaGraphLaunch into a capturing stream (a child graph) is not emulated");
    if (agent(agent_of(s, "cudaGraphLaunch")).device != exec->body.device) return cudaErrorInvalidValue;
    for (const Node& n : exec->body.nodes)
        for (const void* p : n.ptrs)
            if (!is_device(p))
                fail("cudaGraphLaunch: captured %s was given %p, no longer allocated: the graph replays a stale pointer",
                     n.what, p);
    const int la = stream_begin(s, "cudaGraphLaunch");
    std::vector<int> agents;
    for (int i = 0; i < exec->body.slots; ++i) {
        Agent a;
        a.device = exec->body.device;
        a.nonblocking = true;
        a.live = false;  // not a stream: no legacy-stream barrier applies to it
        a.clock = agent(la).clock;
        g_agents.push_back(a);
        agents.push_back(static_cast<int>(g_agents.size()) - 1);
    }
    std::map<int, Clock> tokens;
    for (const Node& n : exec->body.nodes) {
        const int a = agents[n.slot];
        if (n.kind == Node::op) {
            count_call(a);
            n.fn(a);
        } else if (n.kind == Node::record) {
            tokens[n.token] = agent(a).clock;
        } else {
            join(agent(a).clock, tokens.at(n.token));
        }
    }
    for (int a : agents) join(agent(la).clock, agent(a).clock);
    stream_end(la);
    ++g_rt.graph_launches;
    return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
    if (!g_execs.erase(exec)) return cudaErrorInvalidValue;
    delete exec;
    return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
    if (!g_graphs.erase(graph)) return cudaErrorInvalidValue;
    delete graph;
    return cudaSuccess;
}

namespace emu {
size_t live_graphs() { return g_graphs.size() + g_execs.size(); }
}  // namespace emu
