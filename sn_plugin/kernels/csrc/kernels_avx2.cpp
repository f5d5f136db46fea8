// The kernels for x86-64 CPUs with AVX2 and FMA (chosen at run time, as ATen chooses its own).
#include "kernels_base.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// g++ does not update the instruction-set macros after the pragma (gcc does); the headers
// below (ATen's vectors, sleef) test them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"
#pragma GCC pop_options

const sn_plugin::CpuKernels* sn_plugin::kernels_avx2() { return sn_plugin::AVX2::table(); }
#else
const sn_plugin::CpuKernels* sn_plugin::kernels_avx2() { return nullptr; }
#endif
