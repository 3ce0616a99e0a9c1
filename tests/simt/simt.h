// simt.h - run CUDA C kernels on the CPU, compiled from the same source by a
// host C++17 compiler.
//
// Use: g++ -x c++ -std=c++17 -DGMPO_SIMT -include tests/simt/simt.h kernel.cu
// and link tests/simt/simt_runtime.cpp (tests/simt/build.py does both).
//
// Model: every CUDA thread is a fiber with its own stack; the fibers of a block
// run on one OS thread, blocks are spread over SIMT_WORKERS worker threads. A
// fiber runs until it reaches __syncthreads, a warp collective (shuffle,
// ballot, __syncwarp) or its end, so warps do not run in lockstep (as with
// Volta's independent thread scheduling): a warp collective is a rendezvous of
// the lanes named in its mask. Divergent barriers, bad masks, deadlocks,
// __trap, failed asserts and writes past the end of dynamic shared memory are
// reported through cudaGetLastError() after the launch, never by a hang.
//
// Kernel authors launch with GMPO_LAUNCH(kernel, grid, block, smem, stream,
// args...) and declare dynamic shared memory with GMPO_DYNAMIC_SMEM(type, name)
// inside the kernel body. No CUDA header may be included: this file replaces
// them. Test `#ifdef GMPO_SIMT` for host-only code paths.
#ifndef GMPO_SIMT_H_
#define GMPO_SIMT_H_

#if !defined(__cplusplus) || __cplusplus < 201703L
#error "simt.h needs C++17 (compile .cu files with g++ -x c++ -std=c++17)"
#endif

// Standard headers first: some of them spell __attribute__((__noinline__)),
// which the __noinline__ macro below would break if they came later.
#include <assert.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SIMT_ASAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define SIMT_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SIMT_TSAN 1
#endif
#endif

// ---------------------------------------------------------------------------
// CUDA keywords

#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared memory: one copy per worker thread, reused by the blocks that
// thread runs one after another; the runtime fills it with 0xFF bytes before
// every block (as it does dynamic shared memory), so a read of a slot the block
// did not write sees NaN / -1, never an earlier block's value. Declare it in a
// function (kernel or device function): a namespace-scope __shared__ is not
// found by the runtime and keeps its values.
#define __shared__ static thread_local
// __restrict__ is understood by g++ and clang++ already.

#pragma GCC visibility push(hidden)

// ---------------------------------------------------------------------------
// Vector and index types

struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define SIMT_VEC2(T, N, A) \
  struct __attribute__((aligned(A))) N { T x, y; }; \
  inline N make_##N(T x, T y) { return N{x, y}; }
#define SIMT_VEC3(T, N) \
  struct N { T x, y, z; }; \
  inline N make_##N(T x, T y, T z) { return N{x, y, z}; }
#define SIMT_VEC4(T, N, A) \
  struct __attribute__((aligned(A))) N { T x, y, z, w; }; \
  inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
SIMT_VEC2(int, int2, 8)
SIMT_VEC2(unsigned int, uint2, 8)
SIMT_VEC2(float, float2, 8)
SIMT_VEC2(double, double2, 16)
SIMT_VEC2(long long, longlong2, 16)
SIMT_VEC2(unsigned long long, ulonglong2, 16)
SIMT_VEC3(int, int3)
SIMT_VEC3(float, float3)
SIMT_VEC4(int, int4, 16)
SIMT_VEC4(unsigned int, uint4, 16)
SIMT_VEC4(float, float4, 16)
SIMT_VEC4(unsigned short, ushort4, 8)
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }
#undef SIMT_VEC2
#undef SIMT_VEC3
#undef SIMT_VEC4

// ---------------------------------------------------------------------------
// Runtime API subset

typedef struct CUstream_st* cudaStream_t;
typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoDevice = 100,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchTimeout = 702,
  cudaErrorAssert = 710,
  cudaErrorIllegalInstruction = 715,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999
} cudaError_t;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};

extern "C" {
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char* cudaGetErrorString(cudaError_t error);
const char* cudaGetErrorName(cudaError_t error);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream);
cudaError_t cudaMemset(void* ptr, int value, size_t count);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind, cudaStream_t stream);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind);
cudaError_t cudaMalloc(void** ptr, size_t size);
cudaError_t cudaMallocAsync(void** ptr, size_t size, cudaStream_t stream);
cudaError_t cudaFree(void* ptr);
cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device);
}

