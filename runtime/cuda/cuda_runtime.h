// Alias of runtime/cuda/cuda.h (the name launch/device.cpp includes). Prefer runtime/cuda/cuda.h.
#pragma once
#include "runtime/cuda/cuda.h"
