// Consumer smoke test: headwise is usable through the way this directory consumes it.
#include <headwise/headwise.hpp>

#include <cstdio>
#include <vector>

int main() {
  std::vector<float> q(1 * 3 * 2 * 4, 0.5f);
  const headwise::tensor_view<const float, 4> view = headwise::bshd(q.data(), 1, 3, 2, 4);
  headwise::attention_options opts;
  opts.causal = headwise::causal_mode::bottom_right;
  const headwise::bf16 h = headwise::to_bf16(1.5f);
  const bool ok = view.numel() == 24 && view(0, 2, 1, 3) == 0.5f && headwise::to_float(h) == 1.5f;
  std::printf("headwise consumer (%s): %s\n", HEADWISE_CONSUMER_KIND, ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
