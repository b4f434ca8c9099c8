/// @file
/// @brief headwise umbrella header: the public API. The fp64 references live in
/// <headwise/reference/attention.hpp> and are not included here.
#pragma once

#include "core/core.hpp"
#include "variants/attention.hpp"
#include "variants/kv_cache.hpp"
#include "variants/diff.hpp"
#include "variants/mla.hpp"
#include "variants/block_sparse.hpp"
#include "variants/sparse_select.hpp"
