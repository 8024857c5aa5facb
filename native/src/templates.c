/*
 * Pipeline templates and node specification (docs/planner.md). The method and the decisions
 * docs/planner.md leaves open are described in include/oobleck_planner.h next to
 * obk_plan_templates; the units that implement it are listed in templates_internal.h.
 *
 * This file holds the entry point and its phases: the least bottleneck of every node count
 * (which counts are feasible), the node range [n0, n_max] and the specification, the search
 * and rebuild of one template per size, its output, and the uncovered node counts.
 *
 * No global or static mutable state: every table is allocated per call.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "oobleck_planner.h"
#include "templates_internal.h"

/* Everything one obk_plan_templates call allocates. */
typedef struct {
    ctx_t c;
    cache_t cc;
    rebuild_t rb;
    double *bottleneck;      /* [J + 1]: the least bottleneck of n nodes (+inf: no layout fits) */
    unsigned char *feasible; /* [J + 1]: bottleneck[n] < +inf */
    double *lbsum;           /* [n_max + 1]: the least sum with no cap, memory optimistic */
} plan_t;

static void plan_free(plan_t *p)
{
    tpl_cache_free(&p->cc);
    tpl_rebuild_free(&p->rb);
    free(p->lbsum);
    free(p->bottleneck);
    free(p->feasible);
    tpl_ctx_free(&p->c);
}

/*
 * Phase 1: the least bottleneck for every n <= J, hence feasibility and the lowest useful cap.
 * The optimistic k-free min-max serves every n; a result whose layout fits with its real
 * in-flight counts is exact, the others come from the DP with k. Writes the smallest and
 * largest feasible n (0 when none).
 */
static obk_status least_bottlenecks(plan_t *p, int32_t *first, int32_t *last, char *err, size_t err_len)
{
    ctx_t *c = &p->c;
    const int32_t J = c->J;
    p->bottleneck = malloc(sizeof(double) * ((size_t)J + 1));
    p->feasible = calloc((size_t)J + 1, 1);
    if (!p->bottleneck || !p->feasible)
        return obk_fail(OBK_ENOMEM, err, err_len, "out of memory");
    tpl_set_window(c, INFINITY, J, 0);
    tpl_kfree_backward(c, INFINITY, J, KF_MAX, c->bw);
    int32_t unresolved = 0;
    for (int32_t n = 1; n <= J; n++) {
        p->bottleneck[n] = tpl_kf_root(c, c->bw, n);
        int fits = 0;
        if (p->bottleneck[n] < INFINITY) {
            tpl_kf_trace_max(c, c->bw, INFINITY, n, 1, &fits, c->path);
            if (!fits)
                unresolved = n;
        }
    }
    if (unresolved > 0) {
        double *exact = malloc(sizeof(double) * ((size_t)unresolved + 1));
        if (!exact)
            return obk_fail(OBK_ENOMEM, err, err_len, "out of memory");
        tpl_set_window(c, INFINITY, unresolved, 0);
        tpl_run_dp(c, INFINITY, 1, unresolved, NULL);
        tpl_root_values(c, unresolved, exact);
        for (int32_t n = 1; n <= unresolved; n++)
            p->bottleneck[n] = exact[n];
        free(exact);
    }
    *first = *last = 0;
    for (int32_t n = 1; n <= J; n++) {
        if (p->bottleneck[n] < INFINITY) {
            p->feasible[n] = 1;
            if (!*first)
                *first = n;
            *last = n;
        }
    }
    return OBK_OK;
}

/*
 * Phase 2: the template sizes [n0, n_max] (n0 = min_nodes, or the smallest feasible n) and the
 * node specification's range; fails when ft + 1 pipelines of n0 nodes do not fit or no size
 * in the range is feasible.
 */
