/// @file
/// @brief engine layer aggregator: problem, policies, the mainloop and its scheduler.
#pragma once

#include "head_map.hpp"
#include "mainloop.hpp"
#include "mask.hpp"
#include "problem.hpp"
#include "scheduler.hpp"
#include "score.hpp"
