// Bindings of the NF4 family: host quantize / dequantize always, the CUDA decode GEMV when built with CUDA.
// Python passes tensor.data_ptr() values and, for CUDA, the stream handle; fastft/kernels/nf4_cpu.py and
// nf4_cuda.py check shapes, dtypes, devices and alignment first.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "nf4_cpu.h"
#include "registry.h"
#ifdef FASTFT_WITH_CUDA
#include "cuda/nf4_gemv.h"
#endif

namespace py = pybind11;

namespace fastft {

void register_nf4(py::module_& m) {
  m.def(
      "nf4_quantize_cpu",
      [](uintptr_t x, int dtype, int64_t n, int64_t blocksize, uintptr_t packed, uintptr_t absmax) {
        py::gil_scoped_release release;
        nf4_quantize_cpu(reinterpret_cast<const void*>(x), dtype, n, blocksize, reinterpret_cast<uint8_t*>(packed),
                         reinterpret_cast<float*>(absmax));
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("blocksize"), py::arg("packed"), py::arg("absmax"));
  m.def(
      "nf4_dequantize_cpu",
      [](uintptr_t packed, uintptr_t absmax, int64_t n, int64_t blocksize, uintptr_t out, int dtype) {
        py::gil_scoped_release release;
        nf4_dequantize_cpu(reinterpret_cast<const uint8_t*>(packed), reinterpret_cast<const float*>(absmax), n,
                           blocksize, reinterpret_cast<void*>(out), dtype);
      },
      py::arg("packed"), py::arg("absmax"), py::arg("n"), py::arg("blocksize"), py::arg("out"), py::arg("dtype"));
#ifdef FASTFT_WITH_CUDA
  m.def(
      "nf4_gemv_cuda",
      [](uintptr_t x, int64_t ldx, uintptr_t packed, uintptr_t absmax, uintptr_t absmax2, uintptr_t code2,
         float offset, int nested_blocksize, uintptr_t bias, uintptr_t y, int64_t ldy, int batch, int64_t n,
         int64_t k, int blocksize, int dtype, uintptr_t stream, int variant) {
        Nf4GemvArgs a{reinterpret_cast<const void*>(x), ldx, reinterpret_cast<const uint8_t*>(packed),
                      reinterpret_cast<const void*>(absmax), reinterpret_cast<const float*>(absmax2),
                      reinterpret_cast<const float*>(code2), offset, nested_blocksize,
                      reinterpret_cast<const void*>(bias), reinterpret_cast<void*>(y), ldy, batch, n, k, blocksize,
                      dtype, variant};
        const int err = nf4_gemv_launch(a, reinterpret_cast<void*>(stream));
        if (err != 0) throw std::runtime_error(nf4_gemv_error_string(err));
      },
      py::arg("x"), py::arg("ldx"), py::arg("packed"), py::arg("absmax"), py::arg("absmax2"), py::arg("code2"),
      py::arg("offset"), py::arg("nested_blocksize"), py::arg("bias"), py::arg("y"), py::arg("ldy"),
      py::arg("batch"), py::arg("n"), py::arg("k"), py::arg("blocksize"), py::arg("dtype"), py::arg("stream"),
      py::arg("variant") = 0);
#endif
}

}  // namespace fastft
