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

#include <torch/extension.h>

#include <cstring>
#include <stdexcept>
#include <tuple>
#include <vector>

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

torch::Tensor pack_step(const std::vector<int64_t>& signals,
                        const std::vector<int64_t>& request_ids,
                        const std::vector<std::vector<int64_t>>& tokens,
                        const std::vector<std::vector<double>>& params) {
  const size_t n = request_ids.size();
  TORCH_CHECK(tokens.size() == n && params.size() == n,
              "pack_step: request_ids, tokens and params must have the same length");
  size_t words = 2 + signals.size() + 3 * n;
  for (size_t i = 0; i < n; ++i) words += tokens[i].size() + params[i].size();

  torch::Tensor buffer = torch::empty({static_cast<int64_t>(words)}, torch::kInt64);
  int64_t* out = buffer.data_ptr<int64_t>();
  *out++ = static_cast<int64_t>(signals.size());
  out = std::copy(signals.begin(), signals.end(), out);
  *out++ = static_cast<int64_t>(n);
  for (size_t i = 0; i < n; ++i) {
    *out++ = request_ids[i];
    *out++ = static_cast<int64_t>(tokens[i].size());
    *out++ = static_cast<int64_t>(params[i].size());
    out = std::copy(tokens[i].begin(), tokens[i].end(), out);
    for (double p : params[i]) *out++ = double_bits(p);
  }
  return buffer;
}

// Reads `count` words at `pos`, checking they lie inside the buffer.
const int64_t* take(const int64_t* data, int64_t size, int64_t& pos, int64_t count) {
  if (count < 0 || pos + count > size) throw std::invalid_argument("unpack_step: truncated buffer");
  const int64_t* start = data + pos;
  pos += count;
  return start;
}

std::tuple<std::vector<int64_t>, std::vector<int64_t>, std::vector<std::vector<int64_t>>,
           std::vector<std::vector<double>>>
unpack_step(const torch::Tensor& buffer_in) {
  TORCH_CHECK(buffer_in.dim() == 1 && buffer_in.scalar_type() == torch::kInt64,
              "unpack_step: expected a 1-D int64 tensor");
  torch::Tensor buffer = buffer_in.to(torch::kCPU).contiguous();
  const int64_t* data = buffer.data_ptr<int64_t>();
  const int64_t size = buffer.numel();
  int64_t pos = 0;

  int64_t n_signals = *take(data, size, pos, 1);
  const int64_t* sig = take(data, size, pos, n_signals);
  std::vector<int64_t> signals(sig, sig + n_signals);

  int64_t n = *take(data, size, pos, 1);
  if (n < 0 || n > size) throw std::invalid_argument("unpack_step: bad request count");
  std::vector<int64_t> request_ids;
  std::vector<std::vector<int64_t>> tokens;
  std::vector<std::vector<double>> params;
  request_ids.reserve(n);
  tokens.reserve(n);
  params.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* head = take(data, size, pos, 3);
    request_ids.push_back(head[0]);
    const int64_t* tok = take(data, size, pos, head[1]);
    tokens.emplace_back(tok, tok + head[1]);
    const int64_t* par = take(data, size, pos, head[2]);
    std::vector<double> values(head[2]);
    for (int64_t j = 0; j < head[2]; ++j) values[j] = bits_double(par[j]);
    params.push_back(std::move(values));
  }
  if (pos != size) throw std::invalid_argument("unpack_step: trailing words in buffer");
  return {signals, request_ids, tokens, params};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Token-buffer packing for the tensor-parallel request broadcast";
  m.def("pack_step", &pack_step, "Pack signals and requests into one int64 tensor",
        py::arg("signals"), py::arg("request_ids"), py::arg("tokens"), py::arg("params"));
  m.def("unpack_step", &unpack_step, "Unpack a buffer made by pack_step", py::arg("buffer"));
}
