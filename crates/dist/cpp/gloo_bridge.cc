#include "ff-dist/cpp/gloo_bridge.h"

#include <chrono>
#include <string>
#include <vector>

#include "ff-dist/src/gloo/ffi.rs.h"
#include "gloo/allgather.h"
#include "gloo/allreduce.h"
#include "gloo/barrier.h"
#include "gloo/broadcast.h"
#include "gloo/math.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/store.h"
#include "gloo/transport/tcp/device.h"

namespace ff_dist {

namespace {

// Tells the Rust side to use the process group's own timeout: Gloo's timeout-less wait
// overload would otherwise fall back to its fixed 30 second default.
constexpr int64_t kGroupTimeout = -1;

// Gloo's rendezvous store interface, answered by the Rust store client. Errors raised on the
// Rust side arrive here as rust::Error exceptions and propagate out through Gloo unchanged.
class RustBackedStore : public gloo::rendezvous::Store {
 public:
  explicit RustBackedStore(const GlooStoreAccess& access) : access_(access) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    store_set(
        access_,
        rust::Str(key),
        rust::Slice<const uint8_t>(
            reinterpret_cast<const uint8_t*>(data.data()), data.size()));
  }

  std::vector<char> get(const std::string& key) override {
    rust::Vec<uint8_t> value = store_get(access_, rust::Str(key));
    return std::vector<char>(value.begin(), value.end());
  }

  void wait(const std::vector<std::string>& keys) override {
    wait_keys(keys, kGroupTimeout);
  }

  void wait(
      const std::vector<std::string>& keys,
      const std::chrono::milliseconds& timeout) override {
    wait_keys(keys, timeout.count());
  }

 private:
  void wait_keys(const std::vector<std::string>& keys, int64_t timeout_ms) {
    rust::Vec<rust::String> names;
    names.reserve(keys.size());
    for (const auto& key : keys) {
      names.push_back(rust::String(key));
    }
    store_wait(
        access_,
        rust::Slice<const rust::String>(names.data(), names.size()),
        timeout_ms);
  }

  const GlooStoreAccess& access_;
};

std::chrono::milliseconds millis(int64_t timeout_ms) {
  return std::chrono::milliseconds(timeout_ms);
}

template <typename T>
void all_reduce_sum(GlooContext& context, T* data, size_t n, int64_t timeout_ms) {
  gloo::AllreduceOptions opts(context.context);
  opts.setOutput(data, n);
  void (*sum)(void*, const void*, const void*, size_t) = &gloo::sum<T>;
  opts.setReduceFunction(sum);
  opts.setTimeout(millis(timeout_ms));
  gloo::allreduce(opts);
}

}  // namespace

GlooContext::GlooContext(std::shared_ptr<gloo::Context> context)
    : context(std::move(context)) {}

std::unique_ptr<GlooContext> connect_full_mesh(
    const GlooStoreAccess& store,
    int32_t rank,
    int32_t size,
    rust::Str hostname,
    rust::Str iface,
    int64_t timeout_ms) {
  gloo::transport::tcp::attr attr;
  if (iface.size() > 0) {
    attr.iface = std::string(iface);
  } else {
    attr.hostname = std::string(hostname);
  }
  auto device = gloo::transport::tcp::CreateDevice(attr);
  auto context = std::make_shared<gloo::rendezvous::Context>(rank, size);
  context->setTimeout(millis(timeout_ms));
  RustBackedStore backed(store);
  context->connectFullMesh(backed, device);
  return std::make_unique<GlooContext>(context);
}

rust::Vec<rust::String> local_endpoints(const GlooContext& context) {
  rust::Vec<rust::String> endpoints;
  for (int peer = 0; peer < context.context->size; ++peer) {
    if (peer == context.context->rank) {
      endpoints.push_back(rust::String());
    } else {
      endpoints.push_back(
          rust::String(context.context->getPair(peer)->address().str()));
    }
  }
  return endpoints;
}

void all_reduce_sum_f32(
    GlooContext& context, rust::Slice<float> data, int64_t timeout_ms) {
  all_reduce_sum(context, data.data(), data.size(), timeout_ms);
}

void all_reduce_sum_f64(
    GlooContext& context, rust::Slice<double> data, int64_t timeout_ms) {
  all_reduce_sum(context, data.data(), data.size(), timeout_ms);
}

void all_gather_bytes(
    GlooContext& context,
    rust::Slice<const uint8_t> input,
    rust::Slice<uint8_t> output,
    int64_t timeout_ms) {
  gloo::AllgatherOptions opts(context.context);
  // Gloo only reads the input; its API takes a non-const pointer for both directions.
  opts.setInput(const_cast<uint8_t*>(input.data()), input.size());
  opts.setOutput(output.data(), output.size());
  opts.setTimeout(millis(timeout_ms));
  gloo::allgather(opts);
}

void broadcast_bytes(
    GlooContext& context,
    rust::Slice<uint8_t> data,
    int32_t root,
    int64_t timeout_ms) {
  gloo::BroadcastOptions opts(context.context);
  opts.setOutput(data.data(), data.size());
  opts.setRoot(root);
  opts.setTimeout(millis(timeout_ms));
  gloo::broadcast(opts);
}

void barrier(GlooContext& context, int64_t timeout_ms) {
  gloo::BarrierOptions opts(context.context);
  opts.setTimeout(millis(timeout_ms));
  gloo::barrier(opts);
}

}  // namespace ff_dist
