/* ktnuma._pack: the worker's strided-row packer (a tp part's columns of a row-major matrix).
 *
 *   pack(src, offset, rows, run, stride, dst)
 *
 * copies `rows` runs of `run` bytes, the first at src[offset], each next one `stride` bytes further,
 * back to back into dst[0 : rows * run]. Any buffer-protocol objects (dst writable). Every bound is
 * checked before a byte moves (ValueError naming the numbers); the copy runs without the GIL, so a
 * worker's reader threads pack in parallel. Built at install (setup.py, optional): a worker without it
 * packs with numpy (ktnuma/stage/worker_ops.py), which costs each worker numpy's import. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *pack(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    Py_ssize_t offset, rows, run, stride;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnnnw*", &src, &offset, &rows, &run, &stride, &dst))
        return NULL;
    PyObject *ret = NULL;
    if (offset < 0 || rows < 0 || run < 0 || stride < run) {
        PyErr_Format(PyExc_ValueError, "pack: offset %zd, rows %zd, run %zd, stride %zd: need offset, rows, "
                     "run >= 0 and stride >= run", offset, rows, run, stride);
        goto out;
    }
    if (rows > 0) {
        /* the last run ends at offset + (rows - 1) * stride + run <= src.len; checked without any
           sum or product that could overflow (src.len - offset - run >= 0 once the first test passed) */
        if (offset > src.len || run > src.len - offset ||
            (stride > 0 && rows - 1 > (src.len - offset - run) / stride)) {
            PyErr_Format(PyExc_ValueError, "pack: %zd rows of %zd bytes every %zd from byte %zd overrun the "
                         "%zd-byte source", rows, run, stride, offset, src.len);
            goto out;
        }
        if (run && rows > dst.len / run) {
            PyErr_Format(PyExc_ValueError, "pack: %zd rows of %zd bytes overrun the %zd-byte destination",
                         rows, run, dst.len);
            goto out;
        }
        const char *s = (const char *)src.buf + offset;
        char *d = (char *)dst.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows; r++, s += stride, d += run)
            memcpy(d, s, (size_t)run);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
out:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return ret;
}

static PyMethodDef methods[] = {
    {"pack", pack, METH_VARARGS,
     "pack(src, offset, rows, run, stride, dst): rows runs of run bytes every stride bytes from "
     "src[offset], back to back into dst"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "ktnuma._pack",
                                    "The staging worker's strided-row packer.", -1, methods};

PyMODINIT_FUNC PyInit__pack(void) { return PyModule_Create(&module); }
