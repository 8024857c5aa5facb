/*
 * The template DPs (docs/planner.md, "Pipeline templates"; method in include/oobleck_planner.h):
 * run_dp over the states (x, j, k, pair) with the in-flight count k, and the k-free DPs over
 * (x, j, pair) that check memory optimistically or pessimistically. See templates_internal.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "templates_internal.h"

/*
 * h(x, j, k, pair (q, t)) for run_dp: the best over the ends y of the stage [x, y) that the pair
 * allows (see tpl_run_dp for the modes).
 */
static double dp_pair(const ctx_t *c, double cap, int mode_max, int32_t x, int32_t j, int32_t k, int32_t qi,
                      int32_t t)
{
    const int32_t L = c->L, G = c->G, np = c->np;
    const int32_t q = c->qs[qi], g = G / q;
    double best = INFINITY;
    if (!(k >= t + j - 1 && (int64_t)(k - t) <= (int64_t)(j - 1) * G))
        return best;
    int in_type = t < q ? LINK_INTRA : (x > 0 ? LINK_INTER : LINK_NONE);
    double lin = link_cost(c, x, in_type);
    if (t == 1 && j == 1) {
        /* last stage of the pipeline: it must end at L */
        if (k == 1 && stage_memory(c, x, L, g, k) <= c->mcap) {
            double lat = stage_base(c, x, L, g) + lin + 0.0;
            if (lat <= cap)
                best = lat;
        }
        return best;
    }
    int32_t ymax = L - (k - 1);
    for (int32_t y = x + 1; y <= ymax; y++) {
        double base = stage_base(c, x, y, g);
        if (base > cap || base >= best)
            break;
        if (stage_memory(c, x, y, g, k) > c->mcap)
            break;
        double lout = t > 1 ? c->c_intra[y] : c->c_inter[y];
        double lat = (base + lin) + lout;
        if (lat > cap)
            continue;
        double nxt;
        if (t > 1) {
            int64_t ni = cell(c, y, j, k - 1);
            if (ni < 0)
                continue;
            nxt = c->h[ni * np + c->pstart[qi] + t - 2];
        } else {
            int64_t ni = cell(c, y, j - 1, k - 1);
            if (ni < 0)
                continue;
            nxt = c->e[ni];
        }
        double v = mode_max ? (lat > nxt ? lat : nxt) : lat + nxt;
        if (v < best)
            best = v;
    }
    return best;
}

/*
 * Fill h and e for the states of the current window (tpl_set_window, or tpl_window_from_alive).
 * mode_max = 0: min sum of latencies with every stage latency <= cap; mode_max = 1: min of the
 * largest stage latency (cap ignored). alive (NULL: all) marks the (x, j, pair) states to
 * compute; the others are +inf.
 */
void tpl_run_dp(ctx_t *c, double cap, int mode_max, int32_t jlim, const unsigned char *alive)
{
    const int32_t L = c->L, G = c->G, np = c->np;
    if (mode_max)
        cap = INFINITY;
    for (int32_t x = L - 1; x >= 0; x--) {
        int32_t rest = L - x;
        int32_t jhi = imin32(imin32(jlim, c->J), rest);
        for (int32_t j = 1; j <= jhi; j++) {
            if (x < c->xlo[j] || x > c->xhi[j])
                continue;
            int32_t khi = (int32_t)imin64(rest, (int64_t)j * G);
            for (int32_t k = j; k <= khi; k++) {
                int64_t ci = cell(c, x, j, k);
                double *hrow = c->h + ci * np;
                double emin = INFINITY;
                for (int32_t qi = 0; qi < c->nq; qi++) {
                    int32_t q = c->qs[qi];
                    for (int32_t t = 1; t <= q; t++) {
                        double best = INFINITY;
                        if (alive && !alive[kf_index(c, x, j, c->pstart[qi] + t - 1)]) {
                            /* not on any layout within the bound: stays +inf */
                        } else {
                            best = dp_pair(c, cap, mode_max, x, j, k, qi, t);
                        }
                        hrow[c->pstart[qi] + t - 1] = best;
                        if (t == q && best < emin)
                            emin = best;
                    }
                }
                c->e[ci] = emin;
            }
        }
    }
}

/* min over the stage count of the node that starts at (x, j) of a k-free table. */
static inline double kf_node_start(const ctx_t *c, const double *tab, int32_t x, int32_t j)
{
    double best = INFINITY;
    for (int32_t qi = 0; qi < c->nq; qi++) {
        double v = kf_get(c, tab, x, j, c->pstart[qi] + c->qs[qi] - 1);
        if (v < best)
            best = v;
    }
    return best;
}

