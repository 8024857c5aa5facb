/*
 * oobleck_planner.h - public C API of the Oobleck planner.
 *
 * Conventions (see docs/planner.md):
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

/* ---- Templates and node specification (native/src/templates*.c) -------------------- */
/*
 * Decisions where docs/planner.md is silent (all mirrored by tests/planner/reference_templates.py):
 *   - GPU split: the stages of one node all use the same g, with g dividing G (the simplification
 *     docs/planner.md allows). A node thus hosts q = G / g stages, q a divisor of G.
 *   - Ties (relative tolerance eps = 1e-9): T* = min T(m_ref) over all layouts; M* = the smallest
 *     bottleneck among layouts with T <= T* (1 + eps); the tie set is every layout with
 *     max_s L_s <= M* (1 + eps) and sum_s L_s <= T* (1 + eps) - (m_ref - 1) M*. Within it: fewest
 *     stages, then the lexicographically smallest list of stage boundaries (the ends of stages
 *     0 .. S-2), then the lexicographically smallest list of per-stage GPU counts.
 *   - Sizes in [n0, n_max] with no feasible layout get no template and are left out of the sums
 *     that define `uncovered`. min_nodes = 0 means "smallest feasible n".
 *   - Only n <= min(N, L) can have a template (every stage needs a layer). N is limited to
 *     1,000,000 nodes and the DP tables to OBK_TEMPLATES_MAX_CELLS cells (else OBK_ENOMEM).
 *   - memory_bytes of a stage is ceil(M_s). m_ref = max(1, floor(B n / N + 1/2)) in integers.
 *   - Inputs whose costs could overflow a double (a stage latency bound times L + B is not
 *     finite) are OBK_EINVAL ("costs too large").
 *   - Infeasible memory: the message names the layer that does not fit even alone on a whole node
 *     with one microbatch in flight, or else the worst stage of the finest layout the cluster
 *     allows (min(L, N) equal-layer-count stages, one per node, all G GPUs).
 * Algorithm (exact; gap is always 0): T* = min over caps V of min_sum(n, V) + (m-1) V, where
 * min_sum(n, V) is the least sum of latencies over layouts whose stages all have L_s <= V, and
 * it suffices to try every distinct stage latency as V. min_sum comes from a backward DP over
 * (first layer, nodes left, node's stage count, stages left in the node); the in-flight count k
 * matters only for memory, so the DP first runs without it (memory checked optimistically) and
 * its best layout is re-checked with its real k; only when that fails does an exact DP with k
 * run, over the states that can still be optimal. Caps are searched by branch and bound
 * (T >= min_sum(V_r) + (m-1) V_{l+1} on (V_l, V_r)), and a layout found under a cap also bounds
 * every cap down to its own bottleneck. The layout is then rebuilt front to back under the tie
 * rules from an exact DP (with k) over the states within the tie budget.
 * Limits: the DP tables hold OBK_TEMPLATES_MAX_CELLS doubles at most (about 130 MB; e.g. 160
 * layers x 64 nodes x 8 GPUs needs 7.4 M); beyond that OBK_ENOMEM says so.
 */

#define OBK_TEMPLATES_MAX_CELLS 16777216

typedef struct {
    int32_t layer_start; /* layers [layer_start, layer_end) */
    int32_t layer_end;
    int32_t node;        /* index of the node within the template */
    int32_t gpus;
    double latency_ms;   /* L_s */
    double memory_bytes; /* ceil(M_s), per GPU */
} obk_stage;

typedef struct {
    int32_t num_nodes;
    int32_t num_stages;
    int32_t first_stage;  /* index of stage 0 in the caller's stage array */
    int32_t microbatches; /* m_ref */
    double iteration_ms;  /* T(m_ref) */
    double bottleneck_ms; /* max_s L_s */
    double sum_latency_ms;
    double gap;           /* relative gap to a proven lower bound; 0 when exact */
} obk_template;

typedef struct {
    int32_t min_nodes; /* n0 */
    int32_t max_nodes; /* n_max */
    int32_t ft;
    int32_t range_lo;  /* guaranteed range [(f+1) n0, N] */
    int32_t range_hi;
    int32_t num_templates;
    int32_t num_stages;    /* total over all templates */
    int32_t num_uncovered;
} obk_node_spec;

/*
 * Plan the templates for every size in [n0, n_max] and the node specification.
 * min_nodes: n0, or 0 for the smallest feasible n. Outputs are caller-allocated with the given
 * capacities; if one is too small the function returns OBK_ERANGE with spec's counts filled in
 * (call again with larger arrays). Errors: OBK_EINVAL (bad input, too few nodes for ft),
 * OBK_EINFEASIBLE (memory), OBK_ENOMEM.
 */
obk_status obk_plan_templates(const obk_layer *layers, int32_t num_layers, const obk_cluster *cluster,
                              int32_t ft, int32_t microbatches, int32_t min_nodes,
                              obk_node_spec *spec, obk_template *templates, int32_t max_templates,
                              obk_stage *stages, int32_t max_stages, int32_t *uncovered,
                              int32_t max_uncovered, char *err, size_t err_len);


/* ---- Instantiation and batch distribution (native/src/instantiate*.c, batch_split.c) */

/* Cost of one pipeline template for the batch split: T(m) = sum_latency_ms + (m-1) * bottleneck_ms. */
typedef struct {
    int32_t num_nodes;     /* template size n_t (strictly ascending across a template list) */
    double sum_latency_ms; /* sum_s L_s */
    double bottleneck_ms;  /* max_s L_s */
} obk_pipeline_cost;

