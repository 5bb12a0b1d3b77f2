"""Data-parallel training across processes: MPI (mpi4py) for CPU tensors, NCCL (loaded at run time) for CUDA.

    mpirun -n 8 python -m alexnet_cuda.train --data /data/prepared --devices cuda:0
    srun -n 64 --gpus-per-task 1 python -m alexnet_cuda.train --data /data/prepared --devices cuda:0

Each rank runs the whole net (both towers, on its own devices) on its slice of the global batch; after the
backward pass the gradients are summed across ranks and every rank takes the same SGD step, so the ranks hold
identical parameters throughout. The rules:

- The rank and world come from MPI when the process was started by a launcher (mpirun/mpiexec: OMPI_*, PMI_*;
  SLURM's srun: SLURM_STEP_NUM_TASKS); a process started alone never imports mpi4py and runs as before.
- --batch-size is the global batch: rank r takes samples [r*B/W, (r+1)*B/W) of each global batch of the same
  permutation one process would use, with the augmentation drawn for the global batch, and its dropout
  counters shifted to those samples (Net.set_data_parallel sample_base). The loss gradient is scaled by 1/B
  (mean_over), so the all-reduced sum is the mean over the global batch: W ranks x B/W images compute the same
  step as one process x B images, up to the order of the float32 sums (see tests/test_distributed.py).
- CPU tensors: each layer's gradients are handed to a communication thread as soon as the backward pass has
  made them (the net's grad_ready hook), packed into buckets of about BUCKET_BYTES in backward order and
  all-reduced with non-blocking MPI_Iallreduce while the backward pass of the layers below still runs (as
  PyTorch's DDP does).
- CUDA tensors: NCCL (libnccl.so.2 from the nvidia-nccl-cu13 wheel, the system, or ALEXNET_NCCL_LIBRARY),
  loaded with ctypes on first use, so the build never needs it: one communicator per device, its unique id
  broadcast over MPI. As the backward pass is issued, each layer's gradients are summed in place on the
  device's upload stream, which waits for them on an event while the tower's stream goes on with the layers
  below (as DDP's communication stream); the step ends when those sums are done, then the SGD update runs.
  With ALEXNET_BUCKET_BYTES=0 they are summed in one NCCL group after the backward pass instead.
- Failure: every wait on another rank polls with a timeout (--comm-timeout), so a dead or stuck peer ends the
  job with an error naming the rank and the operation (NCCL's wait after the backward pass also watches
  ncclCommGetAsyncError and aborts its communicators; the overlapped NCCL sums are waited for inside the step,
  with no timeout, and their asynchronous errors checked after it); an error on one rank calls MPI_Abort,
  which ends every rank (mpirun and srun report it); SIGTERM from the launcher prints which rank was stopped
  and why, and exits. A dead rank is usually noticed first by the launcher, which stops the others (mpirun at
  once; srun with --kill-on-bad-exit).
"""
import ctypes
import os
import pickle
import signal
import sys
import threading
import time

import numpy as np

# DDP's default bucket size (MPI); ALEXNET_BUCKET_BYTES overrides it (the tests make it tiny to get many
# buckets; 0 turns the overlap off, MPI and NCCL: one all-reduce of every gradient after the backward pass).
BUCKET_BYTES = int(os.environ.get("ALEXNET_BUCKET_BYTES", 25 << 20))
DEFAULT_TIMEOUT = 1800.0  # seconds a rank waits on the others (a checkpoint of rank 0 or the demo data included)

# Launchers and the variable holding the number of processes they started.
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


class CommError(RuntimeError):
    """Another rank did not answer in time, or a collective failed."""


def launched_size(env=None):
    """How many processes the launcher started (1 when none did)."""
    env = os.environ if env is None else env
    for var in _SIZE_VARS:
        v = env.get(var, "")
        if v.strip().isdigit() and int(v) > 1:
            return int(v)
    return 1


def init(timeout=DEFAULT_TIMEOUT):
    """The Dist of this process: one process (no MPI imported) unless a launcher started several."""
    n = launched_size()
    if n <= 1:
        return Dist()
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(f"started as one of {n} processes, but mpi4py is not importable ({e}): install it "
                           "against the launcher's MPI (pip install 'alexnet_cuda[mpi]' with the MPI "
                           "development files, e.g. apt-get install libopenmpi-dev)") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != n:
        raise RuntimeError(f"the launcher started {n} processes but MPI sees {comm.Get_size()}: mpi4py is built "
                           "against another MPI than the launcher's (rebuild it: pip install --no-binary mpi4py "
                           "--force-reinstall mpi4py)")
    return Dist(comm, MPI, timeout)


