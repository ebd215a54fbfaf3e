// Python bindings of specdec._C: m.def lines only; the ops live in their own files.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ngram_index.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "specdec native CPU ops";
  // NgramIndex (csrc/ngram_index.h); reference: specdec/drafters/ngram_index.py
  using specdec::NgramIndex;
  py::class_<NgramIndex>(m, "NgramIndex", "Bounded n-gram -> continuation pool (see csrc/ngram_index.h).")
      .def(py::init<int64_t, int64_t, int64_t, int64_t>(), py::arg("max_order") = 4, py::arg("max_continuation") = 8,
           py::arg("capacity") = 65536, py::arg("max_per_key") = 8)
      .def("insert", &NgramIndex::insert, py::arg("tokens"), py::arg("start") = 0)
      .def("insert_next", &NgramIndex::insert_next, py::arg("context"), py::arg("next_tokens"))
      .def("lookup", &NgramIndex::lookup, py::arg("context"), py::arg("max_candidates"))
      .def("continuations", &NgramIndex::continuations, py::arg("key"))
      .def("num_keys", &NgramIndex::num_keys)
      .def("clear", &NgramIndex::clear)
      .def("__len__", &NgramIndex::size)
      .def_property_readonly("max_order", &NgramIndex::max_order)
      .def_property_readonly("max_continuation", &NgramIndex::max_continuation)
      .def_property_readonly("capacity", &NgramIndex::capacity)
      .def_property_readonly("max_per_key", &NgramIndex::max_per_key);
}