static obk_status node_range(const plan_t *p, int32_t N, int32_t ft, int32_t min_nodes, int32_t first,
                             int32_t last, obk_node_spec *spec, char *err, size_t err_len)
{
    const int32_t J = p->c.J;
    int32_t n0 = min_nodes > 0 ? min_nodes : first;
    if ((int64_t)N < ((int64_t)ft + 1) * n0)
        return obk_fail(OBK_EINVAL, err, err_len,
                        "too few nodes for ft: %d nodes < (ft+1)*n0 = (%d+1)*%d = %lld (n0 = the smallest "
                        "node count with a feasible template)",
                        (int)N, (int)ft, (int)n0, (long long)(((int64_t)ft + 1) * n0));
    int32_t nmax = (int32_t)imin64((int64_t)N - (int64_t)ft * n0, last);
    int32_t ntempl = 0;
    for (int32_t n = n0; n <= nmax; n++)
        ntempl += p->feasible[n];
    if (ntempl == 0)
        return obk_fail(OBK_EINFEASIBLE, err, err_len,
                        "no feasible template with between min_nodes = %d and %d nodes: the largest node "
                        "count with a layout that fits in memory is %d",
                        (int)n0, (int)imin64((int64_t)N - (int64_t)ft * n0, J), (int)last);
    spec->min_nodes = n0;
    spec->max_nodes = nmax;
    spec->ft = ft;
    spec->range_lo = (int32_t)(((int64_t)ft + 1) * n0);
    spec->range_hi = N;
    return OBK_OK;
}

/*
 * Phase 3 set-up: the candidate caps, the search and rebuild scratch, and lbsum[n], the least
 * sum with no cap (memory checked optimistically): a lower bound for every cap.
 */
static obk_status search_setup(plan_t *p, int32_t nmax, char *err, size_t err_len)
{
    ctx_t *c = &p->c;
    obk_status st = tpl_cache_init(&p->cc, c, err, err_len);
    if (st != OBK_OK)
        return st;
    p->lbsum = malloc(sizeof(double) * ((size_t)nmax + 1));
    if (!p->lbsum || tpl_rebuild_init(&p->rb, c) != OBK_OK)
        return obk_fail(OBK_ENOMEM, err, err_len, "out of memory");
    tpl_set_window(c, INFINITY, nmax, 0);
    tpl_kfree_backward(c, INFINITY, nmax, 0, c->bw);
    for (int32_t n = 1; n <= nmax; n++)
        p->lbsum[n] = tpl_kf_root(c, c->bw, n);
    return OBK_OK;
}

/* Write the rebuilt layout of S stages for n nodes and m_ref = m as one template. */
static void write_template(const ctx_t *c, int32_t n, int64_t m, int32_t S, const rebuild_t *rb,
                          int32_t first_stage, obk_template *tp, obk_stage *stages)
{
    const int32_t *bounds = rb->bounds, *gpus = rb->gpus;
    double sum = 0.0, mx = 0.0;
    int32_t node = 0;
    int32_t in_node = 0; /* stages already placed on the current node */
    for (int32_t k = 0; k < S; k++) {
        int32_t g = gpus[k], q = c->G / g;
        int first_of_node = in_node == 0;
        int last_of_node = in_node + 1 == q;
        int in_type = k == 0 ? LINK_NONE : (first_of_node ? LINK_INTER : LINK_INTRA);
        int out_type = k == S - 1 ? LINK_NONE : (last_of_node ? LINK_INTER : LINK_INTRA);
        obk_stage *sp = &stages[k];
        sp->layer_start = bounds[k];
        sp->layer_end = bounds[k + 1];
        sp->node = node;
        sp->gpus = g;
        sp->latency_ms = stage_latency(c, bounds[k], bounds[k + 1], g, in_type, out_type);
        sp->memory_bytes = ceil(stage_memory(c, bounds[k], bounds[k + 1], g, S - k));
        sum += sp->latency_ms;
        if (sp->latency_ms > mx)
            mx = sp->latency_ms;
        in_node++;
        if (in_node == q) {
            in_node = 0;
            node++;
        }
    }
    tp->num_nodes = n;
    tp->num_stages = S;
    tp->first_stage = first_stage;
    tp->microbatches = (int32_t)m;
    tp->sum_latency_ms = sum;
    tp->bottleneck_ms = mx;
    tp->iteration_ms = sum + (double)(m - 1) * mx;
    tp->gap = 0.0;
}

/*
 * Phase 3: one template per feasible n in [n0, n_max]: the search over caps gives M* and the
 * tie budget, the rebuild the layout. Templates and stages are written while they fit; the
 * counts (*ti, *si) go on past the capacities.
 */
