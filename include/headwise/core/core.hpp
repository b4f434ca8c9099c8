/// @file
/// @brief core layer aggregator: dtypes, views, errors, options. No SIMD.
#pragma once

#include "block_mask.hpp"
#include "checks.hpp"
#include "dtype.hpp"
#include "error.hpp"
#include "options.hpp"
#include "view.hpp"
