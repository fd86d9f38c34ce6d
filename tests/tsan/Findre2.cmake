# Debian's libre2-dev as the imported target re2::re2 (tests/tsan/grpc.cmake; Debian ships no config).
find_path(RE2_INCLUDE_DIR re2/re2.h REQUIRED)
find_library(RE2_LIBRARY re2 REQUIRED)
if(NOT TARGET re2::re2)
  add_library(re2::re2 UNKNOWN IMPORTED GLOBAL)
  set_target_properties(re2::re2 PROPERTIES IMPORTED_LOCATION ${RE2_LIBRARY}
                                            INTERFACE_INCLUDE_DIRECTORIES ${RE2_INCLUDE_DIR})
endif()
set(re2_FOUND TRUE)
