/*
 * gmpo_loss.cu -- the CUDA kernels of the fused GMPO loss (Geometric-Mean Policy
 * Optimization, arXiv 2507.20673) and of the GRPO baseline loss, forward and
 * backward, with the extern "C" entry points of csrc/gmpo.h.
 *
 * Shapes (B rows = sequences, T tokens per row):
 *   logp, old_logp, ref_logp, mask: (B,T)   adv, is_w: (B,) or (B,T)
 *   rows: (B+1, GMPO_ROW_STATS) fp64        loss: 0-d, metrics: (GMPO_METRICS,)
 *   grad: (B,T) contiguous, in logp's dtype
 * Every input is a gmpo_view (pointer, dtype, element strides): any float dtype
 * for the log-probabilities, any dtype of gmpo.h for the mask, no copies.
 *
 * The per-token and per-row formulas are gmpo_math.h's, shared with the C core
 * (csrc/cpu): this file only moves data and reduces.
 *
 *   forward   gmpo_fwd_rows_kernel   grid (B), one block per row, looping over a
 *                                    row of any length: one pass over the inputs,
 *                                    per-thread sums, a deterministic block
 *                                    reduction, gmpo_row_finish -> rows[i]
 *             gmpo_fwd_totals_kernel one block: rows[0..B) -> rows[B] (fixed-order
 *                                    tree), loss and metrics
 *   backward  gmpo_bwd_kernel        grid (B, token chunks): one read of the inputs,
 *                                    one write of grad; grad_output is read on the
 *                                    device
 *   family    gmpo_fam_fwd_kernel    TRL's GRPO family (GMPO_ALGO_FAMILY: cispo, sapo,
 *             gmpo_fam_bwd_kernel    luspo, vespo, the sequence level, delta, the
 *                                    off-policy mask, ...): the same grids and loads
 *                                    as the two above, the per-row finish in fp64
 *
 * Launched on the caller's stream; no host synchronisation, no allocation, no
 * float atomics: safe in a CUDA graph and the same bits on every run.
 * fp32, fp16 and bf16 inputs accumulate in fp32, fp64 inputs in fp64.
 *
 * Loads: each thread takes VEC = 4 consecutive tokens (2 for fp64): one 16-byte
 * load of fp32 or fp64 logp, 8 bytes of bf16 / fp16, 4 of a bool mask, and the
 * matching width for every other input. (VEC = 8 would give 16-byte loads of
 * 16-bit inputs too, at 80+ registers a thread: fewer resident threads and the
 * same bytes in flight.) A row's first tokens, until logp's row reaches that
 * alignment, and its last (T - head) % VEC are taken one at a time; an input
 * whose row is not aligned like logp's, or is strided, falls back to scalar
 * loads on its own (any stride works). A group of VEC tokens whose mask is all
 * zero reads nothing but the mask: padded tails cost only their mask bytes.
 */
#include <stdint.h>
#include <stdio.h>
#include "launch.cuh"
#include "gmpo_cuda_util.cuh"

// ----------------------------------------------------------------------------
// launch geometry

#define GMPO_FWD_MAX_THREADS 512
#define GMPO_BWD_MAX_THREADS 256
#define GMPO_TOT_MAX_THREADS 1024
// GMPO_MAX_GRID_Y (launch.cuh): the backward's grid.y cap (a grid-stride loop)
// blocks per SM asked of ptxas: 1024 resident threads (<= 64 registers) in fp32,
// 512 in fp64, whose accumulators and values take twice the registers
#define GMPO_MIN_BLOCKS(threads, Acc) ((sizeof(Acc) == 4 ? 1024 : 512) / (threads))

// ----------------------------------------------------------------------------
// per-row views of the inputs

// element (i, 0) of a view, as bytes (NULL for an absent or empty tensor)
GMPO_DEV const char *gmpo_row_ptr(const gmpo_view &v, int64_t i) {
    if (!v.data) return nullptr;
    return (const char *)v.data + i * v.stride_b * gmpo_dtype_size(v.dtype);
}

// Tokens before logp's row reaches VEC-token alignment; 0 where logp is strided
// or not even element-aligned (then every input takes scalar loads).
template <int VEC>
GMPO_DEV int64_t gmpo_row_head(const gmpo_view &lp, const char *p, int64_t T) {
    int sz = gmpo_dtype_size(lp.dtype);
    uintptr_t addr = (uintptr_t)p, al = (uintptr_t)gmpo_vec_align<VEC>(lp.dtype);
    if (!p || lp.stride_t != 1 || addr % (uintptr_t)sz) return 0;
    int64_t h = (int64_t)(((al - addr % al) % al) / (uintptr_t)sz);
    return h < T ? h : T;
}

// may token group [head, head + VEC) of this row be loaded as one vector?
template <int VEC>
GMPO_DEV bool gmpo_row_vec(const gmpo_view &v, const char *p, int64_t head) {
    if (VEC == 1 || !p || v.stride_t != 1) return false;
    return (uintptr_t)(p + head * gmpo_dtype_size(v.dtype)) % (uintptr_t)gmpo_vec_align<VEC>(v.dtype) == 0;
}

