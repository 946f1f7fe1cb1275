// Bounds-checked little helpers for reading and writing wire structures. Every access copies
// with memcpy (the wire gives no alignment guarantee) and every read checks the remaining
// length first, so a decoder built on ByteReader cannot read past its buffer.
#ifndef KVMID_KERNEL_ABI_BYTES_H_
#define KVMID_KERNEL_ABI_BYTES_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <vector>

namespace kvmi {

// A read-only view of bytes (the codec's input type).
class ByteView {
 public:
  constexpr ByteView() = default;
  constexpr ByteView(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  ByteView(const std::vector<uint8_t>& v) : data_(v.data()), size_(v.size()) {}  // NOLINT
  explicit ByteView(std::string_view s)
      : data_(reinterpret_cast<const uint8_t*>(s.data())), size_(s.size()) {}

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  uint8_t operator[](size_t i) const { return data_[i]; }
  ByteView subview(size_t offset, size_t n = SIZE_MAX) const {
    if (offset > size_) offset = size_;
    if (n > size_ - offset) n = size_ - offset;
    return ByteView(data_ + offset, n);
  }
  std::vector<uint8_t> ToVector() const { return std::vector<uint8_t>(data_, data_ + size_); }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

class ByteReader {
 public:
  explicit ByteReader(ByteView in) : in_(in) {}

  size_t remaining() const { return in_.size() - pos_; }
  size_t position() const { return pos_; }
  ByteView Rest() const { return in_.subview(pos_); }

  // Copies sizeof(T) bytes into *out. False (and nothing consumed) if fewer remain.
  template <typename T>
  bool Read(T* out) {
    static_assert(std::is_trivially_copyable_v<T>, "wire types must be trivially copyable");
    if (remaining() < sizeof(T)) return false;
    std::memcpy(out, in_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  // Like Read, but a short input is zero-filled: the v6 kernel's receive buffer is zeroed for
  // every message, so missing trailing bytes of a fixed-size request read as 0.
  template <typename T>
  void ReadZeroFilled(T* out) {
    static_assert(std::is_trivially_copyable_v<T>, "wire types must be trivially copyable");
    std::memset(out, 0, sizeof(T));
    size_t n = remaining() < sizeof(T) ? remaining() : sizeof(T);
    // An empty view may have a null data(); memcpy from null is undefined even for 0 bytes.
    if (n != 0) std::memcpy(out, in_.data() + pos_, n);
    pos_ += n;
  }
  bool ReadBytes(size_t n, ByteView* out) {
    if (remaining() < n) return false;
    *out = in_.subview(pos_, n);
    pos_ += n;
    return true;
  }
  bool Skip(size_t n) {
    if (remaining() < n) return false;
    pos_ += n;
    return true;
  }

 private:
  ByteView in_;
  size_t pos_ = 0;
};

// Appends to a caller-owned vector, so hot paths can reuse one buffer per connection.
class ByteWriter {
 public:
  explicit ByteWriter(std::vector<uint8_t>* out) : out_(out) {}

  template <typename T>
  void Write(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>, "wire types must be trivially copyable");
    const auto* p = reinterpret_cast<const uint8_t*>(&value);
    out_->insert(out_->end(), p, p + sizeof(T));
  }
  void WriteBytes(ByteView bytes) {
    out_->insert(out_->end(), bytes.data(), bytes.data() + bytes.size());
  }
  void WriteZeros(size_t n) { out_->insert(out_->end(), n, 0); }
  size_t size() const { return out_->size(); }
  std::vector<uint8_t>* buffer() { return out_; }
  // Overwrites sizeof(T) bytes at an earlier offset (used to patch hdr.size).
  template <typename T>
  void WriteAt(size_t offset, const T& value) {
    std::memcpy(out_->data() + offset, &value, sizeof(T));
  }

 private:
  std::vector<uint8_t>* out_;
};

// True if every byte of the object is zero (padding checks).
template <typename T>
bool AllZero(const T& value) {
  const auto* p = reinterpret_cast<const uint8_t*>(&value);
  for (size_t i = 0; i < sizeof(T); ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

}  // namespace kvmi

#endif  // KVMID_KERNEL_ABI_BYTES_H_