static obk_status plan_sizes(plan_t *p, int32_t N, int32_t microbatches, const obk_node_spec *spec,
                             obk_template *templates, int32_t max_templates, obk_stage *stages, int32_t max_stages,
                             int32_t *ti_out, int32_t *si_out, char *err, size_t err_len)
{
    int32_t ti = 0, si = 0;
    for (int32_t n = spec->min_nodes; n <= spec->max_nodes; n++) {
        if (!p->feasible[n])
            continue;
        int64_t m = ((int64_t)2 * microbatches * n + N) / ((int64_t)2 * N);
        if (m < 1)
            m = 1;
        double budget = 0.0;
        int64_t best = tpl_search_caps(&p->cc, n, m, p->bottleneck[n], p->lbsum[n], &budget);
        if (best < 0)
            return obk_fail(OBK_EINVAL, err, err_len,
                            "internal error: template search for %d nodes lost its optimum", (int)n);
        double Mstar = p->cc.V[best];
        double capM = Mstar + TIE_EPS * fabs(Mstar);
        int32_t S = 0;
        if (tpl_rebuild_layout(&p->c, n, capM, budget, &p->rb, &S) != 0)
            return obk_fail(OBK_EINVAL, err, err_len,
                            "internal error: template for %d nodes could not be rebuilt", (int)n);
        if (ti < max_templates && si + S <= max_stages)
            write_template(&p->c, n, m, S, &p->rb, si, &templates[ti], &stages[si]);
        ti++;
        si += S;
    }
    *ti_out = ti;
    *si_out = si;
    return OBK_OK;
}

/* Phase 4: node counts in the guaranteed range that no mix of >= ft+1 templates covers. */
static obk_status uncovered_counts(const plan_t *p, int32_t N, obk_node_spec *spec, int32_t *uncovered,
                                   int32_t max_uncovered, char *err, size_t err_len)
{
    int32_t nunc = 0;
    if (spec->range_lo <= N) {
        if (tpl_find_uncovered(p->feasible, spec->min_nodes, spec->max_nodes, (int64_t)spec->ft + 1,
                               spec->range_lo, N, uncovered, max_uncovered, &nunc) != OBK_OK)
            return obk_fail(OBK_ENOMEM, err, err_len, "out of memory");
    }
    spec->num_uncovered = nunc;
    return OBK_OK;
}

obk_status obk_plan_templates(const obk_layer *layers, int32_t num_layers, const obk_cluster *cluster,
                              int32_t ft, int32_t microbatches, int32_t min_nodes,
                              obk_node_spec *spec, obk_template *templates, int32_t max_templates,
                              obk_stage *stages, int32_t max_stages, int32_t *uncovered,
                              int32_t max_uncovered, char *err, size_t err_len)
{
    obk_status st = tpl_validate_args(layers, num_layers, cluster, ft, microbatches, min_nodes, spec, templates,
                                      max_templates, stages, max_stages, uncovered, max_uncovered, err, err_len);
    if (st != OBK_OK)
        return st;
    const int32_t N = cluster->num_nodes, L = num_layers;
    plan_t p;
    memset(&p, 0, sizeof(p));
    int32_t first = 0, last = 0, ti = 0, si = 0;
    if ((st = tpl_ctx_init(&p.c, layers, L, cluster, imin32(N, L), err, err_len)) != OBK_OK)
        goto done;
    if ((st = tpl_check_cost_range(&p.c, microbatches, err, err_len)) != OBK_OK)
        goto done;
    if ((st = least_bottlenecks(&p, &first, &last, err, err_len)) != OBK_OK)
        goto done;
    if (!first) {
        st = tpl_memory_failure(&p.c, cluster, err, err_len);
        goto done;
    }
    if ((st = node_range(&p, N, ft, min_nodes, first, last, spec, err, err_len)) != OBK_OK)
        goto done;
    if ((st = search_setup(&p, spec->max_nodes, err, err_len)) != OBK_OK)
        goto done;
    if ((st = plan_sizes(&p, N, microbatches, spec, templates, max_templates, stages, max_stages, &ti, &si, err,
                         err_len)) != OBK_OK)
        goto done;
    spec->num_templates = ti;
    spec->num_stages = si;
    if ((st = uncovered_counts(&p, N, spec, uncovered, max_uncovered, err, err_len)) != OBK_OK)
        goto done;
    if (ti > max_templates || si > max_stages || spec->num_uncovered > max_uncovered)
        st = obk_fail(OBK_ERANGE, err, err_len, "output arrays too small: need %d templates, %d stages, %d uncovered",
                      (int)ti, (int)si, (int)spec->num_uncovered);

done:
    plan_free(&p);
    return st;
}