// VEC tokens t.. of one input row (vector or scalar loads).
// fp64 (Acc = double): the scalar fallback of a vector group takes the one-element
// case of gmpo_load_vec (same values: the conversions are gmpo_load_d's) rather than
// gmpo_load_d's two nested dtype switches. With those, ptxas for sm_100 and sm_120
// wanted 170 to 240 registers for the fp64 kernels and spilled 60 to 216 bytes under
// their 128-register launch bounds; this way they take 88 to 96 there (65 to 96 on
// sm_80..sm_90), no spill. The fp32 kernels keep gmpo_load_f: the one-element
// gmpo_load_vec costs them 4 to 8 registers.
template <class Acc, int VEC>
GMPO_DEV void gmpo_load_tokens(const gmpo_view &v, const char *p, bool vec, int64_t t, Acc *out) {
    if (VEC > 1 && vec) {
        gmpo_load_vec<Acc, VEC>(p, v.dtype, t, out);
    } else if constexpr (sizeof(Acc) == 8 && VEC > 1) {
#pragma unroll
        for (int k = 0; k < VEC; k++) gmpo_load_vec<Acc, 1>(p, v.dtype, (t + k) * v.stride_t, out + k);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) out[k] = gmpo_m<Acc>::load(p, v.dtype, (t + k) * v.stride_t);
    }
}

// a per-row value (advantage or importance weight); `absent` where the tensor
// is absent (an empty one may have no storage) or per token
template <class Acc>
GMPO_DEV Acc gmpo_row_value(const gmpo_view &v, int64_t i, Acc absent) {
    if (!v.data || v.stride_t) return absent;
    return (Acc)gmpo_load_d(v.data, v.dtype, i * v.stride_b);
}

// The rows of all inputs of row i, and whether each takes vector loads.
struct gmpo_rows {
    const char *lp, *olp, *m, *adv, *ref, *w;
    bool vlp, volp, vm, vadv, vref, vw;
    int64_t head;   // scalar tokens [0, head), vectors from head, scalar tail
    bool adv_tok, ref_on, w_tok;
};

template <int VEC>
GMPO_DEV gmpo_rows gmpo_make_rows(const gmpo_args &a, int64_t i) {
    gmpo_rows r;
    r.adv_tok = a.adv.stride_t != 0;
    r.ref_on = a.beta != 0;
    r.w_tok = a.is_w.data && a.is_w.stride_t;
    r.lp = gmpo_row_ptr(a.logp, i);
    r.olp = gmpo_row_ptr(a.old_logp, i);
    r.m = gmpo_row_ptr(a.mask, i);
    r.adv = r.adv_tok ? gmpo_row_ptr(a.adv, i) : nullptr;
    r.ref = r.ref_on ? gmpo_row_ptr(a.ref_logp, i) : nullptr;
    r.w = r.w_tok ? gmpo_row_ptr(a.is_w, i) : nullptr;
    r.head = gmpo_row_head<VEC>(a.logp, r.lp, a.T);
    r.vlp = gmpo_row_vec<VEC>(a.logp, r.lp, r.head);
    r.volp = gmpo_row_vec<VEC>(a.old_logp, r.olp, r.head);
    r.vm = gmpo_row_vec<VEC>(a.mask, r.m, r.head);
    r.vadv = gmpo_row_vec<VEC>(a.adv, r.adv, r.head);
    r.vref = gmpo_row_vec<VEC>(a.ref_logp, r.ref, r.head);
    r.vw = gmpo_row_vec<VEC>(a.is_w, r.w, r.head);
    return r;
}

// The inputs of VEC tokens t.. of a row, mask first. Returns false (and loads
// nothing else) when the whole group is masked out.
template <class Acc, int VEC>
GMPO_DEV bool gmpo_load_group(const gmpo_args &a, const gmpo_rows &r, int64_t t, Acc adv_row,
                              Acc w_row, Acc (&m)[VEC], Acc (&lp)[VEC], Acc (&olp)[VEC],
                              Acc (&adv)[VEC], Acc (&ref)[VEC], Acc (&w)[VEC]) {
    gmpo_load_tokens<Acc, VEC>(a.mask, r.m, r.vm, t, m);
    bool any = false;
#pragma unroll
    for (int k = 0; k < VEC; k++) any |= m[k] != 0;
    if (!any) return false;
    gmpo_load_tokens<Acc, VEC>(a.logp, r.lp, r.vlp, t, lp);
    gmpo_load_tokens<Acc, VEC>(a.old_logp, r.olp, r.volp, t, olp);
    if (r.adv_tok) {
        gmpo_load_tokens<Acc, VEC>(a.adv, r.adv, r.vadv, t, adv);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) adv[k] = adv_row;
    }
    if (r.ref_on) {
        gmpo_load_tokens<Acc, VEC>(a.ref_logp, r.ref, r.vref, t, ref);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) ref[k] = 0;
    }
    if (r.w_tok) {
        gmpo_load_tokens<Acc, VEC>(a.is_w, r.w, r.vw, t, w);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) w[k] = w_row;
    }
    return true;
}

// ----------------------------------------------------------------------------
// forward

// VEC tokens t.. of a row into the thread's sums (padding never enters them)
template <class Acc, int VEC>
GMPO_DEV void gmpo_fwd_group(const gmpo_args &a, const typename gmpo_m<Acc>::opts &o,
                             const gmpo_rows &r, int64_t t, Acc adv_row, Acc w_row,
                             typename gmpo_m<Acc>::acc *s) {
    Acc m[VEC], lp[VEC], olp[VEC], adv[VEC], ref[VEC], w[VEC];
    if (!gmpo_load_group<Acc, VEC>(a, r, t, adv_row, w_row, m, lp, olp, adv, ref, w)) return;
#pragma unroll
    for (int k = 0; k < VEC; k++) {
        if (m[k] != 0) gmpo_m<Acc>::add_token(s, &o, m[k], lp[k], olp[k], adv[k], ref[k], w[k]);
    }
}

