// The canonical names of gRPC status codes ("INVALID_ARGUMENT", ...), for the logs of the server
// and the output of the client: one home, shared through dysco_proto by both.
//
// Thread-safety: a pure function. Ownership: returns a static string.
#pragma once

#include <grpcpp/support/status.h>

namespace dysco {

const char* GrpcCodeName(grpc::StatusCode code);

}  // namespace dysco
