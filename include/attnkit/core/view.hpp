// attnkit/core/view.hpp — non-owning strided views over caller memory.
//
// A View<T, Rank> is a pointer, a shape and per-dimension strides counted in elements (not
// bytes). Nothing is copied or owned: an engine wraps its own buffers. Activations use the
// layout [tokens, heads, head_dim] with any strides; kernels require only that the last
// dimension is contiguous (stride 1), which they check.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <type_traits>

#include "attnkit/core/error.hpp"

namespace attnkit {

template <class T, int Rank>
struct View {
  static_assert(Rank >= 1 && Rank <= 4);
  using element_type = T;
  using value_type = std::remove_const_t<T>;
  static constexpr int rank = Rank;

  T* data = nullptr;
  std::array<std::int64_t, Rank> shape{};
  std::array<std::int64_t, Rank> stride{};

  View() = default;
  View(T* p, std::array<std::int64_t, Rank> shp, std::array<std::int64_t, Rank> str)
      : data(p), shape(shp), stride(str) {}
  // Row-major contiguous view.
  View(T* p, std::array<std::int64_t, Rank> shp) : data(p), shape(shp) {
    std::int64_t s = 1;
    for (int i = Rank - 1; i >= 0; --i) {
      stride[i] = s;
      s *= shape[i];
    }
  }
  // View<T> converts to View<const T>.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  View(const View<U, Rank>& o) : data(o.data), shape(o.shape), stride(o.stride) {}

  bool empty() const { return data == nullptr; }
  std::int64_t size(int dim) const { return shape[dim]; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  bool inner_contiguous() const { return stride[Rank - 1] == 1 || shape[Rank - 1] <= 1; }
  bool contiguous() const {
    std::int64_t s = 1;
    for (int i = Rank - 1; i >= 0; --i) {
      if (shape[i] > 1 && stride[i] != s) return false;
      s *= shape[i];
    }
    return true;
  }

  template <class... I>
  T& operator()(I... idx) const {
    static_assert(sizeof...(I) == Rank);
    const std::int64_t ix[] = {static_cast<std::int64_t>(idx)...};
    std::int64_t off = 0;
    for (int i = 0; i < Rank; ++i) off += ix[i] * stride[i];
    return data[off];
  }
  // Pointer to the start of the innermost row at the given leading indices.
  template <class... I>
  T* ptr(I... idx) const {
    static_assert(sizeof...(I) <= Rank);
    const std::int64_t ix[] = {0, static_cast<std::int64_t>(idx)...};
    std::int64_t off = 0;
    for (int i = 0; i < static_cast<int>(sizeof...(I)); ++i) off += ix[i + 1] * stride[i];
    return data + off;
  }
  // Sub-range [begin, end) along dimension dim.
  View slice(int dim, std::int64_t begin, std::int64_t end) const {
    View r = *this;
    r.data = data + begin * stride[dim];
    r.shape[dim] = end - begin;
    return r;
  }
};

template <class T> using View1 = View<T, 1>;
template <class T> using View2 = View<T, 2>;
template <class T> using View3 = View<T, 3>;
template <class T> using ConstView1 = View<const T, 1>;
template <class T> using ConstView2 = View<const T, 2>;
template <class T> using ConstView3 = View<const T, 3>;

namespace detail {
template <class V>
std::string shape_string(const V& v) {
  std::string s = "[";
  for (int i = 0; i < V::rank; ++i) {
    if (i) s += ", ";
    s += std::to_string(v.shape[i]);
  }
  return s + "]";
}
}  // namespace detail

// Checks shared by every kernel entry point. `fn` and `arg` name the function and argument.
template <class V>
void check_view(const V& v, const char* fn, const char* arg) {
  ATTNKIT_REQUIRE(v.data != nullptr || v.numel() == 0, fn, ": argument '", arg, "': null data pointer");
  for (int i = 0; i < V::rank; ++i)
    ATTNKIT_REQUIRE(v.shape[i] >= 0, fn, ": argument '", arg, "': negative extent in shape ",
                    detail::shape_string(v));
  ATTNKIT_REQUIRE(v.inner_contiguous(), fn, ": argument '", arg,
                  "': the last dimension must be contiguous (stride 1), got stride ", v.stride[V::rank - 1]);
}

}  // namespace attnkit