// a row's sums to and from the fp64 values processes add up (gmpo_math.h)
GMPO_DEV void gmpo_sums_store(const gmpo_acc_f &s, double *out) { gmpo_acc_store_f(&s, out); }
GMPO_DEV void gmpo_sums_store(const gmpo_acc_d &s, double *out) { gmpo_acc_store_d(&s, out); }
GMPO_DEV void gmpo_sums_load(const double *in, gmpo_acc_f &s) { gmpo_acc_load_f(in, &s); }
GMPO_DEV void gmpo_sums_load(const double *in, gmpo_acc_d &s) { gmpo_acc_load_d(in, &s); }

// Row blockIdx.x: its GMPO_ROW_STATS statistics into rows[i], or, with sums
// (rows split over processes), its raw GMPO_SUM_STATS sums into sums[i].
// logp, old_logp, mask, ref_logp: (B,T); adv, is_w: (B,) or (B,T); rows: (B+1, 10)
template <class Acc, int VEC>
__global__ void __launch_bounds__(GMPO_FWD_MAX_THREADS, GMPO_MIN_BLOCKS(GMPO_FWD_MAX_THREADS, Acc))
gmpo_fwd_rows_kernel(const __grid_constant__ gmpo_args a, double *__restrict__ rows,
                     double *__restrict__ sums) {
    typedef typename gmpo_m<Acc>::acc acc_t;
    const int64_t i = blockIdx.x, T = a.T;
    const gmpo_rows r = gmpo_make_rows<VEC>(a, i);
    const Acc adv_row = gmpo_row_value<Acc>(a.adv, i, (Acc)0);
    const Acc w_row = gmpo_row_value<Acc>(a.is_w, i, (Acc)1);
    const typename gmpo_m<Acc>::opts o = gmpo_m<Acc>::make_opts(&a);

    acc_t s;
    gmpo_m<Acc>::zero(&s);
    const int64_t nvec = (T - r.head) / VEC, tail = r.head + nvec * VEC;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x)
        gmpo_fwd_group<Acc, VEC>(a, o, r, r.head + j * VEC, adv_row, w_row, &s);
    // the unaligned head and the tail, a token per thread
    const int64_t nscalar = r.head + (T - tail);
    for (int64_t j = threadIdx.x; j < nscalar; j += blockDim.x)
        gmpo_fwd_group<Acc, 1>(a, o, r, j < r.head ? j : tail + (j - r.head), adv_row, w_row, &s);

    Acc v[GMPO_ACC_FIELDS];
    gmpo_acc_pack<Acc>(s, v);
    gmpo_block_sum8<Acc>(v);
    if (threadIdx.x == 0) {
        gmpo_acc_unpack<Acc>(v, s);
        if (sums) gmpo_sums_store(s, sums + i * GMPO_SUM_STATS);
        else gmpo_m<Acc>::finish(&a, &s, adv_row, w_row, rows + i * GMPO_ROW_STATS);
    }
}

// Rows split over processes: the summed sums[i] -> rows[i] (a thread per row)
template <class Acc>
__global__ void gmpo_finish_sums_kernel(const __grid_constant__ gmpo_args a,
                                        const double *__restrict__ sums,
                                        double *__restrict__ rows) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.B; i += stride) {
        const Acc adv_row = gmpo_row_value<Acc>(a.adv, i, (Acc)0);
        const Acc w_row = gmpo_row_value<Acc>(a.is_w, i, (Acc)1);
        if (a.algo == GMPO_ALGO_FAMILY) {   // the family's finish is fp64 (gmpo_math.h)
            gmpo_family_row_finish(&a, sums + i * GMPO_SUM_STATS, (double)adv_row,
                                   (double)w_row, rows + i * GMPO_ROW_STATS);
            continue;
        }
        typename gmpo_m<Acc>::acc s;
        gmpo_sums_load(sums + i * GMPO_SUM_STATS, s);
        gmpo_m<Acc>::finish(&a, &s, adv_row, w_row, rows + i * GMPO_ROW_STATS);
    }
}

