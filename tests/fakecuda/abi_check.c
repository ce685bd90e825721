/*
 * abi_check.c - compile-time proof that fakecuda.c matches the real driver ABI.
 *
 *   gcc -fsyntax-only -Wall -Wextra -I/usr/local/cuda/include tests/fakecuda/abi_check.c
 *
 * cuda.h is included first, so fakecuda.c skips its own typedefs (they sit
 * under #ifndef __cuda_cuda_h__) and its function definitions are compiled
 * against the real prototypes: a wrong parameter or return type is a
 * "conflicting types" error.  cuda.h's renaming macros (cuMemAlloc ->
 * cuMemAlloc_v2, ...) make its prototypes name the same versioned symbols the
 * fake defines.  Constants and struct layouts are checked with static asserts.
 * Do not define CUDA_API_PER_THREAD_DEFAULT_STREAM: the fake exports the
 * legacy-default-stream symbols (cuMemsetD8Async, not cuMemsetD8Async_ptsz).
 */
#define _GNU_SOURCE
#include <cuda.h>
#include <stddef.h>
#include "fakecuda.c"

#define FK_ASSERT_CONST(name, value) _Static_assert((name) == (value), #name " differs from cuda.h");
FK_CONSTANTS(FK_ASSERT_CONST)

#define FK_SAME(mine, theirs, field) \
    _Static_assert(offsetof(struct mine, field) == offsetof(theirs, field), #theirs "." #field);
_Static_assert(sizeof(CUdeviceptr) == 8, "CUdeviceptr must be 64-bit");
_Static_assert(sizeof(CUmemGenericAllocationHandle) == 8, "handle must be 64-bit");
_Static_assert(sizeof(CUresult) == sizeof(int), "CUresult is an int-sized enum");
_Static_assert(sizeof(CUuuid) == 16, "CUuuid");
_Static_assert(sizeof(struct fk_mem_location) == sizeof(CUmemLocation), "CUmemLocation size");
FK_SAME(fk_mem_location, CUmemLocation, type)
FK_SAME(fk_mem_location, CUmemLocation, id)
_Static_assert(sizeof(struct fk_alloc_prop) == sizeof(CUmemAllocationProp), "CUmemAllocationProp size");
FK_SAME(fk_alloc_prop, CUmemAllocationProp, type)
FK_SAME(fk_alloc_prop, CUmemAllocationProp, requestedHandleTypes)
FK_SAME(fk_alloc_prop, CUmemAllocationProp, location)
FK_SAME(fk_alloc_prop, CUmemAllocationProp, win32HandleMetaData)
FK_SAME(fk_alloc_prop, CUmemAllocationProp, allocFlags)
_Static_assert(sizeof(struct fk_access_desc) == sizeof(CUmemAccessDesc), "CUmemAccessDesc size");
FK_SAME(fk_access_desc, CUmemAccessDesc, location)
FK_SAME(fk_access_desc, CUmemAccessDesc, flags)
_Static_assert(sizeof(struct fk_memcpy_attributes) == sizeof(CUmemcpyAttributes), "CUmemcpyAttributes size");
FK_SAME(fk_memcpy_attributes, CUmemcpyAttributes, srcAccessOrder)
FK_SAME(fk_memcpy_attributes, CUmemcpyAttributes, srcLocHint)
FK_SAME(fk_memcpy_attributes, CUmemcpyAttributes, dstLocHint)
FK_SAME(fk_memcpy_attributes, CUmemcpyAttributes, flags)