namespace simt {
namespace detail {
cudaError_t func_set_attribute(const void* func, int attr, int value);
cudaError_t occupancy(int* blocks, int block_size, size_t smem);
}  // namespace detail
}  // namespace simt

// CUDA needs this before a launch asks for more than 48 KiB of dynamic shared
// memory; the emulation enforces the same rule.
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return ::simt::detail::func_set_attribute(reinterpret_cast<const void*>(func), attr, value);
}
template <class F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F*, int block_size, size_t smem) {
  return ::simt::detail::occupancy(blocks, block_size, smem);
}

// ---------------------------------------------------------------------------
// Per-thread state of the emulation

namespace simt {
namespace detail {

struct Fiber;
struct Worker;

// One per OS thread. thread_idx is rewritten at every fiber switch; the
// block fields while a worker runs a block.
struct Tls {
  uint3 thread_idx;
  uint3 block_idx;
  uint3 block_dim;
  uint3 grid_dim;
  unsigned char* dyn_smem;
  Fiber* cur;  // running fiber, null on a host (scheduler) context
  Worker* worker;
};
inline thread_local Tls tls;

enum Op : int {
  OP_SYNCTHREADS, OP_SYNCTHREADS_COUNT, OP_SYNCTHREADS_AND, OP_SYNCTHREADS_OR,
  OP_SHFL_IDX, OP_SHFL_UP, OP_SHFL_DOWN, OP_SHFL_XOR,
  OP_BALLOT, OP_ALL, OP_ANY, OP_SYNCWARP,
  OP_REDUCE_ADD_U, OP_REDUCE_MIN_U, OP_REDUCE_MAX_U,
  OP_REDUCE_MIN_I, OP_REDUCE_MAX_I,
  OP_REDUCE_AND, OP_REDUCE_OR, OP_REDUCE_XOR,
  OP_COUNT_
};

int block_barrier(int op, int pred, const char* file, int line);
uint64_t warp_op(int op, unsigned mask, uint64_t val, int arg, int width, const char* file, int line);
unsigned active_mask();
void yield_fiber();
[[noreturn]] void trap(const char* what, const char* file, int line);
// ends the block with cudaErrorMisalignedAddress (`size` bytes at p need `align`)
[[noreturn]] void misaligned(const void* p, unsigned size, const char* what, unsigned align, const char* file,
                             int line);

cudaError_t launch(const char* name, const void* func, dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, void (*invoke)(void*), void* call);

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffles move 32- or 64-bit values");
  if constexpr (sizeof(T) == 4) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  } else {
    uint64_t u;
    memcpy(&u, &v, 8);
    return u;
  }
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  if constexpr (sizeof(T) == 4) {
    uint32_t u = static_cast<uint32_t>(b);
    memcpy(&v, &u, 4);
  } else {
    memcpy(&v, &b, 8);
  }
  return v;
}

template <class... P>
struct KernelCall {
  void (*fn)(P...);
  std::tuple<std::decay_t<P>...> args;
  static void invoke(void* self) {
    KernelCall* k = static_cast<KernelCall*>(self);
    std::apply(k->fn, k->args);
  }
};

// Evaluates the arguments once, converts them to the kernel's parameter types
// and runs the whole grid before returning.
template <class... P, class... A>
inline cudaError_t launch_kernel(const char* name, void (*fn)(P...), dim3 grid, dim3 block, size_t smem,
                                 cudaStream_t stream, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "GMPO_LAUNCH: wrong number of kernel arguments");
  KernelCall<P...> call{fn, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  return launch(name, reinterpret_cast<const void*>(fn), grid, block, smem, stream, &KernelCall<P...>::invoke,
                &call);
}

}  // namespace detail
}  // namespace simt

#define threadIdx (static_cast<const ::uint3&>(::simt::detail::tls.thread_idx))
#define blockIdx (static_cast<const ::uint3&>(::simt::detail::tls.block_idx))
#define blockDim (static_cast<const ::uint3&>(::simt::detail::tls.block_dim))
#define gridDim (static_cast<const ::uint3&>(::simt::detail::tls.grid_dim))
constexpr int warpSize = 32;

// Launch `kernel` over the grid synchronously. Errors are reported through
// cudaGetLastError() and on stderr. Wrap a template kernel in parentheses:
// GMPO_LAUNCH((kern<float, 4>), grid, block, smem, stream, args...).
#define SIMT_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)::simt::detail::launch_kernel(#kernel, kernel, grid, block, smem, stream, ##__VA_ARGS__))
#define GMPO_LAUNCH(kernel, grid, block, smem, stream, ...) SIMT_LAUNCH(kernel, grid, block, smem, stream, ##__VA_ARGS__)

