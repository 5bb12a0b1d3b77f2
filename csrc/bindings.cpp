// The only file that includes pybind11: alexnet_cuda._C (tensors, ops, runtime queries).
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <optional>
#include <sstream>
#include <type_traits>

#include "checked.h"
#include "cpu/gemm_kernel.h"
#include "cpu/parallel.h"
#include "net.h"
#include "ops.h"
#include "tensor.h"

namespace py = pybind11;
using namespace ax;

namespace {

// ---- arguments from Python: every conversion checks kind and range first and names the op and argument ----

std::string where(const char* op, const char* arg) { return std::string(op) + ": argument '" + arg + "' "; }

std::string type_name(const py::handle& v) { return py::str(py::type::of(v).attr("__name__")); }

bool is_numpy_number(const py::handle& v, const char* kind) {
    // Leaked on purpose: a static py::object would be released after the interpreter is finalized.
    static py::object* np = new py::object(py::module_::import("numpy"));
    return py::isinstance(v, np->attr(kind));
}

// A Python or NumPy integer (not a bool) as int64, or TypeError/ValueError naming op and arg.
int64_t int64_arg(const py::handle& v, const char* op, const char* arg) {
    if (py::isinstance<py::bool_>(v) || is_numpy_number(v, "bool_") ||
        !(py::isinstance<py::int_>(v) || is_numpy_number(v, "integer")))
        throw TypeError(where(op, arg) + "must be an int, got " + type_name(v));
    py::int_ i = py::reinterpret_steal<py::int_>(PyNumber_Index(v.ptr()));
    if (!i) throw py::error_already_set();
    int overflow = 0;
    const long long r = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
    if (overflow) throw ValueError(where(op, arg) + "is " + std::string(py::str(i)) + ", outside the 64-bit range");
    return r;
}

// An int that must fit the int32 the ops take (their own checks then apply the op's range).
int int_arg(const py::handle& v, const char* op, const char* arg) {
    const int64_t r = int64_arg(v, op, arg);
    if (r < INT32_MIN || r > INT32_MAX)
        throw ValueError(where(op, arg) + "is " + std::to_string(r) + ", outside the int32 range [-2^31, 2^31-1]");
    return static_cast<int>(r);
}

uint64_t uint64_arg(const py::handle& v, const char* op, const char* arg) {
    if (py::isinstance<py::bool_>(v) || is_numpy_number(v, "bool_") ||
        !(py::isinstance<py::int_>(v) || is_numpy_number(v, "integer")))
        throw TypeError(where(op, arg) + "must be an int, got " + type_name(v));
    py::int_ i = py::reinterpret_steal<py::int_>(PyNumber_Index(v.ptr()));
    if (!i) throw py::error_already_set();
    const unsigned long long r = PyLong_AsUnsignedLongLong(i.ptr());
    if (PyErr_Occurred()) {
        PyErr_Clear();
        throw ValueError(where(op, arg) + "is " + std::string(py::str(i)) + ", outside [0, 2^64-1]");
    }
    return r;
}

// A real number (Python int or float, NumPy integer or floating; not a bool, str or complex) as float32.
// Range and finiteness are the op's to check (a double beyond float32 becomes inf, which they reject).
float float_arg(const py::handle& v, const char* op, const char* arg) {
    if (py::isinstance<py::bool_>(v) || is_numpy_number(v, "bool_") ||
        !(py::isinstance<py::float_>(v) || py::isinstance<py::int_>(v) || is_numpy_number(v, "integer") ||
          is_numpy_number(v, "floating")))
        throw TypeError(where(op, arg) + "must be a real number, got " + type_name(v));
    const double d = PyFloat_AsDouble(v.ptr());
    if (PyErr_Occurred()) {
        PyErr_Clear();
        throw ValueError(where(op, arg) + "is out of range for a float");
    }
    return static_cast<float>(d);
}

// An int or a pair of ints, e.g. stride=4 or stride=(4, 4); raises TypeError naming op and arg.
std::pair<int, int> pair_arg(const py::handle& v, const char* op, const char* arg) {
    if (py::isinstance<py::int_>(v) || is_numpy_number(v, "integer")) {
        const int i = int_arg(v, op, arg);
        return {i, i};
    }
    if (!py::isinstance<py::str>(v) && !py::isinstance<py::bytes>(v) && py::isinstance<py::sequence>(v)) {
        auto s = py::reinterpret_borrow<py::sequence>(v);
        if (s.size() == 2) return {int_arg(s[0], op, arg), int_arg(s[1], op, arg)};
    }
    throw TypeError(where(op, arg) + "must be an int or a pair of ints");
}

Tensor tensor_arg(const py::handle& v, const char* op, const char* arg) {
    if (!py::isinstance<Tensor>(v))
        throw TypeError(where(op, arg) + "must be an alexnet_cuda Tensor, got " + type_name(v) +
                        (py::isinstance<py::array>(v) ? " (convert with alexnet_cuda.from_numpy)" : ""));
    return v.cast<Tensor>();
}

std::optional<Tensor> opt_tensor_arg(const py::handle& v, const char* op, const char* arg) {
    if (v.is_none()) return std::nullopt;
    return tensor_arg(v, op, arg);
}

// ---- arrays -----------------------------------------------------------------------------------------
// An array's buffer is read only after its dtype is known to hold exactly the bytes we read: never through
// a cast that may fail (py::array_t::ensure returns a null array for, e.g., a string or structured array,
// which is what crashed load_state_dict), and never reinterpreting a buffer of another item size.

bool native_order(const py::dtype& dt) {
    const char b = dt.byteorder();
    static const bool little = py::module_::import("sys").attr("byteorder").cast<std::string>() == "little";
    return b == '=' || b == '|' || (b == '<' && little) || (b == '>' && !little);
}

// The DType whose bytes `dt` holds exactly (kind, size and byte order), or nothing.
std::optional<DType> exact_dtype(const py::dtype& dt) {
    if (dt.has_fields() || !native_order(dt)) return std::nullopt;
    const char k = dt.kind();
    const auto n = dt.itemsize();
    if (k == 'f' && n == 4) return DType::f32;
    if (k == 'u' && n == 1) return DType::u8;
    if (k == 'i' && n == 4) return DType::i32;
    return std::nullopt;
}

py::array array_arg(const py::handle& v, const char* op, const char* arg) {
    if (!py::isinstance<py::array>(v))
        throw TypeError(where(op, arg) + "must be a numpy.ndarray, got " + type_name(v));
    return py::reinterpret_borrow<py::array>(v);
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()); }

Tensor from_numpy(const py::handle& obj, const py::handle& device_obj) {
    const char* op = "from_numpy";
    py::array a = array_arg(obj, op, "array");
    const auto dt = exact_dtype(a.dtype());
    if (!dt)
        throw TypeError(where(op, "array") + "has dtype " + dtype_str(a) +
                        "; expected float32, uint8 or int32 in native byte order (convert with array.astype)");
    if (!(a.flags() & py::array::c_style))
        throw ValueError(where(op, "array") + "is not C-contiguous (use numpy.ascontiguousarray)");
    if (!py::isinstance<py::str>(device_obj))
        throw TypeError(where(op, "device") + "must be a str, got " + type_name(device_obj));
    const Device dev = Device::parse(device_obj.cast<std::string>(), op, "device");
    std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
    Tensor host = Tensor::empty(shape, *dt, Device{});
    if (host.nbytes() != static_cast<size_t>(a.nbytes()))  // cannot differ once the dtype matched; never copy past either
        throw ValueError(where(op, "array") + "holds " + std::to_string(a.nbytes()) + " bytes, expected " +
                         std::to_string(host.nbytes()));
    if (host.nbytes()) std::memcpy(host.raw(), a.data(), host.nbytes());
    if (dev.is_cpu()) return host;
    py::gil_scoped_release nogil;
    return host.to(dev);
}