class Dist:
    """Rank, world size and the few collectives the trainer needs; without MPI, one process (no-ops)."""

    def __init__(self, comm=None, mpi=None, timeout=DEFAULT_TIMEOUT):
        self.comm, self.MPI, self.timeout = comm, mpi, float(timeout)
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.local_rank, self.local_size = self.rank, self.size
        self.agreed_exit = False  # set when every rank leaves by the same path (no MPI_Abort needed)
        self.thread_level_ok = True
        if comm is not None:
            local = comm.Split_type(mpi.COMM_TYPE_SHARED)
            self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
            local.Free()
            # Gradients are all-reduced from a communication thread while the main thread waits.
            self.thread_level_ok = mpi.Query_thread() >= mpi.THREAD_SERIALIZED
            self._install_signal_handlers()

    @property
    def is_root(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.size > 1

    def __repr__(self):
        return f"Dist(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"

    # ---- waiting, with a timeout ----

    def wait(self, requests, what):
        """Completes MPI requests, polling so that signals are handled and a silent peer becomes an error."""
        if not requests:
            return
        deadline = time.monotonic() + self.timeout
        pause = 1e-5
        while not self.MPI.Request.Testall(requests):
            if time.monotonic() > deadline:
                raise CommError(f"rank {self.rank}: no answer from the other ranks within {self.timeout:g} s "
                                f"({what}); a rank died or hangs (--comm-timeout sets the limit)")
            time.sleep(pause)
            pause = min(pause * 2, 2e-3)

    # ---- collectives ----

    def allreduce_sum(self, values, what="reducing metrics"):
        """Element-wise sum over ranks of a float64 vector (the same result on every rank)."""
        a = np.ascontiguousarray(values, dtype=np.float64).copy()
        if self.comm is None:
            return a
        self.wait([self.comm.Iallreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)], what)
        return a

    def bcast(self, obj, what="broadcast from rank 0"):
        """rank 0's obj on every rank (pickled; arrays travel as their bytes)."""
        if self.comm is None:
            return obj
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.is_root else b""
        n = np.array([len(data)], np.int64)
        self.wait([self.comm.Ibcast(n, root=0)], what)
        buf = np.frombuffer(data, np.uint8).copy() if self.is_root else np.empty(int(n[0]), np.uint8)
        self.wait([self.comm.Ibcast(buf, root=0)], what)
        return obj if self.is_root else pickle.loads(buf.tobytes())

    def barrier(self, what="barrier"):
        if self.comm is not None:
            self.wait([self.comm.Ibarrier()], what)

    def on_root(self, fn, what="setup on rank 0"):
        """fn() on rank 0, its result on every rank; an exception there is raised on every rank (so each
        prints the same one-line error and they exit together)."""
        if self.comm is None:
            return fn()
        out = None
        if self.is_root:
            try:
                out = ("ok", fn())
            except Exception as e:  # noqa: BLE001 - raised again on every rank
                out = ("error", _portable(e))
        out = self.bcast(out, what)
        if out[0] == "error":
            self.agreed_exit = True
            raise out[1]
        return out[1]

    def abort(self, code=1):
        """Ends every rank of the job now (MPI_Abort); never returns."""
        sys.stdout.flush()
        sys.stderr.flush()
        if self.comm is not None:
            self.comm.Abort(int(code) or 1)
        os._exit(int(code) or 1)

    # ---- signals ----

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return
        rank = self.rank

        def on_term(signum, frame):
            print(f"alexnet_cuda: error: rank {rank}: stopped by signal {signal.Signals(signum).name} from the "
                  "launcher (another rank failed, or the job was cancelled)", file=sys.stderr, flush=True)
            os._exit(128 + signum)  # no MPI_Finalize: it would wait for ranks that are gone

        try:
            signal.signal(signal.SIGTERM, on_term)
        except (ValueError, OSError):
            pass


