// Emulator stand-in for the toolkit's cuda_runtime.h: the device built-ins and the launch
// machinery, see emu.h.
#pragma once

#include "cuda_runtime_api.h"
#include "emu.h"
