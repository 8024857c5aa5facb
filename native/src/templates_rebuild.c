/*
 * Rebuilding the chosen template layout under the tie rules (docs/planner.md, "Pipeline
 * templates"; the rules are in include/oobleck_planner.h): from an exact DP with k over the
 * states within the tie budget, front to back, fewest stages, then the lexicographically
 * smallest boundaries, then the smallest GPU counts. See templates_internal.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "templates_internal.h"

obk_status tpl_rebuild_init(rebuild_t *rb, const ctx_t *c)
{
    const size_t fsize = (size_t)(c->J + 1) * (size_t)c->np;
    const int32_t L = c->L;
    rb->front = malloc(sizeof(double) * fsize);
    rb->next = malloc(sizeof(double) * fsize);
    rb->bounds = malloc(sizeof(int32_t) * ((size_t)L + 1));
    rb->gpus = malloc(sizeof(int32_t) * ((size_t)L + 1));
    rb->hb = malloc(sizeof(double) * fsize * ((size_t)L + 1));
    if (!rb->front || !rb->next || !rb->bounds || !rb->gpus || !rb->hb)
        return OBK_ENOMEM;
    return OBK_OK;
}

void tpl_rebuild_free(rebuild_t *rb)
{
    free(rb->front);
    free(rb->next);
    free(rb->bounds);
    free(rb->gpus);
    free(rb->hb);
}

/*
 * Continuation value of the state (y, j, k, pair pi) for the rebuild: from the DP tables
 * (hb == NULL) or from hb, the table of the same values along fixed boundaries, at stage s.
 */
static inline double cont_value(const ctx_t *c, const double *hb, int32_t s, int32_t y, int32_t j, int32_t k,
                                size_t pi)
{
    if (hb != NULL)
        return hb[((size_t)s * (size_t)(c->J + 1) + (size_t)j) * (size_t)c->np + pi];
    int64_t ni = cell(c, y, j, k);
    return ni < 0 ? INFINITY : c->h[ni * c->np + pi];
}

/*
 * One stage [x, y) with k stages left, from every state in `front` whose node has a stage count
 * with index in [qlo, qhi], into `next` (min prefix sum per state). Only moves with a completion
 * of total sum <= budget count. Returns whether there is one. s is the index of the stage.
 */
static int rebuild_step(const ctx_t *c, int32_t n, int32_t s, int32_t x, int32_t y, int32_t k, int32_t qlo,
                        int32_t qhi, double cap, double budget, const double *hb, const double *front,
                        double *next)
{
    const int32_t L = c->L, G = c->G, np = c->np;
    const size_t fsize = (size_t)(c->J + 1) * (size_t)np;
    for (size_t i = 0; i < fsize; i++)
        next[i] = INFINITY;
    int ok = 0;
    for (int32_t j = 1; j <= n; j++) {
        for (int32_t qi = qlo; qi <= qhi; qi++) {
            int32_t q = c->qs[qi], g = G / q;
            if (stage_memory(c, x, y, g, k) > c->mcap)
                continue;
            for (int32_t t = 1; t <= q; t++) {
                double pre = front[(size_t)j * np + c->pstart[qi] + t - 1];
                if (!(pre < INFINITY))
                    continue;
                int in_type = t < q ? LINK_INTRA : (x > 0 ? LINK_INTER : LINK_NONE);
                int out_type = t > 1 ? LINK_INTRA : (y < L ? LINK_INTER : LINK_NONE);
                double lat = stage_latency(c, x, y, g, in_type, out_type);
                if (lat > cap)
                    continue;
                double p2 = pre + lat;
                if (t > 1) {
                    size_t pi = c->pstart[qi] + t - 2;
                    if (p2 + cont_value(c, hb, s + 1, y, j, k - 1, pi) <= budget) {
                        ok = 1;
                        if (p2 < next[(size_t)j * np + pi])
                            next[(size_t)j * np + pi] = p2;
                    }
                } else if (y == L) {
                    if (j == 1 && k == 1 && p2 <= budget)
                        ok = 1;
                } else if (j > 1) {
                    for (int32_t q2i = 0; q2i < c->nq; q2i++) {
                        size_t pi = c->pstart[q2i] + c->qs[q2i] - 1;
                        if (p2 + cont_value(c, hb, s + 1, y, j - 1, k - 1, pi) <= budget) {
                            ok = 1;
                            size_t fi = (size_t)(j - 1) * np + pi;
                            if (p2 < next[fi])
                                next[fi] = p2;
                        }
                    }
                }
            }
        }
    }
    return ok;
}

static void rebuild_start(const ctx_t *c, int32_t n, double *front)
{
    const size_t fsize = (size_t)(c->J + 1) * (size_t)c->np;
    for (size_t i = 0; i < fsize; i++)
        front[i] = INFINITY;
    for (int32_t qi = 0; qi < c->nq; qi++)
        front[(size_t)n * c->np + c->pstart[qi] + c->qs[qi] - 1] = 0.0;
}

/* The fewest stages S of a layout of n nodes with sum <= budget; -1 when none. */
static int32_t fewest_stages(const ctx_t *c, int32_t n, double budget)
{
    int32_t khi = (int32_t)imin64(c->L, (int64_t)n * c->G);
    for (int32_t k = n; k <= khi; k++) {
        int64_t ci = cell(c, 0, n, k);
        if (ci >= 0 && c->e[ci] <= budget)
            return k;
    }
    return -1;
}

