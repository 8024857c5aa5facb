/*
 * Checks of obk_plan_templates (docs/planner.md, "Pipeline templates" and "Node
 * specification"): its arguments, the range of its costs, the explanation given when no layout
 * fits in memory, and the node counts no mix of templates covers. See templates_internal.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "templates_internal.h"

static obk_status validate_cluster(const obk_cluster *cl, char *err, size_t err_len)
{
    if (cl == NULL)
        return obk_fail(OBK_EINVAL, err, err_len, "cluster pointer is NULL");
    if (cl->num_nodes < 1)
        return obk_fail(OBK_EINVAL, err, err_len, "nodes: must be >= 1, got %d", (int)cl->num_nodes);
    if (cl->num_nodes > MAX_CLUSTER_NODES)
        return obk_fail(OBK_EINVAL, err, err_len, "nodes: at most %d supported, got %d", MAX_CLUSTER_NODES,
                        (int)cl->num_nodes);
    if (cl->gpus_per_node < 1)
        return obk_fail(OBK_EINVAL, err, err_len, "gpus_per_node: must be >= 1, got %d", (int)cl->gpus_per_node);
    if (!isfinite(cl->gpu_memory_bytes) || cl->gpu_memory_bytes <= 0)
        return obk_fail(OBK_EINVAL, err, err_len, "gpu_memory_bytes: must be finite and > 0, got %g",
                        cl->gpu_memory_bytes);
    if (!isfinite(cl->reserved_bytes) || cl->reserved_bytes < 0 || cl->reserved_bytes >= cl->gpu_memory_bytes)
        return obk_fail(OBK_EINVAL, err, err_len,
                        "reserved_bytes: must be >= 0 and < gpu_memory_bytes (%.0f), got %g", cl->gpu_memory_bytes,
                        cl->reserved_bytes);
    if (!isfinite(cl->intra_node_bytes_per_s) || cl->intra_node_bytes_per_s <= 0)
        return obk_fail(OBK_EINVAL, err, err_len, "intra_node_bytes_per_s: must be finite and > 0, got %g",
                        cl->intra_node_bytes_per_s);
    if (!isfinite(cl->inter_node_bytes_per_s) || cl->inter_node_bytes_per_s <= 0)
        return obk_fail(OBK_EINVAL, err, err_len, "inter_node_bytes_per_s: must be finite and > 0, got %g",
                        cl->inter_node_bytes_per_s);
    if (!isfinite(cl->optimizer_state_factor) || cl->optimizer_state_factor <= 0)
        return obk_fail(OBK_EINVAL, err, err_len, "optimizer_state_factor: must be finite and > 0, got %g",
                        cl->optimizer_state_factor);
    return OBK_OK;
}

/* The argument checks of obk_plan_templates, in order; clears *spec once it is known valid. */
obk_status tpl_validate_args(const obk_layer *layers, int32_t num_layers, const obk_cluster *cluster,
                             int32_t ft, int32_t microbatches, int32_t min_nodes, obk_node_spec *spec,
                             const obk_template *templates, int32_t max_templates, const obk_stage *stages,
                             int32_t max_stages, const int32_t *uncovered, int32_t max_uncovered, char *err,
                             size_t err_len)
{
    obk_status st = obk_validate_profile(layers, num_layers, err, err_len);
    if (st != OBK_OK)
        return st;
    if ((st = validate_cluster(cluster, err, err_len)) != OBK_OK)
        return st;
    if (spec == NULL)
        return obk_fail(OBK_EINVAL, err, err_len, "spec pointer is NULL");
    memset(spec, 0, sizeof(*spec));
    if (max_templates < 0 || max_stages < 0 || max_uncovered < 0 || (max_templates > 0 && templates == NULL) ||
        (max_stages > 0 && stages == NULL) || (max_uncovered > 0 && uncovered == NULL))
        return obk_fail(OBK_EINVAL, err, err_len, "output arrays: NULL pointer or negative capacity");
    if (ft < 0)
        return obk_fail(OBK_EINVAL, err, err_len, "ft: must be >= 0, got %d", (int)ft);
    if (microbatches < 1)
        return obk_fail(OBK_EINVAL, err, err_len, "microbatches: must be >= 1, got %d", (int)microbatches);
    const int32_t N = cluster->num_nodes, L = num_layers;
    const int32_t Jall = imin32(N, L);
    if (min_nodes < 0 || min_nodes > Jall)
        return obk_fail(OBK_EINVAL, err, err_len, "min_nodes: must be between 1 and min(nodes, layers) = %d, got %d",
                        (int)Jall, (int)min_nodes);
    if (min_nodes > 0 && (int64_t)N < ((int64_t)ft + 1) * min_nodes)
        return obk_fail(OBK_EINVAL, err, err_len,
                        "too few nodes for ft: %d nodes < (ft+1)*min_nodes = (%d+1)*%d = %lld", (int)N, (int)ft,
                        (int)min_nodes, (long long)(((int64_t)ft + 1) * min_nodes));
    return OBK_OK;
}

