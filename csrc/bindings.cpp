// The only file that includes pybind11: alexnet_cuda._C (tensors, ops, runtime queries).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "net.h"
#include "ops.h"
#include "tensor.h"

namespace py = pybind11;
using namespace ax;

namespace {

DType dtype_from_numpy(const py::array& a, const char* op) {
    const py::dtype dt = a.dtype();
    if (dt.is(py::dtype::of<float>())) return DType::f32;
    if (dt.is(py::dtype::of<uint8_t>())) return DType::u8;
    if (dt.is(py::dtype::of<int32_t>())) return DType::i32;
    throw TypeError(std::string(op) + ": argument 'array' has dtype " + std::string(py::str(dt)) +
                    "; expected float32, uint8 or int32 (convert with array.astype)");
}

Tensor from_numpy(const py::array& a, const std::string& device) {
    const char* op = "from_numpy";
    const DType dt = dtype_from_numpy(a, op);
    if (!(a.flags() & py::array::c_style))
        throw ValueError(std::string(op) + ": argument 'array' is not C-contiguous (use numpy.ascontiguousarray)");
    const Device dev = Device::parse(device, op, "device");
    std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
    Tensor host = Tensor::empty(shape, dt, Device{});
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

}  // namespace

namespace {

// An int or a pair of ints, e.g. stride=4 or stride=(4, 4); raises TypeError naming op and arg.
std::pair<int, int> pair_arg(const py::object& v, const char* op, const char* arg) {
    if (py::isinstance<py::int_>(v) && !py::isinstance<py::bool_>(v)) {
        const int i = v.cast<int>();
        return {i, i};
    }
    if (py::isinstance<py::sequence>(v) && !py::isinstance<py::str>(v)) {
        auto s = v.cast<py::sequence>();
        if (s.size() == 2 && py::isinstance<py::int_>(s[0]) && py::isinstance<py::int_>(s[1]))
            return {s[0].cast<int>(), s[1].cast<int>()};
    }
    throw TypeError(std::string(op) + ": argument '" + arg + "' must be an int or a pair of ints");
}

// ---- Net glue -------------------------------------------------------------------------------------

template <typename T>
T cfg_get(const py::dict& d, const char* key) {
    if (!d.contains(key)) throw ValueError(std::string("Net: config is missing '") + key + "'");
    try {
        return d[key].cast<T>();
    } catch (const py::cast_error&) {
        throw TypeError(std::string("Net: config entry '") + key + "' has the wrong type (" +
                        std::string(py::str(py::type::of(d[key]))) + ")");
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

using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using i32_array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

int check_images(const Net& net, const f32_array& images, const char* op) {
    const auto& c = net.config();
    if (images.ndim() != 4 || images.shape(1) != c.in_channels || images.shape(2) != c.input_size ||
        images.shape(3) != c.input_size)
        throw ValueError(std::string(op) + ": argument 'images' must have shape (N, " + std::to_string(c.in_channels) +
                         ", " + std::to_string(c.input_size) + ", " + std::to_string(c.input_size) + ")");
    return static_cast<int>(images.shape(0));
}

void check_labels(const i32_array& labels, int n, const char* op) {
    if (labels.ndim() != 1 || labels.shape(0) != n)
        throw ValueError(std::string(op) + ": argument 'labels' must have shape (" + std::to_string(n) + ",)");
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
        }
    });

    py::class_<Tensor>(m, "Tensor", "A contiguous float32/uint8/int32 array on 'cpu' or 'cuda:N'.")
        .def_property_readonly("shape", [](const Tensor& t) { return py::tuple(py::cast(t.shape())); })
        .def_property_readonly("dtype", [](const Tensor& t) { return std::string(dtype_name(t.dtype())); })
        .def_property_readonly("device", [](const Tensor& t) { return t.device().str(); })
        .def_property_readonly("numel", &Tensor::numel)
        .def_property_readonly("nbytes", &Tensor::nbytes)
        .def("numpy", &to_numpy, "Copy to a new NumPy array (synchronizes with the producing stream).")
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

