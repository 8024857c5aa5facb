/*
 * Internal interface of instantiation and batch distribution (obk_instantiate,
 * obk_distribute_batch; docs/planner.md), shared by its units:
 *   instantiate.c         the entry point and its phases; the method is described there
 *   instantiate_checks.c  the argument checks
 *   instantiate_dp.c      the DP tables: node counts pipelines can cover, capacity at a bound z
 *   instantiate_search.c  the search over bounds z and pipeline counts
 *   instantiate_trace.c   the lexicographically smallest count vector for the chosen (z, P)
 *   batch_split.c         the canonical greedy batch split
 * No global or static mutable state: every table is allocated per call.
 */
#ifndef OBK_INSTANTIATE_INTERNAL_H
#define OBK_INSTANTIATE_INTERNAL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "oobleck_planner.h"

#define MAX_MICROBATCHES (1 << 28)
#define MAX_NODES (1 << 20)
#define NEG (-(1 << 30))
/* Guard for the reconstruction tables (int32 entries). */
#define MAX_TABLE_ENTRIES ((size_t)1 << 25)

/* T(m) = sum_latency + (m-1) * bottleneck, the same expression as Template.time_ms. */
static inline double t_ms(const obk_pipeline_cost *c, int64_t m)
{
    return c->sum_latency_ms + (double)(m - 1) * c->bottleneck_ms;
}

/* Gradient synchronisation across p pipelines: W bytes per node over the inter-node links. */
static inline double sync_ms(int32_t p, double w, double bw)
{
    return 1000.0 * 2.0 * (double)(p - 1) / (double)p * w / bw;
}

/* c_t(z) capped at b; 0 when even one microbatch takes longer than z. */
static inline int32_t capacity_at(const obk_pipeline_cost *c, double z, int32_t b)
{
    if (c->sum_latency_ms > z)
        return 0;
    if (c->bottleneck_ms <= 0.0)
        return b;
    double q = floor((z - c->sum_latency_ms) / c->bottleneck_ms);
    int64_t m = q >= (double)b ? (int64_t)b : (int64_t)q + 1;
    if (m < 1)
        m = 1;
    /* Correct rounding so that exactly T(m) <= z < T(m+1), evaluated as t_ms computes it. */
    while (m > 1 && t_ms(c, m) > z)
        m--;
    while (m < b && t_ms(c, m + 1) <= z)
        m++;
    return (int32_t)m;
}

#if defined(__GNUC__) && !defined(__clang__)
#define OBK_HOT __attribute__((optimize("O3")))
#else
#define OBK_HOT
#endif

/* dst[n] = max(dst[n], src[n] + c): the DP's inner loop, kept simple so that it vectorises. */
static inline OBK_HOT void relax(int32_t *restrict dst, const int32_t *restrict src, int32_t len, int32_t c)
{
    for (int32_t n = 0; n < len; n++) {
        int32_t v = src[n] + c;
        dst[n] = v > dst[n] ? v : dst[n];
    }
}

/* Invalid (negative) sums back to NEG, valid ones capped at b. */
static inline OBK_HOT void clamp(int32_t *restrict row, int32_t len, int32_t b)
{
    for (int32_t n = 0; n < len; n++) {
        int32_t v = row[n];
        v = v > b ? b : v;
        row[n] = v < 0 ? NEG : v;
    }
}

/* The state of the search over bounds z (instantiate_dp.c, instantiate_search.c). */
typedef struct {
    const obk_pipeline_cost *tpl;
    int32_t nt;
    int32_t m_used; /* M' */
    int32_t b;
    int32_t p_lo, p_hi; /* pipelines counts allowed (p_hi already limited to what reaches M') */
    const uint8_t *reaches; /* reaches[p] != 0 iff p pipelines can cover exactly M' nodes */
    int32_t *cap;           /* [nt] capacities at the current z */
    int32_t *row0, *row1;   /* DP rows [m_used + 1] */
    int32_t *dp1;           /* [(p_lo + 1) * (m_used + 1)] for the pipeline-count-free check */
    int32_t exact_limit;    /* the count-free check is exact when plimit >= this */
} search_ctx;

/* The pipeline counts obk_instantiate may use, from its arguments. */
typedef struct {
    int32_t n0;       /* the smallest template size */
    int degraded;     /* fewer than (ft+1) n0 nodes */
    int32_t p_lo;     /* ft + 1, or 1 when degraded */
    int32_t p_hi;     /* min(B, M / n0) */
    int32_t p_all;    /* M / n0: the most pipelines on M nodes, ignoring B */
} inst_limits;

/* ---- instantiate_checks.c -------------------------------------------------------------- */

obk_status inst_check_costs(const obk_pipeline_cost *c, int32_t n, const char *what, int ascending, char *err,
                            size_t err_len);
obk_status inst_validate_args(const obk_pipeline_cost *templates, int32_t num_templates, int32_t num_nodes,
                              int32_t ft, int32_t microbatches, double max_node_param_bytes,
                              double inter_node_bytes_per_s, const int32_t *pipeline_template,
                              const int32_t *pipeline_microbatches, const double *pipeline_ms, int32_t capacity,
                              const obk_instantiation *out, inst_limits *lim, char *err, size_t err_len);

/* ---- instantiate_dp.c ------------------------------------------------------------------ */

int32_t inst_pmin_at(search_ctx *s, double z, int32_t plimit);
int inst_feasible(search_ctx *s, double z, int32_t plimit);
obk_status inst_usable_nodes(const obk_pipeline_cost *templates, int32_t num_templates, int32_t M,
                             const inst_limits *lim, uint8_t *reaches, int32_t *mu, char *err, size_t err_len);

/* ---- instantiate_search.c -------------------------------------------------------------- */

void inst_search(search_ctx *s, double w, double bw, double *best_z, int32_t *best_p);

/* ---- instantiate_trace.c --------------------------------------------------------------- */

obk_status inst_reconstruct(const obk_pipeline_cost *tpl, int32_t nt, const int32_t *cap, int32_t p, int32_t mu,
                            int32_t b, int32_t *counts, char *err, size_t err_len);

/* ---- batch_split.c --------------------------------------------------------------------- */

obk_status inst_split(const obk_pipeline_cost *costs, const int32_t *idx, int32_t n, int32_t b, int32_t *m,
                      double *ms, char *err, size_t err_len);

#endif
