// ToScalarType: the torch element type of a package's dtype (weights and KV cache), for the
// translation units that already use libtorch (ModelRunner, KvPagePool, the benchmarks). A header of
// its own so that torch-free headers (model_config.h) stay torch-free.
//
// Thread-safety: a pure function. Ownership: nothing is kept.
#pragma once

#include <c10/core/ScalarType.h>

#include "core/model/model_config.h"

namespace dysco {

inline c10::ScalarType ToScalarType(ModelDtype dtype) {
  switch (dtype) {
    case ModelDtype::kFloat32:
      return c10::kFloat;
    case ModelDtype::kBFloat16:
      return c10::kBFloat16;
    case ModelDtype::kFloat16:
      return c10::kHalf;
  }
  return c10::kFloat;
}

}  // namespace dysco
