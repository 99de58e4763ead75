// linalg.cpp: low-rank factorization of Conv2d weights through the
// eigen-decomposition of a Gram matrix, and small tensor helpers.
#include "linalg.h"

#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "internal.h"

using convsplit::guard;

struct cs_lowrank {
  // The unfolded weight divided by scale, (L, M), float64.
  at::Tensor matrix;
  // A power of two that brings the largest |element| of the matrix near 1,
  // so that the Gram matrix neither overflows nor underflows. Dividing by a
  // power of two is exact, so the results round as without it.
  double scale = 1;
  // Singular values of the unscaled matrix, descending, (L).
  at::Tensor values;
  // Eigenvectors of the Gram matrix of the scaled matrix as columns, in
  // ascending order of eigenvalue, (L, L).
  at::Tensor vectors;
  bool split_output = false, split_width = false;
  int64_t out_channels = 0, in_channels = 0;
  c10::ScalarType dtype = c10::kFloat;
  bool channels_last = false, requires_grad = false;
};

namespace {

// unfold returns the (L, M) float64 matrix of a weight (C_out, C_in, kh, kw):
// rows (split channel, split kernel axis), columns (other channel, other
// kernel axis).
at::Tensor unfold(const at::Tensor& weight, bool split_output, bool split_width) {
  at::Tensor w = weight.detach().to(at::kDouble);
  if (split_width) w = w.permute({0, 1, 3, 2});  // (out, in, split axis, other axis)
  if (split_output) {
    w = w.permute({0, 2, 1, 3});  // (out, split axis, in, other axis)
  } else {
    w = w.permute({1, 2, 0, 3});  // (in, split axis, out, other axis)
  }
  return w.reshape({w.size(0) * w.size(1), w.size(2) * w.size(3)}).contiguous();
}

// largestFinite returns the largest finite value of a floating dtype.
double largestFinite(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kHalf:
      return static_cast<double>(std::numeric_limits<c10::Half>::max());
    case c10::kFloat:
      return static_cast<double>(std::numeric_limits<float>::max());
    default:
      return std::numeric_limits<double>::max();
  }
}

// toWeight casts a float64 weight to the factorization's dtype, clamping it
// to the dtype's finite range, and gives it the original memory format and
// requires_grad flag.
at::Tensor toWeight(const cs_lowrank& f, at::Tensor w) {
  if (f.dtype != at::kDouble) {
    double limit = largestFinite(f.dtype);
    w = w.clamp(-limit, limit).to(f.dtype);
  }
  // The factors are computed into new tensors, so the result never shares
  // storage with the original weight.
  w = f.channels_last ? w.contiguous(at::MemoryFormat::ChannelsLast) : w.contiguous();
  w.set_requires_grad(f.requires_grad);
  return w;
}

}  // namespace

