/*
 * Following one optimal layout through a template DP table (docs/planner.md, "Pipeline
 * templates"): from the root (0, n), each stage takes the first end y whose continuation
 * reproduces the table value exactly. One tracer serves both kinds of table; see
 * templates_internal.h.
 */
#include <math.h>
#include <stdint.h>

#include "templates_internal.h"

/*
 * The value of the state (x, j, k, pair pi) in the table being traced: the k-free table kf
 * (k is then ignored), or with kf == NULL the table h of the last run_dp. +inf when the state
 * is outside the window.
 */
static inline double trace_value(const ctx_t *c, const double *kf, int32_t x, int32_t j, int32_t k, int32_t pi)
{
    if (kf != NULL)
        return kf_get(c, kf, x, j, pi);
    int64_t ci = cell(c, x, j, k);
    return ci < 0 ? INFINITY : c->h[ci * c->np + pi];
}

/*
 * The root (0, n) of the table being traced: the least value over the first node's stage count
 * (index *qi) and, in run_dp's table, over k (*k). *qi stays -1 when there is no finite value.
 */
static double trace_root(const ctx_t *c, const double *kf, int32_t n, int32_t *qi, int32_t *k)
{
    double v = INFINITY;
    int32_t khi = kf != NULL ? n : (int32_t)imin64(c->L, (int64_t)n * c->G);
    for (int32_t kk = n; kk <= khi; kk++) {
        for (int32_t i = 0; i < c->nq; i++) {
            double w = trace_value(c, kf, 0, n, kk, c->pstart[i] + c->qs[i] - 1);
            if (w < v) {
                v = w;
                *qi = i;
                *k = kk;
            }
        }
    }
    return v;
}

/*
 * Follow one layout from the root (0, n) of a table whose values combine stage latencies by
 * sum (mode_max = 0) or max (mode_max = 1): a k-free table kf of tpl_kfree_backward, its stages'
 * memory checked with the optimistic in-flight count k_lo = t + j - 1, or, with kf == NULL,
 * the table h of tpl_run_dp in sum mode, with the real in-flight counts. Returns the layout's
 * largest stage latency; +inf when the root has no layout, `cap` (always a safe answer) when
 * the trace gets lost. path (may be NULL) receives L + 1 ints: the stage starts, each packed
 * with its GPU count as start * (G + 1) + g; then *S_out is the number of stages.
 */
double tpl_trace_path(const ctx_t *c, const double *kf, double cap, int32_t n, int mode_max, int64_t *path,
                      int32_t *S_out)
{
    const int32_t L = c->L, G = c->G;
    int32_t qi = -1, k = -1;
    double v = trace_root(c, kf, n, &qi, &k);
    if (qi < 0)
        return INFINITY;
    int32_t x = 0, j = n, t = c->qs[qi], S = 0;
    double mx = 0.0;
    for (;;) {
        int32_t q = c->qs[qi], g = G / q, pi = c->pstart[qi] + t - 1;
        int32_t kin = kf != NULL ? t + j - 1 : k; /* in-flight count for memory */
        if (path != NULL) {
            if (S >= L)
                return cap;
            path[S++] = (int64_t)x * (G + 1) + g;
        }
        int in_type = t < q ? LINK_INTRA : (x > 0 ? LINK_INTER : LINK_NONE);
        double lin = link_cost(c, x, in_type);
        int32_t ylo = x + 1, yhi = L - (kin - 1);
        if (t == 1 && j == 1)
            ylo = yhi = L;
        int moved = 0;
        for (int32_t y = ylo; y <= yhi && !moved; y++) {
            double base = stage_base(c, x, y, g);
            if (base > cap || stage_memory(c, x, y, g, kin) > c->mcap)
                break;
            double lout = t > 1 ? c->c_intra[y] : (y < L ? c->c_inter[y] : 0.0);
            double lat = (base + lin) + lout;
            if (lat > cap)
                continue;
            if (t > 1) {
                /* the next stage of the same node */
                double nxt = trace_value(c, kf, y, j, k - 1, pi - 1);
                if (combine(mode_max, lat, nxt) == v) {
                    t--;
                    v = nxt;
                    moved = 1;
                }
            } else if (y == L) {
                /* the last stage of the pipeline */
                if (j == 1 && kin == 1 && combine(mode_max, lat, 0.0) == v) {
                    if (S_out != NULL)
                        *S_out = S;
                    return lat > mx ? lat : mx;
                }
            } else {
                /* the first stage of the next node, with any stage count */
                for (int32_t q2 = 0; q2 < c->nq && !moved; q2++) {
                    double nxt = trace_value(c, kf, y, j - 1, k - 1, c->pstart[q2] + c->qs[q2] - 1);
                    if (combine(mode_max, lat, nxt) == v) {
                        j--;
                        qi = q2;
                        t = c->qs[q2];
                        v = nxt;
                        moved = 1;
                    }
                }
            }
            if (moved) {
                if (lat > mx)
                    mx = lat;
                x = y;
                k--;
            }
        }
        if (!moved)
            return cap; /* not expected; cap is always a safe answer */
    }
}

/*
 * Follow one least-sum (or, mode_max, least-bottleneck) layout of an optimistic k-free run
 * from the root (0, n) (equal values) and return its largest stage latency (+inf when there is
 * none). *fits says whether the layout fits in memory with its real in-flight counts, in which
 * case its value is the exact optimum. path holds L + 1 ints (see tpl_trace_path).
 */
double tpl_kf_trace_max(const ctx_t *c, const double *bw, double cap, int32_t n, int mode_max, int *fits,
                        int64_t *path)
{
    int32_t S = 0;
    double mx = tpl_trace_path(c, bw, cap, n, mode_max, path, &S);
    *fits = 0;
    if (!(mx < INFINITY) || S <= 0)
        return mx;
    for (int32_t s = 0; s < S; s++) {
        int32_t a = (int32_t)(path[s] / (c->G + 1)), g = (int32_t)(path[s] % (c->G + 1));
        int32_t b = s + 1 < S ? (int32_t)(path[s + 1] / (c->G + 1)) : c->L;
        if (stage_memory(c, a, b, g, S - s) > c->mcap)
            return mx;
    }
    *fits = 1;
    return mx;
}

/* The largest stage latency of one least-sum layout in the tables of tpl_run_dp (sum mode). */
double tpl_dp_trace_max(const ctx_t *c, double cap, int32_t n)
{
    return tpl_trace_path(c, NULL, cap, n, 0, NULL, NULL);
}