// Dynamic shared memory, inside a kernel (or device function) body:
// `GMPO_DYNAMIC_SMEM(float, sbuf);` declares `float* sbuf` pointing at the
// block's buffer (128-byte aligned, filled with 0xFF bytes before each block,
// guarded by canaries checked after the block; poisoned for ASan).
#define SIMT_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::simt::detail::tls.dyn_smem)
#define GMPO_DYNAMIC_SMEM(type, name) SIMT_DYNAMIC_SMEM(type, name)

// ---------------------------------------------------------------------------
// Synchronisation

#define SIMT_SITE const char* simt_file_ = __builtin_FILE(), int simt_line_ = __builtin_LINE()
#define SIMT_AT simt_file_, simt_line_

inline void __syncthreads(SIMT_SITE) { ::simt::detail::block_barrier(::simt::detail::OP_SYNCTHREADS, 0, SIMT_AT); }
inline int __syncthreads_count(int pred, SIMT_SITE) {
  return ::simt::detail::block_barrier(::simt::detail::OP_SYNCTHREADS_COUNT, pred != 0, SIMT_AT);
}
inline int __syncthreads_and(int pred, SIMT_SITE) {
  return ::simt::detail::block_barrier(::simt::detail::OP_SYNCTHREADS_AND, pred != 0, SIMT_AT);
}
inline int __syncthreads_or(int pred, SIMT_SITE) {
  return ::simt::detail::block_barrier(::simt::detail::OP_SYNCTHREADS_OR, pred != 0, SIMT_AT);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, SIMT_SITE) {
  ::simt::detail::warp_op(::simt::detail::OP_SYNCWARP, mask, 0, 0, 32, SIMT_AT);
}
inline unsigned __ballot_sync(unsigned mask, int pred, SIMT_SITE) {
  return static_cast<unsigned>(::simt::detail::warp_op(::simt::detail::OP_BALLOT, mask, pred != 0, 0, 32, SIMT_AT));
}
inline int __all_sync(unsigned mask, int pred, SIMT_SITE) {
  return static_cast<int>(::simt::detail::warp_op(::simt::detail::OP_ALL, mask, pred != 0, 0, 32, SIMT_AT));
}
inline int __any_sync(unsigned mask, int pred, SIMT_SITE) {
  return static_cast<int>(::simt::detail::warp_op(::simt::detail::OP_ANY, mask, pred != 0, 0, 32, SIMT_AT));
}
inline unsigned __activemask() { return ::simt::detail::active_mask(); }

// Shuffles, with CUDA's overload set (a short or bool promotes to int).
#define SIMT_SHFL(T)                                                                                      \
  inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, SIMT_SITE) {                   \
    return ::simt::detail::from_bits<T>(::simt::detail::warp_op(                                          \
        ::simt::detail::OP_SHFL_IDX, mask, ::simt::detail::to_bits(var), src_lane, width, SIMT_AT));      \
  }                                                                                                       \
  inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, SIMT_SITE) {              \
    return ::simt::detail::from_bits<T>(::simt::detail::warp_op(::simt::detail::OP_SHFL_UP, mask,         \
                                                                ::simt::detail::to_bits(var),             \
                                                                static_cast<int>(delta), width, SIMT_AT)); \
  }                                                                                                       \
  inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, SIMT_SITE) {            \
    return ::simt::detail::from_bits<T>(::simt::detail::warp_op(::simt::detail::OP_SHFL_DOWN, mask,       \
                                                                ::simt::detail::to_bits(var),             \
                                                                static_cast<int>(delta), width, SIMT_AT)); \
  }                                                                                                       \
  inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, SIMT_SITE) {              \
    return ::simt::detail::from_bits<T>(::simt::detail::warp_op(                                          \
        ::simt::detail::OP_SHFL_XOR, mask, ::simt::detail::to_bits(var), lane_mask, width, SIMT_AT));     \
  }
SIMT_SHFL(int)
SIMT_SHFL(unsigned int)
SIMT_SHFL(long)
SIMT_SHFL(unsigned long)
SIMT_SHFL(long long)
SIMT_SHFL(unsigned long long)
SIMT_SHFL(float)
SIMT_SHFL(double)
#undef SIMT_SHFL