/* Summary of an instantiation; per-pipeline results go to the caller's arrays. */
typedef struct {
    int32_t num_pipelines; /* P */
    int32_t used_nodes;    /* nodes in pipelines; the remaining ones (the last in the caller's order) are spares */
    int32_t degraded;      /* 1 when fewer than ft+1 pipelines (fewer than (ft+1)*n0 nodes) */
    double max_pipeline_ms; /* Z = max_p T_p(m_p) */
    double sync_ms;         /* 1000 * 2 * (P-1)/P * W / inter_node_bytes_per_s */
    double iteration_ms;    /* Z + sync_ms */
} obk_instantiation;

/*
 * Choose template counts for `num_nodes` nodes and split `microbatches` among the pipelines
 * (docs/planner.md). Exact; a DP over (pipelines, nodes) for
 * each candidate bottleneck, no enumeration of mixes. Pipelines are written by template size
 * ascending: pipeline_template[i] is an index into `templates`, pipeline_microbatches[i] its
 * share, pipeline_ms[i] = T(share). `capacity` must be >= num_nodes / templates[0].num_nodes.
 * Errors: OBK_EINVAL (malformed input), OBK_EINFEASIBLE (too few nodes, microbatches < pipelines),
 * OBK_ERANGE (capacity too small), OBK_ENOMEM.
 */
obk_status obk_instantiate(const obk_pipeline_cost *templates, int32_t num_templates, int32_t num_nodes,
                           int32_t ft, int32_t microbatches, double max_node_param_bytes,
                           double inter_node_bytes_per_s, int32_t *pipeline_template,
                           int32_t *pipeline_microbatches, double *pipeline_ms, int32_t capacity,
                           obk_instantiation *out, char *err, size_t err_len);

/*
 * Canonical batch split: every pipeline starts with 1 microbatch, the rest go one at a time to
 * the pipeline with the smallest T_p(m_p + 1) (exact comparison; ties: lower index).
 * OBK_EINFEASIBLE when microbatches < num_pipelines.
 */
obk_status obk_distribute_batch(const obk_pipeline_cost *pipelines, int32_t num_pipelines, int32_t microbatches,
                                int32_t *out_microbatches, double *out_ms, char *err, size_t err_len);

/* ---- Reconfiguration and layer-copy plan (native/src/reconfigure.c) ---------------- */

/*
 * Reconfiguration policy steps 1-4 (docs/planner.md). Pipelines are given flattened: `nodes` holds
 * the node ids of pipeline 0, then pipeline 1, ...; `sizes[i]` is the length of pipeline i.
 * Lost ids that are in no pipeline are ignored. Output in the same flattened form; out_nodes
 * needs room for every input node, out_sizes for num_pipelines entries.
 * OBK_EINFEASIBLE "insufficient nodes ..." when the survivors cannot form a pipeline of min_nodes.
 */
obk_status obk_reconfigure_pipelines(const int64_t *nodes, const int32_t *sizes, int32_t num_pipelines,
                                     const int64_t *lost, int32_t num_lost, int32_t min_nodes,
                                     int64_t *out_nodes, int32_t *out_sizes, int32_t *out_num_pipelines,
                                     char *err, size_t err_len);

/*
 * Compacted ranks: pipelines in order, nodes in pipeline order, GPUs in node order.
 * first_rank[j] is the first of the gpus_per_node consecutive ranks of the j-th node
 * (flattened order); returns the world size in *world_size.
 */
obk_status obk_compact_ranks(const int32_t *sizes, int32_t num_pipelines, int32_t gpus_per_node,
                             int64_t *first_rank, int64_t *world_size, char *err, size_t err_len);

/* The contiguous layer range [layer_start, layer_end) a node holds. */
typedef struct {
    int64_t node;
    int32_t layer_start;
    int32_t layer_end;
} obk_holding;

/* One layer copy: `bytes` = param_bytes * (optimizer_state_factor - 1). */
typedef struct {
    int32_t layer;
    int64_t src;
    int64_t dst;
    double bytes;
} obk_copy;

/*
 * Layer-copy plan (docs/planner.md). `before`: the ranges every node held in the
 * last completed generation (lost nodes included or not; a lost node is never a source);
 * `after`: the ranges every node of the new plan needs (each node once). Each missing
 * (node, layer) is copied from a surviving holder: layers ascending, then destinations by node
 * id ascending, each to the holder that has sent the fewest bytes so far (ties: lowest id).
 * Layers needed but without a surviving holder go to restore_layers (ascending) and are not
 * copied. `copies` needs room for every missing pair (sum of the after ranges is enough),
 * restore_layers for num_layers entries. copy_ms = 1000 * max over nodes of
 * max(sent, received) / inter_node_bytes_per_s.
 */
obk_status obk_plan_copies(const obk_layer *layers, int32_t num_layers, double optimizer_state_factor,
                           double inter_node_bytes_per_s, const obk_holding *before, int32_t num_before,
                           const int64_t *lost, int32_t num_lost, const obk_holding *after, int32_t num_after,
                           obk_copy *copies, int32_t copies_capacity, int32_t *num_copies,
                           int32_t *restore_layers, int32_t *num_restore, double *copy_ms, char *err,
                           size_t err_len);

#ifdef __cplusplus
}
#endif

#endif /* OOBLECK_PLANNER_H */