py::array to_numpy(const Tensor& t) {
    if (!t.defined()) throw ValueError("numpy: tensor is undefined");
    Tensor host;
    {
        py::gil_scoped_release nogil;
        host = t.device().is_cpu() ? t : t.to(Device{});
    }
    std::vector<py::ssize_t> shape(t.shape().begin(), t.shape().end());
    py::array out;
    switch (t.dtype()) {
        case DType::f32: out = py::array_t<float>(shape); break;
        case DType::u8: out = py::array_t<uint8_t>(shape); break;
        case DType::i32: out = py::array_t<int32_t>(shape); break;
    }
    if (host.nbytes()) std::memcpy(out.mutable_data(), host.raw(), host.nbytes());
    return out;
}

// ---- Net glue -------------------------------------------------------------------------------------

template <typename T>
T cfg_get(const py::dict& d, const char* key) {
    if (!d.contains(key)) throw ValueError(std::string("Net: config is missing '") + key + "'");
    const py::object v = d[key];
    const std::string arg = std::string("config['") + key + "']";
    // Numbers go through the checked converters: an int beyond int32 or a NaN is named, not mis-typed.
    if constexpr (std::is_same_v<T, int>) {
        return int_arg(v, "Net", arg.c_str());
    } else if constexpr (std::is_same_v<T, float>) {
        const float f = float_arg(v, "Net", arg.c_str());
        if (!std::isfinite(f)) throw ValueError(where("Net", arg.c_str()) + "must be finite (and fit a float32)");
        return f;
    } else if constexpr (std::is_same_v<T, bool>) {
        if (py::isinstance<py::bool_>(v) || is_numpy_number(v, "bool_")) return v.cast<bool>();
        if (py::isinstance<py::int_>(v) || is_numpy_number(v, "integer")) {  // 0 and 1, as a config file may spell them
            const int64_t i = int64_arg(v, "Net", arg.c_str());
            if (i == 0 || i == 1) return i == 1;
        }
        throw TypeError(where("Net", arg.c_str()) + "must be a bool, got " + std::string(py::repr(v)));
    } else if constexpr (std::is_same_v<T, std::vector<int>>) {
        if (py::isinstance<py::str>(v) || !py::isinstance<py::sequence>(v))
            throw TypeError(where("Net", arg.c_str()) + "must be a list of ints, got " + type_name(v));
        std::vector<int> out;
        for (auto item : py::reinterpret_borrow<py::sequence>(v)) out.push_back(int_arg(item, "Net", arg.c_str()));
        return out;
    } else {
        try {
            return v.cast<T>();
        } catch (const py::cast_error&) {
            throw TypeError(std::string("Net: config entry '") + key + "' has the wrong type (" + type_name(v) + ")");
        }
    }
}

NetConfig config_from_dict(const py::dict& d) {
    NetConfig c;
    c.input_size = cfg_get<int>(d, "input_size");
    c.in_channels = cfg_get<int>(d, "in_channels");
    c.num_classes = cfg_get<int>(d, "num_classes");
    c.towers = cfg_get<int>(d, "towers");
    py::dict conv1 = cfg_get<py::dict>(d, "conv1");
    c.conv1_kernel = cfg_get<int>(conv1, "kernel");
    c.conv1_stride = cfg_get<int>(conv1, "stride");
    c.conv1_padding = cfg_get<int>(conv1, "padding");
    c.channels = cfg_get<std::vector<int>>(d, "channels");
    c.fc = cfg_get<std::vector<int>>(d, "fc");
    c.lrn = cfg_get<bool>(d, "lrn");
    c.lrn_size = cfg_get<int>(d, "lrn_size");
    c.lrn_k = cfg_get<float>(d, "lrn_k");
    c.lrn_alpha = cfg_get<float>(d, "lrn_alpha");
    c.lrn_beta = cfg_get<float>(d, "lrn_beta");
    c.overlap_pool = cfg_get<bool>(d, "overlap_pool");
    c.dropout = cfg_get<float>(d, "dropout");
    c.drop_layers = cfg_get<std::vector<std::string>>(d, "drop_layers");
    c.momentum = cfg_get<float>(d, "momentum");
    c.weight_decay = cfg_get<float>(d, "weight_decay");
    c.bias_weight_decay = cfg_get<float>(d, "bias_weight_decay");
    c.init_std = cfg_get<float>(d, "init_std");
    return c;
}

// Images for the Net: a float32 (N, C, S, S) array, exactly (no silent cast from another dtype); made
// C-contiguous if it is not. Returns the array to read and N.
std::pair<py::array, int> images_arg(const Net& net, const py::handle& obj, const char* op) {
    py::array a = array_arg(obj, op, "images");
    if (exact_dtype(a.dtype()) != DType::f32)
        throw TypeError(where(op, "images") + "must be float32, got " + dtype_str(a));
    const auto& c = net.config();
    if (a.ndim() != 4 || a.shape(1) != c.in_channels || a.shape(2) != c.input_size || a.shape(3) != c.input_size)
        throw ValueError(where(op, "images") + "must have shape (N, " + std::to_string(c.in_channels) + ", " +
                         std::to_string(c.input_size) + ", " + std::to_string(c.input_size) + ")");
    checked::check_elements(op, "images", std::vector<int64_t>(a.shape(), a.shape() + 4));
    const int n = checked::to_int(op, "images", a.shape(0));
    if (!(a.flags() & py::array::c_style)) a = py::module_::import("numpy").attr("ascontiguousarray")(a);
    return {a, n};
}

// An array of exactly `dt` (no silent cast) and shape `want` (-1: any size), made C-contiguous.
py::array exact_arg(const py::handle& obj, const char* op, const char* arg, DType dt, const std::vector<int64_t>& want,
                    const char* shape_doc) {
    py::array a = array_arg(obj, op, arg);
    if (exact_dtype(a.dtype()) != dt)
        throw TypeError(where(op, arg) + "must be " + dtype_name(dt) + ", got " + dtype_str(a));
    bool ok = a.ndim() == static_cast<py::ssize_t>(want.size());
    for (size_t i = 0; ok && i < want.size(); ++i) ok = want[i] < 0 || a.shape(i) == want[i];
    if (!ok) throw ValueError(where(op, arg) + "must have shape " + shape_doc);
    if (!(a.flags() & py::array::c_style)) a = py::module_::import("numpy").attr("ascontiguousarray")(a);
    return a;
}

// Labels for the Net: an integer array of shape (n,) whose every value is in [0, classes), checked in the
// array's own dtype before it is narrowed to int32 (so 2^32 + 1 is an error, not class 1).
std::vector<int32_t> labels_arg(const py::handle& obj, int n, int classes, const char* op, const char* arg) {
    py::array a = array_arg(obj, op, arg);
    const char k = a.dtype().kind();
    if (a.dtype().has_fields() || (k != 'i' && k != 'u'))
        throw TypeError(where(op, arg) + "must hold integers, got dtype " + dtype_str(a));
    if (a.ndim() != 1 || a.shape(0) != n)
        throw ValueError(where(op, arg) + "must have shape (" + std::to_string(n) + ",)");
    std::vector<int32_t> out(static_cast<size_t>(n));
    if (n == 0) return out;
    py::module_ np = py::module_::import("numpy");
    // NumPy compares any integer dtype with a Python int exactly (pybind11's `<` would ask for one bool).
    py::object bad = np.attr("flatnonzero")(
        np.attr("logical_or")(np.attr("less")(a, py::int_(0)), np.attr("greater_equal")(a, py::int_(classes))));
    if (py::len(bad) > 0) {
        const py::object i = bad[py::int_(0)];
        throw ValueError(where(op, arg) + "holds " + std::string(py::str(a[i])) + " at " +
                         std::string(py::str(i)) + ", outside [0, " + std::to_string(classes) + ")");
    }
    py::array l = np.attr("ascontiguousarray")(a, "int32");  // exact: every value is in [0, classes)
    std::memcpy(out.data(), l.data(), sizeof(int32_t) * out.size());
    return out;
}

