/*
 * fakecuda.c - a GPU-free stand-in for libcuda.so.1, used by the nbd-vram tests.
 *
 * Build:
 *   gcc -O2 -Wall -Wextra -shared -fPIC -o libcuda.so.1 fakecuda.c -lpthread
 *
 * It exports the subset of the CUDA driver API that nbd-vram uses, under the
 * exact (versioned) symbol names and with the exact ABI of the real driver.
 * This file does not include cuda.h; abi_check.c compiles it against the real
 * cuda.h so that any prototype, constant or struct-layout mismatch is an error.
 *
 * Model:
 *  - "Device memory" is host memory: a CUdeviceptr is a real host address.
 *    cuMemAlloc_v2 maps anonymous memory; copies are memmove; async calls run
 *    synchronously.  Every device range touched by a copy/memset must lie inside
 *    a live allocation or an accessible VMM mapping, else CUDA_ERROR_INVALID_VALUE.
 *  - VMM (cuMemCreate & co) is modelled with memfd: a handle owns a memfd, a
 *    mapping is mmap(MAP_SHARED|MAP_FIXED) of it, exporting dup()s the fd.  So,
 *    as with the real driver, the memory survives the creating process as long
 *    as someone holds an exported fd.  New mappings are PROT_NONE until
 *    cuMemSetAccess (as documented for the real driver).
 *  - Memory is accounted per device against FAKECUDA_TOTAL_MB (not allocated),
 *    less what FAKECUDA_OTHER_USAGE says other processes use.
 *  - Device i has UUID GPU-facec0da-0000-4000-0000-0000000000NN (NN = i+1, hex)
 *    and PCI bus id 0000:NN:00.0; the fake NVML (tests/fakenvml) reports the same.
 *
 * Environment (read once, at the first cuInit):
 *   FAKECUDA_DEVICES=N            number of devices (default: the number of
 *                                 FAKECUDA_BACKING paths, else 1; max 16)
 *   FAKECUDA_TOTAL_MB=N           memory per device (default 8192) of devices
 *                                 without a backing file
 *   FAKECUDA_BACKING=P0:P1:...    device i's memory is a MAP_SHARED mapping of Pi
 *                                 (regular file or PCI BAR resource file); a
 *                                 value that names an existing file is one path,
 *                                 ':' in it and all; see "backing mode" below
 *   FAKECUDA_OTHER_USAGE=PATH     "other processes" use device memory: line i of
 *                                 PATH is MiB used on device i (missing file or
 *                                 line = 0).  Read again at every cuMemGetInfo_v2,
 *                                 cuMemAlloc_v2 and cuMemCreate: free memory is
 *                                 reduced by it, and an allocation that does not
 *                                 fit in what is left returns CUDA_ERROR_OUT_OF_MEMORY.
 *   FAKECUDA_LOST_DEVICES=PATH    PATH lists device indices (whitespace separated)
 *                                 that are lost: copies and memsets touching their
 *                                 memory, calls made in their context (cleanup calls
 *                                 still free), cuDevicePrimaryCtxRetain and
 *                                 cuMemCreate on them return CUDA_ERROR_DEVICE_UNAVAILABLE;
 *                                 device queries, cuCtxSetCurrent/cuCtxGetCurrent
 *                                 and other devices work on.  Re-read at most every
 *                                 50 ms (CLOCK_MONOTONIC_COARSE): a change takes
 *                                 effect within ~50 ms; a missing file = none lost.
 *   FAKECUDA_HOST_REGISTER_FAILS=PATH  while PATH exists, cuMemHostRegister_v2
 *                                 returns CUDA_ERROR_OUT_OF_MEMORY (no more memory
 *                                 can be pinned); checked at every call
 *   FAKECUDA_NO_DEVICE=1          cuInit returns CUDA_ERROR_NO_DEVICE
 *   FAKECUDA_INIT_FAILS=N         the first N cuInit calls return CUDA_ERROR_UNKNOWN
 *   FAKECUDA_FAIL_ALLOC_ABOVE=B   cuMemAlloc_v2/cuMemCreate of more than B bytes
 *                                 return CUDA_ERROR_OUT_OF_MEMORY
 *   FAKECUDA_FAIL_COPY_N=N        the Nth copy attempt (1-based, all kinds, all
 *                                 threads) returns CUDA_ERROR_ILLEGAL_ADDRESS
 *   FAKECUDA_FAIL_COPY_EVERY=K    every Kth copy attempt fails the same way
 *   FAKECUDA_LOST_AFTER_COPIES=N  after N successful copies the device is lost:
 *                                 every later call returns CUDA_ERROR_DEVICE_UNAVAILABLE
 *   FAKECUDA_NO_VMM=1             VMM attributes read 0, VMM calls return
 *                                 CUDA_ERROR_NOT_SUPPORTED
 *   FAKECUDA_LOG=PATH             append one line per API call (its symbol name)
 *
 * Backing mode (FAKECUDA_BACKING): each path is mapped once and is the memory of
 * one device (devices beyond the paths, if FAKECUDA_DEVICES says more, have no
 * backing file).  cuMemAlloc_v2 (page aligned) and cuMemCreate (2 MiB aligned)
 * carve blocks from the device's file, first fit; freed blocks are coalesced with
 * their free neighbours, so freeing a middle block makes its space allocatable
 * again.  A device's total memory is its file's size.  A cuMemCreate handle is
 * {backing fd, offset, size}; exporting it returns a new open file description of
 * the backing file (open of /proc/self/fd/N, else of the path) whose file position
 * is the block's offset.  The position travels with the fd (fork, SCM_RIGHTS), so
 * the importer - this process or another with the same FAKECUDA_BACKING - reads
 * the offset with lseek(fd, 0, SEEK_CUR) and cuMemMap maps [offset, offset+size).
 * An fd of device i's file imports as memory of device i.  An importing process
 * keeps its own allocator off the imported block while it is mapped (if that block
 * is free in it), so a restarted creator does not hand the same block out twice;
 * processes do not otherwise share allocation state.  Memfd fds (no backing) have
 * position 0: the whole memfd.
 *
 * Injected copy failures are transient: the failing call returns 700, and for an
 * async call the error is also latched on the stream and returned (once) by the
 * next cuStreamSynchronize/cuCtxSynchronize.  Device loss is sticky; cleanup
 * calls (frees, unmaps, releases, destroys) still free host resources but return
 * CUDA_ERROR_DEVICE_UNAVAILABLE.  cuDriverGetVersion, cuGetErrorName and
 * cuGetErrorString work before cuInit, as in the real driver.
 *
 * Exported globals (ctypes: c_long.in_dll / c_int.in_dll):
 *   long fake_copy_count     successful copies
 *   long fake_copy_attempts  copy attempts that passed validation (the counter
 *                            that FAKECUDA_FAIL_COPY_N / fake_fail_copy_n refer to)
 *   long fake_memset_count   successful memsets
 *   long fake_alloc_bytes    device bytes currently allocated (all devices;
 *                            imported VMM handles are not counted)
 *   int  fake_fail_copy_n    writable; same meaning as FAKECUDA_FAIL_COPY_N, 0 = off
 *   int  fake_device_lost    writable; 1 = every device lost now (per device: FAKECUDA_LOST_DEVICES)
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* ABI: constants, types and struct layouts, copied from cuda.h.             */
/* ------------------------------------------------------------------------ */

