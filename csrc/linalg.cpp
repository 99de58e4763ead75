// linalg.cpp: low-rank factorization of Conv2d weights through the
// eigen-decomposition of a Gram matrix, and small tensor helpers.
#include "linalg.h"

#include <dlfcn.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "internal.h"

using convsplit::guard;

struct cs_lowrank {
  // The unfolded weight divided by scale, (L, M), row-major float64.
  at::Tensor matrix;
  // A power of two that brings the largest |element| of the matrix near 1,
  // so that the Gram matrix neither overflows nor underflows. Dividing by a
  // power of two is exact, so the results round as without it.
  double scale = 1;
  // Singular values of the unscaled matrix, descending, (L).
  at::Tensor values;

  // LAPACK path: the Gram matrix reduced to tridiagonal form by dsytrd
  // (column-major, lower triangle, with the Householder reflectors below the
  // subdiagonal), the tridiagonal's diagonal and subdiagonal, and tau.
  at::Tensor reduced;
  std::vector<double> diagonal, subdiagonal, tau;
  // at::linalg_eigh path: eigenvectors as columns, ascending eigenvalues, (L, L).
  at::Tensor vectors;

  bool split_output = false, split_width = false;
  int64_t out_channels = 0, in_channels = 0;
  c10::ScalarType dtype = c10::kFloat;
  bool channels_last = false, requires_grad = false;
};

namespace {

// LAPACK and BLAS routines of the library that libtorch itself loaded
// (OpenBLAS on Debian). The shim finds them with dlsym rather than linking
// them, so that programs link only libtorch. Character arguments are
// followed by their hidden Fortran lengths.
struct Lapack {
  using Dsyrk = void (*)(const char*, const char*, const int*, const int*, const double*,
                         const double*, const int*, const double*, double*, const int*, size_t,
                         size_t);
  using Dsytrd = void (*)(const char*, const int*, double*, const int*, double*, double*,
                          double*, double*, const int*, int*, size_t);
  using Dsterf = void (*)(const int*, double*, double*, int*);
  using Dstemr = void (*)(const char*, const char*, const int*, double*, double*, const double*,
                          const double*, const int*, const int*, int*, double*, double*,
                          const int*, const int*, int*, int*, double*, const int*, int*,
                          const int*, int*, size_t, size_t);
  using Dormtr = void (*)(const char*, const char*, const char*, const int*, const int*,
                          const double*, const int*, const double*, double*, const int*, double*,
                          const int*, int*, size_t, size_t, size_t);
  Dsyrk dsyrk = nullptr;
  Dsytrd dsytrd = nullptr;
  Dsterf dsterf = nullptr;
  Dstemr dstemr = nullptr;
  Dormtr dormtr = nullptr;

