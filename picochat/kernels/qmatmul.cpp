// picochat's CPU kernel as PyTorch operators: picochat::qlinear, picochat::dequantize, picochat::isa.
// The arithmetic, and what it computes, is in qmatmul.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "qmatmul.h"

namespace {
using namespace picochat;

struct AtenParallelFor {  // the kernel's loops split over PyTorch's intra-op threads (torch.set_num_threads)
  template <typename F>
  void operator()(int64_t begin, int64_t end, int64_t grain, const F& fn) const { at::parallel_for(begin, end, grain, fn); }
};

Weights check_weights(const char* op, const at::Tensor& packed, int64_t bits, int64_t group, int64_t in_features,
                      int64_t out_features, bool has_min) {
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group == 16 || group == 32 || group == 64, op, ": group must be 16, 32 or 64, got ", group);
  TORCH_CHECK(in_features > 0 && out_features > 0, op, ": the matrix must have positive sizes");
  const Weights W = layout((const uint8_t*)packed.data_ptr(), bits, group, in_features, out_features, has_min);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2 &&
              packed.size(0) == W.tiles && packed.size(1) == W.tile_bytes,
              op, ": packed weight must be uint8 [", W.tiles, ", ", W.tile_bytes, "] for a ", out_features, "×",
              in_features, " matrix, got ", packed.sizes());
  return W;
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& packed, int64_t bits, int64_t group, int64_t in_features,
                   int64_t out_features, bool has_min) {
  const Weights W = check_weights("picochat::qlinear", packed, bits, group, in_features, out_features, has_min);
  TORCH_CHECK(x.size(-1) == in_features, "picochat::qlinear: x has ", x.size(-1), " features, the weight ", in_features);
  const at::Tensor x2 = x.reshape({-1, W.K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, W.N}, x2.options());
  if (M > 0) {
    if (bits == 4) qmatmul<4>(x2.data_ptr<float>(), M, W, y.data_ptr<float>(), AtenParallelFor{});
    else qmatmul<8>(x2.data_ptr<float>(), M, W, y.data_ptr<float>(), AtenParallelFor{});
  }
  auto out_shape = x.sizes().vec();
  out_shape.back() = W.N;
  return y.view(out_shape).to(x.scalar_type());
}

// W (or the given rows of it) in floating point, float32 or bfloat16: for products of many rows, where a
// dense matrix product (e.g. oneDNN's AMX bfloat16 kernels) beats the integer kernel, the weights are
// expanded just for that call; and for embedding lookups (a few rows).
at::Tensor dequantize(const at::Tensor& packed, int64_t bits, int64_t group, int64_t in_features, int64_t out_features,
                      bool has_min, at::ScalarType dtype, const std::optional<at::Tensor>& rows) {
  const Weights W = check_weights("picochat::dequantize", packed, bits, group, in_features, out_features, has_min);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "picochat::dequantize: dtype must be float32 or bfloat16");
  at::Tensor index;
  if (rows.has_value()) {
    index = rows->to(at::kLong).contiguous();
    TORCH_CHECK(index.dim() == 1, "picochat::dequantize: rows must be 1-D");
    if (index.numel()) {
      TORCH_CHECK(index.min().item<int64_t>() >= 0 && index.max().item<int64_t>() < W.N,
                  "picochat::dequantize: a row is out of range [0, ", W.N, ")");
    }
  }
  const int64_t n_out = rows.has_value() ? index.numel() : W.N;
  const int64_t* idx = rows.has_value() ? index.data_ptr<int64_t>() : nullptr;
  at::Tensor out = at::empty({n_out, W.K}, packed.options().dtype(dtype));
  at::parallel_for(0, n_out, 64, [&](int64_t i0, int64_t i1) {
    std::vector<float> row(W.Kp);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = idx ? idx[i] : i;
      if (bits == 4) dequantize_row<4>(W, n, row.data());
      else dequantize_row<8>(W, n, row.data());
      if (dtype == at::kFloat) {
        std::memcpy(out.data_ptr<float>() + i * W.K, row.data(), W.K * sizeof(float));
      } else {
        at::BFloat16* o = out.data_ptr<at::BFloat16>() + i * W.K;
        for (int64_t k = 0; k < W.K; ++k) o[k] = at::BFloat16(row[k]);
      }
    }
  });
  return out;
}

std::string isa() { return isa_name(); }

}  // namespace

TORCH_LIBRARY(picochat, m) {
  m.def("qlinear(Tensor x, Tensor packed, int bits, int group, int in_features, int out_features, bool has_min) "
        "-> Tensor");
  m.def("dequantize(Tensor packed, int bits, int group, int in_features, int out_features, bool has_min, "
        "ScalarType dtype, Tensor? rows=None) -> Tensor");
  m.def("isa() -> str", &isa);  // which instruction set this build uses
}

TORCH_LIBRARY_IMPL(picochat, CPU, m) {
  m.impl("qlinear", qlinear);
  m.impl("dequantize", dequantize);
}
