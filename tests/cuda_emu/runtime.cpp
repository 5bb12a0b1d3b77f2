// The emulated CUDA runtime (include/cuda_runtime.h): one device, memory on the host heap, and streams and
// events as checked handles. Work runs to completion when it is issued, in issue order, which is one valid
// serialization of what CUDA allows; what this file adds is the ordering CUDA *guarantees*, as vector
// clocks: per stream (agent) a clock advanced by each op, joined by cudaStreamWaitEvent (the event's
// clock at record time), by the legacy default stream's implicit barriers against blocking streams, and
// into the host's clock by stream/event/device synchronization (work issued afterwards inherits it).
// With race tracking on, every device allocation a launch or copy touches is checked, FastTrack style,
// against its last writer and the readers since: two accesses from different streams, one a write, with no
// happens-before edge between them would be a race on a GPU even though the serialized run here was fine.
// Not thread-safe, like the fiber scheduler: one host thread issues all CUDA work.
#include <chrono>
#include <map>
#include <set>

#include "cuda_runtime.h"

struct CUstream_st {
    int agent;
    bool nonblocking;
};
struct CUevent_st {
    unsigned flags;
    bool recorded = false;
    int agent = -1;                // stream it was last recorded on
    std::vector<uint64_t> clock;   // that stream's clock at the record
    std::chrono::steady_clock::time_point when;
};