/* min over the first node's stage count of a k-free table at the root (0, n). */
double tpl_kf_root(const ctx_t *c, const double *tab, int32_t n)
{
    return kf_node_start(c, tab, 0, n);
}

/* One state (x, j, pair) of tpl_kfree_backward; sets *ambiguous as documented there. */
static double kfree_pair(const ctx_t *c, double cap, int flags, const double *bw, int32_t x, int32_t j,
                         int32_t qi, int32_t t, int *ambiguous)
{
    const int pessimistic = flags & KF_PESSIMISTIC, mode_max = (flags & KF_MAX) != 0;
    const int32_t L = c->L, G = c->G;
    const int32_t q = c->qs[qi], g = G / q;
    int32_t pi = c->pstart[qi] + t - 1;
    int32_t klo = t + j - 1;
    int32_t khi = (int32_t)imin64(L - x, (int64_t)t + (int64_t)(j - 1) * G);
    double best = INFINITY;
    int in_type = t < q ? LINK_INTRA : (x > 0 ? LINK_INTER : LINK_NONE);
    double lin = link_cost(c, x, in_type);
    int32_t ylo = x + 1, yhi = L - (klo - 1);
    if (t == 1 && j == 1)
        ylo = yhi = L;
    if (klo > L - x)
        yhi = ylo - 1;
    for (int32_t y = ylo; y <= yhi; y++) {
        double base = stage_base(c, x, y, g);
        if (base > cap || base >= best)
            break;
        if (stage_memory(c, x, y, g, klo) > c->mcap)
            break;
        if (stage_memory(c, x, y, g, khi) > c->mcap) {
            *ambiguous = 1;
            if (pessimistic)
                break;
        }
        double lout = t > 1 ? c->c_intra[y] : (y < L ? c->c_inter[y] : 0.0);
        double lat = (base + lin) + lout;
        if (lat > cap)
            continue;
        double nxt = INFINITY;
        if (t > 1)
            nxt = kf_get(c, bw, y, j, pi - 1);
        else if (y == L)
            nxt = 0.0;
        else
            nxt = kf_node_start(c, bw, y, j - 1);
        double v = combine(mode_max, lat, nxt);
        if (v < best)
            best = v;
    }
    return best;
}

/*
 * The DP without the in-flight dimension k, over states (x, j, pair) of the window of
 * tpl_set_window(cap, n, n): bw = least sum of the stages from x on (with KF_MAX: least largest
 * stage latency). A stage's memory is checked with the fewest (optimistic) or, with
 * KF_PESSIMISTIC, the most in-flight microbatches it can have there: k_lo = t + j - 1,
 * k_hi = min(L - x, t + (j - 1) G). Returns whether some examined stage fits with k_lo but not
 * k_hi; if not, the optimistic values are exact.
 */
int tpl_kfree_backward(const ctx_t *c, double cap, int32_t n, int flags, double *bw)
{
    const int32_t L = c->L;
    int ambiguous = 0;
    for (int32_t x = L - 1; x >= 0; x--) {
        int32_t jhi = imin32(n, L - x);
        for (int32_t j = 1; j <= jhi; j++) {
            if (x < c->xlo[j] || x > c->xhi[j])
                continue;
            for (int32_t qi = 0; qi < c->nq; qi++)
                for (int32_t t = 1; t <= c->qs[qi]; t++)
                    bw[kf_index(c, x, j, c->pstart[qi] + t - 1)] =
                        kfree_pair(c, cap, flags, bw, x, j, qi, t, &ambiguous);
        }
    }
    return ambiguous;
}