  bool available() const { return dsyrk && dsytrd && dsterf && dstemr && dormtr; }
};

const Lapack& lapack() {
  static const Lapack routines = [] {
    Lapack l;
    l.dsyrk = reinterpret_cast<Lapack::Dsyrk>(dlsym(RTLD_DEFAULT, "dsyrk_"));
    l.dsytrd = reinterpret_cast<Lapack::Dsytrd>(dlsym(RTLD_DEFAULT, "dsytrd_"));
    l.dsterf = reinterpret_cast<Lapack::Dsterf>(dlsym(RTLD_DEFAULT, "dsterf_"));
    l.dstemr = reinterpret_cast<Lapack::Dstemr>(dlsym(RTLD_DEFAULT, "dstemr_"));
    l.dormtr = reinterpret_cast<Lapack::Dormtr>(dlsym(RTLD_DEFAULT, "dormtr_"));
    return l;
  }();
  return routines;
}

int checkedInt(int64_t n) {
  TORCH_CHECK(n <= std::numeric_limits<int>::max(), "matrix size ", n, " is too large for LAPACK");
  return static_cast<int>(n);
}

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

// eigenvaluesLapack reduces the Gram matrix of f.matrix to tridiagonal form
// and returns its eigenvalues in ascending order. The eigenvectors are left
// for leadingVectorsLapack, which computes only the ones the rank needs: the
// reduction is most of the cost, and all L eigenvectors would cost as much
// again.
at::Tensor eigenvaluesLapack(cs_lowrank& f) {
  const Lapack& l = lapack();
  const int n = checkedInt(f.matrix.size(0));
  const int k = checkedInt(f.matrix.size(1));
  const double one = 1, zero = 0;
  int info = 0;

  // Column-major, the row-major (L, M) matrix is A^T with leading dimension
  // M, so A A^T is syrk with trans = 'T'.
  f.reduced = at::empty({n, n}, f.matrix.options());
  double* gram = f.reduced.data_ptr<double>();
  l.dsyrk("L", "T", &n, &k, &one, f.matrix.data_ptr<double>(), &k, &zero, gram, &n, 1, 1);

  f.diagonal.assign(n, 0);
  f.subdiagonal.assign(n, 0);  // n, not n - 1: dstemr uses the last element as workspace
  f.tau.assign(std::max(n - 1, 1), 0);
  int lwork = -1;
  double size = 0;
  l.dsytrd("L", &n, gram, &n, f.diagonal.data(), f.subdiagonal.data(), f.tau.data(), &size, &lwork,
           &info, 1);
  TORCH_CHECK(info == 0, "LAPACK dsytrd workspace query failed with info ", info);
  lwork = std::max(1, static_cast<int>(size));
  std::vector<double> work(lwork);
  l.dsytrd("L", &n, gram, &n, f.diagonal.data(), f.subdiagonal.data(), f.tau.data(), work.data(),
           &lwork, &info, 1);
  TORCH_CHECK(info == 0, "LAPACK dsytrd failed with info ", info);

  at::Tensor values = at::empty({n}, f.matrix.options());
  std::vector<double> offdiagonal(f.subdiagonal);
  std::copy(f.diagonal.begin(), f.diagonal.end(), values.data_ptr<double>());
  l.dsterf(&n, values.data_ptr<double>(), offdiagonal.data(), &info);
  TORCH_CHECK(info == 0, "LAPACK dsterf failed to converge (info ", info, ")");
  return values;
}

// leadingVectorsLapack returns U_r^T, (r, L), the eigenvectors of the r
// largest eigenvalues in descending order, from the tridiagonal form.
at::Tensor leadingVectorsLapack(cs_lowrank& f, int64_t rank) {
  const Lapack& l = lapack();
  const int n = checkedInt(f.matrix.size(0));
  const int r = checkedInt(rank);
  const int first = n - r + 1, last = n;
  const double unused = 0;
  int found = 0, info = 0, tryrac = 1;
  std::vector<double> d(f.diagonal), e(f.subdiagonal), w(n);
  std::vector<int> support(2 * static_cast<size_t>(r));

  // Column-major n x r is row-major (r, n): each row is one eigenvector.
  at::Tensor vectors = at::empty({r, n}, f.matrix.options());
  double* z = vectors.data_ptr<double>();
  int lwork = -1, liwork = -1, iworkSize = 0;
  double workSize = 0;
  l.dstemr("V", "I", &n, d.data(), e.data(), &unused, &unused, &first, &last, &found, w.data(), z,
           &n, &r, support.data(), &tryrac, &workSize, &lwork, &iworkSize, &liwork, &info, 1, 1);
  TORCH_CHECK(info == 0, "LAPACK dstemr workspace query failed with info ", info);
  lwork = std::max(1, static_cast<int>(workSize));
  liwork = std::max(1, iworkSize);
  std::vector<double> work(lwork);
  std::vector<int> iwork(liwork);
  l.dstemr("V", "I", &n, d.data(), e.data(), &unused, &unused, &first, &last, &found, w.data(), z,
           &n, &r, support.data(), &tryrac, work.data(), &lwork, iwork.data(), &liwork, &info, 1, 1);
  TORCH_CHECK(info == 0 && found == r, "LAPACK dstemr failed with info ", info, " (", found, " of ",
              r, " eigenvectors)");

  // Back to eigenvectors of the Gram matrix: Z = Q Z.
  lwork = -1;
  l.dormtr("L", "L", "N", &n, &r, f.reduced.data_ptr<double>(), &n, f.tau.data(), z, &n, &workSize,
           &lwork, &info, 1, 1, 1);
  TORCH_CHECK(info == 0, "LAPACK dormtr workspace query failed with info ", info);
  lwork = std::max(1, static_cast<int>(workSize));
  work.assign(lwork, 0);
  l.dormtr("L", "L", "N", &n, &r, f.reduced.data_ptr<double>(), &n, f.tau.data(), z, &n, work.data(),
           &lwork, &info, 1, 1, 1);
  TORCH_CHECK(info == 0, "LAPACK dormtr failed with info ", info);
  return vectors.flip({0});
}

// eigenvaluesEigh computes every eigenvalue and eigenvector of the Gram
// matrix with at::linalg_eigh and returns the eigenvalues in ascending order.
at::Tensor eigenvaluesEigh(cs_lowrank& f) {
  at::Tensor gram = at::matmul(f.matrix, f.matrix.t());
  auto [values, vectors] = at::linalg_eigh(gram, "L");
  f.vectors = vectors;
  return values;
}

// leadingVectors returns U_r^T, (r, L): the eigenvectors of the r largest
// eigenvalues of the Gram matrix in descending order.
at::Tensor leadingVectors(cs_lowrank& f, int64_t rank) {
  const int64_t rows = f.matrix.size(0);
  if (!f.vectors.defined()) {
    try {
      return leadingVectorsLapack(f, rank);
    } catch (const c10::Error& e) {
      // dstemr can fail to converge in rare cases. at::linalg_eigh
      // computes the vectors another way.
      eigenvaluesEigh(f);
    }
  }
  // at::linalg_eigh sorts ascending, so the leading vectors are the last columns.
  return f.vectors.narrow(1, rows - rank, rank).flip({1}).t();
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

int cs_lowrank_lapack_available(void) { return lapack().available() ? 1 : 0; }

int cs_lowrank_new(cs_tensor* weight, int split_output, int split_width, int method,
                   cs_lowrank** out, char** err) {
  return guard(err, [&] {
    torch::NoGradGuard no_grad;
    const at::Tensor& w = weight->tensor;
    TORCH_CHECK(w.dim() == 4, "a Conv2d weight has 4 dimensions, got ", w.dim());
    TORCH_CHECK(w.scalar_type() == at::kHalf || w.scalar_type() == at::kFloat ||
                    w.scalar_type() == at::kDouble,
                "weight dtype ", w.scalar_type(), " is not supported: want Half, Float or Double");
    TORCH_CHECK(w.numel() > 0, "weight ", w.sizes(), " is empty");
    TORCH_CHECK(method == CS_LOWRANK_AUTO || method == CS_LOWRANK_EIGH, "unknown method ", method);

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
    bool useLapack = method == CS_LOWRANK_AUTO && lapack().available();
    at::Tensor squares = (useLapack ? eigenvaluesLapack(*f) : eigenvaluesEigh(*f)).flip({0});

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

    at::Tensor ut = leadingVectors(*f, rank);  // U_r^T, (r, L)
    at::Tensor projection = at::matmul(ut, f->matrix).mul_(f->scale);  // (r, M)

    // Kernel sides: the split axis runs along the U_r layer's kernel and the
    // other axis along the projection layer's. unsqueeze(3) gives (..., k, 1),
    // unsqueeze(2) gives (..., 1, k).
    const int64_t splitDim = f->split_width ? 2 : 3;
    const int64_t otherDim = f->split_width ? 3 : 2;
    at::Tensor firstWeight, lastWeight;
    if (f->split_output) {
      // Rows (out, ka): the last layer holds U_r as (C_out, r, ka).
      lastWeight = ut.reshape({rank, f->out_channels, -1}).permute({1, 0, 2}).unsqueeze(splitDim);
      firstWeight = projection.reshape({rank, f->in_channels, -1}).unsqueeze(otherDim);
    } else {
      // Rows (in, ka): the first layer holds U_r^T as (r, C_in, ka).
      firstWeight = ut.reshape({rank, f->in_channels, -1}).unsqueeze(splitDim);
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
