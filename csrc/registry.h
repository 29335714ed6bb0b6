// Each op family registers its bindings here, so bindings.cpp stays one small table.
#pragma once
#include <pybind11/pybind11.h>

namespace fastft {
void register_all(pybind11::module_& m);
}  // namespace fastft
