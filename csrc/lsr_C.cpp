// The Python module lsr._C: importing it loads this library, whose static initialisers
// register the lsr:: ops with the PyTorch dispatcher. No pybind11 bindings are needed.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                      "lsr native ops (registered as torch.ops.lsr.*)", -1, nullptr};
  return PyModule_Create(&module);
}
}
