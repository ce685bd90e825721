/*
 * fakenvml.c - a GPU-free stand-in for libnvidia-ml.so.1, used by the nbd-vram tests.
 *
 * Build:
 *   gcc -O2 -Wall -Wextra -shared -fPIC -o libnvidia-ml.so.1 fakenvml.c
 *
 * It exports the subset of NVML that nbd-vram uses, under the exact (versioned)
 * symbol names and with the exact ABI of the real library.  This file does not
 * include nvml.h; abi_check.c compiles it against the real nvml.h (where one is
 * installed) so that a prototype, constant or struct-layout mismatch is an error.
 *
 * Model: the same GPUs as the fake libcuda (tests/fakecuda) sees with the same
 * environment.  Device i has UUID GPU-facec0da-0000-4000-0000-0000000000NN and PCI
 * bus id 00000000:NN:00.0 (NN = i+1, hex), as fakecuda's cuDeviceGetUuid_v2 and
 * cuDeviceGetPCIBusId report them.  The fake NVML does not see what the fake
 * libcuda allocates (another process, no shared state): memory used is what
 * FAKECUDA_OTHER_USAGE says.  Memory clocks: supported 9501, 5001, 810 and 405 MHz
 * (highest first, as NVML lists them); the current clock is the highest one, or
 * the locked maximum while a lock is set.
 *
 * Environment (read at every nvmlInit_v2, except the files, read at each call):
 *   FAKECUDA_DEVICES=N            number of devices (default: the number of
 *                                 FAKECUDA_BACKING paths, else 1; max 16)
 *   FAKECUDA_BACKING=P0:P1:...    device i's total memory is Pi's size
 *   FAKECUDA_TOTAL_MB=N           total memory of the others (default 8192)
 *   FAKECUDA_OTHER_USAGE=PATH     line i: MiB used on device i (missing = 0)
 *   FAKECUDA_LOST_DEVICES=PATH    device indices (whitespace separated) whose
 *                                 calls return NVML_ERROR_GPU_IS_LOST
 *   FAKENVML_PROCESSES=LIST       running processes: "dev:pid:MiB[:kind],..."; MiB
 *                                 "-" = NVML_VALUE_NOT_AVAILABLE; kind "c" compute
 *                                 (default), "g" graphics, "cg" both lists
 *   FAKENVML_STATE=PATH           locked memory clocks, one line "dev min max" per
 *                                 locked device (rewritten by Set/Reset, read by
 *                                 every call: a test sees what was set and whether
 *                                 it was reset; a missing file = nothing locked).
 *                                 Without it the state lives in the process.
 *   FAKENVML_CLOCKS_UNSUPPORTED=1 Set/ResetMemoryLockedClocks return NVML_ERROR_NOT_SUPPORTED
 *   FAKENVML_NO_PERMISSION=1      Set/ResetMemoryLockedClocks return NVML_ERROR_NO_PERMISSION
 *   FAKENVML_NO_DRIVER=1          nvmlInit_v2 returns NVML_ERROR_DRIVER_NOT_LOADED
 *
 * Every call but nvmlInit_v2 and nvmlErrorString returns NVML_ERROR_UNINITIALIZED
 * before nvmlInit_v2 (or after the nvmlShutdown matching the last init).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* ABI: constants, types and struct layouts, copied from nvml.h.             */
/* ------------------------------------------------------------------------ */