// rows[0..B) -> the totals row rows[B], the loss and the metrics (out_dtype).
// One block: thread t folds rows t, t + blockDim, ... in order, then a fixed
// shuffle tree and the warps' partials in lane order: deterministic for any B.
__global__ void __launch_bounds__(GMPO_TOT_MAX_THREADS)
gmpo_fwd_totals_kernel(const __grid_constant__ gmpo_args a, double *__restrict__ rows,
                       void *out_loss, void *out_metrics, int32_t out_dtype) {
    __shared__ double part[32][GMPO_ROW_STATS];
    const int64_t B = a.B;
    double tot[GMPO_ROW_STATS];
    gmpo_totals_init(tot);
    // rows are 80 bytes: 5 x 16. One loop per load width, not a branch in one
    // loop: with both widths in one body ptxas spilled 4 bytes on sm_86 and sm_89
    // (64 registers at 1024 threads)
    if (((uintptr_t)rows & 15u) == 0) {
        for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
            const double2 *src = reinterpret_cast<const double2 *>(rows + i * GMPO_ROW_STATS);
            double row[GMPO_ROW_STATS];
#pragma unroll
            for (int k = 0; k < GMPO_ROW_STATS / 2; k++) {
                double2 d = __ldg(src + k);
                row[2 * k] = d.x;
                row[2 * k + 1] = d.y;
            }
            gmpo_totals_add_row(tot, row);
        }
    } else {
        for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
            const double *src = rows + i * GMPO_ROW_STATS;
            double row[GMPO_ROW_STATS];
#pragma unroll
            for (int k = 0; k < GMPO_ROW_STATS; k++) row[k] = src[k];
            gmpo_totals_add_row(tot, row);
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        double o[GMPO_ROW_STATS];
#pragma unroll
        for (int k = 0; k < GMPO_ROW_STATS; k++) o[k] = __shfl_xor_sync(GMPO_FULL_MASK, tot[k], off);
        gmpo_totals_merge(tot, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k < GMPO_ROW_STATS; k++) part[warp][k] = tot[k];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < nwarps; w++) gmpo_totals_merge(tot, part[w]);
        gmpo_totals_close(tot);
        double *dst = rows + B * GMPO_ROW_STATS;
#pragma unroll
        for (int k = 0; k < GMPO_ROW_STATS; k++) dst[k] = tot[k];
        double out[GMPO_METRICS + 1];
        gmpo_finish_totals(&a, tot, out);
        gmpo_store_d(out_loss, out_dtype, 0, out[0]);
#pragma unroll
        for (int k = 0; k < GMPO_METRICS; k++) gmpo_store_d(out_metrics, out_dtype, k, out[k + 1]);
    }
}

// ----------------------------------------------------------------------------
// backward

// VEC tokens t.. of a row: their gradient into gr (grad's row); a fully masked
// group writes zeros and reads nothing but its mask
template <class Acc, int VEC>
GMPO_DEV void gmpo_bwd_group(const gmpo_args &a, const typename gmpo_m<Acc>::opts &o,
                             const gmpo_rows &r, int64_t t, Acc adv_row, Acc w_row, Acc pg,
                             Acc kl, char *gr, int32_t gdt, bool vg) {
    Acc m[VEC], lp[VEC], olp[VEC], adv[VEC], ref[VEC], w[VEC], g[VEC];
    if (gmpo_load_group<Acc, VEC>(a, r, t, adv_row, w_row, m, lp, olp, adv, ref, w)) {
#pragma unroll
        for (int k = 0; k < VEC; k++)
            g[k] = gmpo_m<Acc>::grad(&o, pg, kl, m[k], lp[k], olp[k], adv[k], ref[k], w[k]);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) g[k] = 0;
    }
    if (VEC > 1 && vg) {
        gmpo_store_vec<Acc, VEC>(gr, gdt, t, g);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) gmpo_m<Acc>::store(gr, gdt, t + k, g[k]);
    }
}

// grad[i, :] for row i = blockIdx.x, the token vectors strided over blockIdx.y.
// rows: forward's (B+1, 10) statistics; grad_out: the upstream scalar (device)
template <class Acc, int VEC>
__global__ void __launch_bounds__(GMPO_BWD_MAX_THREADS, GMPO_MIN_BLOCKS(GMPO_BWD_MAX_THREADS, Acc))
gmpo_bwd_kernel(const __grid_constant__ gmpo_args a, const double *__restrict__ rows,
                const void *__restrict__ grad_out, int32_t go_dt, void *__restrict__ grad,
                int32_t gdt) {
    const int64_t i = blockIdx.x, T = a.T;
    const double go = gmpo_load_d(grad_out, go_dt, 0);
    double pg_d, kl_d;   // the row's gradient factors, shared with the CPU (fp64)
    gmpo_row_grad_factors(&a, rows, i, go, &pg_d, &kl_d);
    const Acc pg = (Acc)pg_d, kl = (Acc)kl_d;
    const gmpo_rows r = gmpo_make_rows<VEC>(a, i);
    const Acc adv_row = gmpo_row_value<Acc>(a.adv, i, (Acc)0);
    const Acc w_row = gmpo_row_value<Acc>(a.is_w, i, (Acc)1);
    const typename gmpo_m<Acc>::opts o = gmpo_m<Acc>::make_opts(&a);
    char *gr = (char *)grad + i * T * gmpo_dtype_size(gdt);
    const bool vg = VEC > 1 && (uintptr_t)(gr + r.head * gmpo_dtype_size(gdt)) %
                                       (uintptr_t)gmpo_vec_align<VEC>(gdt) == 0;

    const int64_t nvec = (T - r.head) / VEC, tail = r.head + nvec * VEC;
    const int64_t stride = (int64_t)gridDim.y * blockDim.x;
    for (int64_t j = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; j < nvec; j += stride)
        gmpo_bwd_group<Acc, VEC>(a, o, r, r.head + j * VEC, adv_row, w_row, pg, kl, gr, gdt, vg);
    if (blockIdx.y == 0) {   // the unaligned head and the tail, a token per thread
        const int64_t nscalar = r.head + (T - tail);
        for (int64_t j = threadIdx.x; j < nscalar; j += blockDim.x)
            gmpo_bwd_group<Acc, 1>(a, o, r, j < r.head ? j : tail + (j - r.head), adv_row, w_row, pg,
                                   kl, gr, gdt, false);
    }
}

