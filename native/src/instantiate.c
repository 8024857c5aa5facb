/*
 * Instantiation and batch distribution (docs/planner.md).
 *
 * Problem: choose counts k_t of templates (sizes n_t) with sum k_t n_t = M' (the most nodes that
 * can be used, normally M) and P = sum k_t in [P_lo, P_hi] (P_lo = ft+1, or 1 when degraded;
 * P_hi = min(B, M / n0)), then split B microbatches to minimise Z = max_p T_p(m_p); the plan
 * minimises Z + sync(P), ties: fewer pipelines, then the count vector lexicographically smallest.
 *
 * Method (exact, no enumeration of mixes):
 *   - For a bound z, a pipeline of template t can take c_t(z) = #{m >= 1 : T_t(m) <= z}
 *     microbatches, so a mix reaches Z <= z iff sum c_t(z) >= B. A DP over (pipelines p, nodes n)
 *     gives the largest total capacity of p pipelines on n nodes; pmin(z) is the fewest pipelines
 *     (>= P_lo) on exactly M' nodes with capacity >= B. pmin is non-increasing in z. Cheaper
 *     screens first: the relaxation mu * max_t c_t / n_t, then a DP over node counts alone
 *     (pipeline count tracked only up to P_lo), which is exact when the pipeline limit cannot bind.
 *   - The optimum is at a breakpoint of pmin: the smallest feasible z (binary search over the
 *     candidate values T_t(m), starting from the relaxation's bound) gives P0; then repeatedly
 *     the smallest z at which fewer pipelines become feasible, for the pipeline counts p whose
 *     lower bound max(z, min_t T_t(ceil(B/p))) + sync(p) can still match the best estimate.
 *   - For the chosen (z, P) the lexicographically smallest count vector is reconstructed from
 *     suffix tables over templates (every sqrt(T)-th table kept, the others recomputed), then
 *     the canonical greedy split gives each m_p.
 * Ties: estimates within a relative 1e-9 are equal (then fewer pipelines); the batch split and
 * the feasibility of a bound compare exactly (T_t(m) evaluated as sum_latency + (m-1) * bottleneck,
 * the same expression as Template.time_ms).
 *
 * This file holds the entry point and its phases (checks, node counts, search, trace, split); the
 * units that implement them are listed in instantiate_internal.h.
 */
#include <stdint.h>
#include <stdlib.h>

#include "errors.h"
#include "instantiate_internal.h"
#include "oobleck_planner.h"

/*
 * Which pipeline counts cover exactly M' nodes: the smallest one >= p_lo (*lo), the largest
 * <= p_hi (*hi) and the largest overall (*all); 0 when none.
 */
static void reach_range(const uint8_t *reaches, const inst_limits *lim, int32_t *lo, int32_t *hi, int32_t *all)
{
    *lo = *hi = *all = 0;
    for (int32_t p = lim->p_lo; p <= lim->p_all; p++)
        if (reaches[p]) {
            if (!*lo)
                *lo = p;
            if (p <= lim->p_hi)
                *hi = p;
            *all = p;
        }
}

/* The pipelines of the chosen mix (template sizes ascending), their split and the summary. */
static obk_status write_plan(const obk_pipeline_cost *templates, int32_t num_templates, const int32_t *counts,
                             int32_t best_p, int32_t mu, int32_t B, int degraded, double max_node_param_bytes,
                             double inter_node_bytes_per_s, int32_t *pipeline_template,
                             int32_t *pipeline_microbatches, double *pipeline_ms, obk_instantiation *out, char *err,
                             size_t err_len)
{
    int32_t k = 0;
    for (int32_t t = 0; t < num_templates; t++)
        for (int32_t j = 0; j < counts[t]; j++)
            pipeline_template[k++] = t;
    obk_status rc = inst_split(templates, pipeline_template, best_p, B, pipeline_microbatches, pipeline_ms, err,
                               err_len);
    if (rc != OBK_OK)
        return rc;
    double zz = 0.0;
    for (int32_t i = 0; i < best_p; i++)
        zz = pipeline_ms[i] > zz ? pipeline_ms[i] : zz;
    out->num_pipelines = best_p;
    out->used_nodes = mu;
    out->degraded = degraded;
    out->max_pipeline_ms = zz;
    out->sync_ms = sync_ms(best_p, max_node_param_bytes, inter_node_bytes_per_s);
    out->iteration_ms = zz + out->sync_ms;
    return OBK_OK;
}

