/*
 * The runtime symbols TVM kernels reference, for firmware: serial "parallel" loops, workspace from a fixed
 * region, errors into a static buffer. Nothing here allocates, locks or prints.
 */
#include "edgeprune_rt.h"

#include <string.h>

/* ---- errors: TVMFFIErrorSetRaisedFromCStrParts */
static char last_error[256];

void TVMFFIErrorSetRaisedFromCStrParts(const char *kind, const char **parts, int32_t num_parts) {
  size_t n = 0;
  const char *pieces[2] = {kind, ": "};
  for (int i = 0; i < 2 && kind; ++i)
    for (const char *c = pieces[i]; *c && n + 1 < sizeof(last_error); ++c) last_error[n++] = *c;
  for (int32_t p = 0; p < num_parts; ++p)
    for (const char *c = parts[p]; c && *c && n + 1 < sizeof(last_error); ++c) last_error[n++] = *c;
  last_error[n] = '\0';
}

const char *ep_rt_last_error(void) { return last_error; }

/* ---- workspace: a stack inside the region model.c hands us */
static uint8_t *ws_base;
static size_t ws_size, ws_top;

void ep_rt_set_workspace(void *base, size_t size) {
  ws_base = (uint8_t *)base;
  ws_size = size;
  ws_top = 0;
}

static void *alloc_workspace(int device_type, int device_id, uint64_t nbytes, int code, int bits) {
  (void)device_type; (void)device_id; (void)code; (void)bits;
  size_t need = ((size_t)nbytes + 63u) & ~(size_t)63u;
  if (ws_top + need > ws_size) {
    const char *msg = "workspace exhausted";
    TVMFFIErrorSetRaisedFromCStrParts("MemoryError", &msg, 1);
    return NULL;
  }
  void *p = ws_base + ws_top;
  ws_top += need;
  return p;
}

static int free_workspace(int device_type, int device_id, void *ptr) {
  (void)device_type; (void)device_id;
  if (ptr) ws_top = (size_t)((uint8_t *)ptr - ws_base); /* kernels free in reverse order of allocation */
  return 0;
}

/* ---- parallel loops run as one task on the calling core */
typedef struct { void *sync_handle; int32_t num_task; } ep_parallel_env;
typedef int (*ep_parallel_lambda)(int task_id, ep_parallel_env *env, void *cdata);

static int parallel_launch(ep_parallel_lambda f, void *cdata, int num_task) {
  (void)num_task;
  ep_parallel_env env = {NULL, 1};
  return f(0, &env, cdata);
}

static int parallel_barrier(int task_id, ep_parallel_env *env) {
  (void)task_id; (void)env;
  return 0;
}

void *TVMBackendAllocWorkspace(int t, int id, uint64_t n, int c, int b) { return alloc_workspace(t, id, n, c, b); }
int TVMBackendFreeWorkspace(int t, int id, void *p) { return free_workspace(t, id, p); }
int TVMBackendParallelLaunch(ep_parallel_lambda f, void *cdata, int n) { return parallel_launch(f, cdata, n); }
int TVMBackendParallelBarrier(int task_id, ep_parallel_env *env) { return parallel_barrier(task_id, env); }

/* LLVM's x86 and some ARM kernels call these through pointers the TVM loader fills in; a static link fills them
 * here (the kernels' own definitions are weak). */
void *__TVMBackendAllocWorkspace = (void *)TVMBackendAllocWorkspace;
void *__TVMBackendFreeWorkspace = (void *)TVMBackendFreeWorkspace;
void *__TVMBackendParallelLaunch = (void *)TVMBackendParallelLaunch;
void *__TVMBackendParallelBarrier = (void *)TVMBackendParallelBarrier;
