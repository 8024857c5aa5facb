/*
 * Argument checks of obk_instantiate and obk_distribute_batch (docs/planner.md, "Instantiation
 * and batch distribution"). See instantiate_internal.h.
 */
#include <math.h>
#include <stdint.h>

#include "errors.h"
#include "instantiate_internal.h"

/* n pipeline costs: sizes in 1..MAX_NODES (strictly ascending if asked), times finite and >= 0. */
obk_status inst_check_costs(const obk_pipeline_cost *c, int32_t n, const char *what, int ascending, char *err,
                            size_t err_len)
{
    if (n <= 0)
        return obk_fail(OBK_EINVAL, err, err_len, "%s: at least one is required, got %d", what, (int)n);
    if (c == NULL)
        return obk_fail(OBK_EINVAL, err, err_len, "%s: pointer is NULL", what);
    for (int32_t i = 0; i < n; i++) {
        if (c[i].num_nodes < 1 || c[i].num_nodes > MAX_NODES)
            return obk_fail(OBK_EINVAL, err, err_len, "%s[%d].num_nodes must be in 1..%d, got %d", what, (int)i,
                            MAX_NODES, (int)c[i].num_nodes);
        if (ascending && i > 0 && c[i].num_nodes <= c[i - 1].num_nodes)
            return obk_fail(OBK_EINVAL, err, err_len,
                            "%s[%d].num_nodes must be larger than the previous template's (%d), got %d", what,
                            (int)i, (int)c[i - 1].num_nodes, (int)c[i].num_nodes);
        if (!isfinite(c[i].sum_latency_ms) || c[i].sum_latency_ms < 0.0)
            return obk_fail(OBK_EINVAL, err, err_len, "%s[%d].sum_latency_ms must be finite and >= 0, got %g",
                            what, (int)i, c[i].sum_latency_ms);
        if (!isfinite(c[i].bottleneck_ms) || c[i].bottleneck_ms < 0.0)
            return obk_fail(OBK_EINVAL, err, err_len, "%s[%d].bottleneck_ms must be finite and >= 0, got %g", what,
                            (int)i, c[i].bottleneck_ms);
    }
    return OBK_OK;
}

/*
 * The argument checks of obk_instantiate, in order, then the pipeline counts its arguments
 * allow (into *lim): too few nodes, too small an output capacity and fewer microbatches than
 * ft + 1 pipelines fail here.
 */
obk_status inst_validate_args(const obk_pipeline_cost *templates, int32_t num_templates, int32_t num_nodes,
                              int32_t ft, int32_t microbatches, double max_node_param_bytes,
                              double inter_node_bytes_per_s, const int32_t *pipeline_template,
                              const int32_t *pipeline_microbatches, const double *pipeline_ms, int32_t capacity,
                              const obk_instantiation *out, inst_limits *lim, char *err, size_t err_len)
{
    obk_status st = inst_check_costs(templates, num_templates, "templates", 1, err, err_len);
    if (st != OBK_OK)
        return st;
    if (num_nodes < 0 || num_nodes > MAX_NODES)
        return obk_fail(OBK_EINVAL, err, err_len, "nodes must be in 0..%d, got %d", MAX_NODES, (int)num_nodes);
    if (ft < 0)
        return obk_fail(OBK_EINVAL, err, err_len, "ft must be >= 0, got %d", (int)ft);
    if (microbatches < 1 || microbatches > MAX_MICROBATCHES)
        return obk_fail(OBK_EINVAL, err, err_len, "microbatches must be in 1..%d, got %d", MAX_MICROBATCHES,
                        (int)microbatches);
    if (!isfinite(max_node_param_bytes) || max_node_param_bytes < 0.0)
        return obk_fail(OBK_EINVAL, err, err_len, "max_node_param_bytes must be finite and >= 0, got %g",
                        max_node_param_bytes);
    if (!isfinite(inter_node_bytes_per_s) || inter_node_bytes_per_s <= 0.0)
        return obk_fail(OBK_EINVAL, err, err_len, "inter_node_bytes_per_s must be finite and > 0, got %g",
                        inter_node_bytes_per_s);
    if (out == NULL || pipeline_template == NULL || pipeline_microbatches == NULL || pipeline_ms == NULL)
        return obk_fail(OBK_EINVAL, err, err_len, "output pointers must not be NULL");

    const int32_t n0 = templates[0].num_nodes, M = num_nodes, B = microbatches;
    if (M < n0)
        return obk_fail(OBK_EINFEASIBLE, err, err_len,
                        "too few nodes: %d available, the smallest pipeline template needs %d", (int)M, (int)n0);
    if (capacity < M / n0)
        return obk_fail(OBK_ERANGE, err, err_len, "output capacity %d is below the possible %d pipelines",
                        (int)capacity, (int)(M / n0));
    int degraded = (int64_t)M < (int64_t)(ft + 1) * n0;
    int32_t p_lo = degraded ? 1 : ft + 1;
    if (B < p_lo)
        return obk_fail(OBK_EINFEASIBLE, err, err_len,
                        "microbatches (%d) must be >= the number of pipelines (%d = ft + 1): every pipeline needs one",
                        (int)B, (int)p_lo);
    lim->n0 = n0;
    lim->degraded = degraded;
    lim->p_lo = p_lo;
    lim->p_hi = M / n0 < B ? M / n0 : B;
    lim->p_all = M / n0;
    return OBK_OK;
}
