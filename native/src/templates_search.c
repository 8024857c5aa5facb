/*
 * The search over caps (docs/planner.md, "Pipeline templates"; method in
 * include/oobleck_planner.h): T* = min over caps V of min_sum(n, V) + (m-1) V, with V every
 * distinct stage latency. min_sum(n, V) comes from the k-free DP (exact when its layout fits
 * with the real in-flight counts) or else from run_dp over the states that can be optimal.
 * Caps are searched by branch and bound; then the smallest cap within the tie tolerance is
 * found. See templates_internal.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "errors.h"
#include "templates_internal.h"

/* ---- candidate caps -------------------------------------------------------------------- */

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Every distinct latency a stage can have in some layout (and that fits with 1 in flight). */
static obk_status candidate_caps(const ctx_t *c, double **out, int64_t *count, char *err, size_t err_len)
{
    const int32_t L = c->L;
    int64_t cap = 0;
    for (int32_t qi = 0; qi < c->nq; qi++)
        cap += (c->qs[qi] == 1 ? 1 : 3);
    cap *= (int64_t)L * (L + 1) / 2;
    if (cap > OBK_TEMPLATES_MAX_CELLS)
        return obk_fail(OBK_ENOMEM, err, err_len, "template search too large: %lld candidate caps",
                        (long long)cap);
    double *v = malloc(sizeof(double) * (size_t)(cap + 1));
    if (!v)
        return obk_fail(OBK_ENOMEM, err, err_len, "out of memory for the candidate caps");
    int64_t n = 0;
    for (int32_t qi = 0; qi < c->nq; qi++) {
        int32_t q = c->qs[qi], g = c->G / q;
        for (int32_t a = 0; a < L; a++) {
            int first_in = a > 0 ? LINK_INTER : LINK_NONE;
            for (int32_t b = a + 1; b <= L; b++) {
                if (stage_memory(c, a, b, g, 1) > c->mcap)
                    break;
                int last_out = b < L ? LINK_INTER : LINK_NONE;
                if (q == 1) {
                    v[n++] = stage_latency(c, a, b, g, first_in, last_out);
                } else {
                    if (b < L)
                        v[n++] = stage_latency(c, a, b, g, first_in, LINK_INTRA);
                    if (a > 0)
                        v[n++] = stage_latency(c, a, b, g, LINK_INTRA, last_out);
                    if (q >= 3 && a > 0 && b < L)
                        v[n++] = stage_latency(c, a, b, g, LINK_INTRA, LINK_INTRA);
                }
            }
        }
    }
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    int64_t u = 0;
    for (int64_t i = 0; i < n; i++)
        if (u == 0 || v[i] != v[u - 1])
            v[u++] = v[i];
    v[u] = INFINITY; /* the virtual "no cap" candidate */
    *out = v;
    *count = u;
    return OBK_OK;
}

obk_status tpl_cache_init(cache_t *cc, ctx_t *c, char *err, size_t err_len)
{
    obk_status st;
    cc->c = c;
    if ((st = candidate_caps(c, &cc->V, &cc->nv, err, err_len)) != OBK_OK)
        return st;
    const size_t nv = (size_t)cc->nv;
    cc->value = malloc(sizeof(double) * (nv + 1));
    cc->stamp = calloc(nv + 1, sizeof(int32_t));
    cc->vidx = malloc(sizeof(int64_t) * (nv + 1));
    if (!cc->value || !cc->stamp || !cc->vidx)
        return obk_fail(OBK_ENOMEM, err, err_len, "out of memory");
    return OBK_OK;
}

void tpl_cache_free(cache_t *cc)
{
    free(cc->value);
    free(cc->stamp);
    free(cc->vidx);
    free(cc->V);
}

