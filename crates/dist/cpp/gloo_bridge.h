// The C++ side of ff-dist's Gloo bridge: a rendezvous store that calls back into the Rust
// store client, and thin wrappers over Gloo's collectives on contiguous host buffers.
#pragma once

#include <cstdint>
#include <memory>

#include "gloo/context.h"
#include "rust/cxx.h"

namespace ff_dist {

struct GlooStoreAccess;

class GlooContext {
 public:
  explicit GlooContext(std::shared_ptr<gloo::Context> context);

  std::shared_ptr<gloo::Context> context;
};

std::unique_ptr<GlooContext> connect_full_mesh(
    const GlooStoreAccess& store,
    int32_t rank,
    int32_t size,
    rust::Str hostname,
    rust::Str iface,
    int64_t timeout_ms);

rust::Vec<rust::String> local_endpoints(const GlooContext& context);

void all_reduce_sum_f32(
    GlooContext& context, rust::Slice<float> data, int64_t timeout_ms);

void all_reduce_sum_f64(
    GlooContext& context, rust::Slice<double> data, int64_t timeout_ms);

void all_gather_bytes(
    GlooContext& context,
    rust::Slice<const uint8_t> input,
    rust::Slice<uint8_t> output,
    int64_t timeout_ms);

void broadcast_bytes(
    GlooContext& context,
    rust::Slice<uint8_t> data,
    int32_t root,
    int64_t timeout_ms);

void barrier(GlooContext& context, int64_t timeout_ms);

}  // namespace ff_dist