namespace emu {

namespace {

constexpr int kDefaultStream = 0, kHost = 1;
using Clock = std::vector<uint64_t>;

struct Agent {
    Clock clock;
    bool live = true, nonblocking = false;
};
std::vector<Agent> g_agents(2);
std::set<CUstream_st*> g_streams;
std::set<CUevent_st*> g_events;
RuntimeStats g_rt;
bool g_tracking = false;
std::vector<std::string> g_races;

struct Epoch {
    int agent = -1;
    uint64_t at = 0;
    const char* op = "";
};
struct Alloc {
    size_t bytes;
    Epoch write;                    // last writer
    std::map<int, Epoch> reads;     // readers since, per agent
};
std::map<uintptr_t, Alloc> g_allocs;  // base -> allocation

uint64_t at(const Clock& c, int a) { return a < static_cast<int>(c.size()) ? c[a] : 0; }
void join(Clock& into, const Clock& from) {
    if (into.size() < from.size()) into.resize(from.size(), 0);
    for (size_t i = 0; i < from.size(); ++i) into[i] = std::max(into[i], from[i]);
}
Agent& agent(int a) { return g_agents[a]; }

int agent_of(cudaStream_t s, const char* what) {
    if (!s) return kDefaultStream;
    if (!g_streams.count(s)) fail("%s: stream %p is not a live stream (destroyed, or never created)", what, (void*)s);
    return s->agent;
}

// The agent that issued an op "happens before" the op at `e` ran, as known by agent `a`?
bool ordered(const Epoch& e, int a) { return e.agent < 0 || e.agent == a || at(agent(a).clock, e.agent) > e.at; }

const char* agent_name(int a, char* buf, size_t n) {
    if (a == kDefaultStream) return "the default stream";
    snprintf(buf, n, "stream #%d", a - 1);
    return buf;
}

void race(const char* kind, const Alloc& al, uintptr_t base, const Epoch& prior, int a, const char* op,
          const char* file, int line) {
    char b1[32], b2[32], where[300] = "", msg[900];
    if (file) snprintf(where, sizeof where, " (%s:%d)", file, line);
    snprintf(msg, sizeof msg,
             "%s race on device buffer %#zx (%zu bytes): %s on %s%s is not ordered after %s on %s "
             "(no event/stream wait or host synchronization between them)",
             kind, static_cast<size_t>(base), al.bytes, op, agent_name(a, b1, sizeof b1), where, prior.op,
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
void host_syncs_all() {
    for (size_t a = 0; a < g_agents.size(); ++a) host_learns(g_agents[a].clock);
}

bool is_device(const void* p) { return find_alloc(p) != nullptr; }

// A copy between two buffers on stream st: direction checked against the kind, accesses tracked.
cudaError_t copy(void* d, const void* s, size_t n, cudaMemcpyKind kind, cudaStream_t st, const char* what) {
    if (n == 0) return cudaSuccess;
    const bool dd = is_device(d), sd = is_device(s);
    const bool ok = kind == cudaMemcpyDefault || (kind == cudaMemcpyHostToDevice && dd && !sd) ||
                    (kind == cudaMemcpyDeviceToHost && !dd && sd) || (kind == cudaMemcpyDeviceToDevice && dd && sd) ||
                    (kind == cudaMemcpyHostToHost && !dd && !sd);
    if (!ok) return cudaErrorInvalidValue;  // a pointer on the wrong side for `kind`
    const int a = stream_begin(st, what);
    memcpy(d, s, n);
    if (g_tracking) {
        access(a, s, false, what, nullptr, 0);
        access(a, d, true, what, nullptr, 0);
    }
    stream_end(a);
    return cudaSuccess;
}

}  // namespace

int stream_begin(cudaStream_t s, const char* what) {
    const int a = agent_of(s, what);
    Agent& me = agent(a);
    join(me.clock, agent(kHost).clock);  // whatever the host has seen complete precedes what it issues now
    // The legacy default stream waits for every blocking stream, and they wait for it.
    if (a == kDefaultStream) {
        for (size_t b = 2; b < g_agents.size(); ++b)
            if (g_agents[b].live && !g_agents[b].nonblocking) join(agent(kDefaultStream).clock, g_agents[b].clock);
        ++g_rt.calls_default_stream;
    } else {
        if (!me.nonblocking) join(me.clock, agent(kDefaultStream).clock);
        ++g_rt.calls_created_streams;
    }
    return a;
}

void stream_end(int a) {
    Clock& c = agent(a).clock;
    if (c.size() <= static_cast<size_t>(a)) c.resize(a + 1, 0);
    ++c[a];
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

bool race_tracking() { return g_tracking; }
void set_race_tracking(bool on) { g_tracking = on; }
void record_accesses(int a, const AccessList& acc, const char* op, const char* file, int line) {
    for (const auto& it : acc.items) access(a, it.ptr, it.kind == Access::write, op, file, line);
}
const std::vector<std::string>& race_reports() { return g_races; }
void clear_race_reports() { g_races.clear(); }
bool is_device_pointer(const void* p) { return is_device(p); }
const RuntimeStats& runtime_stats() { return g_rt; }

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
        default: return "emulated CUDA error";
    }
}

cudaError_t cudaMalloc(void** p, size_t n) {
    if (posix_memalign(p, 256, n ? n : 1) != 0) return cudaErrorMemoryAllocation;
    g_allocs[reinterpret_cast<uintptr_t>(*p)] = Alloc{n ? n : 1, {}, {}};
    return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
    if (!p) return cudaSuccess;
    auto it = g_allocs.find(reinterpret_cast<uintptr_t>(p));
    if (it == g_allocs.end()) return cudaErrorInvalidValue;
    host_syncs_all();  // cudaFree synchronizes the device
    g_allocs.erase(it);
    free(p);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s) {
    if (n == 0) return cudaSuccess;
    if (!is_device(p)) return cudaErrorInvalidValue;
    const int a = stream_begin(s, "cudaMemsetAsync");
    memset(p, v, n);
    if (g_tracking) access(a, p, true, "cudaMemsetAsync", nullptr, 0);
    stream_end(a);
    return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
    const cudaError_t e = cudaMemsetAsync(p, v, n, nullptr);
    host_learns(agent(kDefaultStream).clock);
    return e;
}
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind kind, cudaStream_t st) {
    return copy(d, s, n, kind, st, "cudaMemcpyAsync");
}
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind kind) {
    const cudaError_t e = copy(d, s, n, kind, nullptr, "cudaMemcpy");
    host_learns(agent(kDefaultStream).clock);
    return e;
}
cudaError_t cudaMemcpyPeerAsync(void* d, int dd, const void* s, int sd, size_t n, cudaStream_t st) {
    if (dd != 0 || sd != 0) return cudaErrorInvalidDevice;
    return copy(d, s, n, cudaMemcpyDeviceToDevice, st, "cudaMemcpyPeerAsync");
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
    if (!s || (flags & ~cudaStreamNonBlocking)) return cudaErrorInvalidValue;
    Agent a;
    a.nonblocking = flags & cudaStreamNonBlocking;
    a.clock = agent(kHost).clock;  // a new stream starts after what the host has seen
    g_agents.push_back(a);
    *s = new CUstream_st{static_cast<int>(g_agents.size()) - 1, a.nonblocking};
    g_streams.insert(*s);
    ++g_rt.streams_created;
    return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (!s || !g_streams.count(s)) return cudaErrorInvalidResourceHandle;
    agent(s->agent).live = false;  // its clock stays: events recorded on it may still be waited on
    g_streams.erase(s);
    delete s;
    ++g_rt.streams_destroyed;
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    if (s && !g_streams.count(s)) return cudaErrorInvalidResourceHandle;
    const int a = s ? s->agent : kDefaultStream;
    if (a == kDefaultStream) stream_begin(nullptr, "cudaStreamSynchronize");  // its implicit barriers
    host_learns(agent(a).clock);
    ++g_rt.stream_syncs;
    return cudaSuccess;
}
cudaError_t cudaStreamQuery(cudaStream_t s) {
    if (s && !g_streams.count(s)) return cudaErrorInvalidResourceHandle;
    return cudaSuccess;  // all issued work is done
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags) {
    if (flags != 0 || !g_events.count(e)) return cudaErrorInvalidResourceHandle;
    const int a = stream_begin(s, "cudaStreamWaitEvent");
    ++g_rt.stream_waits;
    if (e->recorded) {  // waiting on a never-recorded event is a no-op in CUDA
        join(agent(a).clock, e->clock);
        if (e->agent != a) ++g_rt.cross_stream_waits;
    }
    return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
    if (!e || (flags & ~(cudaEventBlockingSync | cudaEventDisableTiming))) return cudaErrorInvalidValue;
    *e = new CUevent_st{flags};
    g_events.insert(*e);
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
    if (e->recorded) host_learns(e->clock);
    return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
    if (!g_events.count(e)) return cudaErrorInvalidResourceHandle;
    return cudaSuccess;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
    if (!ms || !g_events.count(start) || !g_events.count(end)) return cudaErrorInvalidResourceHandle;
    if ((start->flags | end->flags) & cudaEventDisableTiming) return cudaErrorInvalidResourceHandle;
    if (!start->recorded || !end->recorded) return cudaErrorInvalidResourceHandle;
    ++g_rt.elapsed_queries;
    // Host clock between the two records: work ran when issued, so this is the time it took to issue and run.
    *ms = std::chrono::duration<float, std::milli>(end->when - start->when).count();
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {
    host_syncs_all();
    ++g_rt.device_syncs;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
    *d = 0;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetDeviceCount(int* n) {
    *n = 1;
    return cudaSuccess;
}
cudaError_t cudaDeviceCanAccessPeer(int* c, int d, int peer) {
    if (d != 0 || peer != 0) return cudaErrorInvalidDevice;
    *c = 0;  // a device is never its own peer
    return cudaSuccess;
}
cudaError_t cudaDeviceEnablePeerAccess(int peer, unsigned flags) {
    if (flags != 0) return cudaErrorInvalidValue;
    (void)peer;
    return cudaErrorInvalidDevice;  // no second device to reach (and a device is not its own peer)
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
    if (d != 0) return cudaErrorInvalidDevice;
    memset(p, 0, sizeof *p);
    strcpy(p->name, "CPU fiber emulator");
    p->multiProcessorCount = 132;
    p->major = 9;
    p->minor = 0;
    p->totalGlobalMem = size_t(16) << 30;
    return cudaSuccess;
}