/* The first candidate index whose cap is >= v (nv when none). */
int64_t tpl_cap_index(const cache_t *cc, double v)
{
    int64_t lo = 0, hi = cc->nv;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (cc->V[mid] < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* ---- min_sum(n, V) --------------------------------------------------------------------- */

/*
 * min_sum(n, cap) when memory depends on k somewhere: the exact DP with k, over the states that
 * can be optimal. *mx receives the largest stage latency of one optimal layout.
 */
static double exact_min_sum(ctx_t *c, double cap, int32_t n, double *mx)
{
    tpl_kfree_backward(c, cap, n, KF_PESSIMISTIC, c->fw);
    double pes = tpl_kf_root(c, c->fw, n);
    tpl_kfree_forward(c, cap, n, c->fw);
    tpl_window_from_alive(c, n, c->fw, c->bw, pes, c->alive);
    tpl_run_dp(c, cap, 0, n, c->alive);
    double f = tpl_root_value(c, n);
    *mx = f < INFINITY ? tpl_dp_trace_max(c, cap, n) : INFINITY;
    return f;
}

/* min_sum(n, V[i]), computed once per (n, i); also fills vidx[i] (see cache_t). */
static double cache_get(cache_t *cc, int64_t i, int32_t n)
{
    if (cc->stamp[i] == n)
        return cc->value[i];
    ctx_t *c = cc->c;
    double cap = cc->V[i], f, mx;
    tpl_set_window(c, cap, n, n);
    tpl_kfree_backward(c, cap, n, 0, c->bw);
    f = tpl_kf_root(c, c->bw, n);
    int fits = 0;
    mx = f < INFINITY ? tpl_kf_trace_max(c, c->bw, cap, n, 0, &fits, c->path) : INFINITY;
    if (f < INFINITY && !fits)
        f = exact_min_sum(c, cap, n, &mx);
    int64_t vi = i;
    if (f < INFINITY && mx <= cap) {
        vi = tpl_cap_index(cc, mx);
        if (vi > i || cc->V[vi] != mx)
            vi = i;
    }
    cc->value[i] = f;
    cc->vidx[i] = vi;
    cc->stamp[i] = n;
    cc->evals++;
    if (vi < i && cc->stamp[vi] != n) {
        /* min_sum is the same at V[vi]: the layout fits there and a lower cap cannot help */
        cc->value[vi] = f;
        cc->vidx[vi] = vi;
        cc->stamp[vi] = n;
    }
    return f;
}

/* ---- branch and bound over the caps ---------------------------------------------------- */

typedef struct {
    cache_t *cc;
    int32_t n;
    double m1;     /* m_ref - 1 */
    double ub;     /* the least T of a layout seen */
    int64_t ubidx; /* the index of that layout's bottleneck */
    double thr;
} search_t;

/* The index in [a, b] (a <= b) with the most trailing zero bits. */
static int64_t dyadic_mid(int64_t a, int64_t b)
{
    if (a == b)
        return a;
    uint64_t diff = (uint64_t)a ^ (uint64_t)b;
    int h = 63;
    while (!((diff >> h) & 1u))
        h--;
    return (int64_t)((uint64_t)b & ~((((uint64_t)1) << h) - 1));
}

/*
 * A lower bound on sum_s L_s over layouts of n nodes: a layer with work w and params p in a stage
 * of a node with q stages adds q w / G to the stage's compute and 2000 (1 - q/G) p / intra_bw to
 * its shard sync; each layer is charged its cheapest q. Links: n - 1 inter-node boundaries, each
 * paid by two stages.
 */
static double sum_lower_bound(const ctx_t *c, int32_t n)
{
    const int32_t L = c->L;
    double best = 0.0;
    for (int32_t i = 0; i < L; i++) {
        double w = c->W[i + 1] - c->W[i], p = c->P[i + 1] - c->P[i], low = INFINITY;
        for (int32_t qi = 0; qi < c->nq; qi++) {
            double q = c->qs[qi], G = c->G;
            double v = q * w / G + 2000.0 * (1.0 - q / G) * p / c->intra_bw;
            if (v < low)
                low = v;
        }
        best += low;
    }
    if (n > 1) {
        double link = INFINITY;
        for (int32_t b = 1; b < L; b++)
            if (c->c_inter[b] < link)
                link = c->c_inter[b];
        best += 2.0 * (n - 1) * link;
    }
    return best * (1.0 - 1e-9);
}

/* Evaluate candidate i and record the T of the layout found there. */
static double visit(search_t *s, int64_t i)
{
    double f = cache_get(s->cc, i, s->n);
    if (f < INFINITY) {
        int64_t vi = s->cc->vidx[i];
        double t = f + s->m1 * s->cc->V[vi];
        if (t < s->ub) {
            s->ub = t;
            s->ubidx = vi;
        }
    }
    return f;
}

/* Improvements of less than this are not worth a search (far below the tie tolerance). */
static inline double ub_floor(const search_t *s)
{
    return s->ub - 1e-12 * fabs(s->ub);
}

/*
 * Phase 1: lower ub to min T over candidates strictly inside (l, r); l and r are visited.
 * min_sum is constant on [vidx[r], r], so only (l, vidx[r]] can hold a better T.
 */
static void bb_min(search_t *s, int64_t l, int64_t r)
{
    while (r - l >= 2) {
        double fr = visit(s, r);
        int64_t t = s->cc->vidx[r];
        if (t <= l)
            return;
        if (t < r) {
            r = t;
            continue;
        }
        if (fr + s->m1 * s->cc->V[l + 1] >= ub_floor(s))
            return;
        int64_t mid = dyadic_mid(l + 1, r - 1);
        visit(s, mid);
        bb_min(s, l, mid);
        l = mid;
    }
}

/* A candidate qualifies when min_sum + (m-1) V <= thr. Phase 2 finds the smallest one. */
static int64_t first_any(search_t *s, int64_t l, int64_t r);

/* The smallest qualifying index in (l, r]; r qualifies and no index <= l does. */
static int64_t first_known(search_t *s, int64_t l, int64_t r)
{
    for (;;) {
        visit(s, r);
        int64_t t = s->cc->vidx[r];
        if (t < r && t > l) {
            r = t; /* the layout found at r already fits under V[t] */
            continue;
        }
        if (r - l < 2)
            return r;
        if (s->cc->value[r] + s->m1 * s->cc->V[l + 1] > s->thr)
            return r;
        int64_t mid = dyadic_mid(l + 1, r - 1);
        int64_t found = first_any(s, l, mid);
        if (found >= 0)
            return found;
        l = mid;
    }
}

/* The smallest qualifying index in (l, r], or -1; no index <= l qualifies. */
static int64_t first_any(search_t *s, int64_t l, int64_t r)
{
    double f = visit(s, r);
    if (f < INFINITY) {
        int64_t t = s->cc->vidx[r];
        if (t > l && f + s->m1 * s->cc->V[t] <= s->thr)
            return first_known(s, l, t);
    }
    if (r - l < 2)
        return -1;
    if (f + s->m1 * s->cc->V[l + 1] > s->thr)
        return -1;
    int64_t mid = dyadic_mid(l + 1, r - 1);
    int64_t found = first_any(s, l, mid);
    return found >= 0 ? found : first_any(s, mid, r);
}

/*
 * The search for n nodes with m_ref = m microbatches: the index of M*, the smallest cap within
 * the tie tolerance of T* (-1 when the search lost its optimum), and in *budget the tie budget
 * on the sum of latencies, T* (1 + eps) - (m - 1) M*. bottleneck: the least bottleneck of n
 * nodes (one of the candidates); lbsum: a lower bound on min_sum(n, V) for every V.
 */
int64_t tpl_search_caps(cache_t *cc, int32_t n, int64_t m, double bottleneck, double lbsum, double *budget)
{
    const int64_t nv = cc->nv;
    const double *V = cc->V;
    /* V0 = bottleneck is one of the candidates (the same arithmetic produced both) */
    int64_t lo = tpl_cap_index(cc, bottleneck);
    if (lo >= nv)
        lo = nv - 1;
    search_t s = {.cc = cc, .n = n, .m1 = (double)(m - 1), .ub = INFINITY, .ubidx = -1};
    double lb = sum_lower_bound(cc->c, n);
    if (lbsum * (1.0 - 1e-12) > lb)
        lb = lbsum * (1.0 - 1e-12);
    visit(&s, lo);
    if (s.m1 == 0.0)
        visit(&s, nv - 1); /* T = sum: the largest cap gives the least sum */
    /* Gallop over caps V[lo+1], V[lo+2], V[lo+4], ... while a larger cap could still beat
       the best T (T >= lb + (m-1) V), searching each new segment by branch and bound. */
    int64_t l = lo;
    for (int64_t step = 1; l + 1 < nv && s.m1 > 0.0; step *= 2) {
        if (lb + s.m1 * V[l + 1] >= ub_floor(&s))
            break;
        int64_t r = l + step < nv ? l + step : nv - 1;
        visit(&s, r);
        bb_min(&s, l, r);
        l = r;
    }
    s.thr = s.ub + TIE_EPS * fabs(s.ub);
    int64_t best = s.ubidx >= 0 ? first_known(&s, lo - 1, s.ubidx) : -1;
    if (best < 0 || best >= nv)
        return -1;
    *budget = s.thr - s.m1 * V[best];
    return best;
}
