#include "registry.h"

namespace fastft {
// Op families add a `register_<family>(m)` declaration and call here.
void register_nf4(pybind11::module_& m);

void register_all(pybind11::module_& m) { register_nf4(m); }
}  // namespace fastft