def _portable(e):
    """The exception itself if it survives pickling, else a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(str(e))


def shard_devices(devices, dist, cuda_count):
    """The CUDA devices of this rank. With several ranks on a node that all see its every GPU, `--devices`
    names one rank's devices and local rank r takes them shifted by r times the number it names (cuda:0 ->
    cuda:r for one GPU per rank); when each rank sees only its own GPUs (srun --gpus-per-task, or
    CUDA_VISIBLE_DEVICES per rank) they are taken as named."""
    devices = list(devices)
    cuda = sorted({int(d.split(":")[1]) for d in devices if str(d).startswith("cuda:")})
    if dist.local_size <= 1 or not cuda:
        return devices
    per = max(cuda) + 1
    if cuda_count < per * dist.local_size:
        return devices
    return [f"cuda:{int(d.split(':')[1]) + per * dist.local_rank}" if str(d).startswith("cuda:") else d
            for d in devices]


# ---- the gradient all-reduce ----------------------------------------------------------------------------

class GradientAllReduce:
    """Sums the net's gradients over the ranks between the backward pass and the SGD update.

        sync = GradientAllReduce(dist, net, global_batch)
        stats = net.train_step(x_local, y_local, lr)   # forward + backward only (defer_sgd); CPU: buckets start
        sync.finish()                                  # every gradient now holds the global batch's mean
        net.apply_sgd(lr)
    """

    def __init__(self, dist, net, global_batch, bucket_bytes=BUCKET_BYTES):
        if global_batch % dist.size:
            raise ValueError(f"batch size {global_batch} is not divisible by the {dist.size} ranks "
                             "(--batch-size is the global batch)")
        self.dist, self.net = dist, net
        self.local_batch = global_batch // dist.size
        self.cuda = any(str(d).startswith("cuda") for d in net.devices)
        self.towers = int(net.config["towers"])
        self.layers = len(net.layers())
        self.bucket_bytes = int(bucket_bytes)
        overlap = not self.cuda and dist.thread_level_ok and dist.distributed and self.bucket_bytes > 0
        # CUDA: each layer's sums are issued on the device's upload stream as its backward pass makes them.
        self._cuda_overlap = self.cuda and dist.distributed and self.bucket_bytes > 0
        self._overlap = overlap
        self._cond = threading.Condition()
        self._job = None
        self._buffers = {}
        if self.cuda and dist.distributed:
            self._nccl = Nccl.load()
            self._comms = self._nccl.communicators(dist, sorted(set(net.devices)))
        hook = self._grad_ready if overlap else self._nccl_ready if self._cuda_overlap else None
        net.set_data_parallel(True, mean_over=global_batch, sample_base=dist.rank * self.local_batch, grad_ready=hook)

    # CUDA, called on the host as the backward pass is issued, with the device's upload stream: the sums run
    # there after the layer's gradients, while the tower's stream goes on with the layers below.
    def _nccl_ready(self, layer, tower, dw, db, stream):
        comm = self._comms[dw.device]
        self._nccl.allreduce([(dw.data_ptr, dw.numel, comm), (db.data_ptr, db.numel, comm)], stream)

    # CPU, called by the towers' workers during backward (the GIL is taken for the call)
    def _grad_ready(self, layer, tower, dw, db, stream=0):
        with self._cond:
            job = self._job
            if job is None:
                return
            job["views"][(layer, tower)] = (dw.host_view(), db.host_view())
            self._cond.notify_all()

    def start(self):
        """Before the step: the communication thread waits for each layer's gradients, in backward order."""
        if not self.dist.distributed or not self._overlap:
            return
        job = {"views": {}, "cancel": False, "done": threading.Event(), "error": None}
        with self._cond:
            self._job = job
        threading.Thread(target=self._run, args=(job,), name="alexnet-allreduce", daemon=True).start()

    def cancel(self):
        """The step failed: stop waiting for gradients that will not come."""
        with self._cond:
            if self._job is not None:
                self._job["cancel"] = True
                self._cond.notify_all()
            self._job = None

    def _run(self, job):
        try:
            self._reduce_buckets(job)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            job["error"] = e
        finally:
            job["done"].set()

    def _reduce_buckets(self, job):
        MPI, comm, dist = self.dist.MPI, self.dist.comm, self.dist
        deadline = time.monotonic() + dist.timeout
        pending = []  # (request, unpack)
        bucket, nbytes, index = [], 0, 0
        for layer in range(self.layers - 1, -1, -1):
            for tower in range(self.towers):
                key = (layer, tower)
                with self._cond:
                    while key not in job["views"] and not job["cancel"]:
                        # Drives the MPI progress of the buckets in flight while the backward pass runs.
                        if pending:
                            self._cond.release()
                            try:
                                MPI.Request.Testall([p[0] for p in pending])
                            finally:
                                self._cond.acquire()
                        self._cond.wait(0.001 if pending else 0.05)
                        if time.monotonic() > deadline:
                            raise CommError(f"rank {dist.rank}: the backward pass did not produce layer {layer}'s "
                                            f"gradients within {dist.timeout:g} s")
                    if job["cancel"]:
                        return
                    dw, db = job["views"][key]
                bucket += [dw, db]
                nbytes += dw.nbytes + db.nbytes
            if nbytes >= self.bucket_bytes or layer == 0:
                pending.append(self._issue(bucket, index, comm, MPI))
                bucket, nbytes, index = [], 0, index + 1
        dist.wait([p[0] for p in pending], "all-reducing the gradients")
        for _, unpack in pending:
            unpack()

    def _issue(self, arrays, index, comm, MPI):
        if len(arrays) == 1:
            return comm.Iallreduce(MPI.IN_PLACE, arrays[0], op=MPI.SUM), (lambda: None)
        total = sum(a.size for a in arrays)
        flat = self._buffers.get(index)
        if flat is None or flat.size != total:
            flat = self._buffers[index] = np.empty(total, np.float32)
        o = 0
        for a in arrays:
            flat[o:o + a.size] = a.reshape(-1)
            o += a.size

        def unpack():
            k = 0
            for a in arrays:
                a.reshape(-1)[:] = flat[k:k + a.size]
                k += a.size

        return comm.Iallreduce(MPI.IN_PLACE, flat, op=MPI.SUM), unpack

    def finish(self):
        """After the step's backward pass: waits until every gradient is summed over the ranks."""
        dist = self.dist
        if not dist.distributed:
            return
        if self._cuda_overlap:
            # The step ended when its upload streams did, so the sums are done: only NCCL's errors are left.
            self._nccl.check_async(self._comms)
            return
        if self.cuda:
            self._nccl.allreduce_grads(self.net, self._comms, dist.timeout, dist.rank)
            return
        if not self._overlap:
            # One flat all-reduce after the backward pass (ALEXNET_BUCKET_BYTES=0, or an MPI without threads).
            views = [t.host_view() for _, t in self.net.grads()]
            total = sum(v.size for v in views)
            flat = np.concatenate([v.reshape(-1) for v in views]) if total else np.empty(0, np.float32)
            dist.wait([dist.comm.Iallreduce(dist.MPI.IN_PLACE, flat, op=dist.MPI.SUM)], "all-reducing the gradients")
            k = 0
            for v in views:
                v.reshape(-1)[:] = flat[k:k + v.size]
                k += v.size
            return
        with self._cond:
            job = self._job
        if job is None:
            raise RuntimeError("GradientAllReduce.finish without start")
        deadline = time.monotonic() + dist.timeout + 1.0
        while not job["done"].wait(0.05):
            if time.monotonic() > deadline:
                raise CommError(f"rank {dist.rank}: the gradient all-reduce did not finish within {dist.timeout:g} s")
        with self._cond:
            self._job = None
        if job["error"] is not None:
            raise job["error"]


