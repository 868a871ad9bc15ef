// Registers the ospo_fast::owen_aggregate operator and its CPU implementation.
// Argument checks live in Python (ospo_fast/owen.py); the TORCH_CHECKs here only guard memory safety
// against calls that bypass it (dtype, device, contiguity), never the index ranges.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

namespace ospo_fast {

namespace {

void check_aggregate_args(const at::Tensor& values, const at::Tensor& row_value_base, const at::Tensor& row_term_begin,
                          const at::Tensor& row_term_end, const at::Tensor& term_plus, const at::Tensor& term_minus,
                          const at::Tensor& term_weight) {
  TORCH_CHECK(values.dim() == 1, "owen_aggregate: values must be 1-D");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "owen_aggregate: values must be float32 or float64");
  TORCH_CHECK(term_weight.scalar_type() == values.scalar_type(), "owen_aggregate: term_weight dtype must match values");
  for (const at::Tensor* t : {&row_value_base, &row_term_begin, &row_term_end, &term_plus, &term_minus}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1, "owen_aggregate: index tensors must be 1-D int64");
  }
  TORCH_CHECK(row_term_begin.numel() == row_value_base.numel() && row_term_end.numel() == row_value_base.numel(),
              "owen_aggregate: row tensors must have the same length");
  TORCH_CHECK(term_minus.numel() == term_plus.numel() && term_weight.numel() == term_plus.numel(),
              "owen_aggregate: term tensors must have the same length");
  for (const at::Tensor* t :
       {&values, &row_value_base, &row_term_begin, &row_term_end, &term_plus, &term_minus, &term_weight}) {
    TORCH_CHECK(t->device() == values.device(), "owen_aggregate: all tensors must be on one device");
    TORCH_CHECK(t->is_contiguous(), "owen_aggregate: all tensors must be contiguous");
  }
}

template <typename scalar_t>
void owen_aggregate_rows(const scalar_t* values, const int64_t* base, const int64_t* begin, const int64_t* end,
                         const int64_t* plus, const int64_t* minus, const scalar_t* weight, scalar_t* out,
                         int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const scalar_t* v = values + base[r];
    scalar_t acc = 0;
    for (int64_t t = begin[r]; t < end[r]; ++t) {
      acc += weight[t] * (v[plus[t]] - v[minus[t]]);
    }
    out[r] = acc;
  }
}

at::Tensor owen_aggregate_cpu(const at::Tensor& values, const at::Tensor& row_value_base,
                              const at::Tensor& row_term_begin, const at::Tensor& row_term_end,
                              const at::Tensor& term_plus, const at::Tensor& term_minus,
                              const at::Tensor& term_weight) {
  check_aggregate_args(values, row_value_base, row_term_begin, row_term_end, term_plus, term_minus, term_weight);
  TORCH_CHECK(values.device().is_cpu(), "owen_aggregate_cpu: tensors must be on the CPU");
  const int64_t num_rows = row_value_base.numel();
  at::Tensor out = at::empty({num_rows}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "owen_aggregate_cpu", [&] {
    const scalar_t* v = values.data_ptr<scalar_t>();
    const int64_t* base = row_value_base.data_ptr<int64_t>();
    const int64_t* begin = row_term_begin.data_ptr<int64_t>();
    const int64_t* end = row_term_end.data_ptr<int64_t>();
    const int64_t* plus = term_plus.data_ptr<int64_t>();
    const int64_t* minus = term_minus.data_ptr<int64_t>();
    const scalar_t* w = term_weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // Rows hold tens of terms each: a grain of 256 rows keeps thread start-up below the work.
    at::parallel_for(0, num_rows, 256, [&](int64_t row_begin, int64_t row_end) {
      owen_aggregate_rows<scalar_t>(v, base, begin, end, plus, minus, w, o, row_begin, row_end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(ospo_fast, m) {
  m.def(
      "owen_aggregate(Tensor values, Tensor row_value_base, Tensor row_term_begin, Tensor row_term_end, "
      "Tensor term_plus, Tensor term_minus, Tensor term_weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(ospo_fast, CPU, m) { m.impl("owen_aggregate", &owen_aggregate_cpu); }

// Shared with the CUDA binding, which lives in its own translation unit.
void check_owen_aggregate_args(const at::Tensor& values, const at::Tensor& row_value_base,
                               const at::Tensor& row_term_begin, const at::Tensor& row_term_end,
                               const at::Tensor& term_plus, const at::Tensor& term_minus,
                               const at::Tensor& term_weight) {
  check_aggregate_args(values, row_value_base, row_term_begin, row_term_end, term_plus, term_minus, term_weight);
}

}  // namespace ospo_fast

// A bare module: importing ospo_fast._C runs the registrations above. Whether CUDA kernels were built
// is exposed as the attribute `with_cuda`.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ospo_fast operators", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef OSPO_FAST_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  return module;
}
}
