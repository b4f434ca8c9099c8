# cmake -P script behind the `consumer/*` ctest cases: configure, build and run a tiny
# consumer project against headwise, from scratch every time.
#
#   -DSOURCE_DIR=<consumer project>   -DBINARY_DIR=<its build dir (wiped first)>
#   -DGENERATOR=<cmake generator>     -DCXX_COMPILER=<path>   -DBUILD_TYPE=<config>
#   -DCXX_FLAGS=<flags>               (optional, forwarded so sanitizer builds stay consistent)
#   -DEXTRA_ARGS=<;-list of -D...>    (optional, e.g. -DCMAKE_PREFIX_PATH=... or
#                                      -DHEADWISE_SOURCE_DIR=...)
#   -DEXECUTABLE=<name>               the consumer's program, run after the build
cmake_minimum_required(VERSION 3.25)

foreach(var SOURCE_DIR BINARY_DIR GENERATOR CXX_COMPILER EXECUTABLE)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "headwise_consumer_test.cmake: -D${var}= is required")
  endif()
endforeach()
if(NOT BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()

file(REMOVE_RECURSE "${BINARY_DIR}")

message(STATUS "consumer: configuring ${SOURCE_DIR}")
execute_process(
  COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}"
          "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}"
          "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}" ${EXTRA_ARGS}
  COMMAND_ECHO STDOUT
  COMMAND_ERROR_IS_FATAL ANY)

message(STATUS "consumer: building")
execute_process(
  COMMAND "${CMAKE_COMMAND}" --build "${BINARY_DIR}" --config "${BUILD_TYPE}"
  COMMAND_ECHO STDOUT
  COMMAND_ERROR_IS_FATAL ANY)

# Single-config generators put the program in BINARY_DIR, multi-config ones in a subdir.
set(exe "${BINARY_DIR}/${EXECUTABLE}${CMAKE_EXECUTABLE_SUFFIX}")
if(NOT EXISTS "${exe}")
  set(exe "${BINARY_DIR}/${BUILD_TYPE}/${EXECUTABLE}${CMAKE_EXECUTABLE_SUFFIX}")
endif()
message(STATUS "consumer: running ${exe}")
execute_process(COMMAND "${exe}" COMMAND_ERROR_IS_FATAL ANY)