/* Relax the successors of the state (x, j, pair) with prefix `pre` in the forward k-free DP. */
static void kfree_forward_pair(const ctx_t *c, double cap, double *fw, int32_t x, int32_t j, int32_t qi,
                               int32_t t, double pre)
{
    const int32_t L = c->L, G = c->G;
    const int32_t q = c->qs[qi], g = G / q, pi = c->pstart[qi] + t - 1;
    int32_t klo = t + j - 1;
    int in_type = t < q ? LINK_INTRA : (x > 0 ? LINK_INTER : LINK_NONE);
    double lin = link_cost(c, x, in_type);
    int32_t ylo = x + 1, yhi = L - (klo - 1);
    if (t == 1 && j == 1)
        ylo = yhi = L;
    for (int32_t y = ylo; y <= yhi; y++) {
        double base = stage_base(c, x, y, g);
        if (base > cap || stage_memory(c, x, y, g, klo) > c->mcap)
            break;
        double lout = t > 1 ? c->c_intra[y] : (y < L ? c->c_inter[y] : 0.0);
        double lat = (base + lin) + lout;
        if (lat > cap || y == L)
            continue;
        double v = pre + lat;
        if (t > 1) {
            if (y >= c->xlo[j] && y <= c->xhi[j] && v < fw[kf_index(c, y, j, pi - 1)])
                fw[kf_index(c, y, j, pi - 1)] = v;
        } else if (j > 1 && y >= c->xlo[j - 1] && y <= c->xhi[j - 1]) {
            for (int32_t q2 = 0; q2 < c->nq; q2++) {
                size_t ni = kf_index(c, y, j - 1, c->pstart[q2] + c->qs[q2] - 1);
                if (v < fw[ni])
                    fw[ni] = v;
            }
        }
    }
}

/* Forward k-free DP (optimistic memory): fw = least sum of the stages before x. */
void tpl_kfree_forward(const ctx_t *c, double cap, int32_t n, double *fw)
{
    const int32_t L = c->L, np = c->np;
    for (int32_t x = 0; x < L; x++)
        for (int32_t j = 1; j <= imin32(n, L - x); j++)
            if (x >= c->xlo[j] && x <= c->xhi[j])
                for (int32_t pi = 0; pi < np; pi++)
                    fw[kf_index(c, x, j, pi)] = INFINITY;
    for (int32_t qi = 0; qi < c->nq; qi++)
        if (0 >= c->xlo[n] && 0 <= c->xhi[n])
            fw[kf_index(c, 0, n, c->pstart[qi] + c->qs[qi] - 1)] = 0.0;
    for (int32_t x = 0; x < L; x++) {
        int32_t jhi = imin32(n, L - x);
        for (int32_t j = 1; j <= jhi; j++) {
            if (x < c->xlo[j] || x > c->xhi[j])
                continue;
            for (int32_t qi = 0; qi < c->nq; qi++) {
                for (int32_t t = 1; t <= c->qs[qi]; t++) {
                    double pre = fw[kf_index(c, x, j, c->pstart[qi] + t - 1)];
                    if (!(pre < INFINITY))
                        continue;
                    kfree_forward_pair(c, cap, fw, x, j, qi, t, pre);
                }
            }
        }
    }
}

/*
 * Mark the states whose best prefix + best suffix (optimistic, so lower bounds) is within
 * `bound`, and shrink the window to them. Returns the number of states kept.
 */
int64_t tpl_window_from_alive(ctx_t *c, int32_t n, const double *fw, const double *bw, double bound,
                              unsigned char *alive)
{
    const int32_t L = c->L, np = c->np;
    double lim = bound + 1e-11 * fabs(bound);
    int64_t kept = 0;
    for (int32_t j = 1; j <= n; j++) {
        int32_t lo = c->xlo[j], hi = c->xhi[j], nlo = L, nhi = -1;
        for (int32_t x = lo; x <= hi && x < L; x++) {
            for (int32_t pi = 0; pi < np; pi++) {
                size_t i = kf_index(c, x, j, pi);
                int ok = fw[i] < INFINITY && bw[i] < INFINITY && fw[i] + bw[i] <= lim;
                alive[i] = (unsigned char)ok;
                if (ok) {
                    kept++;
                    if (x < nlo)
                        nlo = x;
                    if (x > nhi)
                        nhi = x;
                }
            }
        }
        c->xlo[j] = nlo;
        c->xhi[j] = nhi;
    }
    return kept;
}

/* min over k of e(0, n, k) from the last run_dp (+inf when no state holds a layout). */
double tpl_root_value(const ctx_t *c, int32_t n)
{
    double best = INFINITY;
    int32_t khi = (int32_t)imin64(c->L, (int64_t)n * c->G);
    for (int32_t k = n; k <= khi; k++) {
        int64_t ci = cell(c, 0, n, k);
        if (ci >= 0 && c->e[ci] < best)
            best = c->e[ci];
    }
    return best;
}

/* tpl_root_value for every n <= jlim, into out[n] (out[0] unused). */
void tpl_root_values(const ctx_t *c, int32_t jlim, double *out)
{
    out[0] = INFINITY;
    for (int32_t n = 1; n <= jlim; n++)
        out[n] = tpl_root_value(c, n);
}