// ----------------------------------------------------------------------------
// GMPO_ALGO_FAMILY: TRL's GRPO family with its options (gmpo_math_impl.h's
// gmpo_fam_token / gmpo_fam_grad, the row finish gmpo_family_row_finish in
// fp64). The grids, loads and reductions of the kernels above (gmpo_rows,
// gmpo_load_group), plus the family's sampler log-probs and token mask.

template <class Acc> struct gmpo_fam_m;
template <> struct gmpo_fam_m<float> { typedef gmpo_fam_opts_f opts; };
template <> struct gmpo_fam_m<double> { typedef gmpo_fam_opts_d opts; };
GMPO_DEV gmpo_fam_opts_f gmpo_fam_opts(const gmpo_args *a, float) { return gmpo_fam_opts_make_f(a); }
GMPO_DEV gmpo_fam_opts_d gmpo_fam_opts(const gmpo_args *a, double) { return gmpo_fam_opts_make_d(a); }
GMPO_DEV gmpo_acc_f gmpo_fam_tok(const gmpo_fam_opts_f *o, float m, float tm, float lp, float olp,
                                 float slp, float A, float ref, float w) {
    return gmpo_fam_token_f(o, m, tm, lp, olp, slp, A, ref, w);
}
GMPO_DEV gmpo_acc_d gmpo_fam_tok(const gmpo_fam_opts_d *o, double m, double tm, double lp,
                                 double olp, double slp, double A, double ref, double w) {
    return gmpo_fam_token_d(o, m, tm, lp, olp, slp, A, ref, w);
}
GMPO_DEV float gmpo_fam_g(const gmpo_fam_opts_f *o, float pg1, float pc, float kl, float m,
                          float tm, float lp, float olp, float A, float ref, float w) {
    return gmpo_fam_grad_f(o, pg1, pc, kl, m, tm, lp, olp, A, ref, w);
}
GMPO_DEV double gmpo_fam_g(const gmpo_fam_opts_d *o, double pg1, double pc, double kl, double m,
                           double tm, double lp, double olp, double A, double ref, double w) {
    return gmpo_fam_grad_d(o, pg1, pc, kl, m, tm, lp, olp, A, ref, w);
}
GMPO_DEV float gmpo_fam_lw(float w) { return gmpo_fam_logis_f(w); }
GMPO_DEV double gmpo_fam_lw(double w) { return gmpo_fam_logis_d(w); }

// The family's two extra inputs of row i (sampler log-probs, token mask) and
// whether each takes vector loads; with gmpo_rows, every input of the row.
struct gmpo_fam_rows {
    const char *slp, *tm;
    bool vslp, vtm;
};

template <int VEC>
GMPO_DEV gmpo_fam_rows gmpo_make_fam_rows(const gmpo_args &a, const gmpo_rows &r, int64_t i,
                                          bool opm) {
    gmpo_fam_rows f;
    f.slp = opm ? gmpo_row_ptr(a.samp_logp, i) : nullptr;
    f.tm = gmpo_row_ptr(a.tok_mask, i);
    f.vslp = gmpo_row_vec<VEC>(a.samp_logp, f.slp, r.head);
    f.vtm = gmpo_row_vec<VEC>(a.tok_mask, f.tm, r.head);
    return f;
}

// VEC tokens t.. of one of the family's extra rows; `absent` where it is absent
template <class Acc, int VEC>
GMPO_DEV void gmpo_fam_load(const gmpo_view &v, const char *p, bool vec, int64_t t, Acc absent,
                            Acc (&out)[VEC]) {
    if (p) {
        gmpo_load_tokens<Acc, VEC>(v, p, vec, t, out);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) out[k] = absent;
    }
}

#define GMPO_FAM_THREADS 256

// VEC tokens t.. of a row into the thread's sums; vespo with per-token
// weights also adds every token's clamped log weight into *logw (TRL's sum is
// unmasked), whatever the mask
template <class Acc, int VEC>
GMPO_DEV void gmpo_fam_fwd_group(const gmpo_args &a, const typename gmpo_fam_m<Acc>::opts &fo,
                                 const gmpo_rows &r, const gmpo_fam_rows &f, int64_t t,
                                 Acc adv_row, Acc w_row, bool vw,
                                 typename gmpo_m<Acc>::acc *s, Acc *logw) {
    Acc m[VEC], lp[VEC], olp[VEC], adv[VEC], ref[VEC], w[VEC], slp[VEC], tm[VEC];
    if (vw) {
        gmpo_load_tokens<Acc, VEC>(a.is_w, r.w, r.vw, t, w);
#pragma unroll
        for (int k = 0; k < VEC; k++) *logw += gmpo_fam_lw(w[k]);
    }
    if (!gmpo_load_group<Acc, VEC>(a, r, t, adv_row, w_row, m, lp, olp, adv, ref, w)) return;
    gmpo_fam_load<Acc, VEC>(a.samp_logp, f.slp, f.vslp, t, (Acc)0, slp);
    gmpo_fam_load<Acc, VEC>(a.tok_mask, f.tm, f.vtm, t, (Acc)1, tm);
#pragma unroll
    for (int k = 0; k < VEC; k++) {
        if (m[k] != 0) {
            typename gmpo_m<Acc>::acc c =
                gmpo_fam_tok(&fo, m[k], tm[k], lp[k], olp[k], f.slp ? slp[k] : lp[k], adv[k],
                             ref[k], w[k]);
            gmpo_m<Acc>::merge(s, &c);
        }
    }
}