#define FK_CONSTANTS(X)                                                      \
    X(CUDA_SUCCESS, 0)                                                       \
    X(CUDA_ERROR_INVALID_VALUE, 1)                                           \
    X(CUDA_ERROR_OUT_OF_MEMORY, 2)                                           \
    X(CUDA_ERROR_NOT_INITIALIZED, 3)                                         \
    X(CUDA_ERROR_DEVICE_UNAVAILABLE, 46)                                     \
    X(CUDA_ERROR_NO_DEVICE, 100)                                             \
    X(CUDA_ERROR_INVALID_DEVICE, 101)                                        \
    X(CUDA_ERROR_INVALID_CONTEXT, 201)                                       \
    X(CUDA_ERROR_OPERATING_SYSTEM, 304)                                      \
    X(CUDA_ERROR_INVALID_HANDLE, 400)                                        \
    X(CUDA_ERROR_ILLEGAL_ADDRESS, 700)                                       \
    X(CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED, 712)                        \
    X(CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED, 713)                            \
    X(CUDA_ERROR_NOT_SUPPORTED, 801)                                         \
    X(CUDA_ERROR_UNKNOWN, 999)                                               \
    X(CU_DEVICE_ATTRIBUTE_PCI_BUS_ID, 33)                                    \
    X(CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID, 34)                                 \
    X(CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID, 50)                                 \
    X(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, 102)          \
    X(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, 103)  \
    X(CU_MEM_ALLOCATION_TYPE_PINNED, 1)                                      \
    X(CU_MEM_LOCATION_TYPE_DEVICE, 1)                                        \
    X(CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 1)                           \
    X(CU_MEM_HANDLE_TYPE_FABRIC, 8)                                          \
    X(CU_MEM_ACCESS_FLAGS_PROT_READWRITE, 3)                                 \
    X(CU_MEM_ALLOC_GRANULARITY_MINIMUM, 0)                                   \
    X(CU_MEM_ALLOC_GRANULARITY_RECOMMENDED, 1)                               \
    X(CU_STREAM_NON_BLOCKING, 1)                                             \
    X(CU_MEMHOSTREGISTER_PORTABLE, 1)                                        \
    X(CU_MEMHOSTREGISTER_DEVICEMAP, 2)                                       \
    X(CU_MEMHOSTREGISTER_IOMEMORY, 4)                                        \
    X(CU_MEMHOSTREGISTER_READ_ONLY, 8)                                       \
    X(CU_MEMCPY_SRC_ACCESS_ORDER_STREAM, 1)

/* CU_DEVICE_ATTRIBUTE_MAX of CUDA 13.0; grows with every release, so it is not
 * checked against cuda.h.  Attribute numbers >= this are CUDA_ERROR_INVALID_VALUE. */
#define FK_ATTRIBUTE_MAX 148

/* Private mirrors of the cuda.h structs; abi_check.c asserts identical layout. */
struct fk_mem_location { int type; int id; };                 /* CUmemLocation */
struct fk_alloc_prop {                                         /* CUmemAllocationProp, 32 bytes */
    int type;                                                  /* CUmemAllocationType */
    int requestedHandleTypes;                                  /* CUmemAllocationHandleType */
    struct fk_mem_location location;
    void *win32HandleMetaData;
    struct {
        unsigned char compressionType;
        unsigned char gpuDirectRDMACapable;
        unsigned short usage;
        unsigned char reserved[4];
    } allocFlags;
};
struct fk_access_desc { struct fk_mem_location location; int flags; }; /* CUmemAccessDesc, 12 bytes */
struct fk_memcpy_attributes {                                  /* CUmemcpyAttributes, 24 bytes */
    int srcAccessOrder;                                        /* CUmemcpySrcAccessOrder */
    struct fk_mem_location srcLocHint;
    struct fk_mem_location dstLocHint;
    unsigned int flags;
};

#ifndef __cuda_cuda_h__
/* Standalone build: our own definitions, ABI-identical to cuda.h. */
#define FK_ENUMERATOR(name, value) name = value,
enum { FK_CONSTANTS(FK_ENUMERATOR) };
typedef int CUresult;                      /* enum cudaError_enum */
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;    /* CUdeviceptr_v2, 64-bit */
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef int CUdevice_attribute;
typedef int CUmemAllocationHandleType;
typedef int CUmemAllocationGranularity_flags;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct fk_alloc_prop CUmemAllocationProp;
typedef struct fk_access_desc CUmemAccessDesc;
typedef struct fk_memcpy_attributes CUmemcpyAttributes;
#ifndef CU_UUID_HAS_BEEN_DEFINED
#define CU_UUID_HAS_BEEN_DEFINED
typedef struct CUuuid_st { char bytes[16]; } CUuuid;
#endif
#define CU_STREAM_LEGACY     ((CUstream)0x1)
#define CU_STREAM_PER_THREAD ((CUstream)0x2)
#endif

/* ------------------------------------------------------------------------ */
/* State.                                                                   */
/* ------------------------------------------------------------------------ */

#define FK_MAX_DEV 16
#define FK_GRAN ((size_t)2 << 20)          /* VMM granularity: 2 MiB */
#define ALIGN_UP(x, a) (((x) + (a) - 1) / (a) * (a))

/* Exported for in-process tests. */
long fake_copy_count, fake_copy_attempts, fake_memset_count, fake_alloc_bytes;
int fake_fail_copy_n, fake_device_lost;

struct CUctx_st { int device; int retained; };
struct CUstream_st { unsigned flags; int pending; };           /* pending: latched async error */

struct fk_handle {                         /* what a CUmemGenericAllocationHandle points to */
    int fd, owns_fd, dev, types, counted, released;
    size_t offset, size;                   /* offset into fd (backing mode), size in bytes */
    size_t claimed;                        /* imported backing block: bytes claimed from the allocator */
    long refs;                             /* 1 until cuMemRelease, +1 per mapping */
};

/* Sorted, non-overlapping range tables (one mutex guards all of them). */
enum { R_ALLOC, R_MAP, R_RESERVE, R_HOST_ALLOC, R_HOST_REG, R_HANDLE, R_STREAM };
struct range {
    uintptr_t base;
    size_t size;                           /* bytes the user may touch */
    size_t span;                           /* bytes mapped / charged */
    size_t boff;                           /* backing-file offset (backing mode) */
    int kind, dev, access;
    struct fk_handle *h;
};
struct rtab { struct range *v; size_t n, cap; };
static struct rtab t_dev;                  /* R_ALLOC and R_MAP: copy targets */
static struct rtab t_res;                  /* R_RESERVE: VA reservations */
static struct rtab t_host;                 /* R_HOST_ALLOC and R_HOST_REG */
static struct rtab t_obj;                  /* R_HANDLE and R_STREAM, keyed by pointer */

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_inited, g_init_calls, g_env_error, g_ndev = 1, g_null_pending;
static size_t g_page;
static struct CUctx_st g_ctx[FK_MAX_DEV];
static __thread struct CUctx_st *tls_ctx;

static int cfg_no_device, cfg_no_vmm, cfg_log_fd = -1;
static long cfg_init_fails, cfg_fail_every, cfg_lost_after;
static unsigned long long cfg_fail_alloc_above;
static const char *cfg_other_usage, *cfg_lost_devices, *cfg_host_register_fails;   /* paths, or NULL */

struct fk_ext { size_t off, size; };       /* a free extent of a backing file */
struct fk_dev {
    size_t total, used;                    /* used: bytes charged by this process */
    char *path;                            /* backing mode: the device's FAKECUDA_BACKING path */
    int fd;                                /* ... its fd (-1 = not backed), */
    char *base;                            /* ... its MAP_SHARED mapping */
    struct fk_ext *free;                   /* ... and its free extents, sorted by offset, coalesced */
    size_t nfree, capfree;
    dev_t st_dev;                          /* identifies the file behind an imported fd */
    ino_t st_ino;
};
static struct fk_dev g_dev[FK_MAX_DEV];

/* ------------------------------------------------------------------------ */
/* Helpers.                                                                 */
/* ------------------------------------------------------------------------ */

static long env_long(const char *name, long dflt)
{
    const char *s = getenv(name);
    return (s && *s) ? strtol(s, NULL, 0) : dflt;
}

static void fk_log(const char *name)
{
    if (cfg_log_fd >= 0) {
        char line[64];
        int n = snprintf(line, sizeof line, "%s\n", name);
        if (write(cfg_log_fd, line, (size_t)n) < 0) { /* debugging aid only */ }
    }
}

static size_t fd_size(int fd)
{
    struct stat st;
    if (fstat(fd, &st) != 0) return 0;
    if (st.st_size > 0) return (size_t)st.st_size;
    off_t end = lseek(fd, 0, SEEK_END);    /* sysfs BAR files may report 0 */
    return end > 0 ? (size_t)end : 0;
}

