# ThreadSanitizer over the server (scripts/sanitize.sh tsan): gRPC and abseil compiled into this build
# with -fsanitize=thread, from Debian bookworm's own sources (the exact versions the normal build links:
# gRPC 1.51.1, abseil 20220623.1), instead of Debian's uninstrumented libgrpc. TSan cannot see
# synchronisation inside uninstrumented code, so with the packaged gRPC every reactor and callback tag
# reports races that gRPC itself orders; suppressing those would also hide races in our callbacks.
#
# Only what the server links is built (EXCLUDE_FROM_ALL: grpc, grpc++, grpc++_reflection and their
# abseil parts; not grpc_unsecure, the plugins or the tests). Protobuf, OpenSSL, zlib, c-ares and re2
# stay Debian's: they hold no cross-thread state of ours. Debian's grpc_cpp_plugin (the same version)
# generates both the reflection service and our own protos.
# scripts/sanitize.sh creates the proto folders gRPC's CMake would otherwise download (xds,
# googleapis, ...): nothing built here needs them.
set(gRPC_ABSL_PROVIDER module CACHE STRING "" FORCE)
set(ABSL_ROOT_DIR ${DYSCO_TSAN_ABSL_SOURCE})
set(ABSL_PROPAGATE_CXX_STD ON)
foreach(dep ZLIB CARES RE2 SSL PROTOBUF)
  set(gRPC_${dep}_PROVIDER package CACHE STRING "" FORCE)
endforeach()
set(gRPC_BUILD_TESTS OFF CACHE BOOL "" FORCE)
set(gRPC_INSTALL OFF CACHE BOOL "" FORCE)
set(gRPC_BUILD_CSHARP_EXT OFF CACHE BOOL "" FORCE)
foreach(lang CPP CSHARP NODE OBJECTIVE_C PHP PYTHON RUBY)
  set(gRPC_BUILD_GRPC_${lang}_PLUGIN OFF CACHE BOOL "" FORCE)
endforeach()
find_program(DYSCO_GRPC_CPP_PLUGIN grpc_cpp_plugin REQUIRED)
add_executable(grpc_cpp_plugin IMPORTED GLOBAL)
set_target_properties(grpc_cpp_plugin PROPERTIES IMPORTED_LOCATION ${DYSCO_GRPC_CPP_PLUGIN})
add_executable(gRPC::grpc_cpp_plugin IMPORTED GLOBAL)
set_target_properties(gRPC::grpc_cpp_plugin PROPERTIES IMPORTED_LOCATION ${DYSCO_GRPC_CPP_PLUGIN})
# grpc_plugin_support (never built here) names libprotoc, which Debian installs without its -dev link.
find_library(Protobuf_PROTOC_LIBRARY NAMES protoc libprotoc.so.32 REQUIRED)
# Debian ships no CMake configs for re2 and c-ares: tests/tsan/Find*.cmake provide their targets.
list(APPEND CMAKE_MODULE_PATH ${CMAKE_CURRENT_LIST_DIR})
add_subdirectory(${DYSCO_TSAN_GRPC_SOURCE} ${CMAKE_BINARY_DIR}/tsan-grpc EXCLUDE_FROM_ALL SYSTEM)

add_library(gRPC::grpc ALIAS grpc)
add_library(gRPC::grpc++ ALIAS grpc++)
add_library(gRPC::grpc++_reflection ALIAS grpc++_reflection)
