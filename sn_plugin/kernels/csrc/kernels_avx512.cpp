// The kernels for x86-64 CPUs with AVX-512 (F, BW, VL, DQ), as ATen's AVX512 capability.
#include "kernels_base.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
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
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"
#pragma GCC pop_options

const sn_plugin::CpuKernels* sn_plugin::kernels_avx512() { return sn_plugin::AVX512::table(); }
#else
const sn_plugin::CpuKernels* sn_plugin::kernels_avx512() { return nullptr; }
#endif
