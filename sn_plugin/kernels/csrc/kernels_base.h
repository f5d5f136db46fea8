// ATen headers every CPU-capability variant of the kernels needs, included before the
// variant switches the instruction set, so that only the kernels themselves (and ATen's
// vector classes, in their own per-capability namespace) are compiled for it.
#pragma once

#include "sn_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>