#define FN_CONSTANTS(X)                                                      \
    X(NVML_SUCCESS, 0)                                                       \
    X(NVML_ERROR_UNINITIALIZED, 1)                                           \
    X(NVML_ERROR_INVALID_ARGUMENT, 2)                                        \
    X(NVML_ERROR_NOT_SUPPORTED, 3)                                           \
    X(NVML_ERROR_NO_PERMISSION, 4)                                           \
    X(NVML_ERROR_NOT_FOUND, 6)                                               \
    X(NVML_ERROR_INSUFFICIENT_SIZE, 7)                                       \
    X(NVML_ERROR_DRIVER_NOT_LOADED, 9)                                       \
    X(NVML_ERROR_GPU_IS_LOST, 15)                                            \
    X(NVML_ERROR_UNKNOWN, 999)                                               \
    X(NVML_CLOCK_GRAPHICS, 0)                                                \
    X(NVML_CLOCK_SM, 1)                                                      \
    X(NVML_CLOCK_MEM, 2)                                                     \
    X(NVML_CLOCK_VIDEO, 3)

/* Private mirrors of the nvml.h structs; abi_check.c asserts identical layout. */
struct fn_memory { unsigned long long total, free, used; };   /* nvmlMemory_t, 24 bytes */
struct fn_process_info {                                       /* nvmlProcessInfo_t (= _v2_t), 24 bytes */
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
};

#ifndef NVML_API_VERSION
/* Standalone build: our own definitions, ABI-identical to nvml.h. */
#define FN_ENUMERATOR(name, value) name = value,
enum { FN_CONSTANTS(FN_ENUMERATOR) };
typedef int nvmlReturn_t;                  /* enum nvmlReturn_enum */
typedef int nvmlClockType_t;               /* enum nvmlClockType_enum */
typedef struct nvmlDevice_st *nvmlDevice_t;
typedef struct fn_memory nvmlMemory_t;
typedef struct fn_process_info nvmlProcessInfo_t;
#define NVML_VALUE_NOT_AVAILABLE (-1)
#endif

/* ------------------------------------------------------------------------ */
/* State.                                                                   */
/* ------------------------------------------------------------------------ */

#define FN_MAX_DEV 16
#define FN_MAX_PROC 64
static const unsigned k_mem_clocks[] = { 9501, 5001, 810, 405 };     /* MHz, highest first */
#define FN_NCLOCKS (sizeof k_mem_clocks / sizeof k_mem_clocks[0])

struct nvmlDevice_st { int index; };
static struct nvmlDevice_st g_devs[FN_MAX_DEV];
static int g_init_count, g_ndev;
static unsigned long long g_total[FN_MAX_DEV];
static unsigned g_lock_min[FN_MAX_DEV], g_lock_max[FN_MAX_DEV];  /* 0 = not locked (no FAKENVML_STATE) */

static int env_flag(const char *name)
{
    const char *s = getenv(name);
    return s && *s && strcmp(s, "0") != 0;
}

static unsigned long long file_size(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    struct stat st;
    unsigned long long n = fstat(fd, &st) == 0 ? (unsigned long long)st.st_size : 0;
    if (n == 0) {                          /* sysfs BAR files may report 0 */
        off_t end = lseek(fd, 0, SEEK_END);
        n = end > 0 ? (unsigned long long)end : 0;
    }
    close(fd);
    return n;
}

static void read_env(void)
{
    const char *bp = getenv("FAKECUDA_BACKING"), *tm = getenv("FAKECUDA_TOTAL_MB"), *nd = getenv("FAKECUDA_DEVICES");
    unsigned long long total = (tm && *tm ? strtoull(tm, NULL, 0) : 8192) << 20;
    char *copy = bp && *bp ? strdup(bp) : NULL, *save = NULL;
    int npaths = 0;
    for (int i = 0; i < FN_MAX_DEV; i++) {
        g_total[i] = total;
        g_devs[i].index = i;
    }
    for (char *t = copy ? strtok_r(copy, ":", &save) : NULL; t && npaths < FN_MAX_DEV; t = strtok_r(NULL, ":", &save))
        g_total[npaths++] = file_size(t);
    free(copy);
    g_ndev = nd && *nd ? atoi(nd) : (npaths ? npaths : 1);
    if (g_ndev < 1) g_ndev = 1;
    if (g_ndev > FN_MAX_DEV) g_ndev = FN_MAX_DEV;
}

