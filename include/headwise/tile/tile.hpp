/// @file
/// @brief tile layer aggregator: arch traits, loads/stores, exp2, microkernels, online softmax.
#pragma once

#include "arch.hpp"
#include "exp.hpp"
#include "memory.hpp"
#include "mma.hpp"
#include "softmax.hpp"
#include "transpose.hpp"
