// Reads the files of an on-disk store one after another on a background
// thread, so the next shard is read (and its checksum verified) while the
// current one is scored. Each file arrives whole as a uint8 tensor, in pinned
// host memory when it is bound for a GPU. No Python here: the binding is in
// csrc/python/, and C++ users can drive it directly.
#pragma once

#include <ATen/ATen.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace exemplar {

struct ShardFile {
  std::string path;
  int64_t bytes;   // expected size
  uint32_t crc32;  // expected zlib CRC-32 of the whole file
};

class ShardReader {
 public:
  // Reads `files` in order, at most `depth` files ahead of the consumer.
  ShardReader(std::vector<ShardFile> files, bool pinned, int64_t depth);
  ~ShardReader();
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;

  // The next file's bytes (uint8, 1-D); throws std::runtime_error naming the
  // file when it is missing, short or fails its checksum. Blocks until read.
  at::Tensor next();
  bool done() const;

 private:
  void run();
  at::Tensor read(const ShardFile& file) const;

  struct Item {
    at::Tensor bytes;
    std::string error;
  };
  std::vector<ShardFile> files_;
  bool pinned_;
  size_t depth_;
  size_t taken_ = 0;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Item> ready_;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace exemplar