/* 1. boundaries: the smallest next boundary that still has a completion within budget. */
static int rebuild_bounds(const ctx_t *c, int32_t n, int32_t S, double cap, double budget, rebuild_t *rb)
{
    const int32_t L = c->L;
    double *front = rb->front, *next = rb->next;
    int32_t *bounds = rb->bounds;
    rebuild_start(c, n, front);
    for (int32_t s = 0; s < S; s++) {
        int32_t k = S - s, x = bounds[s], y;
        for (y = x + 1; y <= L - (k - 1); y++)
            if (rebuild_step(c, n, s, x, y, k, 0, c->nq - 1, cap, budget, NULL, front, next))
                break;
        if (y > L - (k - 1))
            return -1;
        bounds[s + 1] = y;
        double *tmp = front;
        front = next;
        next = tmp;
    }
    return 0;
}

/* 2. hb: the least sum of the remaining stages along these boundaries, per state. */
static void rebuild_suffix_sums(const ctx_t *c, int32_t n, int32_t S, double cap, rebuild_t *rb)
{
    const int32_t L = c->L, G = c->G, np = c->np, J = c->J;
    const int32_t *bounds = rb->bounds;
    double *hb = rb->hb;
    const size_t row = (size_t)(J + 1) * (size_t)np;
    for (size_t i = 0; i < (size_t)(S + 1) * row; i++)
        hb[i] = INFINITY;
    for (int32_t s = S - 1; s >= 0; s--) {
        int32_t x = bounds[s], y = bounds[s + 1], k = S - s;
        double *cur = hb + (size_t)s * row;
        const double *after = hb + (size_t)(s + 1) * row; /* the states of stage s + 1 */
        for (int32_t j = 1; j <= n; j++) {
            for (int32_t qi = 0; qi < c->nq; qi++) {
                int32_t q = c->qs[qi], g = G / q;
                if (stage_memory(c, x, y, g, k) > c->mcap)
                    continue;
                for (int32_t t = 1; t <= q; t++) {
                    int in_type = t < q ? LINK_INTRA : (x > 0 ? LINK_INTER : LINK_NONE);
                    int out_type = t > 1 ? LINK_INTRA : (y < L ? LINK_INTER : LINK_NONE);
                    double lat = stage_latency(c, x, y, g, in_type, out_type);
                    if (lat > cap)
                        continue;
                    double rest = INFINITY;
                    if (t > 1)
                        rest = after[(size_t)j * np + c->pstart[qi] + t - 2];
                    else if (y == L)
                        rest = (j == 1 && k == 1) ? 0.0 : INFINITY;
                    else if (j > 1)
                        for (int32_t q2i = 0; q2i < c->nq; q2i++) {
                            double v = after[(size_t)(j - 1) * np + c->pstart[q2i] + c->qs[q2i] - 1];
                            if (v < rest)
                                rest = v;
                        }
                    cur[(size_t)j * np + c->pstart[qi] + t - 1] = lat + rest;
                }
            }
        }
    }
}

/* 3. GPU counts: the smallest g (largest q) at each stage that keeps a completion. */
static int rebuild_gpus(const ctx_t *c, int32_t n, int32_t S, double cap, double budget, rebuild_t *rb)
{
    double *front = rb->front, *next = rb->next;
    const int32_t *bounds = rb->bounds;
    rebuild_start(c, n, front);
    for (int32_t s = 0; s < S; s++) {
        int32_t k = S - s, x = bounds[s], y = bounds[s + 1], qi;
        for (qi = c->nq - 1; qi >= 0; qi--)
            if (rebuild_step(c, n, s, x, y, k, qi, qi, cap, budget, rb->hb, front, next))
                break;
        if (qi < 0)
            return -1;
        rb->gpus[s] = c->G / c->qs[qi];
        double *tmp = front;
        front = next;
        next = tmp;
    }
    return 0;
}

/*
 * Rebuild the layout for n nodes from the tables of run_dp(cap) under the tie rules: fewest
 * stages with sum <= budget, then lexicographically smallest boundaries, then GPU counts.
 * Writes S, rb->bounds[0..S] and rb->gpus[0..S-1]. Returns 0 on success.
 */
static int reconstruct(const ctx_t *c, int32_t n, double cap, double budget, int32_t *S_out, rebuild_t *rb)
{
    int32_t S = fewest_stages(c, n, budget);
    if (S < 0)
        return -1;
    rb->bounds[0] = 0;
    rb->bounds[S] = c->L;
    if (rebuild_bounds(c, n, S, cap, budget, rb) != 0)
        return -1;
    rebuild_suffix_sums(c, n, S, cap, rb);
    if (rebuild_gpus(c, n, S, cap, budget, rb) != 0)
        return -1;
    *S_out = S;
    return 0;
}

/*
 * The template layout of n nodes with bottleneck cap capM and tie budget `budget` (see
 * tpl_search_caps): the exact DP with k over the states within the budget, then the rebuild.
 * Writes S and the layout into rb. Returns 0 on success.
 */
int tpl_rebuild_layout(ctx_t *c, int32_t n, double capM, double budget, rebuild_t *rb, int32_t *S_out)
{
    tpl_set_window(c, capM, n, n);
    tpl_kfree_backward(c, capM, n, 0, c->bw);
    tpl_kfree_forward(c, capM, n, c->fw);
    tpl_window_from_alive(c, n, c->fw, c->bw, budget, c->alive);
    tpl_run_dp(c, capM, 0, n, c->alive);
    return reconstruct(c, n, capM, budget, S_out, rb);
}