obk_status obk_instantiate(const obk_pipeline_cost *templates, int32_t num_templates, int32_t num_nodes, int32_t ft,
                           int32_t microbatches, double max_node_param_bytes, double inter_node_bytes_per_s,
                           int32_t *pipeline_template, int32_t *pipeline_microbatches, double *pipeline_ms,
                           int32_t capacity, obk_instantiation *out, char *err, size_t err_len)
{
    inst_limits lim;
    obk_status rc = inst_validate_args(templates, num_templates, num_nodes, ft, microbatches, max_node_param_bytes,
                                       inter_node_bytes_per_s, pipeline_template, pipeline_microbatches,
                                       pipeline_ms, capacity, out, &lim, err, err_len);
    if (rc != OBK_OK)
        return rc;
    const int32_t M = num_nodes, B = microbatches;
    uint8_t *reaches = calloc((size_t)lim.p_all + 1, 1);
    int32_t *dp1 = NULL;
    int32_t *cap = malloc(sizeof(int32_t) * (size_t)num_templates);
    int32_t *row0 = malloc(sizeof(int32_t) * ((size_t)M + 1)), *row1 = malloc(sizeof(int32_t) * ((size_t)M + 1));
    int32_t *counts = malloc(sizeof(int32_t) * (size_t)num_templates);
    if (!reaches || !cap || !row0 || !row1 || !counts) {
        rc = obk_fail(OBK_ENOMEM, err, err_len, "out of memory planning the instantiation");
        goto done;
    }

    /* Node counts: M' = mu, the most nodes usable, and the pipeline counts that cover it. */
    int32_t mu = -1, lo_reach, hi_reach, all_reach;
    if ((rc = inst_usable_nodes(templates, num_templates, M, &lim, reaches, &mu, err, err_len)) != OBK_OK)
        goto done;
    reach_range(reaches, &lim, &lo_reach, &hi_reach, &all_reach);

    /* Search: the bound z and the pipeline count P. */
    dp1 = malloc(sizeof(int32_t) * ((size_t)lo_reach + 2) * ((size_t)mu + 1));
    if (dp1 == NULL) {
        rc = obk_fail(OBK_ENOMEM, err, err_len, "out of memory planning the instantiation");
        goto done;
    }
    search_ctx s = {templates, num_templates, mu, B, lo_reach, hi_reach, reaches, cap, row0, row1, dp1, all_reach};
    double best_z;
    int32_t best_p;
    inst_search(&s, max_node_param_bytes, inter_node_bytes_per_s, &best_z, &best_p);

    /* Trace: the count vector at (best_z, best_p), then the split. */
    for (int32_t t = 0; t < num_templates; t++)
        cap[t] = templates[t].num_nodes <= mu ? capacity_at(&templates[t], best_z, B) : 0;
    rc = inst_reconstruct(templates, num_templates, cap, best_p, mu, B, counts, err, err_len);
    if (rc != OBK_OK)
        goto done;
    rc = write_plan(templates, num_templates, counts, best_p, mu, B, lim.degraded, max_node_param_bytes,
                    inter_node_bytes_per_s, pipeline_template, pipeline_microbatches, pipeline_ms, out, err, err_len);
done:
    free(reaches);
    free(dp1);
    free(cap);
    free(row0);
    free(row1);
    free(counts);
    return rc;
}