// Row blockIdx.x: its statistics into rows[i], or (sums != NULL) its raw sums
// into sums[i]. Inputs (B,T): logp, old_logp, mask, ref_logp, samp_logp,
// tok_mask; adv, is_w (B,) or (B,T). Loads as gmpo_fwd_rows_kernel's.
template <class Acc, int VEC>
__global__ void __launch_bounds__(GMPO_FAM_THREADS, 1)
gmpo_fam_fwd_kernel(const __grid_constant__ gmpo_args a, double *__restrict__ rows,
                    double *__restrict__ sums) {
    typedef typename gmpo_m<Acc>::acc acc_t;
    const int64_t i = blockIdx.x, T = a.T;
    const auto fo = gmpo_fam_opts(&a, (Acc)0);
    const gmpo_rows r = gmpo_make_rows<VEC>(a, i);
    const gmpo_fam_rows f = gmpo_make_fam_rows<VEC>(a, r, i, fo.opm);
    const Acc adv_row = gmpo_row_value<Acc>(a.adv, i, (Acc)0);
    const Acc w_row = gmpo_row_value<Acc>(a.is_w, i, (Acc)1);
    const bool vw = a.loss_type == GMPO_LT_VESPO && r.w_tok;   // vespo: every token's log w
    acc_t s;
    gmpo_m<Acc>::zero(&s);
    Acc logw = 0;
    const int64_t nvec = (T - r.head) / VEC, tail = r.head + nvec * VEC;
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x)
        gmpo_fam_fwd_group<Acc, VEC>(a, fo, r, f, r.head + j * VEC, adv_row, w_row, vw, &s, &logw);
    const int64_t nedge = r.head + (T - tail);   // head and tail tokens
    for (int64_t j = threadIdx.x; j < nedge; j += blockDim.x)
        gmpo_fam_fwd_group<Acc, 1>(a, fo, r, f, j < r.head ? j : tail + (j - r.head), adv_row,
                                   w_row, vw, &s, &logw);
    s.logw = logw;
    Acc v[GMPO_ACC_FIELDS];
    gmpo_acc_pack<Acc>(s, v);
    gmpo_block_sum8<Acc>(v);
    if (threadIdx.x == 0) {
        gmpo_acc_unpack<Acc>(v, s);
        double sm[GMPO_SUM_STATS];
        gmpo_sums_store(s, sm);
        if (sums) {
#pragma unroll
            for (int k = 0; k < GMPO_SUM_STATS; k++) sums[i * GMPO_SUM_STATS + k] = sm[k];
        } else {
            gmpo_family_row_finish(&a, sm, (double)adv_row, (double)w_row,
                                   rows + i * GMPO_ROW_STATS);
        }
    }
}

// VEC tokens t.. of a row: their gradient into gr (grad's row); a fully masked
// group writes zeros and reads nothing but its mask
template <class Acc, int VEC>
GMPO_DEV void gmpo_fam_bwd_group(const gmpo_args &a, const typename gmpo_fam_m<Acc>::opts &fo,
                                 const gmpo_rows &r, const gmpo_fam_rows &f, int64_t t,
                                 Acc adv_row, Acc w_row, Acc pg1, Acc pc, Acc kl, char *gr,
                                 int32_t gdt, bool vg) {
    Acc m[VEC], lp[VEC], olp[VEC], adv[VEC], ref[VEC], w[VEC], tm[VEC], g[VEC];
    if (gmpo_load_group<Acc, VEC>(a, r, t, adv_row, w_row, m, lp, olp, adv, ref, w)) {
        gmpo_fam_load<Acc, VEC>(a.tok_mask, f.tm, f.vtm, t, (Acc)1, tm);
#pragma unroll
        for (int k = 0; k < VEC; k++)
            g[k] = gmpo_fam_g(&fo, pg1, pc, kl, m[k], tm[k], lp[k], olp[k], adv[k], ref[k], w[k]);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) g[k] = 0;
    }
    if (VEC > 1 && vg) {
        gmpo_store_vec<Acc, VEC>(gr, gdt, t, g);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) gmpo_m<Acc>::store(gr, gdt, t + k, g[k]);
    }
}