static void read_env(void)
{
    g_page = (size_t)sysconf(_SC_PAGESIZE);
    const char *log = getenv("FAKECUDA_LOG");
    if (log && *log) cfg_log_fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    cfg_no_device = env_long("FAKECUDA_NO_DEVICE", 0) != 0;
    cfg_no_vmm = env_long("FAKECUDA_NO_VMM", 0) != 0;
    cfg_init_fails = env_long("FAKECUDA_INIT_FAILS", 0);
    cfg_fail_every = env_long("FAKECUDA_FAIL_COPY_EVERY", 0);
    cfg_lost_after = env_long("FAKECUDA_LOST_AFTER_COPIES", 0);
    const char *above = getenv("FAKECUDA_FAIL_ALLOC_ABOVE");
    if (above && *above) cfg_fail_alloc_above = strtoull(above, NULL, 0);
    long n = env_long("FAKECUDA_FAIL_COPY_N", 0);
    if (n > 0) __atomic_store_n(&fake_fail_copy_n, (int)n, __ATOMIC_SEQ_CST);
    const char *s = getenv("FAKECUDA_OTHER_USAGE");
    cfg_other_usage = s && *s ? s : NULL;
    s = getenv("FAKECUDA_LOST_DEVICES");
    cfg_lost_devices = s && *s ? s : NULL;
    s = getenv("FAKECUDA_HOST_REGISTER_FAILS");
    cfg_host_register_fails = s && *s ? s : NULL;
    /* FAKECUDA_BACKING=path0:path1:... - one backing file per device. */
    char *paths[FK_MAX_DEV];
    int npaths = 0;
    const char *bp = getenv("FAKECUDA_BACKING");
    if (bp && *bp && access(bp, F_OK) == 0) {
        paths[npaths++] = strdup(bp);       /* one path that exists: PCI sysfs paths are full of ':' */
    } else if (bp && *bp) {
        char *copy = strdup(bp), *save = NULL;
        for (char *t = copy ? strtok_r(copy, ":", &save) : NULL; t && npaths < FK_MAX_DEV; t = strtok_r(NULL, ":", &save))
            paths[npaths++] = t;
    }
    g_ndev = (int)env_long("FAKECUDA_DEVICES", npaths ? npaths : 1);
    if (g_ndev < 1) g_ndev = 1;
    if (g_ndev > FK_MAX_DEV) g_ndev = FK_MAX_DEV;
    size_t total = (size_t)env_long("FAKECUDA_TOTAL_MB", 8192) << 20;
    for (int i = 0; i < FK_MAX_DEV; i++) {
        g_ctx[i].device = i;
        g_dev[i].total = total;
        g_dev[i].fd = -1;
    }
    for (int i = 0; i < npaths && i < g_ndev; i++) {
        struct fk_dev *d = &g_dev[i];
        struct stat st;
        d->path = paths[i];
        d->fd = open(d->path, O_RDWR | O_CLOEXEC);
        d->total = d->fd >= 0 ? fd_size(d->fd) : 0;
        if (d->total) d->base = mmap(NULL, d->total, PROT_READ | PROT_WRITE, MAP_SHARED, d->fd, 0);
        d->free = malloc(sizeof *d->free * 16);
        if (!d->total || d->base == MAP_FAILED || !d->free || fstat(d->fd, &st) != 0) {
            fprintf(stderr, "fakecuda: cannot map FAKECUDA_BACKING path %d: %s\n", i, d->path);
            d->base = NULL;
            g_env_error = CUDA_ERROR_UNKNOWN;
            continue;
        }
        d->st_dev = st.st_dev;
        d->st_ino = st.st_ino;
        d->capfree = 16;
        d->nfree = 1;
        d->free[0] = (struct fk_ext){ 0, d->total };
    }
}

/* ------------------------------------------------------------------------ */
/* Backing-file allocator: first fit over sorted, coalesced free extents.    */
/* ------------------------------------------------------------------------ */

static int ext_insert(struct fk_dev *d, size_t i, struct fk_ext e)
{
    if (d->nfree == d->capfree) {
        struct fk_ext *v = realloc(d->free, d->capfree * 2 * sizeof *v);
        if (!v) return -1;
        d->free = v;
        d->capfree *= 2;
    }
    memmove(&d->free[i + 1], &d->free[i], (d->nfree - i) * sizeof *d->free);
    d->free[i] = e;
    d->nfree++;
    return 0;
}

static void ext_remove(struct fk_dev *d, size_t i)
{
    memmove(&d->free[i], &d->free[i + 1], (d->nfree - i - 1) * sizeof *d->free);
    d->nfree--;
}

/* Takes [off, off+size) out of free extent i, which contains it. */
static int ext_carve(struct fk_dev *d, size_t i, size_t off, size_t size)
{
    struct fk_ext e = d->free[i];
    size_t head = off - e.off, tail = e.off + e.size - (off + size);
    if (head && tail) {
        if (ext_insert(d, i + 1, (struct fk_ext){ off + size, tail }) != 0) return -1;
        d->free[i].size = head;
    } else if (head) {
        d->free[i].size = head;
    } else if (tail) {
        d->free[i] = (struct fk_ext){ off + size, tail };
    } else {
        ext_remove(d, i);
    }
    return 0;
}

/* First fit: the lowest offset, aligned to `align`, where `size` bytes are free. */
static int ext_alloc(struct fk_dev *d, size_t size, size_t align, size_t *off)
{
    for (size_t i = 0; i < d->nfree; i++) {
        size_t a = ALIGN_UP(d->free[i].off, align);
        if (a < d->free[i].off + d->free[i].size && size <= d->free[i].off + d->free[i].size - a) {
            *off = a;
            return ext_carve(d, i, a, size);
        }
    }
    return -1;
}

/* Claims [off, off+size) if it is entirely free (an imported block); -1 if not. */
static int ext_claim(struct fk_dev *d, size_t off, size_t size)
{
    for (size_t i = 0; i < d->nfree && d->free[i].off <= off; i++)
        if (off + size <= d->free[i].off + d->free[i].size) return ext_carve(d, i, off, size);
    return -1;
}

/* Returns [off, off+size) to the free list, merged with its neighbours. */
static void ext_free(struct fk_dev *d, size_t off, size_t size)
{
    size_t i = 0;
    while (i < d->nfree && d->free[i].off < off) i++;
    int prev = i > 0 && d->free[i - 1].off + d->free[i - 1].size == off;
    int next = i < d->nfree && off + size == d->free[i].off;
    if (prev && next) {
        d->free[i - 1].size += size + d->free[i].size;
        ext_remove(d, i);
    } else if (prev) {
        d->free[i - 1].size += size;
    } else if (next) {
        d->free[i].off = off;
        d->free[i].size += size;
    } else if (ext_insert(d, i, (struct fk_ext){ off, size }) != 0) {
        fprintf(stderr, "fakecuda: out of memory for the free list; %zu bytes leak\n", size);
    }
}

/* ------------------------------------------------------------------------ */
/* Cross-process switches: FAKECUDA_OTHER_USAGE and FAKECUDA_LOST_DEVICES.   */
/* ------------------------------------------------------------------------ */

/* Reads a small file whole; returns its length, or -1 (missing). */
static ssize_t read_small(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = 0, r;
    while ((size_t)n < cap - 1 && (r = read(fd, buf + n, cap - 1 - (size_t)n)) > 0) n += r;
    close(fd);
    buf[n] = 0;
    return n;
}

/* Bytes that "other processes" use on device `dev`: line `dev` of FAKECUDA_OTHER_USAGE, in MiB.
 * Read afresh at every call (cuMemGetInfo_v2, cuMemAlloc_v2, cuMemCreate: not the hot path). */
static size_t other_usage(int dev)
{
    char buf[4096];
    if (!cfg_other_usage || read_small(cfg_other_usage, buf, sizeof buf) < 0) return 0;
    char *line = buf;
    for (int i = 0; i < dev && line; i++) {
        line = strchr(line, '\n');
        if (line) line++;
    }
    return line ? (size_t)strtoull(line, NULL, 0) << 20 : 0;
}

/* Bit i set = device i lost, per FAKECUDA_LOST_DEVICES.  The hot path pays one
 * CLOCK_MONOTONIC_COARSE read (vDSO); the file is re-read at most every 50 ms, by
 * whichever thread first sees the period over, so a change takes effect within ~50 ms. */
#define FK_LOST_PERIOD_NS 50000000LL
static long long g_lost_next;              /* CLOCK_MONOTONIC_COARSE ns of the next re-read */
static unsigned g_lost_mask;

