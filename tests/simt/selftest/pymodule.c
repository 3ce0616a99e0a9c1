/* A CPython extension over the self-test kernels, built by
 * build_library(..., python_extension=True): proves that the emulated kernels
 * load and run inside the Python process, as gmpo_ext._C will. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "selftest.h"

PyDoc_STRVAR(warp_semantics_doc, "warp_semantics() -> list[int]: run the warp-primitive kernel (64 threads).");

static PyObject* warp_semantics(PyObject* self, PyObject* unused) {
  (void)self;
  (void)unused;
  int out[64 * ST_WARP_OUTS];
  int code;
  Py_BEGIN_ALLOW_THREADS
  code = st_warp_semantics(out);
  Py_END_ALLOW_THREADS
  if (code) return PyErr_Format(PyExc_RuntimeError, "%s", st_error_string(code));
  PyObject* list = PyList_New(64 * ST_WARP_OUTS);
  if (!list) return NULL;
  for (int i = 0; i < 64 * ST_WARP_OUTS; ++i) PyList_SET_ITEM(list, i, PyLong_FromLong(out[i]));
  return list;
}

PyDoc_STRVAR(divergent_doc, "divergent(threads) -> None: the divergent-barrier kernel; raises RuntimeError.");

static PyObject* divergent(PyObject* self, PyObject* args) {
  (void)self;
  int threads, code;
  if (!PyArg_ParseTuple(args, "i:divergent", &threads)) return NULL;
  if (threads < 1 || threads > 1024) return PyErr_Format(PyExc_ValueError, "threads must be in [1, 1024]");
  float* out = PyMem_RawCalloc(2 * (size_t)threads, sizeof(float));
  if (!out) return PyErr_NoMemory();
  Py_BEGIN_ALLOW_THREADS
  code = st_divergent_barrier(out, threads);
  Py_END_ALLOW_THREADS
  PyMem_RawFree(out);
  if (code) return PyErr_Format(PyExc_RuntimeError, "%s", st_error_string(code));
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"warp_semantics", warp_semantics, METH_NOARGS, warp_semantics_doc},
    {"divergent", divergent, METH_VARARGS, divergent_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "simt_selftest_ext", NULL, 0, methods};

PyMODINIT_FUNC PyInit_simt_selftest_ext(void) { return PyModuleDef_Init(&module); }
