// CPU kernel of `ema_update_`: teacher <- teacher + (1 - decay) * (student - teacher), over all tensors at once.
//
// The parameter set is cut into fixed-size chunks (a tensor gives one or more), and one parallel_for runs over
// all chunks, so many small tensors (biases, norms) cost no more than one large one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_rows.h"
#include "ops.h"

namespace d2v {

namespace {
constexpr int64_t kChunk = 16384;  // elements: 64 KiB of teacher, fits L2 with the student chunk

struct Chunk {
  int64_t tensor, begin, size;
};
}  // namespace

void ema_update_cpu(at::TensorList teacher, at::TensorList student, double decay) {
  TORCH_CHECK(teacher.size() == student.size(), "d2v: ema_update_ needs as many student as teacher tensors");
  const size_t n = teacher.size();
  std::vector<at::Tensor> t(n), s(n);
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(teacher[i].scalar_type() == at::kFloat, "d2v: ema_update_ teacher tensors must be float32");
    TORCH_CHECK(teacher[i].sizes() == student[i].sizes(), "d2v: ema_update_ teacher/student shapes differ");
    // A non-contiguous teacher is updated through a contiguous copy, written back below.
    t[i] = teacher[i].contiguous();
    const auto sd = student[i].scalar_type();
    s[i] = (sd == at::kFloat || sd == at::kBFloat16 || sd == at::kHalf ? student[i] : student[i].to(at::kFloat))
               .contiguous();
    for (int64_t b = 0; b < t[i].numel(); b += kChunk) {
      chunks.push_back({static_cast<int64_t>(i), b, std::min(kChunk, t[i].numel() - b)});
    }
  }
  const float w = static_cast<float>(1.0 - decay);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks[c];
      float* tp = t[ch.tensor].data_ptr<float>() + ch.begin;
      const auto sd = s[ch.tensor].scalar_type();
      const char* sp = static_cast<const char*>(s[ch.tensor].data_ptr()) + ch.begin * c10::elementSize(sd);
      if (sd == at::kFloat) {
        cpu::lerp_row(tp, reinterpret_cast<const float*>(sp), ch.size, w);
      } else {
        buf.resize(ch.size);
        cpu::load_row(sp, sd, buf.data(), ch.size);
        cpu::lerp_row(tp, buf.data(), ch.size, w);
      }
    }
  });
  for (size_t i = 0; i < n; ++i) {
    if (!t[i].is_same(teacher[i])) teacher[i].copy_(t[i]);
  }
}

}  // namespace d2v
