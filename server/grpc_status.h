// The one place where dysco::Status becomes grpc::Status: core/ knows nothing of gRPC, and every
// RPC of server/ reports its errors through ToGrpcStatus.
//
// Thread-safety: pure functions. Ownership: returns values.
#pragma once

#include <grpcpp/support/status.h>

#include <cstddef>

#include "core/base/status.h"

namespace dysco::server {

inline constexpr size_t kMaxStatusMessageBytes = 1024;

grpc::StatusCode ToGrpcCode(StatusCode code);
// OK for an OK status; otherwise the mapped code with the message, cut at kMaxStatusMessageBytes.
grpc::Status ToGrpcStatus(const Status& status);

}  // namespace dysco::server