// One uint8 batch for Net::train_step_u8, its arrays checked (dtype exactly, shapes) and kept alive; the
// names in messages carry `prefix` ("prefetch." for the batch to prefetch).
struct U8Args {
    py::array img, off, fl, li;
    std::vector<int32_t> lab;
    Net::U8Batch b;
    U8Args(const Net& net, const py::object& images, const py::object& offsets, const py::object& flips,
           const py::object& light, const py::object& labels, const std::string& prefix) {
        const char* op = "train_step_u8";
        auto name = [&](const char* a) { return prefix + a; };
        img = exact_arg(images, op, name("images").c_str(), DType::u8, {-1, -1, -1, 3}, "(N, H, W, 3)");
        checked::check_elements(op, name("images").c_str(), std::vector<int64_t>(img.shape(), img.shape() + 4));
        const int n = checked::to_int(op, name("images").c_str(), img.shape(0));
        const std::string ns = std::to_string(n);
        off = exact_arg(offsets, op, name("offsets").c_str(), DType::i32, {n, 2}, ("(" + ns + ", 2)").c_str());
        fl = exact_arg(flips, op, name("flips").c_str(), DType::u8, {n}, ("(" + ns + ",)").c_str());
        li = exact_arg(light, op, name("light").c_str(), DType::f32, {n, 3}, ("(" + ns + ", 3)").c_str());
        lab = labels_arg(labels, n, net.config().num_classes, op, name("labels").c_str());
        b.images = static_cast<const uint8_t*>(img.data());
        b.n = n;
        b.H = checked::to_int(op, name("images").c_str(), img.shape(1));
        b.W = checked::to_int(op, name("images").c_str(), img.shape(2));
        b.offsets = static_cast<const int32_t*>(off.data());
        b.flips = static_cast<const uint8_t*>(fl.data());
        b.light = static_cast<const float*>(li.data());
        b.labels = lab.data();
    }
};

py::dict result_dict(const StepResult& r);

py::dict u8_step(Net& net, const U8Args* cur, const py::object& lr_obj, const py::object& prefetch) {
    const float lr = float_arg(lr_obj, "train_step_u8", "lr");
    std::unique_ptr<U8Args> next;
    if (!prefetch.is_none()) {
        if (!py::isinstance<py::tuple>(prefetch) || py::len(prefetch) != 5)
            throw TypeError("train_step_u8: argument 'prefetch' must be None or a tuple (images, offsets, flips, light, "
                            "labels), got " + type_name(prefetch));
        const py::tuple p = py::reinterpret_borrow<py::tuple>(prefetch);
        next = std::make_unique<U8Args>(net, p[0], p[1], p[2], p[3], p[4], "prefetch.");
    }
    StepResult r;
    {
        py::gil_scoped_release nogil;
        r = net.train_step_u8(cur ? &cur->b : nullptr, lr, next ? &next->b : nullptr);
    }
    return result_dict(r);
}


// A part of a staging slot as a writable NumPy view of the slot's own (pinned) memory; the view holds the
// slot, so the memory outlives the ring's hold on it for as long as the view does.
py::array slot_view(const Net::StagingSlot& s, void* ptr, py::dtype dt, std::vector<py::ssize_t> shape) {
    auto* keep = new std::shared_ptr<Net::HostSlot>(s.slot);
    py::capsule owner(keep, [](void* p) { delete static_cast<std::shared_ptr<Net::HostSlot>*>(p); });
    return py::array(dt, shape, ptr, owner);
}

const Net::StagingSlot* slot_arg(const py::handle& v, const char* op, const char* arg) {
    if (!py::isinstance<Net::StagingSlot>(v))
        throw TypeError(std::string(op) + ": argument '" + arg + "' must be a StagingSlot (from Net.staging_slot)" +
                        (std::string(arg) == "slot" ? " or None" : "") + ", got " + type_name(v));
    return v.cast<const Net::StagingSlot*>();
}

py::dict staged_step(Net& net, const py::object& slot, const py::object& lr_obj, const py::object& prefetch) {
    const char* op = "train_step_staged";
    const float lr = float_arg(lr_obj, op, "lr");
    const Net::StagingSlot* cur = slot.is_none() ? nullptr : slot_arg(slot, op, "slot");
    Net::PrefetchFn fn;
    if (!prefetch.is_none()) {
        if (py::isinstance<Net::StagingSlot>(prefetch)) {
            const Net::StagingSlot s = prefetch.cast<Net::StagingSlot>();
            fn = [s]() -> std::optional<Net::StagingSlot> { return s; };
        } else if (PyCallable_Check(prefetch.ptr())) {
            // Called on this thread while the step computes, with the GIL taken back for it.
            fn = [prefetch, op]() -> std::optional<Net::StagingSlot> {
                py::gil_scoped_acquire gil;
                py::object r = prefetch();
                if (r.is_none()) return std::nullopt;
                return *slot_arg(r, op, "prefetch");
            };
        } else {
            throw TypeError("train_step_staged: argument 'prefetch' must be None, a StagingSlot or a callable "
                            "returning one (or None), got " + type_name(prefetch));
        }
    }
    StepResult r;
    {
        py::gil_scoped_release nogil;
        r = net.train_step_staged(cur, lr, fn);
    }
    return result_dict(r);
}


// One state-dict entry as a host float32 tensor of the shape `want`. The dtype is checked first (floating
// point only: not str, bytes, object, structured, complex, bool or integer), then the shape, and only
// then is the buffer read, through NumPy's own conversion to exactly the dtype being read. Values must be
// finite in float32: a float64 beyond float32's range is an error, not inf.
Tensor state_entry(const std::string& name, const py::handle& obj, const std::vector<int64_t>& want) {
    const std::string where_ = "load_state_dict: entry '" + name + "' ";
    if (!py::isinstance<py::array>(obj))
        throw TypeError(where_ + "must be a numpy.ndarray, got " + type_name(obj));
    py::array a = py::reinterpret_borrow<py::array>(obj);
    if (a.dtype().has_fields() || a.dtype().kind() != 'f')
        throw TypeError(where_ + "has dtype " + dtype_str(a) + "; expected a floating-point array");
    const std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
    if (shape != want)
        throw ValueError(where_ + "has shape " + checked::shape_str(shape) + ", the net has " + checked::shape_str(want));
    Tensor t = Tensor::empty(shape, DType::f32, Device{});
    float* dst = t.data<float>();
    const int64_t n = t.numel();
    py::module_ np = py::module_::import("numpy");
    auto not_finite = [&](int64_t i, const std::string& v) {
        return ValueError(where_ + "holds " + v + " at flat index " + std::to_string(i) +
                          ", which is not a finite float32 (parameters and momentum must be finite)");
    };
    if (exact_dtype(a.dtype()) == DType::f32) {
        py::array c = np.attr("ascontiguousarray")(a);
        const float* src = static_cast<const float*>(c.data());
        for (int64_t i = 0; i < n; ++i) {
            if (!std::isfinite(src[i])) throw not_finite(i, std::to_string(src[i]));
            dst[i] = src[i];
        }
    } else {
        py::array c = np.attr("ascontiguousarray")(a, "float64");
        if (exact_dtype(c.dtype()).has_value() || c.dtype().kind() != 'f' || c.dtype().itemsize() != 8)
            throw TypeError(where_ + "could not be converted to float64");
        const double* src = static_cast<const double*>(c.data());
        for (int64_t i = 0; i < n; ++i) {
            if (!std::isfinite(src[i]) || std::fabs(src[i]) > FLT_MAX) {
                std::ostringstream o;
                o << src[i];
                throw not_finite(i, o.str());
            }
            dst[i] = static_cast<float>(src[i]);
        }
    }
    return t;
}

py::dict result_dict(const StepResult& r) {
    py::dict d;
    d["loss"] = r.loss;
    d["top1"] = r.top1;
    d["top5"] = r.top5;
    d["n"] = r.n;
    return d;
}

}  // namespace


