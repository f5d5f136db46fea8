// The kernels for any CPU (ATen's portable vector class).
#include "kernels_base.h"

#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"

const sn_plugin::CpuKernels* sn_plugin::kernels_default() { return sn_plugin::DEFAULT::table(); }
