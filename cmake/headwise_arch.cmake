# Compile-flag helpers for headwise's own tests, benchmarks and examples.
# Nothing here touches the `headwise` INTERFACE target: consumers choose their own -march.
include_guard(GLOBAL)
include(CheckCXXCompilerFlag)

check_cxx_compiler_flag(-march=native HEADWISE_HAVE_MARCH_NATIVE)

# headwise_target_arch(<target> [ARCH <march>])
#   Without ARCH: adds -march=native when HEADWISE_NATIVE is ON (and the compiler accepts it);
#   no -march flag at all when it is OFF.
#   With ARCH: adds -march=<march> (used for the HEADWISE_TEST_ARCHES builds of the tests).
function(headwise_target_arch target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "ARCH" "")
  if(arg_ARCH)
    target_compile_options(${target} PRIVATE -march=${arg_ARCH})
  elseif(HEADWISE_NATIVE AND HEADWISE_HAVE_MARCH_NATIVE)
    target_compile_options(${target} PRIVATE -march=native)
  endif()
endfunction()

# headwise_target_warnings(<target>): the warning set of our own targets.
function(headwise_target_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra)
  elseif(MSVC)
    target_compile_options(${target} PRIVATE /W4)
  endif()
endfunction()

# headwise_arch_suffix(<march> <out-var>): the short name of a -march value, used as the
# executable suffix (_<name>), the ctest name prefix (<name>/) and label (arch:<name>).
function(headwise_arch_suffix march out)
  if(march STREQUAL "x86-64")
    set(name sse2)
  elseif(march STREQUAL "x86-64-v2")
    set(name sse4)
  elseif(march STREQUAL "x86-64-v3")
    set(name avx2)
  elseif(march STREQUAL "x86-64-v4")
    set(name avx512)
  else()
    string(MAKE_C_IDENTIFIER "${march}" name)
  endif()
  set(${out} ${name} PARENT_SCOPE)
endfunction()
