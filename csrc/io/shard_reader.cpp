#include "shard_reader.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace exemplar {

ShardReader::ShardReader(std::vector<ShardFile> files, bool pinned, int64_t depth)
    : files_(std::move(files)), pinned_(pinned), depth_(static_cast<size_t>(std::max<int64_t>(depth, 1))) {
  worker_ = std::thread([this] { run(); });
}

ShardReader::~ShardReader() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  changed_.notify_all();
  worker_.join();
}

bool ShardReader::done() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return taken_ == files_.size();
}

at::Tensor ShardReader::next() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (taken_ == files_.size()) throw std::runtime_error("ShardReader: no files left to read");
  changed_.wait(lock, [this] { return !ready_.empty(); });
  Item item = std::move(ready_.front());
  ready_.pop_front();
  ++taken_;
  lock.unlock();
  changed_.notify_all();
  if (!item.error.empty()) throw std::runtime_error(item.error);
  return item.bytes;
}

void ShardReader::run() {
  for (const auto& file : files_) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      changed_.wait(lock, [this] { return stop_ || ready_.size() < depth_; });
      if (stop_) return;
    }
    Item item;
    try {
      item.bytes = read(file);
    } catch (const std::exception& e) {
      item.error = e.what();
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ready_.push_back(std::move(item));
    }
    changed_.notify_all();
  }
}

at::Tensor ShardReader::read(const ShardFile& file) const {
  const int fd = ::open(file.path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("shard " + file.path + ": cannot open: " + std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  const off_t size = ::lseek(fd, 0, SEEK_END);
  if (size != file.bytes) {
    throw std::runtime_error("shard " + file.path + ": " + std::to_string(size) + " bytes, the manifest says " +
                             std::to_string(file.bytes) + " (truncated or replaced)");
  }
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  auto bytes = at::empty({file.bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(pinned_));
  auto* data = bytes.data_ptr<uint8_t>();
  uLong crc = crc32(0L, Z_NULL, 0);
  constexpr int64_t kChunk = int64_t(1) << 26;  // read and checksum 64 MB at a time
  for (int64_t done = 0; done < file.bytes;) {
    const int64_t want = std::min(kChunk, file.bytes - done);
    int64_t got = 0;
    while (got < want) {
      const ssize_t n = ::pread(fd, data + done + got, want - got, done + got);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        throw std::runtime_error("shard " + file.path + ": read failed at byte " + std::to_string(done + got) +
                                 ": " + (n < 0 ? std::strerror(errno) : "unexpected end of file"));
      }
      got += n;
    }
    crc = crc32(crc, data + done, static_cast<uInt>(want));
    done += want;
  }
  if (static_cast<uint32_t>(crc) != file.crc32) {
    char text[64];
    std::snprintf(text, sizeof(text), "CRC-32 %08x, the manifest says %08x", static_cast<unsigned>(crc),
                  file.crc32);
    throw std::runtime_error("shard " + file.path + ": checksum mismatch: " + text + " (the file is corrupt)");
  }
  return bytes;
}

}  // namespace exemplar
