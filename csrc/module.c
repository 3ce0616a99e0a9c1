/*
 * module.c -- gmpo_ext._C, the thin CPython C-API layer over the C core.
 *
 * Python passes raw data pointers, shapes, element strides, dtype codes and
 * (for CUDA) the stream handle as integers; this module never includes a
 * libtorch header and never links libtorch or libpython, so one build works
 * with any PyTorch. The GIL is released around the compute only, and every C
 * status becomes one Python exception in one place (fail_status).
 *
 * A tensor is passed as a 5-tuple (data_ptr, dtype_code, stride_b, stride_t,
 * extent), an absent optional tensor as (0, 0, 0, 0, 0); an output or saved
 * buffer as (data_ptr, extent). The extent is the number of elements that may
 * be addressed from data_ptr on: the C core checks every access against it.
 *
 * Stable ABI: setup.py builds this file with Py_LIMITED_API=0x03090000 (one
 * cp39-abi3 wheel for every CPython >= 3.9), so it may use only the limited C
 * API of 3.9: PyArg_ParseTuple, Py_BuildValue, PyErr_*, PyModuleDef_Init,
 * PyModule_AddIntConstant, Py_BEGIN/END_ALLOW_THREADS are; no struct access,
 * no PyTuple_GET_ITEM-style macros (tests/test_wheel.py compiles it so and runs
 * abi3audit). Free-threaded CPython has no limited API: there setup.py leaves
 * Py_LIMITED_API undefined.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include "gmpo.h"
#include "gmpo_logits.h"

#ifndef GMPO_MODULE_NAME
#define GMPO_MODULE_NAME _C
#endif
#define GMPO_STR2(x) #x
#define GMPO_STR(x) GMPO_STR2(x)
#define GMPO_CAT2(a, b) a##b
#define GMPO_CAT(a, b) GMPO_CAT2(a, b)

enum { DEV_CPU = 0, DEV_CUDA = 1 };

// The argument formats parse "K" straight into pointers and "L" into int64_t.
_Static_assert(sizeof(void *) == sizeof(unsigned long long), "K must fill a pointer");
_Static_assert(sizeof(long long) == sizeof(int64_t), "L must fill an int64_t");

#ifndef GMPO_WITH_CUDA
gmpo_status gmpo_cuda_forward(gmpo_args *a, double *rows, void *out_loss,
                              void *out_metrics, int32_t out_dtype) {
    (void)rows; (void)out_loss; (void)out_metrics; (void)out_dtype;
    snprintf(a->err, sizeof a->err, "gmpo_ext was built without its CUDA kernels");
    return GMPO_ENOTBUILT;
}
gmpo_status gmpo_cuda_backward(gmpo_args *a, const double *rows, const void *grad_out,
                               int32_t grad_out_dtype, void *grad, int32_t grad_dtype) {
    (void)rows; (void)grad_out; (void)grad_out_dtype; (void)grad; (void)grad_dtype;
    snprintf(a->err, sizeof a->err, "gmpo_ext was built without its CUDA kernels");
    return GMPO_ENOTBUILT;
}
gmpo_status gmpo_cuda_versions(int *built, int *runtime, int *driver) {
    *built = *runtime = *driver = 0;
    return GMPO_ENOTBUILT;
}
#endif

// the one place a C status becomes a Python exception
static PyObject *fail_status(gmpo_status st, const gmpo_args *a) {
    const char *msg = a->err[0] ? a->err : "unknown error";
    switch (st) {
    case GMPO_EINVAL: PyErr_SetString(PyExc_ValueError, msg); break;
    case GMPO_ENOMEM: PyErr_NoMemory(); break;
    default: PyErr_SetString(PyExc_RuntimeError, msg); break;
    }
    return NULL;
}

#define VIEW_FMT "(KiLLL)"
#define VIEW_ARGS(v) &(v).data, &(v).dtype, &(v).stride_b, &(v).stride_t, &(v).extent
// a buffer: (data_ptr, extent)
#define BUF_FMT "(KL)"

// The arguments forward and backward share, parsed into a gmpo_args.
typedef struct {
    gmpo_args a;
    int device;
    unsigned long long stream;
    PyObject *fam_obj;   // borrowed: None or the family's options tuple
} call;

// the GRPO family's tensors and options (gmpo_family): sampling_logps,
// token_mask, then None (the other algorithms: all zeros) or the tuple
// (seq_level, has_delta, off_policy, bias_corr_kl, delta, off_policy_threshold,
// sapo_tpos, sapo_tneg, vespo_kpos, vespo_lpos, vespo_kneg, vespo_lneg), parsed
// by finish_parse (None costs the common call nothing)
#define FAMILY_FMT VIEW_FMT VIEW_FMT "O"
#define FAMILY_ARGS(c) VIEW_ARGS((c).a.samp_logp), VIEW_ARGS((c).a.tok_mask), &(c).fam_obj
#define COMMON_FMT "iiKLL" VIEW_FMT VIEW_FMT VIEW_FMT VIEW_FMT VIEW_FMT VIEW_FMT FAMILY_FMT \
    "iiddddddi"
#define COMMON_ARGS(c)                                                                 \
    &(c).a.algo, &(c).device, &(c).stream, &(c).a.B, &(c).a.T, VIEW_ARGS((c).a.logp), \
        VIEW_ARGS((c).a.old_logp), VIEW_ARGS((c).a.adv), VIEW_ARGS((c).a.mask),        \
        VIEW_ARGS((c).a.ref_logp), VIEW_ARGS((c).a.is_w), FAMILY_ARGS(c),              \
        &(c).a.convention, &(c).a.loss_type, &(c).a.eps_low, &(c).a.eps_high,          \
        &(c).a.beta, &(c).a.log_ratio_clamp, &(c).a.normalizer, &(c).a.denom,          \
        &(c).a.num_threads

// the family's options tuple into c->a.fam (None: zeros)
static int parse_family(call *c) {
    if (c->fam_obj == Py_None) {
        if (c->a.algo != GMPO_ALGO_FAMILY) return 0;
        PyErr_SetString(PyExc_ValueError,
                        "family: family options required with algo 2 (the GRPO family)");
        return -1;
    }
    if (!PyTuple_Check(c->fam_obj)) {
        PyErr_SetString(PyExc_TypeError, "family: must be a tuple of 12 options or None");
        return -1;
    }
    gmpo_family *f = &c->a.fam;
    // 12 values (TRL's options), or 14 with verl's loss_agg_mode code and clip_ratio_c
    if (!PyArg_ParseTuple(c->fam_obj, "iiiidddddddd|id:family", &f->seq_level, &f->has_delta,
                          &f->off_policy, &f->bias_corr_kl, &f->delta, &f->off_policy_threshold,
                          &f->sapo_tpos, &f->sapo_tneg, &f->vespo_kpos, &f->vespo_lpos,
                          &f->vespo_kneg, &f->vespo_lneg, &f->verl_agg, &f->clip_c))
        return -1;
    return 0;
}

static int check_device(call *c) {
    if (parse_family(c)) return -1;
    if (c->device != DEV_CPU && c->device != DEV_CUDA) {
        PyErr_Format(PyExc_ValueError, "device: must be 0 (cpu) or 1 (cuda), got %d", c->device);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(forward_doc,
"forward(algo, device, stream, B, T, logp, old_logp, adv, mask, ref_logp, is_w,\n"
"        samp_logp, tok_mask, family,\n"
"        convention, loss_type, eps_low, eps_high, beta, log_ratio_clamp,\n"
"        normalizer, denom, num_threads, rows, out_loss, out_metrics, out_dtype)\n"
"--\n\n"
"Fused loss forward. Tensors are (data_ptr, dtype, stride_b, stride_t, extent)\n"
"tuples; rows, out_loss, out_metrics are (data_ptr, extent) buffers of\n"
"preallocated outputs.");

static PyObject *py_forward(PyObject *self, PyObject *args) {
    (void)self;
    call c;
    memset(&c, 0, sizeof c);
    unsigned long long rows, out_loss, out_metrics;
    int out_dtype;
    if (!PyArg_ParseTuple(args, COMMON_FMT BUF_FMT BUF_FMT BUF_FMT "i:forward", COMMON_ARGS(c),
                          &rows, &c.a.rows_extent, &out_loss, &c.a.loss_extent, &out_metrics,
                          &c.a.metrics_extent, &out_dtype))
        return NULL;
    if (check_device(&c)) return NULL;
    c.a.stream = (void *)(uintptr_t)c.stream;
    gmpo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (c.device == DEV_CPU)
        st = gmpo_cpu_forward(&c.a, (double *)(uintptr_t)rows, (void *)(uintptr_t)out_loss,
                              (void *)(uintptr_t)out_metrics, out_dtype);
    else
        st = gmpo_cuda_forward(&c.a, (double *)(uintptr_t)rows, (void *)(uintptr_t)out_loss,
                               (void *)(uintptr_t)out_metrics, out_dtype);
    Py_END_ALLOW_THREADS
    if (st != GMPO_OK) return fail_status(st, &c.a);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(forward_backward_doc,
"forward_backward(algo, device, stream, B, T, logp, old_logp, adv, mask, ref_logp,\n"
"                 is_w, samp_logp, tok_mask, family, convention, loss_type, eps_low, eps_high, beta,\n"
"                 log_ratio_clamp, normalizer, denom, num_threads, rows, out_loss,\n"
"                 out_metrics, out_dtype, grad, grad_dtype)\n"
"--\n\n"
"CPU only: forward, and in the same pass over the inputs the gradient for an\n"
"upstream gradient of 1 into the contiguous (B, T) buffer grad ((data_ptr,\n"
"extent), as rows, out_loss and out_metrics).");

static PyObject *py_forward_backward(PyObject *self, PyObject *args) {
    (void)self;
    call c;
    memset(&c, 0, sizeof c);
    unsigned long long rows, out_loss, out_metrics, grad;
    int out_dtype, grad_dtype;
    if (!PyArg_ParseTuple(args, COMMON_FMT BUF_FMT BUF_FMT BUF_FMT "i" BUF_FMT "i:forward_backward",
                          COMMON_ARGS(c), &rows, &c.a.rows_extent, &out_loss, &c.a.loss_extent,
                          &out_metrics, &c.a.metrics_extent, &out_dtype, &grad,
                          &c.a.grad_extent, &grad_dtype))
        return NULL;
    if (check_device(&c)) return NULL;
    if (c.device != DEV_CPU) {
        PyErr_SetString(PyExc_ValueError, "device: forward_backward runs on the CPU only");
        return NULL;
    }
    gmpo_status st;
    Py_BEGIN_ALLOW_THREADS
    st = gmpo_cpu_forward_backward(&c.a, (double *)(uintptr_t)rows, (void *)(uintptr_t)out_loss,
                                   (void *)(uintptr_t)out_metrics, out_dtype,
                                   (void *)(uintptr_t)grad, grad_dtype);
    Py_END_ALLOW_THREADS
    if (st != GMPO_OK) return fail_status(st, &c.a);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(uses_fast_kernel_doc,
"uses_fast_kernel(algo, device, stream, B, T, logp, old_logp, adv, mask, ref_logp,\n"
"                 is_w, samp_logp, tok_mask, family, convention, loss_type, eps_low, eps_high, beta,\n"
"                 log_ratio_clamp, normalizer, denom, num_threads, grad_dtype)\n"
"--\n\n"
"Whether the CPU entry points take the common case's kernel for these\n"
"arguments (grad_dtype: forward_backward's gradient dtype, -1 for forward).");

static PyObject *py_uses_fast_kernel(PyObject *self, PyObject *args) {
    (void)self;
    call c;
    memset(&c, 0, sizeof c);
    int grad_dtype;
    if (!PyArg_ParseTuple(args, COMMON_FMT "i:uses_fast_kernel", COMMON_ARGS(c), &grad_dtype))
        return NULL;
    if (parse_family(&c)) return NULL;
    return PyBool_FromLong(gmpo_cpu_uses_fast_kernel(&c.a, grad_dtype));
}

PyDoc_STRVAR(backward_doc,
"backward(algo, device, stream, B, T, logp, old_logp, adv, mask, ref_logp, is_w,\n"
"        samp_logp, tok_mask, family,\n"
"         convention, loss_type, eps_low, eps_high, beta, log_ratio_clamp,\n"
"         normalizer, denom, num_threads, rows, grad_out, grad_out_dtype,\n"
"         grad, grad_dtype)\n"
"--\n\n"
"Fused loss backward: writes d loss / d logp times grad_out (read where it\n"
"lives, device memory for CUDA) into the contiguous (B, T) buffer grad.\n"
"rows, grad_out and grad are (data_ptr, extent) buffers.");

static PyObject *py_backward(PyObject *self, PyObject *args) {
    (void)self;
    call c;
    memset(&c, 0, sizeof c);
    unsigned long long rows, grad_out, grad;
    int grad_out_dtype, grad_dtype;
    if (!PyArg_ParseTuple(args, COMMON_FMT BUF_FMT BUF_FMT "i" BUF_FMT "i:backward", COMMON_ARGS(c),
                          &rows, &c.a.rows_extent, &grad_out, &c.a.grad_out_extent,
                          &grad_out_dtype, &grad, &c.a.grad_extent, &grad_dtype))
        return NULL;
    if (check_device(&c)) return NULL;
    c.a.stream = (void *)(uintptr_t)c.stream;
    gmpo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (c.device == DEV_CPU)
        st = gmpo_cpu_backward(&c.a, (const double *)(uintptr_t)rows,
                               (const void *)(uintptr_t)grad_out, grad_out_dtype,
                               (void *)(uintptr_t)grad, grad_dtype);
    else
        st = gmpo_cuda_backward(&c.a, (const double *)(uintptr_t)rows,
                                (const void *)(uintptr_t)grad_out, grad_out_dtype,
                                (void *)(uintptr_t)grad, grad_dtype);
    Py_END_ALLOW_THREADS
    if (st != GMPO_OK) return fail_status(st, &c.a);
    Py_RETURN_NONE;
}

// ----------------------------------------------------------------------------
// rows split over processes (gmpo.h: row_sums, then finish_sums of the sums
// the caller added up over the processes)

PyDoc_STRVAR(row_sums_doc,
"row_sums(algo, device, stream, B, T, logp, old_logp, adv, mask, ref_logp, is_w,\n"
"        samp_logp, tok_mask, family,\n"
"         convention, loss_type, eps_low, eps_high, beta, log_ratio_clamp,\n"
"         normalizer, denom, num_threads, sums)\n"
"--\n\n"
"Each row's raw sums over the tokens given (SUM_STATS float64 per row) into\n"
"sums, a (data_ptr, extent) buffer of a contiguous (B, SUM_STATS) float64\n"
"tensor: the first half of forward for rows split over processes.");

static PyObject *py_row_sums(PyObject *self, PyObject *args) {
    (void)self;
    call c;
    memset(&c, 0, sizeof c);
    unsigned long long sums;
    int64_t sums_extent;
    if (!PyArg_ParseTuple(args, COMMON_FMT BUF_FMT ":row_sums", COMMON_ARGS(c), &sums,
                          &sums_extent))
        return NULL;
    if (check_device(&c)) return NULL;
    c.a.stream = (void *)(uintptr_t)c.stream;
    gmpo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (c.device == DEV_CPU)
        st = gmpo_cpu_row_sums(&c.a, (double *)(uintptr_t)sums, sums_extent);
    else
        st = gmpo_cuda_row_sums(&c.a, (double *)(uintptr_t)sums, sums_extent);
    Py_END_ALLOW_THREADS
    if (st != GMPO_OK) return fail_status(st, &c.a);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(finish_sums_doc,
"finish_sums(algo, device, stream, B, T, logp, old_logp, adv, mask, ref_logp, is_w,\n"
"        samp_logp, tok_mask, family,\n"
"            convention, loss_type, eps_low, eps_high, beta, log_ratio_clamp,\n"
"            normalizer, denom, num_threads, sums, rows, out_loss, out_metrics,\n"
"            out_dtype)\n"
"--\n\n"
"The second half: the (B, SUM_STATS) row sums added up over the processes ->\n"
"rows, loss and metrics, as forward writes them. All (data_ptr, extent).");

static PyObject *py_finish_sums(PyObject *self, PyObject *args) {
    (void)self;
    call c;
    memset(&c, 0, sizeof c);
    unsigned long long sums, rows, out_loss, out_metrics;
    int64_t sums_extent;
    int out_dtype;
    if (!PyArg_ParseTuple(args, COMMON_FMT BUF_FMT BUF_FMT BUF_FMT BUF_FMT "i:finish_sums",
                          COMMON_ARGS(c), &sums, &sums_extent, &rows, &c.a.rows_extent,
                          &out_loss, &c.a.loss_extent, &out_metrics, &c.a.metrics_extent,
                          &out_dtype))
        return NULL;
    if (check_device(&c)) return NULL;
    c.a.stream = (void *)(uintptr_t)c.stream;
    gmpo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (c.device == DEV_CPU)
        st = gmpo_cpu_finish_sums(&c.a, (const double *)(uintptr_t)sums, sums_extent,
                                  (double *)(uintptr_t)rows, (void *)(uintptr_t)out_loss,
                                  (void *)(uintptr_t)out_metrics, out_dtype);
    else
        st = gmpo_cuda_finish_sums(&c.a, (const double *)(uintptr_t)sums, sums_extent,
                                   (double *)(uintptr_t)rows, (void *)(uintptr_t)out_loss,
                                   (void *)(uintptr_t)out_metrics, out_dtype);
    Py_END_ALLOW_THREADS
    if (st != GMPO_OK) return fail_status(st, &c.a);
    Py_RETURN_NONE;
}

// ----------------------------------------------------------------------------
// fused kernels from logits (gmpo_logits.h)

// the one place a logits-kernel status becomes a Python exception
static PyObject *fail_logits(gmpo_status st, const gmpo_logits_args *a) {
    const char *msg = a->err[0] ? a->err : "unknown error";
    switch (st) {
    case GMPO_EINVAL:
        PyErr_SetString(a->bad_id ? PyExc_IndexError : PyExc_ValueError, msg);
        break;
    case GMPO_ENOMEM: PyErr_NoMemory(); break;
    default: PyErr_SetString(PyExc_RuntimeError, msg); break;
    }
    return NULL;
}

typedef struct {
    gmpo_logits_args a;
    int device;
    unsigned long long stream;
    const char *ids_name;
} logits_call;

#define LOGITS_FMT "iKLLLL" VIEW_FMT VIEW_FMT VIEW_FMT "dis"
#define LOGITS_ARGS(c)                                                                  \
    &(c).device, &(c).stream, &(c).a.B, &(c).a.T, &(c).a.TL, &(c).a.V,                  \
        VIEW_ARGS((c).a.logits), VIEW_ARGS((c).a.ids), VIEW_ARGS((c).a.mask),           \
        &(c).a.temperature, &(c).a.num_threads, &(c).ids_name

static int logits_prepare(logits_call *c) {
    if (c->device != DEV_CPU && c->device != DEV_CUDA) {
        PyErr_Format(PyExc_ValueError, "device: must be 0 (cpu) or 1 (cuda), got %d", c->device);
        return -1;
    }
    c->a.stream = (void *)(uintptr_t)c->stream;
    snprintf(c->a.ids_name, sizeof c->a.ids_name, "%s", c->ids_name);
    return 0;
}

PyDoc_STRVAR(logits_forward_doc,
"logits_forward(device, stream, B, T, TL, V, logits, ids, mask, temperature,\n"
"               num_threads, ids_name, logp, entropy, lse)\n"
"--\n\n"
"Per-token log-prob, entropy and log-sum-exp of (B, TL, V) logits (TL = T or\n"
"T + 1) at the (B, T) ids. logits, ids, mask are (data_ptr, dtype, stride_b,\n"
"stride_t, extent) tuples; logp, entropy (data_ptr 0: skip), lse are\n"
"(data_ptr, extent) buffers of (B, T) contiguous float32 outputs. An id\n"
"outside [0, V) raises IndexError on CPU.");

// the forward and backward calls of a parsed logits_call (plain, or a
// vocabulary shard: vocab_total >= 1 then)
static int logits_prepare_shard(logits_call *c, int shard) {
    if (logits_prepare(c)) return -1;
    if (shard && c->a.vocab_total < 1) {
        PyErr_SetString(PyExc_ValueError, "vocab_total: must be >= 1 for a vocabulary shard");
        return -1;
    }
    return 0;
}

static PyObject *logits_run_forward(logits_call *c, int shard, unsigned long long logp,
                                    unsigned long long entropy, unsigned long long lse) {
    if (logits_prepare_shard(c, shard)) return NULL;
    gmpo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (c->device == DEV_CPU)
        st = gmpo_logits_cpu_forward(&c->a, (float *)(uintptr_t)logp,
                                     (float *)(uintptr_t)entropy, (float *)(uintptr_t)lse);
    else
        st = gmpo_logits_cuda_forward(&c->a, (float *)(uintptr_t)logp,
                                      (float *)(uintptr_t)entropy, (float *)(uintptr_t)lse);
    Py_END_ALLOW_THREADS
    if (st != GMPO_OK) return fail_logits(st, &c->a);
    Py_RETURN_NONE;
}

static PyObject *logits_run_backward(logits_call *c, int shard, unsigned long long lse,
                                     unsigned long long entropy, gmpo_view grad_logp,
                                     gmpo_view grad_entropy, gmpo_view grad) {
    if (logits_prepare_shard(c, shard)) return NULL;
    gmpo_status st;
    Py_BEGIN_ALLOW_THREADS
    if (c->device == DEV_CPU)
        st = gmpo_logits_cpu_backward(&c->a, (const float *)(uintptr_t)lse,
                                      (const float *)(uintptr_t)entropy, grad_logp,
                                      grad_entropy, grad);
    else
        st = gmpo_logits_cuda_backward(&c->a, (const float *)(uintptr_t)lse,
                                       (const float *)(uintptr_t)entropy, grad_logp,
                                       grad_entropy, grad);
    Py_END_ALLOW_THREADS
    if (st != GMPO_OK) return fail_logits(st, &c->a);
    Py_RETURN_NONE;
}

static PyObject *py_logits_forward(PyObject *self, PyObject *args) {
    (void)self;
    logits_call c;
    memset(&c, 0, sizeof c);
    unsigned long long logp, entropy, lse;
    if (!PyArg_ParseTuple(args, LOGITS_FMT BUF_FMT BUF_FMT BUF_FMT ":logits_forward",
                          LOGITS_ARGS(c), &logp, &c.a.logp_extent, &entropy,
                          &c.a.entropy_extent, &lse, &c.a.lse_extent))
        return NULL;
    return logits_run_forward(&c, 0, logp, entropy, lse);
}

PyDoc_STRVAR(logits_backward_doc,
"logits_backward(device, stream, B, T, TL, V, logits, ids, mask, temperature,\n"
"                num_threads, ids_name, lse, entropy, grad_logp, grad_entropy, grad)\n"
"--\n\n"
"Gradient of the logits from d loss / d logp and d loss / d entropy ((B, T)\n"
"views; grad_entropy may be absent) into grad, a (B, TL, V) view in the\n"
"logits' dtype that may be the logits themselves. lse and entropy are the\n"
"forward's outputs ((data_ptr, extent) buffers).");

static PyObject *py_logits_backward(PyObject *self, PyObject *args) {
    (void)self;
    logits_call c;
    memset(&c, 0, sizeof c);
    unsigned long long lse, entropy;
    gmpo_view grad_logp, grad_entropy, grad;
    if (!PyArg_ParseTuple(args, LOGITS_FMT BUF_FMT BUF_FMT VIEW_FMT VIEW_FMT VIEW_FMT
                          ":logits_backward", LOGITS_ARGS(c), &lse, &c.a.lse_extent, &entropy,
                          &c.a.entropy_extent, VIEW_ARGS(grad_logp), VIEW_ARGS(grad_entropy),
                          VIEW_ARGS(grad)))
        return NULL;
    return logits_run_backward(&c, 0, lse, entropy, grad_logp, grad_entropy, grad);
}

PyDoc_STRVAR(logits_forward_shard_doc,
"logits_forward_shard(device, stream, B, T, TL, V, logits, ids, mask, temperature,\n"
"                     num_threads, ids_name, logp, entropy, lse, vocab_start,\n"
"                     vocab_total)\n"
"--\n\n"
"logits_forward for logits holding the vocabulary entries [vocab_start,\n"
"vocab_start + V) of vocab_total (the vocabulary split over processes): writes\n"
"the shard's mergeable state, lse and entropy of the shard's softmax and in\n"
"logp the target's scaled logit where the id lies in the shard (else 0).");

static PyObject *py_logits_forward_shard(PyObject *self, PyObject *args) {
    (void)self;
    logits_call c;
    memset(&c, 0, sizeof c);
    unsigned long long logp, entropy, lse;
    if (!PyArg_ParseTuple(args, LOGITS_FMT BUF_FMT BUF_FMT BUF_FMT "LL:logits_forward_shard",
                          LOGITS_ARGS(c), &logp, &c.a.logp_extent, &entropy,
                          &c.a.entropy_extent, &lse, &c.a.lse_extent, &c.a.vocab_start,
                          &c.a.vocab_total))
        return NULL;
    return logits_run_forward(&c, 1, logp, entropy, lse);
}

PyDoc_STRVAR(logits_backward_shard_doc,
"logits_backward_shard(device, stream, B, T, TL, V, logits, ids, mask, temperature,\n"
"                      num_threads, ids_name, lse, entropy, grad_logp, grad_entropy,\n"
"                      grad, vocab_start, vocab_total)\n"
"--\n\n"
"logits_backward for a vocabulary shard: lse and entropy are the merged\n"
"(global) values; the one-hot term applies where the id lies in the shard.");

static PyObject *py_logits_backward_shard(PyObject *self, PyObject *args) {
    (void)self;
    logits_call c;
    memset(&c, 0, sizeof c);
    unsigned long long lse, entropy;
    gmpo_view grad_logp, grad_entropy, grad;
    if (!PyArg_ParseTuple(args, LOGITS_FMT BUF_FMT BUF_FMT VIEW_FMT VIEW_FMT VIEW_FMT
                          "LL:logits_backward_shard", LOGITS_ARGS(c), &lse, &c.a.lse_extent,
                          &entropy, &c.a.entropy_extent, VIEW_ARGS(grad_logp),
                          VIEW_ARGS(grad_entropy), VIEW_ARGS(grad), &c.a.vocab_start,
                          &c.a.vocab_total))
        return NULL;
    return logits_run_backward(&c, 1, lse, entropy, grad_logp, grad_entropy, grad);
}

PyDoc_STRVAR(cuda_versions_doc,
"cuda_versions()\n"
"--\n\n"
"(built, runtime, driver): the CUDA version the kernels were compiled with,\n"
"the runtime's and the newest the driver supports (e.g. 13000 for 13.0; the\n"
"driver's is 0 without one), or None for a build without CUDA. All 0 under\n"
"the SIMT emulation.");

static PyObject *py_cuda_versions(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    int built = 0, runtime = 0, driver = 0;
    gmpo_status st;
    Py_BEGIN_ALLOW_THREADS
    st = gmpo_cuda_versions(&built, &runtime, &driver);
    Py_END_ALLOW_THREADS
    if (st == GMPO_ENOTBUILT) Py_RETURN_NONE;
    return Py_BuildValue("(iii)", built, runtime, driver);
}

#include "module_hidden.inc"   // the hidden-state tile kernels (HIDDEN_METHODS)

static PyMethodDef methods[] = {
    {"cuda_versions", py_cuda_versions, METH_NOARGS, cuda_versions_doc},
    {"forward", py_forward, METH_VARARGS, forward_doc},
    {"backward", py_backward, METH_VARARGS, backward_doc},
    {"forward_backward", py_forward_backward, METH_VARARGS, forward_backward_doc},
    {"uses_fast_kernel", py_uses_fast_kernel, METH_VARARGS, uses_fast_kernel_doc},
    {"row_sums", py_row_sums, METH_VARARGS, row_sums_doc},
    {"finish_sums", py_finish_sums, METH_VARARGS, finish_sums_doc},
    {"logits_forward", py_logits_forward, METH_VARARGS, logits_forward_doc},
    {"logits_backward", py_logits_backward, METH_VARARGS, logits_backward_doc},
    {"logits_forward_shard", py_logits_forward_shard, METH_VARARGS, logits_forward_shard_doc},
    {"logits_backward_shard", py_logits_backward_shard, METH_VARARGS,
     logits_backward_shard_doc},
    HIDDEN_METHODS
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *m) {
#ifdef GMPO_WITH_CUDA
    int cuda = 1;
#else
    int cuda = 0;
#endif
#ifdef GMPO_SIMT
    int simt = 1;
#else
    int simt = 0;
#endif
    if (PyModule_AddIntConstant(m, "WITH_CUDA", cuda) < 0) return -1;
    if (PyModule_AddIntConstant(m, "SIMT", simt) < 0) return -1;
    if (PyModule_AddIntConstant(m, "ROW_STATS", GMPO_ROW_STATS) < 0) return -1;
    if (PyModule_AddIntConstant(m, "METRICS", GMPO_METRICS) < 0) return -1;
    if (PyModule_AddIntConstant(m, "SUM_STATS", GMPO_SUM_STATS) < 0) return -1;
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
#ifdef Py_mod_gil
    // Not in the 3.9 limited API (3.13+ headers define it only for the full API
    // or Py_LIMITED_API >= 3.13), so the abi3 build has no such slot; that costs
    // nothing, since free-threaded CPython cannot load abi3 modules at all: it
    // needs a module built from source against its full API, which has the slot.
    // free-threaded CPython: the module keeps no Python state of its own and
    // touches no Python object while the GIL is released; the C core's only
    // global (the CPU kernel level) is an atomic set idempotently
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

PyDoc_STRVAR(module_doc, "gmpo_ext's C core: fused GMPO / GRPO loss kernels (CPU"
                         " and, when built with nvcc, CUDA).");

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, GMPO_STR(GMPO_MODULE_NAME), module_doc, 0, methods, slots,
    NULL, NULL, NULL,
};

PyMODINIT_FUNC GMPO_CAT(PyInit_, GMPO_MODULE_NAME)(void) {
    return PyModuleDef_Init(&moduledef);
}
