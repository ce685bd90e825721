/*
 * abi_check.c - compile-time proof that fakenvml.c matches the real NVML ABI.
 *
 *   gcc -fsyntax-only -Wall -Wextra -I/usr/local/cuda/include tests/fakenvml/abi_check.c
 *
 * nvml.h is included first, so fakenvml.c skips its own typedefs (they sit under
 * #ifndef NVML_API_VERSION) and its function definitions are compiled against the
 * real prototypes: a wrong parameter or return type is a "conflicting types"
 * error.  Constants and struct layouts are checked with static asserts.
 */
#define _GNU_SOURCE
#include <nvml.h>
#include <stddef.h>
#include "fakenvml.c"

#define FN_ASSERT_CONST(name, value) _Static_assert((name) == (value), #name " differs from nvml.h");
FN_CONSTANTS(FN_ASSERT_CONST)

#define FN_SAME(mine, theirs, field) \
    _Static_assert(offsetof(struct mine, field) == offsetof(theirs, field), #theirs "." #field);
_Static_assert(sizeof(nvmlReturn_t) == sizeof(int), "nvmlReturn_t is an int-sized enum");
_Static_assert(sizeof(nvmlClockType_t) == sizeof(int), "nvmlClockType_t is an int-sized enum");
_Static_assert(sizeof(nvmlDevice_t) == sizeof(void *), "nvmlDevice_t is a pointer");
_Static_assert(NVML_VALUE_NOT_AVAILABLE == -1, "NVML_VALUE_NOT_AVAILABLE");
_Static_assert(sizeof(struct fn_memory) == sizeof(nvmlMemory_t), "nvmlMemory_t size");
FN_SAME(fn_memory, nvmlMemory_t, total)
FN_SAME(fn_memory, nvmlMemory_t, free)
FN_SAME(fn_memory, nvmlMemory_t, used)
_Static_assert(sizeof(struct fn_process_info) == sizeof(nvmlProcessInfo_t), "nvmlProcessInfo_t size");
FN_SAME(fn_process_info, nvmlProcessInfo_t, pid)
FN_SAME(fn_process_info, nvmlProcessInfo_t, usedGpuMemory)
FN_SAME(fn_process_info, nvmlProcessInfo_t, gpuInstanceId)
FN_SAME(fn_process_info, nvmlProcessInfo_t, computeInstanceId)
