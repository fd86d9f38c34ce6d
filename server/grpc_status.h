// The one place where dysco::Status becomes grpc::Status: core/ knows nothing of gRPC, and every
// RPC of server/ reports its errors through ToGrpcStatus.
//
// Thread-safety: pure functions. Ownership: returns values.
#pragma once

#include <grpcpp/support/status.h>

#include "core/base/status.h"

namespace dysco::server {

grpc::StatusCode ToGrpcCode(StatusCode code);
// OK for an OK status; otherwise the mapped code with the message unchanged.
grpc::Status ToGrpcStatus(const Status& status);

}  // namespace dysco::server
