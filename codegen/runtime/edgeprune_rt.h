/*
 * edgeprune's runtime for generated C packages: the few symbols TVM-compiled kernels call, with no heap,
 * no threads and no file I/O. The types below follow the ABI of DLPack and tvm-ffi (TVMFFIAny, 16 bytes),
 * which the kernels were compiled against; they are declared here so a package needs no TVM headers.
 */
#ifndef EDGEPRUNE_RT_H_
#define EDGEPRUNE_RT_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct { int32_t device_type; int32_t device_id; } ep_dl_device;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } ep_dl_dtype;
typedef struct {
  void *data;
  ep_dl_device device;
  int32_t ndim;
  ep_dl_dtype dtype;
  int64_t *shape;
  int64_t *strides;
  uint64_t byte_offset;
} ep_dl_tensor;

typedef struct {
  int32_t type_index;
  uint32_t zero_padding;
  union { int64_t v_int64; double v_float64; void *v_ptr; } v;
} ep_ffi_any;

enum { EP_FFI_NONE = 0, EP_FFI_DLTENSOR_PTR = 7, EP_DL_CPU = 1, EP_DL_FLOAT = 2 };

/* A kernel as TVM compiles it: int32_t __tvm_ffi_<name>(void *self, const TVMFFIAny *args, int32_t n, TVMFFIAny *ret) */
typedef int32_t (*ep_kernel)(void *self, const ep_ffi_any *args, int32_t num_args, ep_ffi_any *ret);

/* Scratch memory some kernels ask for (padded copies, large tiles): handed out last-in first-out from a region
 * of the caller's arena, so its size is known when the package is generated. */
void ep_rt_set_workspace(void *base, size_t size);

/* The last error a kernel raised (a shape or alignment check), or "" . */
const char *ep_rt_last_error(void);

#ifdef __cplusplus
}
#endif
#endif /* EDGEPRUNE_RT_H_ */