# ---- NCCL through ctypes ----------------------------------------------------------------------------------

class NcclUnavailable(RuntimeError):
    pass


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * 128)]  # NCCL_UNIQUE_ID_BYTES


_NCCL_FLOAT32, _NCCL_SUM = 7, 0  # ncclFloat32, ncclSum (nccl.h)


def nccl_candidates():
    """Where libnccl.so.2 is looked for, in order."""
    out = []
    env = os.environ.get("ALEXNET_NCCL_LIBRARY")
    if env:
        return [env]
    try:
        import nvidia.nccl  # the nvidia-nccl-cu13 (or -cu12) wheel: nvidia/nccl/lib/libnccl.so.2

        for p in getattr(nvidia.nccl, "__path__", []):
            out.append(os.path.join(p, "lib", "libnccl.so.2"))
    except ImportError:
        pass
    out.append("libnccl.so.2")  # the system's (ld.so's search path)
    return out


class Nccl:
    """The few NCCL calls the trainer makes, bound with ctypes on first use."""

    _loaded = None

    def __init__(self, lib, path):
        self.lib, self.path = lib, path
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetErrorString.argtypes = [ctypes.c_int]
        lib.ncclGetUniqueId.argtypes = [ctypes.POINTER(_UniqueId)]
        lib.ncclCommInitRank.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, _UniqueId, ctypes.c_int]
        lib.ncclAllReduce.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_void_p, ctypes.c_void_p]
        lib.ncclGetVersion.argtypes = [ctypes.POINTER(ctypes.c_int)]
        lib.ncclCommGetAsyncError.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
        lib.ncclCommAbort.argtypes = [ctypes.c_void_p]
        for f in ("ncclCommInitRank", "ncclAllReduce", "ncclGetUniqueId", "ncclGroupStart", "ncclGroupEnd",
                  "ncclGetVersion", "ncclCommDestroy", "ncclCommGetAsyncError", "ncclCommAbort"):
            getattr(lib, f).restype = ctypes.c_int

    @classmethod
    def load(cls):
        if cls._loaded is not None:
            return cls._loaded
        tried = []
        for path in nccl_candidates():
            try:
                lib = ctypes.CDLL(path)
            except OSError as e:
                tried.append(f"{path} ({e})")
                continue
            cls._loaded = cls(lib, path)
            return cls._loaded
        raise NcclUnavailable("NCCL is needed to all-reduce CUDA gradients across ranks, and libnccl.so.2 could not "
                              "be loaded: tried " + "; ".join(tried) + ". Install it (pip install nvidia-nccl-cu13, "
                              "or the system's libnccl2) or set ALEXNET_NCCL_LIBRARY to its path")

    def check(self, result, what):
        if result != 0:
            msg = self.lib.ncclGetErrorString(result)
            raise CommError(f"NCCL {what}: {msg.decode() if msg else 'error'} (ncclResult_t {result})")

    def version(self):
        v = ctypes.c_int()
        self.check(self.lib.ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
        return v.value


    def unique_id(self):
        uid = _UniqueId()
        self.check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return ctypes.string_at(ctypes.addressof(uid), 128)  # all 128 bytes (a c_char field stops at a NUL)

    def comm_init_rank(self, nranks, uid, rank):
        u = _UniqueId()
        ctypes.memmove(ctypes.byref(u), uid, 128)
        comm = ctypes.c_void_p()
        self.check(self.lib.ncclCommInitRank(ctypes.byref(comm), int(nranks), u, int(rank)), "ncclCommInitRank")
        return comm

    def communicators(self, dist, devices):
        """One communicator per CUDA device of this rank (the same position on every rank)."""
        from . import _C

        comms = {}
        for d in devices:
            uid = dist.bcast(self.unique_id() if dist.is_root else None, f"NCCL id for {d}")
            comms[d] = _C._with_device(d, lambda uid=uid: self.comm_init_rank(dist.size, uid, dist.rank))
        return comms


    def allreduce(self, pairs, stream=0):
        """In-place float32 sums: pairs of (device pointer, element count, communicator), in one group."""
        self.check(self.lib.ncclGroupStart(), "ncclGroupStart")
        try:
            for ptr, count, comm in pairs:
                self.check(self.lib.ncclAllReduce(ctypes.c_void_p(ptr), ctypes.c_void_p(ptr), ctypes.c_size_t(count),
                                                  _NCCL_FLOAT32, _NCCL_SUM, comm, ctypes.c_void_p(stream)),
                           "ncclAllReduce")
        finally:
            self.check(self.lib.ncclGroupEnd(), "ncclGroupEnd")

    def allreduce_grads(self, net, comms, timeout=DEFAULT_TIMEOUT, rank=0):
        """Sums every gradient of the net over the ranks, on the legacy default stream of each device (the
        net's streams are idle between its steps), and waits for it: in a thread, so that this one can watch
        NCCL's asynchronous errors and the timeout (then the communicators are aborted and CommError raised)."""
        from . import _C

        grads = net.grads()
        self.allreduce([(t.data_ptr, t.numel, comms[t.device]) for _, t in grads])
        done, failed = threading.Event(), []

        def wait():
            try:
                for d in comms:
                    _C.synchronize(d)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                failed.append(e)
            finally:
                done.set()

        threading.Thread(target=wait, name="alexnet-nccl-wait", daemon=True).start()
        deadline = time.monotonic() + timeout
        while not done.wait(0.005):
            self.check_async(comms)
            if time.monotonic() > deadline:
                self._abort(comms)
                raise CommError(f"rank {rank}: the NCCL all-reduce of the gradients did not finish within "
                                f"{timeout:g} s; a rank died or hangs (--comm-timeout sets the limit)")
        if failed:
            raise failed[0]

    def check_async(self, comms):
        """CommError (the communicators aborted) if NCCL reports an asynchronous error on any of them."""
        for d, comm in comms.items():
            res = ctypes.c_int(0)
            self.check(self.lib.ncclCommGetAsyncError(comm, ctypes.byref(res)), "ncclCommGetAsyncError")
            if res.value != 0:
                self._abort(comms)
                self.check(res.value, f"all-reduce on {d} (asynchronous error)")

    def _abort(self, comms):
        for comm in comms.values():
            self.lib.ncclCommAbort(comm)
