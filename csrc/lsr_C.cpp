// The Python module lsr._C. Importing it loads this library, whose static initialisers
// register the lsr:: ops with the PyTorch dispatcher (torch.ops.lsr.*). The one binding
// here is the native resampling loop, which takes a scripted module and so is not an op.
#include <torch/extension.h>

#include "resample/resample.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lsr native ops (registered as torch.ops.lsr.*) and the native resampling loop";
  m.def(
      "resample_incremental",
      [](const py::object& scripted, const at::Tensor& codes, const at::Tensor& noise, double tau,
         double temperature) {
        // a torch.jit.ScriptModule from Python: its C++ module is the `_c` attribute
        torch::jit::Module prior = py::cast<torch::jit::Module>(scripted.attr("_c"));
        lsr::ResampleOutput r;
        {
          py::gil_scoped_release no_gil;
          r = lsr::resample_incremental(prior, codes, noise, tau, temperature);
        }
        return py::make_tuple(r.codes, r.resampled, r.likelihood, r.prior_passes, r.positions_evaluated);
      },
      py::arg("prior"), py::arg("codes"), py::arg("noise"), py::arg("tau"), py::arg("temperature") = 1.0,
      "Exact fast resampling with incremental prior passes (see csrc/resample/resample.h). Returns "
      "(codes, resampled, likelihood, prior_passes, positions_evaluated).");
}