extern "C" {

int cs_lowrank_new(cs_tensor* weight, int split_output, int split_width, cs_lowrank** out,
                   char** err) {
  return guard(err, [&] {
    torch::NoGradGuard no_grad;
    const at::Tensor& w = weight->tensor;
    TORCH_CHECK(w.dim() == 4, "a Conv2d weight has 4 dimensions, got ", w.dim());
    TORCH_CHECK(w.scalar_type() == at::kHalf || w.scalar_type() == at::kFloat ||
                    w.scalar_type() == at::kDouble,
                "weight dtype ", w.scalar_type(), " is not supported: want Half, Float or Double");
    TORCH_CHECK(w.numel() > 0, "weight ", w.sizes(), " is empty");

    auto f = std::make_unique<cs_lowrank>();
    f->split_output = split_output != 0;
    f->split_width = split_width != 0;
    f->out_channels = w.size(0);
    f->in_channels = w.size(1);
    f->dtype = w.scalar_type();
    f->channels_last = !w.is_contiguous() && w.is_contiguous(at::MemoryFormat::ChannelsLast);
    f->requires_grad = w.requires_grad();

    at::Tensor a = unfold(w, f->split_output, f->split_width);
    TORCH_CHECK(at::isfinite(a).all().item<bool>(), "weight has NaN or infinite values");
    double largest = a.abs().max().item<double>();
    if (largest > 0) {
      int exponent = 0;
      std::frexp(largest, &exponent);
      f->scale = std::ldexp(1.0, exponent);
      // Out of place: for some shapes the unfolded matrix is a view of a
      // float64 weight, which must stay as it is.
      a = a.div(f->scale);
    }
    f->matrix = a;
    const int64_t rows = a.size(0);

    // The eigenvalues of A A^T are the squared singular values of A and its
    // eigenvectors the left singular vectors. This costs a fraction of an SVD
    // of A, and only the rows of A matter for the rank and the factors.
    at::Tensor gram = at::matmul(a, a.t());
    auto [eigenvalues, eigenvectors] = at::linalg_eigh(gram, "L");
    gram.reset();
    f->vectors = eigenvectors;
    at::Tensor squares = eigenvalues.flip({0});

    // Eigenvalues carry an absolute error of about rows x eps x the largest
    // one. Singular values are trusted from them down to that level. Below
    // it (a weight of lower rank than L), an SVD of A gives them with
    // relative accuracy, which the rank estimate needs because it takes
    // their logarithms.
    double top = squares[0].item<double>();
    double bottom = squares[rows - 1].item<double>();
    double noise = static_cast<double>(rows) * std::numeric_limits<double>::epsilon() * top;
    if (bottom <= noise) {
      at::Tensor s = at::linalg_svdvals(a);
      if (s.size(0) < rows) s = at::cat({s, at::zeros({rows - s.size(0)}, s.options())});
      f->values = s.mul(f->scale);
    } else {
      f->values = squares.sqrt().mul(f->scale);
    }
    *out = f.release();
  });
}

void cs_lowrank_free(cs_lowrank* f) { delete f; }

void cs_lowrank_size(cs_lowrank* f, int64_t* rows, int64_t* cols) {
  *rows = f->matrix.size(0);
  *cols = f->matrix.size(1);
}

int cs_lowrank_singular_values(cs_lowrank* f, double* s, int64_t n, char** err) {
  return guard(err, [&] {
    TORCH_CHECK(n == f->values.size(0), "want room for ", f->values.size(0), " singular values, got ", n);
    at::Tensor values = f->values.contiguous();
    std::memcpy(s, values.data_ptr<double>(), sizeof(double) * static_cast<size_t>(n));
  });
}

int cs_lowrank_factors(cs_lowrank* f, int64_t rank, cs_tensor** first, cs_tensor** last,
                       char** err) {
  return guard(err, [&] {
    torch::NoGradGuard no_grad;
    const int64_t rows = f->matrix.size(0);
    TORCH_CHECK(rank >= 1 && rank <= rows, "rank ", rank, " is outside 1..", rows);

    // The leading singular vectors are the last eigenvectors; flipping puts
    // them in descending order of singular value.
    at::Tensor u = f->vectors.narrow(1, rows - rank, rank).flip({1});  // (L, r)
    at::Tensor projection = at::matmul(u.t(), f->matrix).mul_(f->scale);  // (r, M)

    // Kernel sides: the split axis runs along the U_r layer's kernel and the
    // other axis along the projection layer's. unsqueeze(3) gives (..., k, 1),
    // unsqueeze(2) gives (..., 1, k).
    const int64_t splitDim = f->split_width ? 2 : 3;
    const int64_t otherDim = f->split_width ? 3 : 2;
    at::Tensor firstWeight, lastWeight;
    if (f->split_output) {
      // Rows (out, ka): the last layer holds U_r as (C_out, r, ka).
      lastWeight = u.reshape({f->out_channels, -1, rank}).permute({0, 2, 1}).unsqueeze(splitDim);
      firstWeight = projection.reshape({rank, f->in_channels, -1}).unsqueeze(otherDim);
    } else {
      // Rows (in, ka): the first layer holds U_r^T as (r, C_in, ka).
      firstWeight = u.t().reshape({rank, f->in_channels, -1}).unsqueeze(splitDim);
      lastWeight = projection.reshape({rank, f->out_channels, -1}).permute({1, 0, 2}).unsqueeze(otherDim);
    }
    at::Tensor a = toWeight(*f, firstWeight);
    at::Tensor b = toWeight(*f, lastWeight);
    *first = new cs_tensor{a};
    *last = new cs_tensor{b};
  });
}

int cs_tensor_all_finite(cs_tensor* t, int* out, char** err) {
  return guard(err, [&] {
    const at::Tensor& x = t->tensor;
    if (!at::isFloatingType(x.scalar_type()) && !at::isComplexType(x.scalar_type())) {
      *out = 1;
      return;
    }
    *out = at::isfinite(x.detach()).all().item<bool>() ? 1 : 0;
  });
}

int cs_tensor_clone(cs_tensor* t, cs_tensor** out, char** err) {
  return guard(err, [&] {
    torch::NoGradGuard no_grad;
    at::Tensor copy = t->tensor.detach().clone(at::MemoryFormat::Preserve);
    copy.set_requires_grad(t->tensor.requires_grad());
    *out = new cs_tensor{copy};
  });
}

}  // extern "C"
