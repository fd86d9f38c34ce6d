# Debian's libc-ares-dev as the imported target c-ares::cares (tests/tsan/grpc.cmake; Debian ships no
# config).
find_path(CARES_INCLUDE_DIR ares.h REQUIRED)
find_library(CARES_LIBRARY cares REQUIRED)
if(NOT TARGET c-ares::cares)
  add_library(c-ares::cares UNKNOWN IMPORTED GLOBAL)
  set_target_properties(c-ares::cares PROPERTIES IMPORTED_LOCATION ${CARES_LIBRARY}
                                                 INTERFACE_INCLUDE_DIRECTORIES ${CARES_INCLUDE_DIR})
endif()
set(c-ares_FOUND TRUE)