/* Every cost must stay finite: bound the largest stage latency and T(m). */
obk_status tpl_check_cost_range(const ctx_t *c, int32_t microbatches, char *err, size_t err_len)
{
    const int32_t L = c->L;
    double maxlink = 0.0;
    for (int32_t b = 1; b < L; b++) {
        if (c->c_intra[b] > maxlink)
            maxlink = c->c_intra[b];
        if (c->c_inter[b] > maxlink)
            maxlink = c->c_inter[b];
    }
    double worst = c->W[L] + 2000.0 * c->P[L] / c->intra_bw + 2.0 * maxlink;
    if (!isfinite(worst) || !isfinite(worst * ((double)L + (double)microbatches)))
        return obk_fail(OBK_EINVAL, err, err_len,
                        "costs too large: a stage latency can reach %g ms, so T(m) overflows with %d "
                        "microbatches; check the profile's times and the cluster's bandwidths",
                        worst, (int)microbatches);
    return OBK_OK;
}

/* Explain why no layout fits in memory (see the header for which layout is described). */
obk_status tpl_memory_failure(const ctx_t *c, const obk_cluster *cl, char *err, size_t err_len)
{
    const int32_t L = c->L, G = c->G;
    int32_t worst = -1;
    double worst_need = 0.0;
    for (int32_t i = 0; i < L; i++) {
        double need = stage_memory(c, i, i + 1, G, 1);
        if (need > c->mcap && (worst < 0 || need > worst_need)) {
            worst = i;
            worst_need = need;
        }
    }
    if (worst >= 0)
        return obk_fail(OBK_EINFEASIBLE, err, err_len,
                        "no layout fits in GPU memory: layer %d alone on all %d GPUs of a node with 1 "
                        "microbatch in flight needs %.0f bytes per GPU, %.0f more than the %.0f "
                        "available (gpu_memory_bytes - reserved_bytes)",
                        (int)worst, (int)G, ceil(worst_need), ceil(worst_need - c->mcap), c->mcap);
    int32_t S = imin32(L, cl->num_nodes);
    int32_t ws = 0, wa = 0, wb = 0;
    double wneed = -INFINITY;
    for (int32_t s = 0; s < S; s++) {
        int32_t a = (int32_t)((int64_t)s * L / S), b = (int32_t)((int64_t)(s + 1) * L / S);
        double need = stage_memory(c, a, b, G, S - s);
        if (need > wneed) {
            wneed = need;
            ws = s;
            wa = a;
            wb = b;
        }
    }
    return obk_fail(OBK_EINFEASIBLE, err, err_len,
                    "no layout fits in GPU memory: with %d stages of one node each (all %d GPUs, equal "
                    "layer counts), stage %d (layers [%d, %d)) with %d microbatches in flight needs "
                    "%.0f bytes per GPU, %.0f more than the %.0f available (gpu_memory_bytes - "
                    "reserved_bytes)",
                    (int)S, (int)G, (int)ws, (int)wa, (int)wb, (int)(S - ws), ceil(wneed), ceil(wneed - c->mcap),
                    c->mcap);
}

/* Node counts in [lo, hi] that are not a sum of >= parts sizes from `ok` (ok[s] != 0). */
obk_status tpl_find_uncovered(const unsigned char *ok, int32_t smin, int32_t smax, int64_t parts, int32_t lo,
                              int32_t hi, int32_t *out, int32_t cap, int32_t *count)
{
    *count = 0;
    int contiguous = 1;
    for (int32_t s = smin; s <= smax; s++)
        if (!ok[s])
            contiguous = 0;
    if (contiguous && (int64_t)smax >= 2 * (int64_t)smin - 1)
        return OBK_OK; /* every M >= parts * smin is covered (docs/planner.md) */
    /* maxparts[M] = the most sizes summing to exactly M (-1: none) */
    int32_t *mp = malloc(sizeof(int32_t) * ((size_t)hi + 1));
    if (!mp)
        return OBK_ENOMEM;
    mp[0] = 0;
    for (int32_t M = 1; M <= hi; M++) {
        int32_t best = -1;
        for (int32_t s = smin; s <= smax && s <= M; s++)
            if (ok[s] && mp[M - s] >= 0 && mp[M - s] + 1 > best)
                best = mp[M - s] + 1;
        mp[M] = best;
    }
    for (int32_t M = lo; M <= hi; M++) {
        if (mp[M] < parts) {
            if (*count < cap)
                out[*count] = M;
            (*count)++;
        }
    }
    free(mp);
    return OBK_OK;
}
