/* Entry points of the SIMT harness self-test kernels (correct.cu, broken.cu),
 * called by driver.cpp. Each returns a cudaError_t as an int (0 = success). */
#ifndef SIMT_SELFTEST_H_
#define SIMT_SELFTEST_H_

#include <stdint.h>

#define ST_WARP_OUTS 16

#if defined(__CUDACC__) && !defined(GMPO_SIMT)
/* nvcc: the launch macros as the project defines them (csrc/cuda/launch.cuh) */
#include <cuda_runtime.h>
#define GMPO_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define GMPO_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* correct.cu */
int st_block_sum(const float* x, float* sums, float* centered, int64_t rows, int64_t n, int threads,
                 int first_barrier);
int st_histogram(const int* keys, int64_t n, int nbins, unsigned* hist, float* fsum, double* dsum, int* kmax,
                 unsigned long long* count, int blocks, int threads, int smem_bins);
int st_warp_semantics(int* out);
int st_bad_launch(int which);
const char* st_error_string(int code);
const char* st_error_name(int code);

/* broken.cu: each kernel has one planted bug */
int st_oob_read_sum(const float* x, int n, float* out);
int st_divergent_barrier(float* out, int threads);
int st_partial_warp_mask(float* out, int threads);
int st_missing_lanes(float* out);
int st_barrier_vs_shuffle(float* out);
int st_trap(float* out);
int st_assert(const float* x, float* out, int n);
int st_stack_overflow(float* out);
int st_smem_uninit(float* out);
int st_misaligned(const float* x, float* out, int use_ldg);

#ifdef __cplusplus
}
#endif

#endif