/* Reads a small file whole; returns its length, or -1 (missing). */
static ssize_t read_small(const char *path, char *buf, size_t cap)
{
    int fd = path && *path ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    if (fd < 0) return -1;
    ssize_t n = 0, r;
    while ((size_t)n < cap - 1 && (r = read(fd, buf + n, cap - 1 - (size_t)n)) > 0) n += r;
    close(fd);
    buf[n] = 0;
    return n;
}

static unsigned long long other_usage(int dev)
{
    char buf[4096], *line = buf;
    if (read_small(getenv("FAKECUDA_OTHER_USAGE"), buf, sizeof buf) < 0) return 0;
    for (int i = 0; i < dev && line; i++) {
        line = strchr(line, '\n');
        if (line) line++;
    }
    return line ? strtoull(line, NULL, 0) << 20 : 0;
}

static int dev_lost(int dev)
{
    char buf[4096], *p = buf, *end;
    if (read_small(getenv("FAKECUDA_LOST_DEVICES"), buf, sizeof buf) < 0) return 0;
    for (long v = strtol(p, &end, 10); end != p; p = end, v = strtol(p, &end, 10))
        if (v == dev) return 1;
    return 0;
}

/* Locked memory clocks of `dev` (0, 0 = none), from FAKENVML_STATE or the process. */
static void lock_get(int dev, unsigned *mn, unsigned *mx)
{
    const char *path = getenv("FAKENVML_STATE");
    char buf[4096], *line = buf;
    *mn = *mx = 0;
    if (!path || !*path) {
        *mn = g_lock_min[dev];
        *mx = g_lock_max[dev];
        return;
    }
    if (read_small(path, buf, sizeof buf) < 0) return;
    for (; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        int d;
        unsigned a, b;
        if (sscanf(line, "%d %u %u", &d, &a, &b) == 3 && d == dev) { *mn = a; *mx = b; }
    }
}

/* Sets (mx != 0) or clears the lock of `dev`; rewrites FAKENVML_STATE atomically. */
static nvmlReturn_t lock_set(int dev, unsigned mn, unsigned mx)
{
    const char *path = getenv("FAKENVML_STATE");
    if (!path || !*path) {
        g_lock_min[dev] = mn;
        g_lock_max[dev] = mx;
        return NVML_SUCCESS;
    }
    unsigned lo[FN_MAX_DEV], hi[FN_MAX_DEV];
    for (int i = 0; i < FN_MAX_DEV; i++) lock_get(i, &lo[i], &hi[i]);
    lo[dev] = mn;
    hi[dev] = mx;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp%d", path, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return NVML_ERROR_UNKNOWN;
    for (int i = 0; i < FN_MAX_DEV; i++)
        if (hi[i]) fprintf(f, "%d %u %u\n", i, lo[i], hi[i]);
    if (fclose(f) != 0 || rename(tmp, path) != 0) { unlink(tmp); return NVML_ERROR_UNKNOWN; }
    return NVML_SUCCESS;
}

#define NEED_INIT() do { if (g_init_count <= 0) return NVML_ERROR_UNINITIALIZED; } while (0)
/* Resolves a handle to an index `d`; fails for handles we did not give out and for lost GPUs. */
#define NEED_DEV(device, d)                                                  \
    NEED_INIT();                                                             \
    if (!(device) || (device) < &g_devs[0] || (device) >= &g_devs[g_ndev]) return NVML_ERROR_INVALID_ARGUMENT; \
    int d = (device)->index;                                                 \
    if (dev_lost(d)) return NVML_ERROR_GPU_IS_LOST

/* ------------------------------------------------------------------------ */
/* Init, errors, device handles.                                            */
/* ------------------------------------------------------------------------ */

