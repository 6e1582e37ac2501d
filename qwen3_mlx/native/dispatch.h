// How the extension's primitives queue their work: every output allocated, every array
// registered with the CPU stream's encoder, and the body run on the stream's thread with
// non-owning copies of the arrays (the encoder keeps them alive until the task has run).
#pragma once

#include <utility>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "isa.h"

namespace native {

namespace mx = mlx::core;

// Queue body(inputs, outputs) on `stream`'s thread, with the vector unit's state cleared around it.
template <typename Body>
void dispatch_on_stream(mx::Stream stream, const std::vector<mx::array>& inputs,
                        std::vector<mx::array>& outputs, Body body) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& input : inputs) encoder.set_input_array(input);
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    encoder.set_output_array(out);
  }
  std::vector<mx::array> held, outs;
  for (const auto& input : inputs) held.push_back(mx::array::unsafe_weak_copy(input));
  for (const auto& out : outputs) outs.push_back(mx::array::unsafe_weak_copy(out));
  encoder.dispatch([held = std::move(held), outs = std::move(outs), body]() mutable {
    const ClearVectorState clear;
    body(held, outs);
  });
}

}  // namespace native