// sm_80 warp reductions.
#define SIMT_WREDUCE(NAME, T, OP)                                                                        \
  inline T NAME(unsigned mask, T value, SIMT_SITE) {                                                     \
    return static_cast<T>(::simt::detail::warp_op(::simt::detail::OP, mask,                              \
                                                  static_cast<uint32_t>(value), 0, 32, SIMT_AT));        \
  }
SIMT_WREDUCE(__reduce_add_sync, unsigned, OP_REDUCE_ADD_U)
SIMT_WREDUCE(__reduce_add_sync, int, OP_REDUCE_ADD_U)
SIMT_WREDUCE(__reduce_min_sync, unsigned, OP_REDUCE_MIN_U)
SIMT_WREDUCE(__reduce_min_sync, int, OP_REDUCE_MIN_I)
SIMT_WREDUCE(__reduce_max_sync, unsigned, OP_REDUCE_MAX_U)
SIMT_WREDUCE(__reduce_max_sync, int, OP_REDUCE_MAX_I)
SIMT_WREDUCE(__reduce_and_sync, unsigned, OP_REDUCE_AND)
SIMT_WREDUCE(__reduce_or_sync, unsigned, OP_REDUCE_OR)
SIMT_WREDUCE(__reduce_xor_sync, unsigned, OP_REDUCE_XOR)
#undef SIMT_WREDUCE

// Ends the block with cudaErrorLaunchFailure (a failed assert() in a kernel
// ends it with cudaErrorAssert).
[[noreturn]] inline void __trap(SIMT_SITE) { ::simt::detail::trap("__trap()", SIMT_AT); }
[[noreturn]] inline void __brkpt(SIMT_SITE) { ::simt::detail::trap("__brkpt()", SIMT_AT); }
// Lets the other fibers of the block run (a spin-wait needs it to progress).
inline void __nanosleep(unsigned) { ::simt::detail::yield_fiber(); }

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

#undef SIMT_SITE
#undef SIMT_AT

// ---------------------------------------------------------------------------
// Atomics: sequentially consistent host atomics (stronger than CUDA's relaxed
// ones, which keeps ThreadSanitizer quiet about fence-based patterns).

#define SIMT_ATOMIC_INT(T)                                                                                \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }                    \
  inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }                    \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }                    \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }                      \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }                    \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }                  \
  inline T atomicCAS(T* a, T expected, T desired) {                                                       \
    __atomic_compare_exchange_n(a, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);        \
    return expected;                                                                                      \
  }                                                                                                       \
  inline T atomicMax(T* a, T v) {                                                                         \
    T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                         \
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) \
      ;                                                                                                   \
    return old;                                                                                           \
  }                                                                                                       \
  inline T atomicMin(T* a, T v) {                                                                         \
    T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                         \
    while (v < old && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) \
      ;                                                                                                   \
    return old;                                                                                           \
  }
SIMT_ATOMIC_INT(int)
SIMT_ATOMIC_INT(unsigned int)
SIMT_ATOMIC_INT(long long)
SIMT_ATOMIC_INT(unsigned long long)
#undef SIMT_ATOMIC_INT

#define SIMT_ATOMIC_FP(T)                                                                                 \
  inline T atomicAdd(T* a, T v) {                                                                         \
    T old, nw;                                                                                            \
    __atomic_load(a, &old, __ATOMIC_SEQ_CST);                                                             \
    do {                                                                                                  \
      nw = old + v;                                                                                       \
    } while (!__atomic_compare_exchange(a, &old, &nw, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));         \
    return old;                                                                                           \
  }                                                                                                       \
  inline T atomicExch(T* a, T v) {                                                                        \
    T old;                                                                                                \
    __atomic_exchange(a, &v, &old, __ATOMIC_SEQ_CST);                                                     \
    return old;                                                                                           \
  }
SIMT_ATOMIC_FP(float)
SIMT_ATOMIC_FP(double)
#undef SIMT_ATOMIC_FP

