/*
 * oobleck_planner.h - public C API of the Oobleck planner.
 *
 * Conventions (see shared/design/style.md and planner.md):
 *   - Every function returns an obk_status; OBK_OK (0) is success.
 *   - Outputs are caller-allocated; the planner never keeps pointers to them.
 *   - On failure a function writes one human-readable line, NUL-terminated and
 *     truncated to fit, into the caller's `err` buffer (which may be NULL when
 *     err_len is 0). The Python wrapper turns (status, err) into an exception.
 *   - There is no global or static mutable state: every function is safe to
 *     call from several threads at once.
 *   - Units: times in milliseconds, sizes in bytes. Byte counts are carried as
 *     doubles so that the C side can itself reject negative, fractional and
 *     non-finite values and name the offending field (doubles hold integers
 *     exactly up to 2^53 bytes, far beyond any GPU).
 */
#ifndef OOBLECK_PLANNER_H
#define OOBLECK_PLANNER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int32_t obk_status;

enum {
    OBK_OK = 0,
    OBK_EINVAL = 1,      /* an input is malformed or out of range */
    OBK_EINFEASIBLE = 2, /* inputs are valid but no plan satisfies the constraints */
    OBK_ENOMEM = 3,      /* allocation failed */
    OBK_ERANGE = 4       /* a caller-allocated output is too small */
};

/* Suggested size of the caller's error buffer. */
#define OBK_ERR_LEN 512

/* Measured cost of one layer for one microbatch size (oobleck-profile/1). */
typedef struct {
    double forward_ms;
    double backward_ms;
    double param_bytes;
    double activation_bytes;
    double output_bytes;
} obk_layer;

/* Version string of the planner library, static storage. */
const char *obk_version(void);

/*
 * Validate a profile: at least one layer; every time finite and >= 0; every
 * byte count finite, >= 0 and integral. The first violation is reported as
 * "layer <i>: <field> must be ..., got <value>".
 */
obk_status obk_validate_profile(const obk_layer *layers, int32_t num_layers,
                                char *err, size_t err_len);

/* ---- Cluster (shared by the sections below) ---------------------------------------- */
/* Mirrors oobleck.planner.types.Cluster; bandwidths in bytes per second. */
typedef struct {
    int32_t num_nodes;
    int32_t gpus_per_node;
    double gpu_memory_bytes;
    double reserved_bytes;
    double intra_node_bytes_per_s;
    double inter_node_bytes_per_s;
    double optimizer_state_factor;
} obk_cluster;

/* ---- Templates and node specification (native/src/templates.c) --------------------- */

/* ---- Instantiation and batch distribution (native/src/instantiate.c) --------------- */

/* ---- Reconfiguration and layer-copy plan (native/src/reconfigure.c) ---------------- */

#ifdef __cplusplus
}
#endif

#endif /* OOBLECK_PLANNER_H */
