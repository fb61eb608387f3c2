// The Python module exemplar._C: importing it loads the op registrations
// (csrc/ops.cpp and the kernels), which are reached through torch.ops.exemplar;
// the one class bound here is the store's shard reader.
#include <torch/extension.h>

#include "../io/shard_reader.h"

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  py::class_<exemplar::ShardReader>(m, "ShardReader",
                                    "Reads a store's shard files one ahead of the consumer on a background "
                                    "thread, checking each file's size and CRC-32 (csrc/io/shard_reader.h).")
      .def(py::init([](const std::vector<std::tuple<std::string, int64_t, uint32_t>>& files, bool pinned,
                       int64_t depth) {
             std::vector<exemplar::ShardFile> list;
             for (const auto& [path, bytes, crc] : files) list.push_back({path, bytes, crc});
             return std::make_unique<exemplar::ShardReader>(std::move(list), pinned, depth);
           }),
           py::arg("files"), py::arg("pinned") = false, py::arg("depth") = 1,
           "files: [(path, bytes, crc32)], read in order on a background thread, `depth` ahead")
      .def("next", &exemplar::ShardReader::next, py::call_guard<py::gil_scoped_release>(),
           "The next file's bytes as a uint8 tensor (waits for the reader, without the GIL)")
      .def("done", &exemplar::ShardReader::done);
}