PYBIND11_MODULE(_C, m) {
    m.doc() = "alexnet_cuda compiled core: tensors, the CPU and CUDA backends of every op, the net and its scheduler";

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const ax::TypeError& e) {
            PyErr_SetString(PyExc_TypeError, e.what());
        } catch (const ax::ValueError& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        } catch (const ax::OutOfMemory& e) {
            PyErr_SetString(PyExc_MemoryError, e.what());
        }
    });

    py::class_<Tensor>(m, "Tensor", "A contiguous float32/uint8/int32 array on 'cpu' or 'cuda:N'.")
        .def_property_readonly("shape", [](const Tensor& t) { return py::tuple(py::cast(t.shape())); })
        .def_property_readonly("dtype", [](const Tensor& t) { return std::string(dtype_name(t.dtype())); })
        .def_property_readonly("device", [](const Tensor& t) { return t.device().str(); })
        .def_property_readonly("numel", &Tensor::numel)
        .def_property_readonly("nbytes", &Tensor::nbytes)
        .def("numpy", &to_numpy, "Copy to a new NumPy array (synchronizes with the producing stream).")
        .def_property_readonly("data_ptr", [](const Tensor& t) { return reinterpret_cast<uintptr_t>(t.raw()); },
                               "The address of the first element (a device pointer on CUDA), for NCCL.")
        .def(
            "host_view",
            [](const Tensor& t) {
                // A NumPy array over the tensor's own memory, which it keeps alive: what MPI all-reduces in place.
                if (!t.defined() || !t.device().is_cpu())
                    throw ValueError("host_view: the tensor must be defined and on the cpu, got " +
                                     (t.defined() ? t.device().str() : std::string("an undefined tensor")));
                if (t.dtype() != DType::f32) throw TypeError("host_view: only float32 tensors have a view");
                std::vector<py::ssize_t> shape(t.shape().begin(), t.shape().end());
                auto* keep = new Tensor(t);
                py::capsule owner(keep, [](void* p) { delete static_cast<Tensor*>(p); });
                return py::array_t<float>(shape, t.data<float>(), owner);
            },
            "A writable float32 NumPy view of a CPU tensor's memory (no copy).")
        .def(
            "to",
            [](const Tensor& t, const std::string& device) {
                const Device d = Device::parse(device, "to", "device");
                py::gil_scoped_release nogil;
                return t.to(d);
            },
            py::arg("device"))
        .def("__repr__", [](const Tensor& t) {
            return "Tensor(shape=" + t.shape_str() + ", dtype=" + dtype_name(t.dtype()) + ", device='" + t.device().str() +
                   "')";
        });

    m.def("from_numpy", [](const py::object& a, const py::object& device) { return from_numpy(a, device); },
          py::arg("array"), py::arg("device") = "cpu",
          "Copy a C-contiguous float32, uint8 or int32 NumPy array to a Tensor on `device`.");
    m.def("built_with_cuda", &built_with_cuda, "True if the CUDA backend was compiled into this build.");
    m.def("_arch_list_covers", &arch_list_covers, py::arg("archs"), py::arg("compute_capability"),
          "Whether a CMake CUDA architecture list has code for a GPU of this compute capability (e.g. 86).");
    m.def("_cuda_archs_built", [] {
#ifdef ALEXNET_CUDA_ARCHS_BUILT
        return std::string(ALEXNET_CUDA_ARCHS_BUILT);
#else
        return std::string();
#endif
    }, "The CUDA architectures this build was compiled for (empty without CUDA).");
    m.def("cuda_available", &cuda_available, "True if the CUDA backend is built and a GPU with a driver is present.");
    m.def("cuda_unavailable_reason", &cuda_unavailable_reason,
          "Why CUDA is unavailable (built without CUDA, no driver, no device); '' when it is available.");
    m.def("cuda_device_count", &cuda_device_count);
    m.def("set_poison_allocations", &set_poison_allocations, py::arg("on"),
          "Fill every new allocation with 0xFF bytes (NaN) so unwritten outputs show; for tests.");
    m.def(
        "_with_device",
        [](const std::string& device, const py::function& fn) {
            // NCCL creates a communicator on the current CUDA device: this makes `device` current around fn.
            DeviceGuard g(Device::parse(device, "_with_device", "device"));
            return fn();
        },
        py::arg("device"), py::arg("fn"), "Call fn() with `device` the current CUDA device.");
    m.def(
        "synchronize",
        [](const std::string& device) {
            const Device d = Device::parse(device, "synchronize");
            py::gil_scoped_release nogil;  // so another thread can watch the wait (distributed's NCCL timeout)
            cuda_synchronize(d);
        },
        py::arg("device") = "cuda:0");
    // The CPU backend's threads and GEMM instruction set (csrc/cpu/parallel.h, gemm_kernel.h). Results do not
    // depend on either (the portable kernel aside, see gemm_kernel.h); tests and benchmarks set them.
    m.def("_cpu_threads", &cpu::default_threads,
          "Threads the CPU ops called from Python use, and the budget a new Net splits between its CPU towers.");
    m.def("_cpu_set_threads", [](const py::object& n) {
              cpu::set_default_threads(int_arg(n, "_cpu_set_threads", "n"));
          }, py::arg("n"), "Set the CPU thread budget (n < 1: back to ALEXNET_CPU_THREADS or the CPU count).");
    m.def("_cpu_isa", &cpu::gemm_isa, "The CPU GEMM micro-kernel in use: 'avx512', 'avx2' or 'generic'.");
    m.def("_cpu_isa_supported", &cpu::gemm_isa_supported, py::arg("isa"));
    m.def("_cpu_set_isa", &cpu::set_gemm_isa, py::arg("isa"),
          "Force the CPU GEMM micro-kernel ('avx512', 'avx2', 'generic', or 'auto' for the best supported).");
    // Both caching allocators' counters as a dict; `mallocs` names the first (cudaMalloc or system calls).
    auto stats_dict = [](const AllocatorStats& s, const char* mallocs) {
        py::dict d;
        d[mallocs] = s.device_mallocs;
        d["bytes_in_use"] = s.bytes_in_use;
        d["bytes_cached"] = s.bytes_cached;
        d["peak_bytes_in_use"] = s.peak_bytes_in_use;
        return d;
    };
    m.def("cuda_allocator_stats", [stats_dict]() { return stats_dict(cuda_allocator_stats(), "device_mallocs"); });
    m.def("cuda_empty_cache", &cuda_empty_cache, "Return cached CUDA blocks to the driver.");
    m.def("cpu_allocator_stats", [stats_dict]() {
        py::dict d = stats_dict(cpu_allocator_stats(), "system_allocs");
        d["caching"] = cpu_caching_enabled();
        return d;
    }, "The CPU caching allocator: system allocations so far, bytes held by live tensors and in free lists, peak "
       "bytes in use, and whether caching is on (ALEXNET_NO_CPU_MEMORY_CACHING=1 turns it off).");
    m.def("cpu_empty_cache", &cpu_empty_cache, "Return every cached CPU block to the system.");
    m.def("cpu_trim_cache", &cpu_trim_cache,
          "Return the cached CPU blocks unused since the call before the previous one (Net does this every step).");
    m.def("cpu_reset_peak_stats", &cpu_reset_peak_stats, "Restart peak_bytes_in_use from the bytes in use now.");
    m.def("cuda_reset_peak_stats", &cuda_reset_peak_stats, "Restart peak_bytes_in_use from the bytes in use now.");
    m.def(
        "cuda_device_properties",
        [](int index) {
            auto p = cuda_device_properties(index);
            py::dict d;
            d["name"] = p.name;
            d["sm_count"] = p.sm_count;
            d["compute_capability"] = py::make_tuple(p.major, p.minor);
            d["total_memory"] = p.total_memory;
            return d;
        },
        py::arg("index") = 0);

    py::module_ o = m.def_submodule("ops", "Every op, forward and backward; see csrc/ops.h for the contracts.");
    // Every argument arrives as a Python object and is converted by the *_arg helpers above, so a wrong
    // kind or an out-of-range int is a TypeError/ValueError naming the op and the argument, never a
    // pybind11 "incompatible function arguments" or a RuntimeError from a failed cast.
    using obj = const py::object&;
    const auto none = py::none();

    o.def(
        "conv2d_forward",
        [](obj x, obj w, obj b, obj stride, obj padding, obj groups, obj relu) {
            const char* op = "conv2d_forward";
            const Tensor tx = tensor_arg(x, op, "x"), tw = tensor_arg(w, op, "w");
            const auto tb = opt_tensor_arg(b, op, "b");
            const auto s = pair_arg(stride, op, "stride"), p = pair_arg(padding, op, "padding");
            const int g = int_arg(groups, op, "groups");
            if (!py::isinstance<py::bool_>(relu))
                throw TypeError(where(op, "relu") + "must be a bool, got " + type_name(relu));
            const bool fr = relu.cast<bool>();
            py::gil_scoped_release r;
            return ops::conv2d_forward(tx, tw, tb, s.first, s.second, p.first, p.second, g, fr);
        },
        py::arg("x"), py::arg("w"), py::arg("b") = none, py::arg("stride") = 1, py::arg("padding") = 0,
        py::arg("groups") = 1, py::arg("relu") = false,
        "y = conv(x, w) + b; relu=True applies the ReLU in the same kernel (bit for bit relu_forward of it).");
    o.def(
        "conv2d_backward_input",
        [](obj dy, obj w, obj input_hw, obj stride, obj padding, obj groups, obj relu_y) {
            const char* op = "conv2d_backward_input";
            const Tensor tdy = tensor_arg(dy, op, "dy"), tw = tensor_arg(w, op, "w");
            const auto hw = pair_arg(input_hw, op, "input_hw");
            const auto s = pair_arg(stride, op, "stride"), p = pair_arg(padding, op, "padding");
            const int g = int_arg(groups, op, "groups");
            const auto ry = opt_tensor_arg(relu_y, op, "relu_y");
            py::gil_scoped_release r;
            return ops::conv2d_backward_input(tdy, tw, hw.first, hw.second, s.first, s.second, p.first, p.second, g,
                                              ry);
        },
        py::arg("dy"), py::arg("w"), py::arg("input_hw"), py::arg("stride") = 1, py::arg("padding") = 0,
        py::arg("groups") = 1, py::arg("relu_y") = none,
        "relu_y: the output of the ReLU that made x; dx then also goes back through it in the same kernel "
        "(bit for bit relu_backward(dx, relu_y)).");
    o.def(
        "conv2d_backward_weight",
        [](obj x, obj dy, obj kernel, obj stride, obj padding, obj groups) {
            const char* op = "conv2d_backward_weight";
            const Tensor tx = tensor_arg(x, op, "x"), tdy = tensor_arg(dy, op, "dy");
            const auto k = pair_arg(kernel, op, "kernel");
            const auto s = pair_arg(stride, op, "stride"), p = pair_arg(padding, op, "padding");
            const int g = int_arg(groups, op, "groups");
            py::gil_scoped_release r;
            return ops::conv2d_backward_weight(tx, tdy, k.first, k.second, s.first, s.second, p.first, p.second, g);
        },
        py::arg("x"), py::arg("dy"), py::arg("kernel"), py::arg("stride") = 1, py::arg("padding") = 0,
        py::arg("groups") = 1);
    o.def(
        "conv2d_backward_bias",
        [](obj dy) {
            const Tensor t = tensor_arg(dy, "conv2d_backward_bias", "dy");
            py::gil_scoped_release r;
            return ops::conv2d_backward_bias(t);
        },
        py::arg("dy"));

    o.def(
        "linear_forward",
        [](obj x, obj w, obj b, obj relu) {
            const char* op = "linear_forward";
            const Tensor tx = tensor_arg(x, op, "x"), tw = tensor_arg(w, op, "w");
            const auto tb = opt_tensor_arg(b, op, "b");
            if (!py::isinstance<py::bool_>(relu))
                throw TypeError(where(op, "relu") + "must be a bool, got " + type_name(relu));
            const bool fr = relu.cast<bool>();
            py::gil_scoped_release r;
            return ops::linear_forward(tx, tw, tb, fr);
        },
        py::arg("x"), py::arg("w"), py::arg("b") = none, py::arg("relu") = false,
        "y = x w^T + b; relu=True applies the ReLU in the same kernel (bit for bit relu_forward of it).");
    o.def(
        "linear_backward_input",
        [](obj dy, obj w) {
            const char* op = "linear_backward_input";
            const Tensor a = tensor_arg(dy, op, "dy"), b = tensor_arg(w, op, "w");
            py::gil_scoped_release r;
            return ops::linear_backward_input(a, b);
        },
        py::arg("dy"), py::arg("w"));
    o.def(
        "linear_backward_weight",
        [](obj x, obj dy) {
            const char* op = "linear_backward_weight";
            const Tensor a = tensor_arg(x, op, "x"), b = tensor_arg(dy, op, "dy");
            py::gil_scoped_release r;
            return ops::linear_backward_weight(a, b);
        },
        py::arg("x"), py::arg("dy"));
    o.def(
        "linear_backward_bias",
        [](obj dy) {
            const Tensor t = tensor_arg(dy, "linear_backward_bias", "dy");
            py::gil_scoped_release r;
            return ops::linear_backward_bias(t);
        },
        py::arg("dy"));

    o.def(
        "relu_forward",
        [](obj x) {
            const Tensor t = tensor_arg(x, "relu_forward", "x");
            py::gil_scoped_release r;
            return ops::relu_forward(t);
        },
        py::arg("x"));
    o.def(
        "relu_backward",
        [](obj dy, obj y) {
            const char* op = "relu_backward";
            const Tensor a = tensor_arg(dy, op, "dy"), b = tensor_arg(y, op, "y");
            py::gil_scoped_release r;
            return ops::relu_backward(a, b);
        },
        py::arg("dy"), py::arg("y"));

    o.def(
        "lrn_forward",
        [](obj x, obj size, obj k, obj alpha, obj beta) {
            const char* op = "lrn_forward";
            const Tensor t = tensor_arg(x, op, "x");
            const int n = int_arg(size, op, "size");
            const float fk = float_arg(k, op, "k"), fa = float_arg(alpha, op, "alpha"), fb = float_arg(beta, op, "beta");
            py::gil_scoped_release r;
            return ops::lrn_forward(t, n, fk, fa, fb);
        },
        py::arg("x"), py::arg("size") = 5, py::arg("k") = 2.0, py::arg("alpha") = 1e-4, py::arg("beta") = 0.75,
        "Returns (y, scale).");
    o.def(
        "lrn_backward",
        [](obj dy, obj x, obj y, obj scale, obj size, obj k, obj alpha, obj beta, obj relu) {
            const char* op = "lrn_backward";
            const Tensor tdy = tensor_arg(dy, op, "dy"), tx = tensor_arg(x, op, "x"), ty = tensor_arg(y, op, "y"),
                         ts = tensor_arg(scale, op, "scale");
            const int n = int_arg(size, op, "size");
            const float fk = float_arg(k, op, "k"), fa = float_arg(alpha, op, "alpha"), fb = float_arg(beta, op, "beta");
            if (!py::isinstance<py::bool_>(relu))
                throw TypeError(where(op, "relu") + "must be a bool, got " + type_name(relu));
            const bool fr = relu.cast<bool>();
            py::gil_scoped_release r;
            return ops::lrn_backward(tdy, tx, ty, ts, n, fk, fa, fb, fr);
        },
        py::arg("dy"), py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("size") = 5, py::arg("k") = 2.0,
        py::arg("alpha") = 1e-4, py::arg("beta") = 0.75, py::arg("relu") = false,
        "relu=True: x is a ReLU's output and dx also goes back through that ReLU (bit for bit relu_backward(dx, x)).");

    o.def(
        "maxpool_forward",
        [](obj x, obj window, obj stride, obj padding) {
            const char* op = "maxpool_forward";
            const Tensor t = tensor_arg(x, op, "x");
            const auto k = pair_arg(window, op, "window"), s = pair_arg(stride, op, "stride"),
                       p = pair_arg(padding, op, "padding");
            py::gil_scoped_release r;
            return ops::maxpool_forward(t, k.first, k.second, s.first, s.second, p.first, p.second);
        },
        py::arg("x"), py::arg("window") = 3, py::arg("stride") = 2, py::arg("padding") = 0, "Returns (y, argmax).");
    o.def(
        "maxpool_backward",
        [](obj dy, obj argmax, obj input_hw, obj window, obj stride, obj padding, obj check_argmax, obj relu_y) {
            const char* op = "maxpool_backward";
            const Tensor tdy = tensor_arg(dy, op, "dy"), ta = tensor_arg(argmax, op, "argmax");
            const auto hw = pair_arg(input_hw, op, "input_hw"), k = pair_arg(window, op, "window"),
                       s = pair_arg(stride, op, "stride"), p = pair_arg(padding, op, "padding");
            if (!py::isinstance<py::bool_>(check_argmax))
                throw TypeError(where(op, "check_argmax") + "must be a bool, got " + type_name(check_argmax));
            const bool check = check_argmax.cast<bool>();
            const auto ry = opt_tensor_arg(relu_y, op, "relu_y");
            py::gil_scoped_release r;
            return ops::maxpool_backward(tdy, ta, hw.first, hw.second, k.first, k.second, s.first, s.second, p.first,
                                         p.second, check, ry);
        },
        py::arg("dy"), py::arg("argmax"), py::arg("input_hw"), py::arg("window") = 3, py::arg("stride") = 2,
        py::arg("padding") = 0, py::arg("check_argmax") = true, py::arg("relu_y") = none,
        "Every argmax must lie in its output's window (checked on the host for CUDA tensors unless "
        "check_argmax=False, for an argmax straight from maxpool_forward). relu_y: as conv2d_backward_input's.");

    o.def(
        "lrn_maxpool_forward",
        [](obj x, obj size, obj k, obj alpha, obj beta, obj window, obj stride, obj padding) {
            const char* op = "lrn_maxpool_forward";
            const Tensor t = tensor_arg(x, op, "x");
            const int n = int_arg(size, op, "size");
            const float fk = float_arg(k, op, "k"), fa = float_arg(alpha, op, "alpha"), fb = float_arg(beta, op, "beta");
            const auto kw = pair_arg(window, op, "window"), s = pair_arg(stride, op, "stride"),
                       p = pair_arg(padding, op, "padding");
            ops::LrnPool out;
            {
                py::gil_scoped_release r;
                out = ops::lrn_maxpool_forward(t, n, fk, fa, fb, kw.first, kw.second, s.first, s.second, p.first,
                                               p.second);
            }
            return py::make_tuple(out.y, out.scale, out.pool_y, out.argmax);
        },
        py::arg("x"), py::arg("size") = 5, py::arg("k") = 2.0, py::arg("alpha") = 1e-4, py::arg("beta") = 0.75,
        py::arg("window") = 3, py::arg("stride") = 2, py::arg("padding") = 0,
        "Returns (y, scale, pool_y, argmax): lrn_forward(x) and maxpool_forward of its y, fused on CUDA.");
    o.def(
        "dropout_forward",
        [](obj x, obj p, obj seed, obj offset) {
            const char* op = "dropout_forward";
            const Tensor t = tensor_arg(x, op, "x");
            const float fp = float_arg(p, op, "p");
            const uint64_t s = uint64_arg(seed, op, "seed"), off = uint64_arg(offset, op, "offset");
            py::gil_scoped_release r;
            return ops::dropout_forward(t, fp, s, off);
        },
        py::arg("x"), py::arg("p") = 0.5, py::arg("seed") = 0, py::arg("offset") = 0, "Returns (y, mask).");
    o.def(
        "dropout_backward",
        [](obj dy, obj mask, obj p, obj check_mask, obj relu_y) {
            const char* op = "dropout_backward";
            const Tensor tdy = tensor_arg(dy, op, "dy"), tm = tensor_arg(mask, op, "mask");
            const float fp = float_arg(p, op, "p");
            if (!py::isinstance<py::bool_>(check_mask))
                throw TypeError(where(op, "check_mask") + "must be a bool, got " + type_name(check_mask));
            const bool check = check_mask.cast<bool>();
            const auto ry = opt_tensor_arg(relu_y, op, "relu_y");
            py::gil_scoped_release r;
            return ops::dropout_backward(tdy, tm, fp, check, ry);
        },
        py::arg("dy"), py::arg("mask"), py::arg("p") = 0.5, py::arg("check_mask") = true, py::arg("relu_y") = none,
        "The mask must hold only 0 and 1 (checked on the host unless check_mask=False, for a mask straight "
        "from dropout_forward: the check copies a device mask to the host and synchronizes). relu_y: as "
        "conv2d_backward_input's.");

    o.def(
        "softmax_cross_entropy_forward",
        [](obj logits, obj labels) {
            const char* op = "softmax_cross_entropy_forward";
            const Tensor tl = tensor_arg(logits, op, "logits"), tlab = tensor_arg(labels, op, "labels");
            ops::SoftmaxXent r;
            {
                py::gil_scoped_release g;
                r = ops::softmax_cross_entropy_forward(tl, tlab, true);
            }
            return py::make_tuple(r.loss, r.probs, r.rank);
        },
        py::arg("logits"), py::arg("labels"), "Returns (loss per sample, probs, rank of the label).");
    o.def(
        "softmax_cross_entropy_backward",
        [](obj probs, obj labels, obj scale) {
            const char* op = "softmax_cross_entropy_backward";
            const Tensor tp = tensor_arg(probs, op, "probs"), tlab = tensor_arg(labels, op, "labels");
            const float s = float_arg(scale, op, "scale");
            py::gil_scoped_release r;
            return ops::softmax_cross_entropy_backward(tp, tlab, s, true);
        },
        py::arg("probs"), py::arg("labels"), py::arg("scale"));
    o.def(
        "softmax_forward",
        [](obj logits) {
            const Tensor t = tensor_arg(logits, "softmax_forward", "logits");
            py::gil_scoped_release r;
            return ops::softmax_forward(t);
        },
        py::arg("logits"));

    o.def(
        "sgd_update",
        [](obj w, obj dw, obj v, obj lr, obj momentum, obj weight_decay) {
            const char* op = "sgd_update";
            Tensor tw = tensor_arg(w, op, "w"), tv = tensor_arg(v, op, "v");
            const Tensor tdw = tensor_arg(dw, op, "dw");
            const float flr = float_arg(lr, op, "lr"), fm = float_arg(momentum, op, "momentum"),
                        fwd = float_arg(weight_decay, op, "weight_decay");
            py::gil_scoped_release r;
            ops::sgd_update(tw, tdw, tv, flr, fm, fwd);  // the copies share storage with the caller's tensors
        },
        py::arg("w"), py::arg("dw"), py::arg("v"), py::arg("lr"), py::arg("momentum") = 0.9,
        py::arg("weight_decay") = 0.0005, "In place: v = m v - wd lr w - lr dw; w += v.");

    o.def(
        "sgd_update_multi",
        [](obj params, obj lr, obj momentum) {
            const char* op = "sgd_update_multi";
            if (py::isinstance<py::str>(params) || !py::isinstance<py::sequence>(params))
                throw TypeError(where(op, "params") + "must be a list of (w, dw, v, weight_decay) tuples, got " +
                                type_name(params));
            auto seq = py::reinterpret_borrow<py::sequence>(params);
            // Copies of the caller's Tensors (they share storage), kept alive while the op runs.
            std::vector<Tensor> ws, dws, vs;
            std::vector<float> wds;
            for (size_t i = 0; i < seq.size(); ++i) {
                const std::string a = "params[" + std::to_string(i) + "]";
                py::handle item = seq[i];
                if (py::isinstance<py::str>(item) || !py::isinstance<py::sequence>(item) || py::len(item) != 4)
                    throw TypeError(where(op, a.c_str()) + "must be a (w, dw, v, weight_decay) tuple, got " +
                                    type_name(item));
                auto t = py::reinterpret_borrow<py::sequence>(item);
                ws.push_back(tensor_arg(t[0], op, (a + ".w").c_str()));
                dws.push_back(tensor_arg(t[1], op, (a + ".dw").c_str()));
                vs.push_back(tensor_arg(t[2], op, (a + ".v").c_str()));
                wds.push_back(float_arg(t[3], op, (a + ".weight_decay").c_str()));
            }
            const float flr = float_arg(lr, op, "lr"), fm = float_arg(momentum, op, "momentum");
            std::vector<ops::SgdParam> ps;
            for (size_t i = 0; i < ws.size(); ++i) ps.push_back({&ws[i], &dws[i], &vs[i], wds[i]});
            py::gil_scoped_release r;
            ops::sgd_update_multi(ps, flr, fm);
        },
        py::arg("params"), py::arg("lr"), py::arg("momentum") = 0.9,
        "In place, sgd_update of every (w, dw, v, weight_decay) in params; one launch on CUDA.");

    o.def(
        "concat_channels",
        [](obj xs) {
            const char* op = "concat_channels";
            if (py::isinstance<py::str>(xs) || !py::isinstance<py::sequence>(xs))
                throw TypeError(where(op, "xs") + "must be a list of Tensors, got " + type_name(xs));
            std::vector<Tensor> ts;
            for (auto item : py::reinterpret_borrow<py::sequence>(xs)) ts.push_back(tensor_arg(item, op, "xs"));
            py::gil_scoped_release r;
            return ops::concat_channels(ts);
        },
        py::arg("xs"));
    o.def(
        "slice_channels",
        [](obj x, obj c0, obj c1) {
            const char* op = "slice_channels";
            const Tensor t = tensor_arg(x, op, "x");
            const int a = int_arg(c0, op, "c0"), b = int_arg(c1, op, "c1");
            py::gil_scoped_release r;
            return ops::slice_channels(t, a, b);
        },
        py::arg("x"), py::arg("c0"), py::arg("c1"));
    o.def(
        "split_sum_channels",
        [](obj xs, obj parts) {
            const char* op = "split_sum_channels";
            if (py::isinstance<py::str>(xs) || !py::isinstance<py::sequence>(xs))
                throw TypeError(where(op, "xs") + "must be a list of Tensors, got " + type_name(xs));
            std::vector<Tensor> ts;
            for (auto item : py::reinterpret_borrow<py::sequence>(xs)) ts.push_back(tensor_arg(item, op, "xs"));
            const int k = int_arg(parts, op, "parts");
            py::gil_scoped_release r;
            return ops::split_sum_channels(ts, k);
        },
        py::arg("xs"), py::arg("parts"),
        "[sum over t of xs[t][:, u*C/parts:(u+1)*C/parts] for u < parts], added in list order (a cross-tower "
        "gather's backward); one launch on CUDA.");
    o.def(
        "add",
        [](obj a, obj b) {
            const Tensor ta = tensor_arg(a, "add", "a"), tb = tensor_arg(b, "add", "b");
            py::gil_scoped_release r;
            return ops::add(ta, tb);
        },
        py::arg("a"), py::arg("b"));
    o.def(
        "augment_batch",
        [](obj images, obj offsets, obj flips, obj light, obj mean, obj crop) {
            const char* op = "augment_batch";
            const Tensor ti = tensor_arg(images, op, "images"), to = tensor_arg(offsets, op, "offsets"),
                         tf = tensor_arg(flips, op, "flips"), tl = tensor_arg(light, op, "light"),
                         tm = tensor_arg(mean, op, "mean");
            const int c = int_arg(crop, op, "crop");
            py::gil_scoped_release r;
            return ops::augment_batch(ti, to, tf, tl, tm, c);
        },
        py::arg("images"), py::arg("offsets"), py::arg("flips"), py::arg("light"), py::arg("mean"), py::arg("crop"));

    py::class_<Net::StagingSlot>(m, "StagingSlot",
                                 "A slot of a Net's staging ring (Net.staging_slot): fill its parts in place, then "
                                 "train_step_staged uploads them from there.")
        .def_readonly("n", &Net::StagingSlot::n)
        .def_readonly("height", &Net::StagingSlot::H)
        .def_readonly("width", &Net::StagingSlot::W)
        .def_readonly("generation", &Net::StagingSlot::generation)
        .def_property_readonly("images", [](const Net::StagingSlot& s) {
            return slot_view(s, s.images, py::dtype::of<uint8_t>(), {s.n, s.H, s.W, 3});
        }, "uint8 (n, height, width, 3)")
        .def_property_readonly("offsets", [](const Net::StagingSlot& s) {
            return slot_view(s, s.offsets, py::dtype::of<int32_t>(), {s.n, 2});
        }, "int32 (n, 2): (y0, x0) of each crop")
        .def_property_readonly("flips", [](const Net::StagingSlot& s) {
            return slot_view(s, s.flips, py::dtype::of<uint8_t>(), {s.n});
        }, "uint8 (n,): 0 or 1")
        .def_property_readonly("light", [](const Net::StagingSlot& s) {
            return slot_view(s, s.light, py::dtype::of<float>(), {s.n, 3});
        }, "float32 (n, 3): the PCA lighting shift")
        .def_property_readonly("labels", [](const Net::StagingSlot& s) {
            return slot_view(s, s.labels, py::dtype::of<int32_t>(), {s.n});
        }, "int32 (n,)")
        .def_property_readonly("pinned", [](const Net::StagingSlot& s) { return s.slot && s.slot->pinned != nullptr; },
                               "whether the parts live in page-locked memory (CUDA)")
        .def("__repr__", [](const Net::StagingSlot& s) {
            return "StagingSlot(n=" + std::to_string(s.n) + ", height=" + std::to_string(s.H) + ", width=" +
                   std::to_string(s.W) + ", generation=" + std::to_string(s.generation) + ")";
        });

    py::class_<Net>(m, "Net", "The two-tower AlexNet in C++ (use alexnet_cuda.Net, the Python front, instead).")
        .def(py::init([](const py::dict& cfg, const std::vector<std::string>& devices, bool shared, const py::object& seed_obj) {
                 const uint64_t seed = uint64_arg(seed_obj, "Net", "seed");
                 std::vector<Device> devs;
                 for (const auto& s : devices) devs.push_back(Device::parse(s, "Net", "devices"));
                 NetConfig c = config_from_dict(cfg);
                 py::gil_scoped_release nogil;
                 return new Net(c, devs, shared, seed);
             }),
             py::arg("config"), py::arg("devices"), py::arg("shared"), py::arg("seed"))
        .def(
            "train_step",
            [](Net& net, const py::object& images, const py::object& labels, const py::object& lr_obj) {
                const auto img = images_arg(net, images, "train_step");
                const auto lab = labels_arg(labels, img.second, net.config().num_classes, "train_step", "labels");
                const float lr = float_arg(lr_obj, "train_step", "lr");
                StepResult r;
                {
                    py::gil_scoped_release nogil;
                    r = net.train_step(static_cast<const float*>(img.first.data()), lab.data(), img.second, lr);
                }
                return result_dict(r);
            },
            py::arg("images"), py::arg("labels"), py::arg("lr"))
        .def(
            "train_step_u8",
            [](Net& net, const py::object& images, const py::object& offsets, const py::object& flips,
               const py::object& light, const py::object& labels, const py::object& lr_obj,
               const py::object& prefetch) {
                const U8Args cur(net, images, offsets, flips, light, labels, "");
                return u8_step(net, &cur, lr_obj, prefetch);
            },
            py::arg("images"), py::arg("offsets"), py::arg("flips"), py::arg("light"), py::arg("labels"), py::arg("lr"),
            py::arg("prefetch") = py::none())
        .def(
            "train_step_prefetched",
            [](Net& net, const py::object& lr_obj, const py::object& prefetch) {
                return u8_step(net, nullptr, lr_obj, prefetch);
            },
            py::arg("lr"), py::arg("prefetch") = py::none())
        .def_property_readonly("has_prefetched", &Net::has_prefetched)
        .def(
            "staging_slot",
            [](Net& net, const py::object& n, const py::object& h, const py::object& w) {
                const int ni = int_arg(n, "staging_slot", "n"), hi = int_arg(h, "staging_slot", "height"),
                          wi = int_arg(w, "staging_slot", "width");
                py::gil_scoped_release nogil;  // may wait for an upload still reading the slot
                return net.staging_slot(ni, hi, wi);
            },
            py::arg("n"), py::arg("height"), py::arg("width"))
        .def("train_step_staged", &staged_step, py::arg("slot"), py::arg("lr"), py::arg("prefetch") = py::none())
        .def(
            "set_data_parallel",
            [](Net& net, bool defer_sgd, const py::object& mean_over, const py::object& sample_base,
               const py::object& grad_ready) {
                const int64_t m = int64_arg(mean_over, "set_data_parallel", "mean_over");
                const int64_t b = int64_arg(sample_base, "set_data_parallel", "sample_base");
                if (m < 0) throw ValueError("set_data_parallel: argument 'mean_over' must be >= 0, got " + std::to_string(m));
                if (b < 0) throw ValueError("set_data_parallel: argument 'sample_base' must be >= 0, got " + std::to_string(b));
                if (!grad_ready.is_none() && !PyCallable_Check(grad_ready.ptr()))
                    throw TypeError("set_data_parallel: argument 'grad_ready' must be callable or None, got " +
                                    type_name(grad_ready));
                net.dp.defer_sgd = defer_sgd;
                net.dp.mean_over = m;
                net.dp.sample_base = b;
                using Hook = std::function<void(int, int, const Tensor&, const Tensor&, uintptr_t)>;
                net.dp.grad_ready = grad_ready.is_none() ? Hook() : grad_ready.cast<Hook>();
            },
            py::arg("defer_sgd"), py::arg("mean_over"), py::arg("sample_base"), py::arg("grad_ready"))
        .def(
            "apply_sgd",
            [](Net& net, const py::object& lr_obj) {
                const float lr = float_arg(lr_obj, "apply_sgd", "lr");
                py::gil_scoped_release nogil;
                net.apply_sgd(lr);
            },
            py::arg("lr"))
        .def("grads", &Net::grads, "(name, gradient Tensor on its device) of the last deferred step.")
        .def(
            "set_input_mean",
            [](Net& net, const py::object& mean) {
                const py::array m = exact_arg(mean, "set_input_mean", "mean", DType::f32, {3, -1, -1}, "(3, H, W)");
                const int H = checked::to_int("set_input_mean", "mean", m.shape(1));
                const int W = checked::to_int("set_input_mean", "mean", m.shape(2));
                checked::check_elements("set_input_mean", "mean", {3, H, W});
                net.set_input_mean(static_cast<const float*>(m.data()), H, W);
            },
            py::arg("mean"))
        .def_property_readonly("has_input_mean", &Net::has_input_mean)
        .def(
            "forward",
            [](Net& net, const py::object& images, bool probs) {
                const auto img = images_arg(net, images, "forward");
                Tensor out;
                {
                    py::gil_scoped_release nogil;
                    out = net.forward(static_cast<const float*>(img.first.data()), img.second, probs);
                }
                return to_numpy(out);
            },
            py::arg("images"), py::arg("probs") = false)
        .def(
            "features",
            [](Net& net, const py::object& images, const std::string& layer) {
                const auto img = images_arg(net, images, "features");
                Tensor out;
                {
                    py::gil_scoped_release nogil;
                    out = net.features(static_cast<const float*>(img.first.data()), img.second, layer);
                }
                return to_numpy(out);
            },
            py::arg("images"), py::arg("layer"))
        .def(
            "evaluate",
            [](Net& net, const py::object& images, const py::object& labels) {
                const auto img = images_arg(net, images, "evaluate");
                const auto lab = labels_arg(labels, img.second, net.config().num_classes, "evaluate", "labels");
                StepResult r;
                {
                    py::gil_scoped_release nogil;
                    r = net.evaluate(static_cast<const float*>(img.first.data()), lab.data(), img.second);
                }
                return result_dict(r);
            },
            py::arg("images"), py::arg("labels"))
        .def("state",
             [](const Net& net) {
                 py::list out;
                 for (auto& kv : net.state()) out.append(py::make_tuple(kv.first, to_numpy(kv.second)));
                 return out;
             })
        .def(
            "load_state",
            [](Net& net, const py::object& obj) {
                if (!py::isinstance<py::dict>(obj))
                    throw TypeError("load_state_dict: argument 'state' must be a dict, got " + type_name(obj));
                const py::dict d = py::reinterpret_borrow<py::dict>(obj);
                std::map<std::string, std::vector<int64_t>> want;
                for (auto& kv : net.state()) want[kv.first] = kv.second.shape();
                std::map<std::string, Tensor> host;
                for (auto item : d) {
                    if (!py::isinstance<py::str>(item.first))
                        throw TypeError("load_state_dict: key " + std::string(py::repr(item.first)) + " is not a str");
                    const std::string name = item.first.cast<std::string>();
                    auto it = want.find(name);
                    if (it == want.end()) throw ValueError("load_state_dict: unexpected entry '" + name + "'");
                    host[name] = state_entry(name, item.second, it->second);
                }
                py::gil_scoped_release nogil;
                net.load_state(host);  // checks again that every entry is present
            },
            py::arg("state"))
        .def("dropout_key", &Net::dropout_key, py::arg("step"), py::arg("layer"), py::arg("tower"),
             "(seed, offset) of a dropout mask, as ops.dropout_forward takes them.")
        .def_property(
            "step", [](const Net& net) { return net.step; },
            [](Net& net, const py::object& v) {
                const int64_t step = int64_arg(v, "Net", "step");
                if (step < 0) throw ValueError("Net: argument 'step' must be >= 0, got " + std::to_string(step));
                net.step = step;
            })
        .def_readwrite("trace", &Net::trace)
        .def("set_cuda_graph", &Net::set_cuda_graph, py::arg("mode"),
             "'auto', 'on' or 'off': run steady-state training steps as one captured CUDA graph (see Net.set_cuda_graph).")
        .def_property_readonly("cuda_graph", &Net::cuda_graph)
        .def("cuda_graph_supported",
             [](const Net& net) {
                 std::string why;
                 const bool ok = net.cuda_graph_supported(&why);
                 return py::make_tuple(ok, why);
             })
        .def("graph_stats",
             [](const Net& net) {
                 const Net::GraphStats& g = net.graph_stats();
                 py::dict d;
                 d["captures"] = g.captures;
                 d["replays"] = g.replays;
                 d["failures"] = g.failures;
                 d["last_step_graph"] = g.last_step_graph;
                 d["last_failure"] = g.last_failure;
                 return d;
             })
        .def_property("seed", &Net::seed,
                      [](Net& net, const py::object& v) { net.set_seed(uint64_arg(v, "Net", "seed")); })
        .def_property_readonly("devices",
                               [](const Net& net) {
                                   std::vector<std::string> s;
                                   for (auto& d : net.devices()) s.push_back(d.str());
                                   return s;
                               })
        .def("executors",
             [](const Net& net) {
                 std::vector<std::string> s;
                 for (int t = 0; t < net.scheduler().towers(); ++t) s.push_back(net.scheduler().executor_name(t));
                 return s;
             })
        .def("layers",
             [](const Net& net) {
                 py::list out;
                 for (const auto& L : net.layers()) {
                     py::dict d;
                     d["name"] = L.name;
                     d["kind"] = L.conv ? "conv" : "fc";
                     d["cross"] = L.cross;
                     d["in_c"] = L.in_c;
                     d["out_c"] = L.out_c;
                     d["kernel"] = L.kernel;
                     d["stride"] = L.stride;
                     d["pad"] = L.pad;
                     d["in_hw"] = L.in_hw;
                     d["out_hw"] = L.out_hw;
                     d["pooled_hw"] = L.pooled_hw;
                     d["relu"] = L.relu;
                     d["lrn"] = L.lrn;
                     d["pool"] = L.pool;
                     d["pool_extra"] = L.pool_extra;
                     d["pool_mid_hw"] = L.pool_mid_hw;
                     d["dropout"] = L.dropout;
                     d["bias_init"] = L.bias_init;
                     out.append(d);
                 }
                 return out;
             })
        .def("last_step_stats", [](const Net& net) {
            const Scheduler& s = net.scheduler();
            py::dict d;
            py::dict edges;
            for (auto& kv : s.edge_bytes()) edges[py::str(kv.first)] = kv.second;
            d["edge_bytes"] = edges;
            py::list tl;
            for (auto& e : s.timeline()) tl.append(py::make_tuple(e.op, e.tower, e.device, e.start_us, e.end_us));
            for (auto& e : net.host_timeline())  // the host staging of a staged step (the prefetch callback)
                tl.append(py::make_tuple(e.op, e.tower, e.device, e.start_us, e.end_us));
            d["timeline"] = tl;
            d["wall_us"] = s.step_wall_us();
            return d;
        });
}