// grad[i, :] for row i = blockIdx.x, the token vectors strided over blockIdx.y
template <class Acc, int VEC>
__global__ void __launch_bounds__(GMPO_FAM_THREADS, 1)
gmpo_fam_bwd_kernel(const __grid_constant__ gmpo_args a, const double *__restrict__ rows,
                    const void *__restrict__ grad_out, int32_t go_dt, void *__restrict__ grad,
                    int32_t gdt) {
    const int64_t i = blockIdx.x, T = a.T;
    const double go = gmpo_load_d(grad_out, go_dt, 0);
    double pg1_d, pc_d, kl_d;   // the row's factors, shared with the CPU (fp64)
    gmpo_family_grad_factors(&a, rows, i, go, &pg1_d, &pc_d, &kl_d);
    const Acc pg1 = (Acc)pg1_d, pc = (Acc)pc_d, kl = (Acc)kl_d;
    const auto fo = gmpo_fam_opts(&a, (Acc)0);
    const gmpo_rows r = gmpo_make_rows<VEC>(a, i);
    const gmpo_fam_rows f = gmpo_make_fam_rows<VEC>(a, r, i, false);
    const Acc adv_row = gmpo_row_value<Acc>(a.adv, i, (Acc)0);
    const Acc w_row = gmpo_row_value<Acc>(a.is_w, i, (Acc)1);
    char *gr = (char *)grad + gmpo_dtype_size(gdt) * (i * T);   // row i of grad
    const bool vg = VEC > 1 && (uintptr_t)(gr + r.head * gmpo_dtype_size(gdt)) %
                                       (uintptr_t)gmpo_vec_align<VEC>(gdt) == 0;
    const int64_t nvec = (T - r.head) / VEC, tail = r.head + nvec * VEC;
    const int64_t ystride = (int64_t)gridDim.y * blockDim.x;
    for (int64_t j = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; j < nvec; j += ystride)
        gmpo_fam_bwd_group<Acc, VEC>(a, fo, r, f, r.head + j * VEC, adv_row, w_row, pg1, pc, kl,
                                     gr, gdt, vg);
    if (blockIdx.y == 0) {   // the unaligned head and the tail, a token per thread
        const int64_t nedge = r.head + (T - tail);   // head and tail tokens
        for (int64_t j = threadIdx.x; j < nedge; j += blockDim.x)
            gmpo_fam_bwd_group<Acc, 1>(a, fo, r, f, j < r.head ? j : tail + (j - r.head),
                                       adv_row, w_row, pg1, pc, kl, gr, gdt, false);
    }
}

// ----------------------------------------------------------------------------
// launchers

// tokens per vector: 16 bytes of logp
static int vec_of(int32_t dt) {
    return dt == GMPO_DT_F64 ? 2 : 4;
}

static unsigned pow2_clamp(int64_t n, unsigned lo, unsigned hi) {
    unsigned p = lo;
    while (p < hi && (int64_t)p < n) p <<= 1;
    return p;
}

// forward: about two vectors per thread, 32..512 threads (short rows get small
// blocks, so many rows share an SM and few threads idle)
static unsigned fwd_threads(int64_t T, int vec) {
    int64_t nvec = (T + vec - 1) / vec;
    return pow2_clamp((nvec + 1) / 2, 32, GMPO_FWD_MAX_THREADS);
}

// backward: one vector per thread per block, 32..256 threads; the rest of the
// row goes to more blocks along y (short-lived blocks fill the GPU even for few rows)
static dim3 bwd_grid(int64_t B, int64_t T, int vec, unsigned *threads) {
    int64_t nvec = (T + vec - 1) / vec;
    *threads = pow2_clamp(nvec, 32, GMPO_BWD_MAX_THREADS);
    int64_t gy = (nvec + *threads - 1) / *threads;
    if (gy < 1) gy = 1;
    if (gy > GMPO_MAX_GRID_Y) gy = GMPO_MAX_GRID_Y;
    return dim3((unsigned)B, (unsigned)gy, 1);
}

// the family's forward rows (sums == NULL) or row sums, one block per row
static gmpo_status launch_fam_fwd(gmpo_args *a, double *rows, double *sums) {
    cudaStream_t stream = (cudaStream_t)a->stream;
    const int vec = vec_of(a->logp.dtype);
    unsigned threads = fwd_threads(a->T, vec);
    if (threads > GMPO_FAM_THREADS) threads = GMPO_FAM_THREADS;
    const dim3 grid((unsigned)a->B);
    if (a->logp.dtype == GMPO_DT_F64)
        GMPO_LAUNCH((gmpo_fam_fwd_kernel<double, 2>), grid, threads, 0, stream, *a, rows, sums);
    else
        GMPO_LAUNCH((gmpo_fam_fwd_kernel<float, 4>), grid, threads, 0, stream, *a, rows, sums);
    GMPO_CHECK_LAUNCH(a, "gmpo_fam_fwd_kernel");
    return GMPO_OK;
}

static gmpo_status too_many_rows(gmpo_args *a) {
    snprintf(a->err, sizeof a->err, "logps: %lld rows, more than the CUDA grid's 2^31-1",
             (long long)a->B);
    return GMPO_EINVAL;
}

extern "C" gmpo_status gmpo_cuda_forward(gmpo_args *a, double *rows, void *out_loss,
                                         void *out_metrics, int32_t out_dtype) {
    gmpo_status st = gmpo_check_forward(a, rows, out_loss, out_metrics, out_dtype);
    if (st) return st;
    if (a->B > INT32_MAX) return too_many_rows(a);
    cudaStream_t stream = (cudaStream_t)a->stream;
    if (a->B > 0) {
        const int32_t dt = a->logp.dtype;
        const unsigned threads = fwd_threads(a->T, vec_of(dt));
        const dim3 grid((unsigned)a->B);
        if (a->algo == GMPO_ALGO_FAMILY)
            st = launch_fam_fwd(a, rows, nullptr);
        else if (dt == GMPO_DT_F64)
            GMPO_LAUNCH((gmpo_fwd_rows_kernel<double, 2>), grid, threads, 0, stream, *a, rows,
                        (double *)nullptr);
        else
            GMPO_LAUNCH((gmpo_fwd_rows_kernel<float, 4>), grid, threads, 0, stream, *a, rows,
                        (double *)nullptr);
        if (st) return st;
        GMPO_CHECK_LAUNCH(a, "gmpo_fwd_rows_kernel");
    }
    const unsigned tthreads = pow2_clamp(a->B, 32, GMPO_TOT_MAX_THREADS);
    GMPO_LAUNCH(gmpo_fwd_totals_kernel, 1, tthreads, 0, stream, *a, rows, out_loss, out_metrics,
                out_dtype);
    GMPO_CHECK_LAUNCH(a, "gmpo_fwd_totals_kernel");
    return GMPO_OK;
}

