/*
 * state.h: the C API for state dicts: the tensors of a module's state dict,
 * loading values into a module's parameters and buffers, and the archive
 * layout of Python's torch.save.
 *
 * Conventions are those of convsplit.h: 0 on success, 1 on failure with a
 * message in *err that the caller releases with cs_free.
 */
#ifndef CONVSPLIT_STATE_H
#define CONVSPLIT_STATE_H
#include "convsplit.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Returns the module's state dict in the order of Python's state_dict():
 * *names receives a JSON array of keys and *tensors a malloc'ed array of
 * handles (released with cs_free after each handle is freed). The tensors
 * are detached from autograd and share storage with the module, as Python's
 * state_dict() tensors do.
 */
int cs_module_state_tensors(cs_module* m, char** names, cs_tensor*** tensors, int* n, char** err);

/*
 * Copies values into the module's parameters and buffers in place, without
 * recording gradients. Every key is checked before anything is copied.
 * *report receives a JSON object: {"loaded": [...], "missing": [...],
 * "unexpected": [...], "mismatched": [{"key", "expected_shape",
 * "expected_dtype", "shape", "dtype"}]}. With strict nonzero, nothing is
 * copied unless missing, unexpected and mismatched are all empty; otherwise
 * the keys that match are copied and the others skipped. Either way the call
 * succeeds and the caller reads the report.
 */
int cs_module_load_state(cs_module* m, const char** keys, cs_tensor** values, int n, int strict,
                         char** report, char** err);

/* Returns a view of base's storage with the given sizes, strides and
 * storage offset (in elements), as torch.as_strided does. */
int cs_tensor_as_strided(cs_tensor* base, const int64_t* sizes, const int64_t* strides, int ndim,
                         int64_t offset, cs_tensor** out, char** err);

/*
 * Describes how t lies in its storage: *storage identifies the storage
 * (equal for tensors that share one), *storage_bytes is its size, *offset
 * the tensor's storage offset in elements, and strides (t's ndim values) its
 * strides in elements.
 */
int cs_tensor_storage_info(cs_tensor* t, uint64_t* storage, int64_t* storage_bytes, int64_t* offset,
                           int64_t* strides, char** err);

/*
 * Writes a torch.save archive to path: the pickle as data.pkl and, for each
 * i, the whole storage of storages[i] as data/i, then the version record.
 */
int cs_write_torch_archive(const char* path, const void* pickle, size_t pickle_size,
                           cs_tensor** storages, int n, char** err);

#ifdef __cplusplus
}
#endif

#endif
