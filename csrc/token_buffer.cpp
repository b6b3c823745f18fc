// Packing of one engine step's inputs into a single int64 buffer for the TP broadcast.
//
// The TP-coordinator packs the step's control signals and new requests (ids, prompt token ids,
// numeric sampling parameters) into one contiguous tensor, so the group needs exactly two
// collectives per step (the length, then the buffer) whatever the batch holds. Followers unpack
// it. Layout, all int64 words:
//
//   [n_signals, signal..., n_requests, (request_id, n_tokens, n_params, token..., param...)...]
//
// Parameters are doubles stored bit-for-bit in int64 words. unpack validates every length
// against the buffer size so a corrupt buffer raises instead of reading out of bounds.
//
// Both directions work on Python objects directly (CPython's sequence and number API) rather
// than through std::vector conversions: on a step with many prompt tokens the copies into and
// out of intermediate vectors cost more than the packing itself.

#include <torch/extension.h>

#include <cstring>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

int64_t double_bits(double value) {
  int64_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

double bits_double(int64_t bits) {
  double value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// A list or tuple view of `obj` (PySequence_Fast), raising TypeError for anything else.
py::object fast_sequence(const py::handle& obj, const char* what) {
  PyObject* seq = PySequence_Fast(obj.ptr(), what);
  if (seq == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(seq);
}

int64_t to_int64(PyObject* item) {
  if (PyFloat_Check(item)) throw py::type_error("pack_step: token ids and ids must be integers");
  const long long value = PyLong_AsLongLong(item);
  if (value == -1 && PyErr_Occurred()) throw py::error_already_set();
  return value;
}

double to_double(PyObject* item) {
  const double value = PyFloat_AsDouble(item);
  if (value == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  return value;
}

int64_t* copy_ints(const py::object& seq, int64_t* out) {
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) *out++ = to_int64(items[i]);
  return out;
}

torch::Tensor pack_step(const py::handle& signals_in, const py::handle& ids_in,
                        const py::handle& tokens_in, const py::handle& params_in) {
  py::object signals = fast_sequence(signals_in, "pack_step: signals must be a sequence");
  py::object ids = fast_sequence(ids_in, "pack_step: request_ids must be a sequence");
  py::object tokens_outer = fast_sequence(tokens_in, "pack_step: tokens must be a sequence");
  py::object params_outer = fast_sequence(params_in, "pack_step: params must be a sequence");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(ids.ptr());
  TORCH_CHECK(PySequence_Fast_GET_SIZE(tokens_outer.ptr()) == n &&
                  PySequence_Fast_GET_SIZE(params_outer.ptr()) == n,
              "pack_step: request_ids, tokens and params must have the same length");

  std::vector<py::object> tokens, params;
  tokens.reserve(n);
  params.reserve(n);
  size_t words = 2 + PySequence_Fast_GET_SIZE(signals.ptr()) + 3 * static_cast<size_t>(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    tokens.push_back(fast_sequence(PySequence_Fast_GET_ITEM(tokens_outer.ptr(), i),
                                   "pack_step: each tokens entry must be a sequence"));
    params.push_back(fast_sequence(PySequence_Fast_GET_ITEM(params_outer.ptr(), i),
                                   "pack_step: each params entry must be a sequence"));
    words += PySequence_Fast_GET_SIZE(tokens.back().ptr()) +
             PySequence_Fast_GET_SIZE(params.back().ptr());
  }

  torch::Tensor buffer = torch::empty({static_cast<int64_t>(words)}, torch::kInt64);
  int64_t* out = buffer.data_ptr<int64_t>();
  *out++ = PySequence_Fast_GET_SIZE(signals.ptr());
  out = copy_ints(signals, out);
  *out++ = n;
  PyObject** id_items = PySequence_Fast_ITEMS(ids.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) {
    *out++ = to_int64(id_items[i]);
    *out++ = PySequence_Fast_GET_SIZE(tokens[i].ptr());
    const Py_ssize_t n_params = PySequence_Fast_GET_SIZE(params[i].ptr());
    *out++ = n_params;
    out = copy_ints(tokens[i], out);
    PyObject** p = PySequence_Fast_ITEMS(params[i].ptr());
    for (Py_ssize_t j = 0; j < n_params; ++j) *out++ = double_bits(to_double(p[j]));
  }
  return buffer;
}

// Reads `count` words at `pos`, checking they lie inside the buffer.
const int64_t* take(const int64_t* data, int64_t size, int64_t& pos, int64_t count) {
  if (count < 0 || count > size - pos) throw std::invalid_argument("unpack_step: truncated buffer");
  const int64_t* start = data + pos;
  pos += count;
  return start;
}

py::list int_list(const int64_t* values, int64_t count) {
  PyObject* list = PyList_New(count);
  if (list == nullptr) throw py::error_already_set();
  py::list result = py::reinterpret_steal<py::list>(list);
  for (int64_t i = 0; i < count; ++i) {
    PyObject* item = PyLong_FromLongLong(values[i]);
    if (item == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(list, i, item);
  }
  return result;
}

py::list float_list(const int64_t* values, int64_t count) {
  PyObject* list = PyList_New(count);
  if (list == nullptr) throw py::error_already_set();
  py::list result = py::reinterpret_steal<py::list>(list);
  for (int64_t i = 0; i < count; ++i) {
    PyObject* item = PyFloat_FromDouble(bits_double(values[i]));
    if (item == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(list, i, item);
  }
  return result;
}

py::tuple unpack_step(const torch::Tensor& buffer_in) {
  TORCH_CHECK(buffer_in.dim() == 1 && buffer_in.scalar_type() == torch::kInt64,
              "unpack_step: expected a 1-D int64 tensor");
  torch::Tensor buffer = buffer_in.to(torch::kCPU).contiguous();
  const int64_t* data = buffer.data_ptr<int64_t>();
  const int64_t size = buffer.numel();
  int64_t pos = 0;

  const int64_t n_signals = *take(data, size, pos, 1);
  py::list signals = int_list(take(data, size, pos, n_signals), n_signals);
  const int64_t n = *take(data, size, pos, 1);
  if (n < 0 || n > size) throw std::invalid_argument("unpack_step: bad request count");
  py::list request_ids(n), tokens(n), params(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* head = take(data, size, pos, 3);
    const int64_t id = head[0], n_tokens = head[1], n_params = head[2];
    request_ids[i] = py::reinterpret_steal<py::object>(PyLong_FromLongLong(id));
    tokens[i] = int_list(take(data, size, pos, n_tokens), n_tokens);
    params[i] = float_list(take(data, size, pos, n_params), n_params);
  }
  if (pos != size) throw std::invalid_argument("unpack_step: trailing words in buffer");
  return py::make_tuple(signals, request_ids, tokens, params);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The library is found through its rpath (setup.py) even when torch was not imported first;
  // importing torch here initialises torch's Python types before any tensor crosses this module.
  py::module_::import("torch");
  m.doc() = "Token-buffer packing for the tensor-parallel request broadcast";
  m.def("pack_step", &pack_step, "Pack signals and requests into one int64 tensor",
        py::arg("signals"), py::arg("request_ids"), py::arg("tokens"), py::arg("params"));
  m.def("unpack_step", &unpack_step, "Unpack a buffer made by pack_step", py::arg("buffer"));
}