    m.def("from_numpy", &from_numpy, py::arg("array"), py::arg("device") = "cpu",
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
    m.def("synchronize", [](const std::string& device) { cuda_synchronize(Device::parse(device, "synchronize")); },
          py::arg("device") = "cuda:0");
    m.def("cuda_allocator_stats", []() {
        auto s = cuda_allocator_stats();
        py::dict d;
        d["device_mallocs"] = s.device_mallocs;
        d["bytes_in_use"] = s.bytes_in_use;
        d["bytes_cached"] = s.bytes_cached;
        d["peak_bytes_in_use"] = s.peak_bytes_in_use;
        return d;
    });
    m.def("cuda_empty_cache", &cuda_empty_cache, "Return cached CUDA blocks to the driver.");
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
    using opt_t = std::optional<Tensor>;
    const auto nogil = py::call_guard<py::gil_scoped_release>();

    o.def(
        "conv2d_forward",
        [](const Tensor& x, const Tensor& w, const opt_t& b, py::object stride, py::object padding, int groups) {
            auto s = pair_arg(stride, "conv2d_forward", "stride");
            auto p = pair_arg(padding, "conv2d_forward", "padding");
            py::gil_scoped_release r;
            return ops::conv2d_forward(x, w, b, s.first, s.second, p.first, p.second, groups);
        },
        py::arg("x"), py::arg("w"), py::arg("b") = py::none(), py::arg("stride") = 1, py::arg("padding") = 0,
        py::arg("groups") = 1);
    o.def(
        "conv2d_backward_input",
        [](const Tensor& dy, const Tensor& w, py::object input_hw, py::object stride, py::object padding, int groups) {
            auto hw = pair_arg(input_hw, "conv2d_backward_input", "input_hw");
            auto s = pair_arg(stride, "conv2d_backward_input", "stride");
            auto p = pair_arg(padding, "conv2d_backward_input", "padding");
            py::gil_scoped_release r;
            return ops::conv2d_backward_input(dy, w, hw.first, hw.second, s.first, s.second, p.first, p.second, groups);
        },
        py::arg("dy"), py::arg("w"), py::arg("input_hw"), py::arg("stride") = 1, py::arg("padding") = 0,
        py::arg("groups") = 1);
    o.def(
        "conv2d_backward_weight",
        [](const Tensor& x, const Tensor& dy, py::object kernel, py::object stride, py::object padding, int groups) {
            auto k = pair_arg(kernel, "conv2d_backward_weight", "kernel");
            auto s = pair_arg(stride, "conv2d_backward_weight", "stride");
            auto p = pair_arg(padding, "conv2d_backward_weight", "padding");
            py::gil_scoped_release r;
            return ops::conv2d_backward_weight(x, dy, k.first, k.second, s.first, s.second, p.first, p.second, groups);
        },
        py::arg("x"), py::arg("dy"), py::arg("kernel"), py::arg("stride") = 1, py::arg("padding") = 0,
        py::arg("groups") = 1);
    o.def("conv2d_backward_bias", &ops::conv2d_backward_bias, py::arg("dy"), nogil);

    o.def("linear_forward", &ops::linear_forward, py::arg("x"), py::arg("w"), py::arg("b") = py::none(), nogil);
    o.def("linear_backward_input", &ops::linear_backward_input, py::arg("dy"), py::arg("w"), nogil);
    o.def("linear_backward_weight", &ops::linear_backward_weight, py::arg("x"), py::arg("dy"), nogil);
    o.def("linear_backward_bias", &ops::linear_backward_bias, py::arg("dy"), nogil);

    o.def("relu_forward", &ops::relu_forward, py::arg("x"), nogil);
    o.def("relu_backward", &ops::relu_backward, py::arg("dy"), py::arg("y"), nogil);

    o.def("lrn_forward", &ops::lrn_forward, py::arg("x"), py::arg("size") = 5, py::arg("k") = 2.0f,
          py::arg("alpha") = 1e-4f, py::arg("beta") = 0.75f, nogil, "Returns (y, scale).");
    o.def("lrn_backward", &ops::lrn_backward, py::arg("dy"), py::arg("x"), py::arg("y"), py::arg("scale"),
          py::arg("size") = 5, py::arg("k") = 2.0f, py::arg("alpha") = 1e-4f, py::arg("beta") = 0.75f, nogil);

    o.def(
        "maxpool_forward",
        [](const Tensor& x, py::object window, py::object stride, py::object padding) {
            auto k = pair_arg(window, "maxpool_forward", "window");
            auto s = pair_arg(stride, "maxpool_forward", "stride");
            auto p = pair_arg(padding, "maxpool_forward", "padding");
            py::gil_scoped_release r;
            return ops::maxpool_forward(x, k.first, k.second, s.first, s.second, p.first, p.second);
        },
        py::arg("x"), py::arg("window") = 3, py::arg("stride") = 2, py::arg("padding") = 0, "Returns (y, argmax).");
    o.def(
        "maxpool_backward",
        [](const Tensor& dy, const Tensor& argmax, py::object input_hw, py::object window, py::object stride,
           py::object padding) {
            auto hw = pair_arg(input_hw, "maxpool_backward", "input_hw");
            auto k = pair_arg(window, "maxpool_backward", "window");
            auto s = pair_arg(stride, "maxpool_backward", "stride");
            auto p = pair_arg(padding, "maxpool_backward", "padding");
            py::gil_scoped_release r;
            return ops::maxpool_backward(dy, argmax, hw.first, hw.second, k.first, k.second, s.first, s.second, p.first,
                                         p.second);
        },
        py::arg("dy"), py::arg("argmax"), py::arg("input_hw"), py::arg("window") = 3, py::arg("stride") = 2,
        py::arg("padding") = 0);

    o.def("dropout_forward", &ops::dropout_forward, py::arg("x"), py::arg("p") = 0.5f, py::arg("seed") = 0,
          py::arg("offset") = 0, nogil, "Returns (y, mask).");
    o.def("dropout_backward", &ops::dropout_backward, py::arg("dy"), py::arg("mask"), py::arg("p") = 0.5f, nogil);

    o.def(
        "softmax_cross_entropy_forward",
        [](const Tensor& logits, const Tensor& labels) {
            ops::SoftmaxXent r;
            {
                py::gil_scoped_release g;
                r = ops::softmax_cross_entropy_forward(logits, labels, true);
            }
            return py::make_tuple(r.loss, r.probs, r.rank);
        },
        py::arg("logits"), py::arg("labels"), "Returns (loss per sample, probs, rank of the label).");
    o.def(
        "softmax_cross_entropy_backward",
        [](const Tensor& probs, const Tensor& labels, float scale) {
            return ops::softmax_cross_entropy_backward(probs, labels, scale, true);
        },
        py::arg("probs"), py::arg("labels"), py::arg("scale"), nogil);
    o.def("softmax_forward", &ops::softmax_forward, py::arg("logits"), nogil);

    o.def(
        "sgd_update",
        [](Tensor& w, const Tensor& dw, Tensor& v, float lr, float momentum, float weight_decay) {
            ops::sgd_update(w, dw, v, lr, momentum, weight_decay);
        },
        py::arg("w"), py::arg("dw"), py::arg("v"), py::arg("lr"), py::arg("momentum") = 0.9f,
        py::arg("weight_decay") = 0.0005f, nogil, "In place: v = m v - wd lr w - lr dw; w += v.");

    o.def("concat_channels", &ops::concat_channels, py::arg("xs"), nogil);
    o.def("slice_channels", &ops::slice_channels, py::arg("x"), py::arg("c0"), py::arg("c1"), nogil);
    o.def("add", &ops::add, py::arg("a"), py::arg("b"), nogil);
    o.def("augment_batch", &ops::augment_batch, py::arg("images"), py::arg("offsets"), py::arg("flips"),
          py::arg("light"), py::arg("mean"), py::arg("crop"), nogil);

    py::class_<Net>(m, "Net", "The two-tower AlexNet in C++ (use alexnet_cuda.Net, the Python front, instead).")
        .def(py::init([](const py::dict& cfg, const std::vector<std::string>& devices, bool shared, uint64_t seed) {
                 std::vector<Device> devs;
                 for (const auto& s : devices) devs.push_back(Device::parse(s, "Net", "devices"));
                 NetConfig c = config_from_dict(cfg);
                 py::gil_scoped_release nogil;
                 return new Net(c, devs, shared, seed);
             }),
             py::arg("config"), py::arg("devices"), py::arg("shared"), py::arg("seed"))
        .def(
            "train_step",
            [](Net& net, const f32_array& images, const i32_array& labels, float lr) {
                const int n = check_images(net, images, "train_step");
                check_labels(labels, n, "train_step");
                StepResult r;
                {
                    py::gil_scoped_release nogil;
                    r = net.train_step(images.data(), labels.data(), n, lr);
                }
                return result_dict(r);
            },
            py::arg("images"), py::arg("labels"), py::arg("lr"))
        .def(
            "forward",
            [](Net& net, const f32_array& images, bool probs) {
                const int n = check_images(net, images, "forward");
                Tensor out;
                {
                    py::gil_scoped_release nogil;
                    out = net.forward(images.data(), n, probs);
                }
                return to_numpy(out);
            },
            py::arg("images"), py::arg("probs") = false)
        .def(
            "features",
            [](Net& net, const f32_array& images, const std::string& layer) {
                const int n = check_images(net, images, "features");
                Tensor out;
                {
                    py::gil_scoped_release nogil;
                    out = net.features(images.data(), n, layer);
                }
                return to_numpy(out);
            },
            py::arg("images"), py::arg("layer"))
        .def(
            "evaluate",
            [](Net& net, const f32_array& images, const i32_array& labels) {
                const int n = check_images(net, images, "evaluate");
                check_labels(labels, n, "evaluate");
                StepResult r;
                {
                    py::gil_scoped_release nogil;
                    r = net.evaluate(images.data(), labels.data(), n);
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
            [](Net& net, const py::dict& d) {
                std::map<std::string, Tensor> host;
                for (auto item : d) {
                    const std::string name = item.first.cast<std::string>();
                    py::array a = py::array::ensure(item.second);
                    if (!a) throw TypeError("load_state_dict: entry '" + name + "' is not an array");
                    f32_array f = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a);
                    std::vector<int64_t> shape(f.shape(), f.shape() + f.ndim());
                    Tensor t = Tensor::empty(shape, DType::f32, Device{});
                    if (t.nbytes()) std::memcpy(t.raw(), f.data(), t.nbytes());
                    host[name] = t;
                }
                py::gil_scoped_release nogil;
                net.load_state(host);
            },
            py::arg("state"))
        .def("dropout_key", &Net::dropout_key, py::arg("step"), py::arg("layer"), py::arg("tower"),
             "(seed, offset) of a dropout mask, as ops.dropout_forward takes them.")
        .def_readwrite("step", &Net::step)
        .def_readwrite("trace", &Net::trace)
        .def_property("seed", &Net::seed, &Net::set_seed)
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
            d["timeline"] = tl;
            d["wall_us"] = s.step_wall_us();
            return d;
        });
}
