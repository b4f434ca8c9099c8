/// @file
/// @brief Silences GCC 12's false -W(maybe-)uninitialized reports on AVX-512 intrinsics built
/// on _mm512_undefined_ps (xsimd 8.1 max, unpack, shuffles), in the headers they inline into.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#define HEADWISE_DIAGNOSTICS_PUSH                                      \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"") \
      _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define HEADWISE_DIAGNOSTICS_POP _Pragma("GCC diagnostic pop")
#else
#define HEADWISE_DIAGNOSTICS_PUSH
#define HEADWISE_DIAGNOSTICS_POP
#endif