nvmlReturn_t nvmlInit_v2(void)
{
    if (env_flag("FAKENVML_NO_DRIVER")) return NVML_ERROR_DRIVER_NOT_LOADED;
    if (g_init_count++ == 0) read_env();
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void)
{
    NEED_INIT();
    g_init_count--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    switch ((int)result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_UNKNOWN: return "Unknown Error";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    NEED_INIT();
    if (!deviceCount) return NVML_ERROR_INVALID_ARGUMENT;
    *deviceCount = (unsigned)g_ndev;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    NEED_INIT();
    if (!device || index >= (unsigned)g_ndev) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &g_devs[index];
    return NVML_SUCCESS;
}

static void uuid_of(int dev, char *buf, size_t len)
{
    snprintf(buf, len, "GPU-facec0da-0000-4000-0000-%012x", dev + 1);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    NEED_INIT();
    if (!uuid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < g_ndev; i++) {
        char u[96];
        uuid_of(i, u, sizeof u);
        if (strcasecmp(u, uuid) == 0) {
            if (dev_lost(i)) return NVML_ERROR_GPU_IS_LOST;
            *device = &g_devs[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

/* Accepts "dddd:bb:dd.f" (any domain width, e.g. NVML's 8) or "bb:dd.f", hex, any case. */
nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device)
{
    unsigned dom = 0, bus, d, f;
    int n = -1;
    NEED_INIT();
    if (!pciBusId || !device) return NVML_ERROR_INVALID_ARGUMENT;
    if (!(sscanf(pciBusId, "%x:%x:%x.%x%n", &dom, &bus, &d, &f, &n) == 4 && n > 0 && !pciBusId[n])) {
        dom = 0;
        n = -1;
        if (!(sscanf(pciBusId, "%x:%x.%x%n", &bus, &d, &f, &n) == 3 && n > 0 && !pciBusId[n]))
            return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (dom != 0 || d != 0 || f != 0 || bus < 1 || bus > (unsigned)g_ndev) return NVML_ERROR_NOT_FOUND;
    if (dev_lost((int)bus - 1)) return NVML_ERROR_GPU_IS_LOST;
    *device = &g_devs[bus - 1];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    NEED_DEV(device, dev);
    char u[96];
    uuid_of(dev, u, sizeof u);
    if (!uuid) return NVML_ERROR_INVALID_ARGUMENT;
    if (length < strlen(u) + 1) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(uuid, u, strlen(u) + 1);
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------------ */
/* Memory and processes.                                                    */
/* ------------------------------------------------------------------------ */

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    NEED_DEV(device, dev);
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long used = other_usage(dev);
    if (used > g_total[dev]) used = g_total[dev];
    memory->total = g_total[dev];
    memory->used = used;
    memory->free = g_total[dev] - used;
    return NVML_SUCCESS;
}

/* The processes of `dev` whose kind contains `kind` ('c' or 'g'). */
static unsigned list_processes(int dev, char kind, nvmlProcessInfo_t *out)
{
    const char *s = getenv("FAKENVML_PROCESSES");
    char *copy = s && *s ? strdup(s) : NULL, *save = NULL;
    unsigned n = 0;
    for (char *t = copy ? strtok_r(copy, ",", &save) : NULL; t && n < FN_MAX_PROC; t = strtok_r(NULL, ",", &save)) {
        int d;
        unsigned pid;
        char mib[32] = "", kinds[8] = "c";
        if (sscanf(t, " %d:%u:%31[^:,]:%7s", &d, &pid, mib, kinds) < 3 || d != dev || !strchr(kinds, kind)) continue;
        out[n].pid = pid;
        out[n].usedGpuMemory = strcmp(mib, "-") == 0 ? (unsigned long long)NVML_VALUE_NOT_AVAILABLE
                                                     : strtoull(mib, NULL, 0) << 20;
        out[n].gpuInstanceId = out[n].computeInstanceId = 0xFFFFFFFFu;    /* MIG off */
        n++;
    }
    free(copy);
    return n;
}

static nvmlReturn_t processes(nvmlDevice_t device, unsigned int *infoCount, nvmlProcessInfo_t *infos, char kind)
{
    NEED_DEV(device, dev);
    if (!infoCount) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlProcessInfo_t all[FN_MAX_PROC];
    unsigned n = list_processes(dev, kind, all);
    if (*infoCount < n || (n && !infos)) {
        *infoCount = n;                    /* as the real one: the count needed */
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (n) memcpy(infos, all, n * sizeof *all);
    *infoCount = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos)
{
    return processes(device, infoCount, infos, 'c');
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                      nvmlProcessInfo_t *infos)
{
    return processes(device, infoCount, infos, 'g');
}

/* ------------------------------------------------------------------------ */
/* Clocks.                                                                  */
/* ------------------------------------------------------------------------ */

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, nvmlClockType_t type, unsigned int *clock)
{
    NEED_DEV(device, dev);
    if (!clock) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned mn, mx;
    switch ((int)type) {
    case NVML_CLOCK_MEM:
        lock_get(dev, &mn, &mx);
        *clock = mx && mx < k_mem_clocks[0] ? mx : k_mem_clocks[0];
        return NVML_SUCCESS;
    case NVML_CLOCK_GRAPHICS: case NVML_CLOCK_SM: *clock = 1410; return NVML_SUCCESS;
    case NVML_CLOCK_VIDEO: *clock = 1275; return NVML_SUCCESS;
    default: return NVML_ERROR_INVALID_ARGUMENT;
    }
}

nvmlReturn_t nvmlDeviceGetMaxClockInfo(nvmlDevice_t device, nvmlClockType_t type, unsigned int *clock)
{
    NEED_DEV(device, dev);
    (void)dev;
    if (!clock) return NVML_ERROR_INVALID_ARGUMENT;
    switch ((int)type) {
    case NVML_CLOCK_MEM: *clock = k_mem_clocks[0]; return NVML_SUCCESS;
    case NVML_CLOCK_GRAPHICS: case NVML_CLOCK_SM: *clock = 2100; return NVML_SUCCESS;
    case NVML_CLOCK_VIDEO: *clock = 1950; return NVML_SUCCESS;
    default: return NVML_ERROR_INVALID_ARGUMENT;
    }
}

nvmlReturn_t nvmlDeviceGetSupportedMemoryClocks(nvmlDevice_t device, unsigned int *count, unsigned int *clocksMHz)
{
    NEED_DEV(device, dev);
    (void)dev;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (*count < FN_NCLOCKS || !clocksMHz) {
        *count = FN_NCLOCKS;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    memcpy(clocksMHz, k_mem_clocks, sizeof k_mem_clocks);
    *count = FN_NCLOCKS;
    return NVML_SUCCESS;
}

static nvmlReturn_t clocks_allowed(void)
{
    if (env_flag("FAKENVML_CLOCKS_UNSUPPORTED")) return NVML_ERROR_NOT_SUPPORTED;
    if (env_flag("FAKENVML_NO_PERMISSION")) return NVML_ERROR_NO_PERMISSION;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceSetMemoryLockedClocks(nvmlDevice_t device, unsigned int minMemClockMHz,
                                             unsigned int maxMemClockMHz)
{
    NEED_DEV(device, dev);
    nvmlReturn_t rc = clocks_allowed();
    if (rc != NVML_SUCCESS) return rc;
    if (minMemClockMHz == 0 || maxMemClockMHz == 0 || minMemClockMHz > maxMemClockMHz)
        return NVML_ERROR_INVALID_ARGUMENT;
    return lock_set(dev, minMemClockMHz, maxMemClockMHz);
}

nvmlReturn_t nvmlDeviceResetMemoryLockedClocks(nvmlDevice_t device)
{
    NEED_DEV(device, dev);
    nvmlReturn_t rc = clocks_allowed();
    return rc != NVML_SUCCESS ? rc : lock_set(dev, 0, 0);
}