static unsigned lost_mask(void)
{
    if (!cfg_lost_devices) return 0;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    long long now = ts.tv_sec * 1000000000LL + ts.tv_nsec;
    long long next = __atomic_load_n(&g_lost_next, __ATOMIC_ACQUIRE);
    if (now >= next && __atomic_compare_exchange_n(&g_lost_next, &next, now + FK_LOST_PERIOD_NS, 0,
                                                   __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        char buf[4096], *p = buf, *end;
        unsigned mask = 0;
        if (read_small(cfg_lost_devices, buf, sizeof buf) >= 0)
            for (long v = strtol(p, &end, 10); end != p; p = end, v = strtol(p, &end, 10))
                if (v >= 0 && v < FK_MAX_DEV) mask |= 1u << v;
        __atomic_store_n(&g_lost_mask, mask, __ATOMIC_RELEASE);
    }
    return __atomic_load_n(&g_lost_mask, __ATOMIC_ACQUIRE);
}

/* Index of the first entry whose base is > p. */
static size_t rt_upper(const struct rtab *t, uintptr_t p)
{
    size_t lo = 0, hi = t->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (t->v[mid].base <= p) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* Index of the entry containing p, or -1. */
static long rt_find(const struct rtab *t, uintptr_t p)
{
    size_t i = rt_upper(t, p);
    if (i > 0 && p - t->v[i - 1].base < (t->v[i - 1].size ? t->v[i - 1].size : 1)) return (long)i - 1;
    return -1;
}

static int rt_overlaps(const struct rtab *t, uintptr_t base, size_t size)
{
    size_t i = rt_upper(t, base);
    if (i > 0 && t->v[i - 1].base + t->v[i - 1].size > base) return 1;
    return i < t->n && t->v[i].base < base + size;
}

static int rt_insert(struct rtab *t, struct range r)
{
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 64;
        struct range *v = realloc(t->v, cap * sizeof *v);
        if (!v) return -1;
        t->v = v;
        t->cap = cap;
    }
    size_t i = rt_upper(t, r.base);
    memmove(&t->v[i + 1], &t->v[i], (t->n - i) * sizeof *t->v);
    t->v[i] = r;
    t->n++;
    return 0;
}

static void rt_remove(struct rtab *t, size_t i)
{
    memmove(&t->v[i], &t->v[i + 1], (t->n - i - 1) * sizeof *t->v);
    t->n--;
}

/* Is [p, p+n) inside one allocation, or inside contiguous accessible mappings?
 * Returns the device of the memory at p, or -1 if not. */
static int dev_range_dev(uintptr_t p, size_t n)
{
    int ok = -1;
    if (p + n < p) return -1;
    pthread_mutex_lock(&g_lock);
    long i = rt_find(&t_dev, p);
    int dev = i >= 0 ? t_dev.v[i].dev : -1;
    while (i >= 0 && (size_t)i < t_dev.n) {
        const struct range *e = &t_dev.v[i];
        if (e->kind == R_MAP && !e->access) break;
        if (p + n <= e->base + e->size) { ok = dev; break; }
        if (e->kind != R_MAP || (size_t)i + 1 >= t_dev.n) break;
        if (t_dev.v[i + 1].kind != R_MAP || t_dev.v[i + 1].base != e->base + e->size) break;
        i++;
    }
    pthread_mutex_unlock(&g_lock);
    return ok;
}

static int dev_range_ok(uintptr_t p, size_t n) { return dev_range_dev(p, n) >= 0; }

/* The current thread's device, or -1 without a usable context. */
static int cur_dev(void)
{
    struct CUctx_st *c = tls_ctx;
    return (c && __atomic_load_n(&c->retained, __ATOMIC_ACQUIRE) > 0) ? c->device : -1;
}

/* Is device `dev` lost: all devices (fake_device_lost), or this one (FAKECUDA_LOST_DEVICES)? */
static int dev_lost(int dev)
{
    return __atomic_load_n(&fake_device_lost, __ATOMIC_ACQUIRE) || (dev >= 0 && (lost_mask() >> dev & 1));
}

/* Is the current context's device lost (or all devices)? */
static int lost(void) { return dev_lost(cur_dev()); }

/* Free bytes of device `dev` as cuMemGetInfo_v2 reports them (under g_lock). */
static size_t free_locked(int dev)
{
    size_t used = g_dev[dev].used + other_usage(dev);
    return used < g_dev[dev].total ? g_dev[dev].total - used : 0;
}

/* Charge `size` bytes (for a request of `req` bytes) to device `dev`; in backing
 * mode also carve the block, aligned to `align`, from the device's backing file. */
static CUresult charge_locked(int dev, size_t req, size_t size, size_t align, size_t *boff)
{
    if (cfg_fail_alloc_above && req > cfg_fail_alloc_above) return CUDA_ERROR_OUT_OF_MEMORY;
    if (size > free_locked(dev)) return CUDA_ERROR_OUT_OF_MEMORY;
    *boff = 0;
    if (g_dev[dev].base && ext_alloc(&g_dev[dev], size, align, boff) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
    g_dev[dev].used += size;
    __atomic_add_fetch(&fake_alloc_bytes, (long)size, __ATOMIC_SEQ_CST);
    return CUDA_SUCCESS;
}

static void uncharge_locked(int dev, size_t size, size_t boff)
{
    g_dev[dev].used -= size;
    __atomic_sub_fetch(&fake_alloc_bytes, (long)size, __ATOMIC_SEQ_CST);
    if (g_dev[dev].base) ext_free(&g_dev[dev], boff, size);
}

static struct fk_handle *handle_lookup_locked(CUmemGenericAllocationHandle hv)
{
    long i = rt_find(&t_obj, (uintptr_t)hv);
    return (i >= 0 && t_obj.v[i].kind == R_HANDLE && t_obj.v[i].base == (uintptr_t)hv) ? t_obj.v[i].h : NULL;
}

static void handle_unref_locked(struct fk_handle *h)
{
    if (--h->refs > 0) return;
    if (h->owns_fd) close(h->fd);
    if (h->counted) uncharge_locked(h->dev, h->size, h->offset);
    if (h->claimed) {
        g_dev[h->dev].used -= h->claimed;
        ext_free(&g_dev[h->dev], h->offset, h->claimed);
    }
    rt_remove(&t_obj, (size_t)rt_find(&t_obj, (uintptr_t)h));
    free(h);
}

/* The latched-error slot of a stream, or NULL if the handle is not a stream. */
static int *stream_slot(CUstream s)
{
    if (s == NULL || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD) return &g_null_pending;
    pthread_mutex_lock(&g_lock);
    long i = rt_find(&t_obj, (uintptr_t)s);
    int ok = i >= 0 && t_obj.v[i].kind == R_STREAM && t_obj.v[i].base == (uintptr_t)s;
    pthread_mutex_unlock(&g_lock);
    return ok ? &s->pending : NULL;
}

/* Common prologue: log, require cuInit, fail once the device is lost. */
#define API_BEGIN()                                                          \
    do {                                                                     \
        fk_log(__func__);                                                    \
        if (!__atomic_load_n(&g_inited, __ATOMIC_ACQUIRE)) return CUDA_ERROR_NOT_INITIALIZED; \
        if (lost()) return CUDA_ERROR_DEVICE_UNAVAILABLE;   /* incl. this context's device */ \
    } while (0)
/* Prologue of device queries and of cuCtxSetCurrent/cuCtxGetCurrent: they fail only when
 * all devices are lost (fake_device_lost), so a thread can leave a lost device's context. */
#define API_BEGIN_NOCTX()                                                    \
    do {                                                                     \
        fk_log(__func__);                                                    \
        if (!__atomic_load_n(&g_inited, __ATOMIC_ACQUIRE)) return CUDA_ERROR_NOT_INITIALIZED; \
        if (dev_lost(-1)) return CUDA_ERROR_DEVICE_UNAVAILABLE;              \
    } while (0)
/* Prologue of cleanup calls: they still release resources after device loss. */
#define API_BEGIN_CLEANUP()                                                  \
    do {                                                                     \
        fk_log(__func__);                                                    \
        if (!__atomic_load_n(&g_inited, __ATOMIC_ACQUIRE)) return CUDA_ERROR_NOT_INITIALIZED; \
    } while (0)
#define NEED_CTX(dev)                                                        \
    int dev = cur_dev();                                                     \
    if (dev < 0) return CUDA_ERROR_INVALID_CONTEXT;                          \
    (void)dev
#define NEED_VMM() do { if (cfg_no_vmm) return CUDA_ERROR_NOT_SUPPORTED; } while (0)
#define CHECK_DEV(d) do { if ((d) < 0 || (d) >= g_ndev) return CUDA_ERROR_INVALID_DEVICE; } while (0)
#define DONE(rc) return lost() ? CUDA_ERROR_DEVICE_UNAVAILABLE : (rc)

/* ------------------------------------------------------------------------ */
/* Initialisation, version, devices.                                        */
/* ------------------------------------------------------------------------ */

CUresult cuInit(unsigned int Flags)
{
    pthread_once(&g_once, read_env);
    fk_log(__func__);
    if (Flags != 0) return CUDA_ERROR_INVALID_VALUE;
    if (cfg_no_device) return CUDA_ERROR_NO_DEVICE;
    if (g_env_error) return g_env_error;
    if (__atomic_load_n(&g_inited, __ATOMIC_ACQUIRE)) return CUDA_SUCCESS;
    if (__atomic_add_fetch(&g_init_calls, 1, __ATOMIC_SEQ_CST) <= cfg_init_fails)
        return CUDA_ERROR_UNKNOWN;          /* e.g. a laptop GPU still waking up */
    __atomic_store_n(&g_inited, 1, __ATOMIC_RELEASE);
    return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int *driverVersion)
{
    if (!driverVersion) return CUDA_ERROR_INVALID_VALUE;
    *driverVersion = 12080;                 /* works before cuInit, like the real one */
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int *count)
{
    API_BEGIN_NOCTX();
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    *count = g_ndev;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal)
{
    API_BEGIN_NOCTX();
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    CHECK_DEV(ordinal);
    *device = ordinal;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice dev)
{
    API_BEGIN_NOCTX();
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    CHECK_DEV(dev);
    snprintf(name, (size_t)len, "Fake CUDA Device %d", dev);
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev)
{
    static const unsigned char prefix[8] = { 0xfa, 0xce, 0xc0, 0xda, 0x00, 0x00, 0x40, 0x00 };
    API_BEGIN_NOCTX();
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    CHECK_DEV(dev);
    memset(uuid->bytes, 0, sizeof uuid->bytes);
    memcpy(uuid->bytes, prefix, sizeof prefix);   /* GPU-facec0da-0000-4000-0000-0000000000NN */
    uuid->bytes[15] = (char)(dev + 1);
    return CUDA_SUCCESS;
}

/* Device i sits at PCI 0000:(i+1):00.0, so bus ids start at 01 like a real box. */
CUresult cuDeviceGetPCIBusId(char *pciBusId, int len, CUdevice dev)
{
    API_BEGIN_NOCTX();
    if (!pciBusId || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    CHECK_DEV(dev);
    snprintf(pciBusId, (size_t)len, "%04x:%02x:%02x.%x", 0, dev + 1, 0, 0);
    return CUDA_SUCCESS;
}

/* Accepts "dddd:bb:dd.f" (any domain width) or "bb:dd.f", hex, any case. */
CUresult cuDeviceGetByPCIBusId(CUdevice *dev, const char *pciBusId)
{
    unsigned dom = 0, bus, d, f;
    int n = -1;
    API_BEGIN_NOCTX();
    if (!dev || !pciBusId) return CUDA_ERROR_INVALID_VALUE;
    if (!(sscanf(pciBusId, "%x:%x:%x.%x%n", &dom, &bus, &d, &f, &n) == 4 && n > 0 && !pciBusId[n])) {
        dom = 0;
        n = -1;
        if (!(sscanf(pciBusId, "%x:%x.%x%n", &bus, &d, &f, &n) == 3 && n > 0 && !pciBusId[n]))
            return CUDA_ERROR_INVALID_VALUE;
    }
    if (dom != 0 || d != 0 || f != 0 || bus < 1 || bus > (unsigned)g_ndev) return CUDA_ERROR_INVALID_DEVICE;
    *dev = (CUdevice)bus - 1;
    return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    API_BEGIN_NOCTX();
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    CHECK_DEV(dev);
    *bytes = g_dev[dev].total;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev)
{
    API_BEGIN_NOCTX();
    if (!pi || (int)attrib < 1 || (int)attrib >= FK_ATTRIBUTE_MAX) return CUDA_ERROR_INVALID_VALUE;
    CHECK_DEV(dev);
    switch ((int)attrib) {
    case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: *pi = dev + 1; break;
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED:
    case CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED: *pi = !cfg_no_vmm; break;
    default: *pi = 0; break;                /* incl. PCI_DEVICE_ID, PCI_DOMAIN_ID */
    }
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------ */
/* Contexts.                                                                */
/* ------------------------------------------------------------------------ */

CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)
{
    API_BEGIN_NOCTX();
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    CHECK_DEV(dev);
    if (dev_lost(dev)) return CUDA_ERROR_DEVICE_UNAVAILABLE;
    __atomic_add_fetch(&g_ctx[dev].retained, 1, __ATOMIC_ACQ_REL);
    *pctx = &g_ctx[dev];
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
    API_BEGIN_CLEANUP();
    CHECK_DEV(dev);
    int r = __atomic_load_n(&g_ctx[dev].retained, __ATOMIC_ACQUIRE);
    while (r > 0 && !__atomic_compare_exchange_n(&g_ctx[dev].retained, &r, r - 1, 0,
                                                 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {}
    if (r <= 0) return CUDA_ERROR_INVALID_CONTEXT;
    DONE(CUDA_SUCCESS);
}

CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev)
{
    API_BEGIN_CLEANUP();
    CHECK_DEV(dev);
    DONE(CUDA_SUCCESS);
}

CUresult cuCtxSetCurrent(CUcontext ctx)
{
    API_BEGIN_NOCTX();
    if (ctx && (ctx < &g_ctx[0] || ctx >= &g_ctx[g_ndev])) return CUDA_ERROR_INVALID_CONTEXT;
    tls_ctx = ctx;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext *pctx)
{
    API_BEGIN_NOCTX();
    if (!pctx) return CUDA_ERROR_INVALID_VALUE;
    *pctx = tls_ctx;
    return CUDA_SUCCESS;
}

/* Returns (and clears) the first latched async error of any stream. */
CUresult cuCtxSynchronize(void)
{
    API_BEGIN();
    NEED_CTX(dev);
    int rc = __atomic_exchange_n(&g_null_pending, 0, __ATOMIC_ACQ_REL);
    pthread_mutex_lock(&g_lock);
    for (size_t i = 0; i < t_obj.n && !rc; i++)
        if (t_obj.v[i].kind == R_STREAM)
            rc = __atomic_exchange_n(&((struct CUstream_st *)t_obj.v[i].base)->pending, 0, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&g_lock);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Classic allocations and host memory.                                     */
/* ------------------------------------------------------------------------ */

CUresult cuMemGetInfo_v2(size_t *free, size_t *total)
{
    API_BEGIN();
    NEED_CTX(dev);
    if (!free || !total) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    *total = g_dev[dev].total;
    *free = free_locked(dev);
    pthread_mutex_unlock(&g_lock);
    return CUDA_SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)
{
    API_BEGIN();
    NEED_CTX(dev);
    if (!dptr || bytesize == 0) return CUDA_ERROR_INVALID_VALUE;
    size_t span = ALIGN_UP(bytesize, g_page), boff;
    pthread_mutex_lock(&g_lock);
    CUresult rc = charge_locked(dev, bytesize, span, g_page, &boff);
    if (rc == CUDA_SUCCESS) {
        void *p = g_dev[dev].base ? g_dev[dev].base + boff
                : mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        /* size = exact bytes requested, so even a 1-byte overrun is caught */
        struct range r = { (uintptr_t)p, bytesize, span, boff, R_ALLOC, dev, 1, NULL };
        if (p != MAP_FAILED && rt_insert(&t_dev, r) == 0) {
            *dptr = (CUdeviceptr)(uintptr_t)p;
        } else {
            if (p != MAP_FAILED && !g_dev[dev].base) munmap(p, span);
            uncharge_locked(dev, span, boff);
            rc = CUDA_ERROR_OUT_OF_MEMORY;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

CUresult cuMemFree_v2(CUdeviceptr dptr)
{
    API_BEGIN_CLEANUP();
    NEED_CTX(dev);
    pthread_mutex_lock(&g_lock);
    long i = rt_find(&t_dev, (uintptr_t)dptr);
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    if (i >= 0 && t_dev.v[i].kind == R_ALLOC && t_dev.v[i].base == (uintptr_t)dptr) {
        struct range r = t_dev.v[i];
        rt_remove(&t_dev, (size_t)i);
        if (!g_dev[r.dev].base) munmap((void *)r.base, r.span);
        uncharge_locked(r.dev, r.span, r.boff);
        rc = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_lock);
    DONE(rc);
}

CUresult cuMemAllocHost_v2(void **pp, size_t bytesize)
{
    API_BEGIN();
    NEED_CTX(dev);
    if (!pp || bytesize == 0) return CUDA_ERROR_INVALID_VALUE;
    size_t span = ALIGN_UP(bytesize, g_page);
    void *p = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    struct range r = { (uintptr_t)p, bytesize, span, 0, R_HOST_ALLOC, dev, 1, NULL };
    pthread_mutex_lock(&g_lock);
    int err = rt_insert(&t_host, r);
    pthread_mutex_unlock(&g_lock);
    if (err) { munmap(p, span); return CUDA_ERROR_OUT_OF_MEMORY; }
    *pp = p;
    return CUDA_SUCCESS;
}

CUresult cuMemFreeHost(void *p)
{
    API_BEGIN_CLEANUP();
    NEED_CTX(dev);
    pthread_mutex_lock(&g_lock);
    long i = rt_find(&t_host, (uintptr_t)p);
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    if (p && i >= 0 && t_host.v[i].kind == R_HOST_ALLOC && t_host.v[i].base == (uintptr_t)p) {
        munmap(p, t_host.v[i].span);
        rt_remove(&t_host, (size_t)i);
        rc = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_lock);
    DONE(rc);
}

CUresult cuMemHostRegister_v2(void *p, size_t bytesize, unsigned int Flags)
{
    API_BEGIN();
    NEED_CTX(dev);
    if (!p || bytesize == 0 || (Flags & ~0xFu)) return CUDA_ERROR_INVALID_VALUE;
    if (cfg_host_register_fails && access(cfg_host_register_fails, F_OK) == 0) return CUDA_ERROR_OUT_OF_MEMORY;
    struct range r = { (uintptr_t)p, bytesize, bytesize, 0, R_HOST_REG, dev, 1, NULL };
    CUresult rc = CUDA_SUCCESS;
    pthread_mutex_lock(&g_lock);
    if (rt_overlaps(&t_host, r.base, bytesize)) rc = CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
    else if (rt_insert(&t_host, r)) rc = CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_unlock(&g_lock);
    return rc;
}

CUresult cuMemHostUnregister(void *p)
{
    API_BEGIN_CLEANUP();
    NEED_CTX(dev);
    pthread_mutex_lock(&g_lock);
    long i = rt_find(&t_host, (uintptr_t)p);
    CUresult rc = CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
    if (p && i >= 0 && t_host.v[i].kind == R_HOST_REG && t_host.v[i].base == (uintptr_t)p) {
        rt_remove(&t_host, (size_t)i);
        rc = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_lock);
    DONE(rc);
}

/* ------------------------------------------------------------------------ */
/* Copies and memsets (async ones run synchronously).                       */
/* ------------------------------------------------------------------------ */

static CUresult copy_body(void *dst, const void *src, size_t n, int dst_dev, int src_dev,
                          CUstream s, int async)
{
    int *slot = async ? stream_slot(s) : &g_null_pending;
    if (!slot) return CUDA_ERROR_INVALID_HANDLE;
    if (!dst || !src) return CUDA_ERROR_INVALID_VALUE;
    if (n == 0) return CUDA_SUCCESS;
    int dd = dst_dev ? dev_range_dev((uintptr_t)dst, n) : -1, sd = src_dev ? dev_range_dev((uintptr_t)src, n) : -1;
    if ((dst_dev && dd < 0) || (src_dev && sd < 0)) return CUDA_ERROR_INVALID_VALUE;
    if (dev_lost(dd) || dev_lost(sd)) return CUDA_ERROR_DEVICE_UNAVAILABLE;   /* memory of a lost device */
    long nth = __atomic_add_fetch(&fake_copy_attempts, 1, __ATOMIC_SEQ_CST);
    int fail_n = __atomic_load_n(&fake_fail_copy_n, __ATOMIC_ACQUIRE);
    if ((fail_n > 0 && nth == fail_n) || (cfg_fail_every > 0 && nth % cfg_fail_every == 0)) {
        if (async) __atomic_store_n(slot, CUDA_ERROR_ILLEGAL_ADDRESS, __ATOMIC_RELEASE);
        return CUDA_ERROR_ILLEGAL_ADDRESS;
    }
    memmove(dst, src, n);
    long done = __atomic_add_fetch(&fake_copy_count, 1, __ATOMIC_SEQ_CST);
    if (cfg_lost_after > 0 && done >= cfg_lost_after)
        __atomic_store_n(&fake_device_lost, 1, __ATOMIC_RELEASE);
    return CUDA_SUCCESS;
}

#define DPTR(p) ((void *)(uintptr_t)(p))

CUresult cuMemcpyHtoD_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount)
{
    API_BEGIN();
    NEED_CTX(dev);
    return copy_body(DPTR(dstDevice), srcHost, ByteCount, 1, 0, NULL, 0);
}

CUresult cuMemcpyDtoH_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount)
{
    API_BEGIN();
    NEED_CTX(dev);
    return copy_body(dstHost, DPTR(srcDevice), ByteCount, 0, 1, NULL, 0);
}

CUresult cuMemcpyDtoD_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice, size_t ByteCount)
{
    API_BEGIN();
    NEED_CTX(dev);
    return copy_body(DPTR(dstDevice), DPTR(srcDevice), ByteCount, 1, 1, NULL, 0);
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount, CUstream hStream)
{
    API_BEGIN();
    NEED_CTX(dev);
    return copy_body(DPTR(dstDevice), srcHost, ByteCount, 1, 0, hStream, 1);
}

CUresult cuMemcpyDtoHAsync_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount, CUstream hStream)
{
    API_BEGIN();
    NEED_CTX(dev);
    return copy_body(dstHost, DPTR(srcDevice), ByteCount, 0, 1, hStream, 1);
}

static CUresult memset_body(CUdeviceptr dst, unsigned char uc, size_t n, CUstream s, int async)
{
    if (async && !stream_slot(s)) return CUDA_ERROR_INVALID_HANDLE;
    if (!dst) return CUDA_ERROR_INVALID_VALUE;
    if (n == 0) return CUDA_SUCCESS;
    int dd = dev_range_dev((uintptr_t)dst, n);
    if (dd < 0) return CUDA_ERROR_INVALID_VALUE;
    if (dev_lost(dd)) return CUDA_ERROR_DEVICE_UNAVAILABLE;
    memset(DPTR(dst), uc, n);
    __atomic_add_fetch(&fake_memset_count, 1, __ATOMIC_SEQ_CST);
    return CUDA_SUCCESS;
}

CUresult cuMemsetD8_v2(CUdeviceptr dstDevice, unsigned char uc, size_t N)
{
    API_BEGIN();
    NEED_CTX(dev);
    return memset_body(dstDevice, uc, N, NULL, 0);
}

CUresult cuMemsetD8Async(CUdeviceptr dstDevice, unsigned char uc, size_t N, CUstream hStream)
{
    API_BEGIN();
    NEED_CTX(dev);
    return memset_body(dstDevice, uc, N, hStream, 1);
}

/* cuMemcpyBatchAsync_v2 (CUDA 12.8+): count copies in one call, each direction
 * told apart by which side lies in device memory, in reverse order (see below).  FAKECUDA_NO_BATCH=1 answers
 * CUDA_ERROR_NOT_SUPPORTED, as a driver that has the symbol but not the feature. */
CUresult cuMemcpyBatchAsync_v2(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count,
                               CUmemcpyAttributes *attrs, size_t *attrsIdxs, size_t numAttrs, CUstream hStream)
{
    API_BEGIN();
    NEED_CTX(dev);
    if (getenv("FAKECUDA_NO_BATCH") && atoi(getenv("FAKECUDA_NO_BATCH"))) return CUDA_ERROR_NOT_SUPPORTED;
    if (!dsts || !srcs || !sizes || count == 0 || !attrs || !attrsIdxs || numAttrs == 0 || numAttrs > count
        || attrsIdxs[0] != 0)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < numAttrs; i++)
        if (attrs[i].srcAccessOrder < 1 || attrs[i].srcAccessOrder > 3) return CUDA_ERROR_INVALID_VALUE;
    /* The driver may run the copies of a batch in any order: run them last to first, so that a
     * caller who relies on their order (overlapping writes in one batch) fails its tests. */
    for (size_t j = count; j-- > 0;) {
        size_t i = j;
        int dst_dev = dev_range_ok((uintptr_t)dsts[i], sizes[i] ? sizes[i] : 1);
        int src_dev = dev_range_ok((uintptr_t)srcs[i], sizes[i] ? sizes[i] : 1);
        CUresult rc = copy_body(DPTR(dsts[i]), DPTR(srcs[i]), sizes[i], dst_dev, src_dev, hStream, 1);
        if (rc != CUDA_SUCCESS) return rc;
    }
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------ */
/* Streams: real, distinct heap objects; the NULL/legacy/per-thread handles  */
/* are accepted too.                                                         */
/* ------------------------------------------------------------------------ */

CUresult cuStreamCreate(CUstream *phStream, unsigned int Flags)
{
    API_BEGIN();
    NEED_CTX(dev);
    if (!phStream || (Flags & ~(unsigned)CU_STREAM_NON_BLOCKING)) return CUDA_ERROR_INVALID_VALUE;
    struct CUstream_st *s = calloc(1, sizeof *s);
    if (!s) return CUDA_ERROR_OUT_OF_MEMORY;
    s->flags = Flags;
    struct range r = { (uintptr_t)s, sizeof *s, sizeof *s, 0, R_STREAM, dev, 0, NULL };
    pthread_mutex_lock(&g_lock);
    int err = rt_insert(&t_obj, r);
    pthread_mutex_unlock(&g_lock);
    if (err) { free(s); return CUDA_ERROR_OUT_OF_MEMORY; }
    *phStream = s;
    return CUDA_SUCCESS;
}

CUresult cuStreamDestroy_v2(CUstream hStream)
{
    API_BEGIN_CLEANUP();
    NEED_CTX(dev);
    pthread_mutex_lock(&g_lock);
    long i = rt_find(&t_obj, (uintptr_t)hStream);
    CUresult rc = CUDA_ERROR_INVALID_HANDLE;
    if (hStream && i >= 0 && t_obj.v[i].kind == R_STREAM && t_obj.v[i].base == (uintptr_t)hStream) {
        rt_remove(&t_obj, (size_t)i);
        free(hStream);
        rc = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_lock);
    DONE(rc);
}

/* Returns (and clears) the error latched by a failed async call on this stream. */
CUresult cuStreamSynchronize(CUstream hStream)
{
    API_BEGIN();
    NEED_CTX(dev);
    int *slot = stream_slot(hStream);
    if (!slot) return CUDA_ERROR_INVALID_HANDLE;
    return __atomic_exchange_n(slot, 0, __ATOMIC_ACQ_REL);
}

/* ------------------------------------------------------------------------ */
/* Virtual memory management.                                               */
/* ------------------------------------------------------------------------ */

static CUresult check_prop(const CUmemAllocationProp *prop)
{
    if (!prop || prop->type != CU_MEM_ALLOCATION_TYPE_PINNED || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
        return CUDA_ERROR_INVALID_VALUE;
    CHECK_DEV(prop->location.id);
    if (prop->requestedHandleTypes & CU_MEM_HANDLE_TYPE_FABRIC) return CUDA_ERROR_NOT_SUPPORTED;
    if (prop->requestedHandleTypes & ~CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

CUresult cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop,
                                       CUmemAllocationGranularity_flags option)
{
    API_BEGIN();
    NEED_VMM();
    if (!granularity || (option != CU_MEM_ALLOC_GRANULARITY_MINIMUM && option != CU_MEM_ALLOC_GRANULARITY_RECOMMENDED))
        return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = check_prop(prop);
    if (rc == CUDA_SUCCESS) *granularity = FK_GRAN;
    return rc;
}

/* Creates a memfd of `size` bytes (or carves `size` bytes from the backing file). */
CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                     unsigned long long flags)
{
    API_BEGIN();
    NEED_VMM();
    NEED_CTX(cdev);
    if (!handle || flags != 0 || size == 0 || size % FK_GRAN) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = check_prop(prop);
    if (rc != CUDA_SUCCESS) return rc;
    int dev = prop->location.id;
    struct fk_handle *h = calloc(1, sizeof *h);
    if (!h) return CUDA_ERROR_OUT_OF_MEMORY;
    if (dev_lost(dev)) { free(h); return CUDA_ERROR_DEVICE_UNAVAILABLE; }
    *h = (struct fk_handle){ .fd = g_dev[dev].fd, .owns_fd = !g_dev[dev].base, .dev = dev, .counted = 1,
                             .types = prop->requestedHandleTypes, .size = size, .refs = 1 };
    pthread_mutex_lock(&g_lock);
    rc = charge_locked(dev, size, size, FK_GRAN, &h->offset);
    if (rc == CUDA_SUCCESS && h->owns_fd) {
        h->fd = memfd_create("fakecuda-vmm", MFD_CLOEXEC);
        if (h->fd < 0 || ftruncate(h->fd, (off_t)size) != 0) {
            if (h->fd >= 0) close(h->fd);
            uncharge_locked(dev, size, h->offset);
            rc = CUDA_ERROR_OUT_OF_MEMORY;
        }
    }
    struct range r = { (uintptr_t)h, 1, 1, 0, R_HANDLE, dev, 0, h };
    if (rc == CUDA_SUCCESS && rt_insert(&t_obj, r) != 0) {
        if (h->owns_fd) close(h->fd);
        uncharge_locked(dev, size, h->offset);
        rc = CUDA_ERROR_OUT_OF_MEMORY;
    }
    pthread_mutex_unlock(&g_lock);
    if (rc != CUDA_SUCCESS) { free(h); return rc; }
    *handle = (CUmemGenericAllocationHandle)(uintptr_t)h;
    return CUDA_SUCCESS;
}

/* Drops the handle's own reference; the memory lives on while mapped. */
CUresult cuMemRelease(CUmemGenericAllocationHandle handle)
{
    API_BEGIN_CLEANUP();
    NEED_CTX(dev);
    pthread_mutex_lock(&g_lock);
    struct fk_handle *h = handle_lookup_locked(handle);
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    if (h && !h->released) {
        h->released = 1;
        handle_unref_locked(h);
        rc = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_lock);
    DONE(rc);
}

/* Reserves VA with a PROT_NONE mapping; `addr` is only a hint and is ignored. */
CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                             unsigned long long flags)
{
    API_BEGIN();
    NEED_VMM();
    NEED_CTX(dev);
    (void)addr;
    if (!ptr || flags != 0 || size == 0 || size % g_page || (alignment & (alignment - 1)))
        return CUDA_ERROR_INVALID_VALUE;
    size_t al = alignment > FK_GRAN ? alignment : FK_GRAN;
    char *raw = mmap(NULL, size + al, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    char *p = (char *)ALIGN_UP((uintptr_t)raw, al);
    if (p > raw) munmap(raw, (size_t)(p - raw));
    if (raw + size + al > p + size) munmap(p + size, (size_t)(raw + size + al - (p + size)));
    struct range r = { (uintptr_t)p, size, size, 0, R_RESERVE, dev, 0, NULL };
    pthread_mutex_lock(&g_lock);
    int err = rt_insert(&t_res, r);
    pthread_mutex_unlock(&g_lock);
    if (err) { munmap(p, size); return CUDA_ERROR_OUT_OF_MEMORY; }
    *ptr = (CUdeviceptr)(uintptr_t)p;
    return CUDA_SUCCESS;
}

/* ptr/size must match the reservation exactly, and nothing may still be mapped. */
CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size)
{
    API_BEGIN_CLEANUP();
    NEED_CTX(dev);
    pthread_mutex_lock(&g_lock);
    long i = rt_find(&t_res, (uintptr_t)ptr);
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    if (i >= 0 && t_res.v[i].base == (uintptr_t)ptr && t_res.v[i].size == size &&
        !rt_overlaps(&t_dev, (uintptr_t)ptr, size)) {
        munmap(DPTR(ptr), size);
        rt_remove(&t_res, (size_t)i);
        rc = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_lock);
    DONE(rc);
}

/* mmap(MAP_SHARED|MAP_FIXED) of the handle's fd; PROT_NONE until cuMemSetAccess. */
CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                  unsigned long long flags)
{
    API_BEGIN();
    NEED_VMM();
    NEED_CTX(dev);
    /* The real driver documents offset as "currently must be zero". */
    if (!ptr || flags != 0 || offset != 0 || size == 0 || size % FK_GRAN || ptr % FK_GRAN)
        return CUDA_ERROR_INVALID_VALUE;
    uintptr_t p = (uintptr_t)ptr;
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    struct fk_handle *h = handle_lookup_locked(handle);
    long ri = rt_find(&t_res, p);
    if (h && !h->released && size <= h->size && ri >= 0 &&
        p + size <= t_res.v[ri].base + t_res.v[ri].size && !rt_overlaps(&t_dev, p, size)) {
        void *m = mmap(DPTR(ptr), size, PROT_NONE, MAP_SHARED | MAP_FIXED, h->fd, (off_t)h->offset);
        struct range r = { p, size, size, h->offset, R_MAP, h->dev, 0, h };
        if (m == MAP_FAILED) rc = CUDA_ERROR_OUT_OF_MEMORY;
        else if (rt_insert(&t_dev, r) != 0) rc = CUDA_ERROR_OUT_OF_MEMORY;
        else { h->refs++; rc = CUDA_SUCCESS; }
        /* An imported block of this process's backing file: keep the allocator off it
         * (best effort: only if the whole block is free here, e.g. a restarted daemon). */
        if (rc == CUDA_SUCCESS && !h->counted && !h->claimed && g_dev[h->dev].base && h->fd >= 0 &&
            ext_claim(&g_dev[h->dev], h->offset, size) == 0) {
            h->claimed = size;
            g_dev[h->dev].used += size;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

/* Finds the mappings exactly tiling [p, p+size): sets *first, returns count (0 = no). */
static size_t tiled_maps_locked(uintptr_t p, size_t size, size_t *first)
{
    long i = rt_find(&t_dev, p);
    if (i < 0 || t_dev.v[i].kind != R_MAP || t_dev.v[i].base != p) return 0;
    *first = (size_t)i;
    for (size_t k = (size_t)i, end = p; k < t_dev.n && t_dev.v[k].kind == R_MAP && t_dev.v[k].base == end; k++) {
        end += t_dev.v[k].size;
        if (end == p + size) return k - (size_t)i + 1;
        if (end > p + size) return 0;
    }
    return 0;
}

/* Restores the PROT_NONE reservation and drops the mappings' handle references. */
CUresult cuMemUnmap(CUdeviceptr ptr, size_t size)
{
    API_BEGIN_CLEANUP();
    NEED_CTX(dev);
    size_t first = 0;
    pthread_mutex_lock(&g_lock);
    size_t n = tiled_maps_locked((uintptr_t)ptr, size, &first);
    for (size_t k = 0; k < n; k++) {
        struct range r = t_dev.v[first];
        mmap((void *)r.base, r.size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
        rt_remove(&t_dev, first);
        handle_unref_locked(r.h);
    }
    pthread_mutex_unlock(&g_lock);
    DONE(n ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE);
}

/* Only READWRITE for device locations is supported; the range must be whole mappings. */
CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count)
{
    API_BEGIN();
    NEED_VMM();
    NEED_CTX(dev);
    if (!desc || count == 0) return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < count; i++) {
        if (desc[i].location.type != CU_MEM_LOCATION_TYPE_DEVICE) return CUDA_ERROR_INVALID_VALUE;
        CHECK_DEV(desc[i].location.id);
        if (desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_READWRITE) return CUDA_ERROR_INVALID_VALUE;
    }
    size_t first = 0;
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    size_t n = tiled_maps_locked((uintptr_t)ptr, size, &first);
    if (n && mprotect(DPTR(ptr), size, PROT_READ | PROT_WRITE) == 0) {
        for (size_t k = 0; k < n; k++) t_dev.v[first + k].access = 1;
        rc = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

/* Opens a new file description of device dev's backing file, positioned at `offset`:
 * the position travels with it through fork, exec and SCM_RIGHTS, and tells the
 * importer which block of the file the fd stands for. */
static int open_block_locked(int dev, size_t offset)
{
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", g_dev[dev].fd);
    int fd = open(proc, O_RDWR | O_CLOEXEC);
    if (fd < 0) fd = open(g_dev[dev].path, O_RDWR | O_CLOEXEC);     /* no /proc */
    if (fd >= 0 && lseek(fd, (off_t)offset, SEEK_SET) != (off_t)offset) {
        close(fd);
        fd = -1;
    }
    return fd;
}

/* Writes a dup (O_CLOEXEC) of the memfd to *(int *)shareableHandle; in backing mode
 * a fresh file description of the backing file whose file position is the block's offset. */
CUresult cuMemExportToShareableHandle(void *shareableHandle, CUmemGenericAllocationHandle handle,
                                      CUmemAllocationHandleType handleType, unsigned long long flags)
{
    API_BEGIN();
    NEED_VMM();
    NEED_CTX(dev);
    if (!shareableHandle || flags != 0 || handleType != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    struct fk_handle *h = handle_lookup_locked(handle);
    if (h && !h->released && (h->types & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)) {
        int fd = h->owns_fd ? fcntl(h->fd, F_DUPFD_CLOEXEC, 0) : open_block_locked(h->dev, h->offset);
        if (fd >= 0) { *(int *)shareableHandle = fd; rc = CUDA_SUCCESS; }
        else rc = CUDA_ERROR_OPERATING_SYSTEM;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

/* osHandle is the fd *value* cast to a pointer.  The caller keeps its fd (we dup
 * it).  The block starts at the fd's file position (0 for a memfd; the block's
 * offset for an fd exported in backing mode) and runs to the end of the file (a
 * mapping of it may be shorter).  If the fd is one of this process's backing files,
 * the handle belongs to that device, else to the current context's.  Imports are
 * not counted in fake_alloc_bytes. */
CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *handle, void *osHandle,
                                        CUmemAllocationHandleType shHandleType)
{
    API_BEGIN();
    NEED_VMM();
    NEED_CTX(dev);
    if (!handle || shHandleType != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) return CUDA_ERROR_INVALID_VALUE;
    intptr_t v = (intptr_t)osHandle;
    if (v < 0 || v > INT32_MAX) return CUDA_ERROR_INVALID_VALUE;
    off_t pos = lseek((int)v, 0, SEEK_CUR);  /* first: fd_size may move it (sysfs) */
    if (pos < 0) pos = 0;
    size_t size = fd_size((int)v);
    if (lseek((int)v, pos, SEEK_SET) != pos) {}    /* restore: the position is shared with the sender */
    if (size <= (size_t)pos || (size_t)pos % g_page) return CUDA_ERROR_INVALID_VALUE;
    struct stat st;
    if (fstat((int)v, &st) == 0)
        for (int i = 0; i < g_ndev; i++)
            if (g_dev[i].base && g_dev[i].st_dev == st.st_dev && g_dev[i].st_ino == st.st_ino) dev = i;
    struct fk_handle *h = calloc(1, sizeof *h);
    if (!h) return CUDA_ERROR_OUT_OF_MEMORY;
    *h = (struct fk_handle){ .fd = fcntl((int)v, F_DUPFD_CLOEXEC, 0), .owns_fd = 1, .dev = dev,
                             .types = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                             .offset = (size_t)pos, .size = size - (size_t)pos, .refs = 1 };
    struct range r = { (uintptr_t)h, 1, 1, 0, R_HANDLE, dev, 0, h };
    pthread_mutex_lock(&g_lock);
    int err = h->fd < 0 || rt_insert(&t_obj, r) != 0;
    pthread_mutex_unlock(&g_lock);
    if (err) {
        if (h->fd >= 0) close(h->fd);
        free(h);
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    *handle = (CUmemGenericAllocationHandle)(uintptr_t)h;
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------ */
/* Error strings (the real driver's cuGetErrorName / cuGetErrorString text). */
/* ------------------------------------------------------------------------ */

static const struct { int code; const char *name, *text; } k_errors[] = {
    { 0, "CUDA_SUCCESS", "no error" },
    { 1, "CUDA_ERROR_INVALID_VALUE", "invalid argument" },
    { 2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory" },
    { 3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error" },
    { 46, "CUDA_ERROR_DEVICE_UNAVAILABLE", "CUDA-capable device(s) is/are busy or unavailable" },
    { 100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected" },
    { 101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal" },
    { 201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context" },
    { 304, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS" },
    { 400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle" },
    { 700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered" },
    { 712, "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED", "part or all of the requested memory range is already mapped" },
    { 713, "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED", "pointer does not correspond to a registered memory region" },
    { 801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported" },
    { 999, "CUDA_ERROR_UNKNOWN", "unknown error" },
};

static CUresult error_lookup(CUresult error, const char **pStr, int text)
{
    if (!pStr) return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof k_errors / sizeof k_errors[0]; i++)
        if (k_errors[i].code == (int)error) {
            *pStr = text ? k_errors[i].text : k_errors[i].name;
            return CUDA_SUCCESS;
        }
    *pStr = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

CUresult cuGetErrorName(CUresult error, const char **pStr) { return error_lookup(error, pStr, 0); }
CUresult cuGetErrorString(CUresult error, const char **pStr) { return error_lookup(error, pStr, 1); }
