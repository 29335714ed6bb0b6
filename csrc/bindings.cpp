// Python bindings of fastft's compiled extension. Functions take raw device/host pointers
// (tensor.data_ptr()) and, for CUDA work, the stream handle; the Python side validates
// shapes, dtypes and contiguity before calling in.
#include <pybind11/pybind11.h>

#include "registry.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastft compiled kernels (optional; the package works without them)";
  py::dict info;
#ifdef FASTFT_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef FASTFT_WITH_OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  m.attr("build_info") = info;
  fastft::register_all(m);
}
