/// @file
/// @brief engine layer aggregator: problem, sources, policies, layouts, the mainloop, merge and
/// the scheduler.
#pragma once

#include "head_map.hpp"
#include "layouts.hpp"
#include "mainloop.hpp"
#include "mask.hpp"
#include "merge.hpp"
#include "problem.hpp"
#include "scheduler.hpp"
#include "score.hpp"
#include "sources.hpp"