extern "C" gmpo_status gmpo_cuda_backward(gmpo_args *a, const double *rows, const void *grad_out,
                                          int32_t grad_out_dtype, void *grad, int32_t grad_dtype) {
    gmpo_status st = gmpo_check_backward(a, rows, grad_out, grad_out_dtype, grad, grad_dtype);
    if (st) return st;
    if (a->B * a->T == 0) return GMPO_OK;
    if (a->B > INT32_MAX) return too_many_rows(a);
    cudaStream_t stream = (cudaStream_t)a->stream;
    const int32_t dt = a->logp.dtype;
    unsigned threads;
    const dim3 grid = bwd_grid(a->B, a->T, vec_of(dt), &threads);
    if (a->algo == GMPO_ALGO_FAMILY) {
        if (dt == GMPO_DT_F64)
            GMPO_LAUNCH((gmpo_fam_bwd_kernel<double, 2>), grid, threads, 0, stream, *a, rows,
                        grad_out, grad_out_dtype, grad, grad_dtype);
        else
            GMPO_LAUNCH((gmpo_fam_bwd_kernel<float, 4>), grid, threads, 0, stream, *a, rows,
                        grad_out, grad_out_dtype, grad, grad_dtype);
        GMPO_CHECK_LAUNCH(a, "gmpo_fam_bwd_kernel");
        return GMPO_OK;
    }
    if (dt == GMPO_DT_F64)
        GMPO_LAUNCH((gmpo_bwd_kernel<double, 2>), grid, threads, 0, stream, *a, rows, grad_out,
                    grad_out_dtype, grad, grad_dtype);
    else
        GMPO_LAUNCH((gmpo_bwd_kernel<float, 4>), grid, threads, 0, stream, *a, rows, grad_out,
                    grad_out_dtype, grad, grad_dtype);
    GMPO_CHECK_LAUNCH(a, "gmpo_bwd_kernel");
    return GMPO_OK;
}

// ----------------------------------------------------------------------------
// rows split over processes (gmpo.h): row sums, then the finish of summed ones

extern "C" gmpo_status gmpo_cuda_row_sums(gmpo_args *a, double *sums, int64_t sums_extent) {
    gmpo_status st = gmpo_check_sums(a, sums, sums_extent);
    if (st) return st;
    if (a->B > INT32_MAX) return too_many_rows(a);
    if (a->B == 0) return GMPO_OK;
    cudaStream_t stream = (cudaStream_t)a->stream;
    const int32_t dt = a->logp.dtype;
    const unsigned threads = fwd_threads(a->T, vec_of(dt));
    const dim3 grid((unsigned)a->B);
    if (a->algo == GMPO_ALGO_FAMILY) return launch_fam_fwd(a, nullptr, sums);
    if (dt == GMPO_DT_F64)
        GMPO_LAUNCH((gmpo_fwd_rows_kernel<double, 2>), grid, threads, 0, stream, *a,
                    (double *)nullptr, sums);
    else
        GMPO_LAUNCH((gmpo_fwd_rows_kernel<float, 4>), grid, threads, 0, stream, *a,
                    (double *)nullptr, sums);
    GMPO_CHECK_LAUNCH(a, "gmpo_fwd_rows_kernel");
    return GMPO_OK;
}

extern "C" gmpo_status gmpo_cuda_finish_sums(gmpo_args *a, const double *sums,
                                             int64_t sums_extent, double *rows, void *out_loss,
                                             void *out_metrics, int32_t out_dtype) {
    gmpo_status st = gmpo_check_forward(a, rows, out_loss, out_metrics, out_dtype);
    if (st) return st;
    if ((st = gmpo_check_sums(a, sums, sums_extent))) return st;
    if (a->B > INT32_MAX) return too_many_rows(a);
    cudaStream_t stream = (cudaStream_t)a->stream;
    if (a->B > 0) {
        const unsigned threads = 128;
        int64_t blocks = (a->B + threads - 1) / threads;
        if (blocks > GMPO_MAX_GRID_X) blocks = GMPO_MAX_GRID_X;   // the grid-stride loop covers the rest
        if (a->logp.dtype == GMPO_DT_F64)
            GMPO_LAUNCH(gmpo_finish_sums_kernel<double>, (unsigned)blocks, threads, 0, stream, *a,
                        sums, rows);
        else
            GMPO_LAUNCH(gmpo_finish_sums_kernel<float>, (unsigned)blocks, threads, 0, stream, *a,
                        sums, rows);
        GMPO_CHECK_LAUNCH(a, "gmpo_finish_sums_kernel");
    }
    const unsigned tthreads = pow2_clamp(a->B, 32, GMPO_TOT_MAX_THREADS);
    GMPO_LAUNCH(gmpo_fwd_totals_kernel, 1, tthreads, 0, stream, *a, rows, out_loss, out_metrics,
                out_dtype);
    GMPO_CHECK_LAUNCH(a, "gmpo_fwd_totals_kernel");
    return GMPO_OK;
}