inline unsigned atomicInc(unsigned* a, unsigned limit) {
  unsigned old = __atomic_load_n(a, __ATOMIC_SEQ_CST), nw;
  do {
    nw = old >= limit ? 0u : old + 1u;
  } while (!__atomic_compare_exchange_n(a, &old, nw, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}
inline unsigned atomicDec(unsigned* a, unsigned limit) {
  unsigned old = __atomic_load_n(a, __ATOMIC_SEQ_CST), nw;
  do {
    nw = (old == 0u || old > limit) ? limit : old - 1u;
  } while (!__atomic_compare_exchange_n(a, &old, nw, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}

// ---------------------------------------------------------------------------
// Loads, bit casts, integer intrinsics

// Each checks its pointer's alignment (a misaligned one ends the block with
// cudaErrorMisalignedAddress naming the caller's line); plain dereferences are
// checked by -fsanitize=alignment (tests/simt/build.py).
template <class T>
inline T __ldg(const T* p, const char* simt_file_ = __builtin_FILE(), int simt_line_ = __builtin_LINE()) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T))
    ::simt::detail::misaligned(p, sizeof(T), "__ldg", alignof(T), simt_file_, simt_line_);
  return *p;
}
template <class T>
inline T __ldcs(const T* p, const char* simt_file_ = __builtin_FILE(), int simt_line_ = __builtin_LINE()) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T))
    ::simt::detail::misaligned(p, sizeof(T), "__ldcs", alignof(T), simt_file_, simt_line_);
  return *p;
}
template <class T>
inline void __stcs(T* p, T v, const char* simt_file_ = __builtin_FILE(), int simt_line_ = __builtin_LINE()) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T))
    ::simt::detail::misaligned(p, sizeof(T), "__stcs", alignof(T), simt_file_, simt_line_);
  *p = v;
}

inline float __int_as_float(int x) { return ::simt::detail::from_bits<float>(static_cast<uint32_t>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(static_cast<uint32_t>(::simt::detail::to_bits(x))); }
inline float __uint_as_float(unsigned x) { return ::simt::detail::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return static_cast<uint32_t>(::simt::detail::to_bits(x)); }
inline double __longlong_as_double(long long x) { return ::simt::detail::from_bits<double>(static_cast<uint64_t>(x)); }
inline long long __double_as_longlong(double x) { return static_cast<long long>(::simt::detail::to_bits(x)); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline long long __mul64hi(long long a, long long b) { return static_cast<long long>((static_cast<__int128>(a) * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __mul24(int a, int b) { return a * b; }
inline unsigned __umul24(unsigned a, unsigned b) { return a * b; }

// CUDA's min/max overloads (integers, floats, and CUDA's mixed signed/unsigned
// rules).
#define SIMT_MINMAX(R, A, B)                                 \
  inline R min(A a, B b) { return (R)a < (R)b ? (R)a : (R)b; } \
  inline R max(A a, B b) { return (R)a > (R)b ? (R)a : (R)b; }
SIMT_MINMAX(int, int, int)
SIMT_MINMAX(unsigned int, unsigned int, unsigned int)
SIMT_MINMAX(unsigned int, int, unsigned int)
SIMT_MINMAX(unsigned int, unsigned int, int)
SIMT_MINMAX(long, long, long)
SIMT_MINMAX(unsigned long, unsigned long, unsigned long)
SIMT_MINMAX(unsigned long, long, unsigned long)
SIMT_MINMAX(unsigned long, unsigned long, long)
SIMT_MINMAX(long long, long long, long long)
SIMT_MINMAX(unsigned long long, unsigned long long, unsigned long long)
SIMT_MINMAX(unsigned long long, long long, unsigned long long)
SIMT_MINMAX(unsigned long long, unsigned long long, long long)
SIMT_MINMAX(float, float, float)
SIMT_MINMAX(double, double, double)
SIMT_MINMAX(double, float, double)
SIMT_MINMAX(double, double, float)
#undef SIMT_MINMAX

// ---------------------------------------------------------------------------
// Fast-math and rounding intrinsics as host math (the host results are the
// correctly rounded ones: compare against references with tolerances).

inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline double __dsqrt_rn(double x) { return sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(floorf(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return static_cast<unsigned>(nearbyintf(x)); }
inline unsigned __float2uint_rz(float x) { return static_cast<unsigned>(x); }
inline long long __float2ll_rn(float x) { return static_cast<long long>(nearbyintf(x)); }
inline long long __float2ll_rz(float x) { return static_cast<long long>(x); }
inline long long __double2ll_rn(double x) { return static_cast<long long>(nearbyint(x)); }
inline int __double2int_rn(double x) { return static_cast<int>(nearbyint(x)); }
inline float __double2float_rn(double x) { return static_cast<float>(x); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline double __int2double_rn(int x) { return static_cast<double>(x); }
inline double __ll2double_rn(long long x) { return static_cast<double>(x); }

#pragma GCC visibility pop

#endif  // GMPO_SIMT_H_
