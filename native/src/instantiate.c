/*
 * Instantiation and batch distribution (planner.md "Instantiation and batch distribution").
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
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "oobleck_planner.h"

#define MAX_MICROBATCHES (1 << 28)
#define MAX_NODES (1 << 20)
#define NEG (-(1 << 30))
/* Guard for the reconstruction tables (int32 entries). */
#define MAX_TABLE_ENTRIES ((size_t)1 << 25)

static double t_ms(const obk_pipeline_cost *c, int64_t m)
{
    return c->sum_latency_ms + (double)(m - 1) * c->bottleneck_ms;
}

static int ties(double a, double b)
{
    double scale = fmax(fabs(a), fabs(b));
    return fabs(a - b) <= 1e-9 * scale;
}

static obk_status check_costs(const obk_pipeline_cost *c, int32_t n, const char *what, int ascending, char *err,
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

/* ---- canonical split ------------------------------------------------------------------ */

typedef struct {
    double v; /* T_p(m_p + 1) */
    int32_t i;
} heap_item;

static int heap_less(const heap_item *a, const heap_item *b)
{
    return a->v < b->v || (a->v == b->v && a->i < b->i);
}

static void heap_down(heap_item *h, int32_t n, int32_t k)
{
    for (;;) {
        int32_t l = 2 * k + 1, r = l + 1, s = k;
        if (l < n && heap_less(&h[l], &h[s]))
            s = l;
        if (r < n && heap_less(&h[r], &h[s]))
            s = r;
        if (s == k)
            return;
        heap_item tmp = h[k];
        h[k] = h[s];
        h[s] = tmp;
        k = s;
    }
}

/* Greedy split over pipelines given by index into `costs` (idx may be NULL: identity). */
static obk_status split(const obk_pipeline_cost *costs, const int32_t *idx, int32_t n, int32_t b, int32_t *m,
                        double *ms, char *err, size_t err_len)
{
    heap_item *h = malloc(sizeof(heap_item) * (size_t)n);
    if (h == NULL)
        return obk_fail(OBK_ENOMEM, err, err_len, "out of memory splitting the batch");
    for (int32_t i = 0; i < n; i++) {
        m[i] = 1;
        h[i].v = t_ms(&costs[idx ? idx[i] : i], 2);
        h[i].i = i;
    }
    for (int32_t k = n / 2 - 1; k >= 0; k--)
        heap_down(h, n, k);
    for (int64_t left = (int64_t)b - n; left > 0; left--) {
        int32_t i = h[0].i;
        m[i] += 1;
        h[0].v = t_ms(&costs[idx ? idx[i] : i], (int64_t)m[i] + 1);
        heap_down(h, n, 0);
    }
    for (int32_t i = 0; i < n; i++)
        ms[i] = t_ms(&costs[idx ? idx[i] : i], m[i]);
    free(h);
    return OBK_OK;
}

obk_status obk_distribute_batch(const obk_pipeline_cost *pipelines, int32_t num_pipelines, int32_t microbatches,
                                int32_t *out_microbatches, double *out_ms, char *err, size_t err_len)
{
    obk_status st = check_costs(pipelines, num_pipelines, "pipelines", 0, err, err_len);
    if (st != OBK_OK)
        return st;
    if (microbatches < 1 || microbatches > MAX_MICROBATCHES)
        return obk_fail(OBK_EINVAL, err, err_len, "microbatches must be in 1..%d, got %d", MAX_MICROBATCHES,
                        (int)microbatches);
    if (microbatches < num_pipelines)
        return obk_fail(OBK_EINFEASIBLE, err, err_len,
                        "microbatches (%d) must be >= the number of pipelines (%d): every pipeline needs one",
                        (int)microbatches, (int)num_pipelines);
    if (out_microbatches == NULL || out_ms == NULL)
        return obk_fail(OBK_EINVAL, err, err_len, "output arrays must not be NULL");
    return split(pipelines, NULL, num_pipelines, microbatches, out_microbatches, out_ms, err, err_len);
}

/* ---- instantiation ------------------------------------------------------------------- */

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

/* c_t(z) capped at b; 0 when even one microbatch takes longer than z. */
static int32_t capacity_at(const obk_pipeline_cost *c, double z, int32_t b)
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
static OBK_HOT void relax(int32_t *restrict dst, const int32_t *restrict src, int32_t len, int32_t c)
{
    for (int32_t n = 0; n < len; n++) {
        int32_t v = src[n] + c;
        dst[n] = v > dst[n] ? v : dst[n];
    }
}

/* Invalid (negative) sums back to NEG, valid ones capped at b. */
static OBK_HOT void clamp(int32_t *restrict row, int32_t len, int32_t b)
{
    for (int32_t n = 0; n < len; n++) {
        int32_t v = row[n];
        v = v > b ? b : v;
        row[n] = v < 0 ? NEG : v;
    }
}

/* Fewest pipelines in [p_lo, plimit] on exactly M' nodes with total capacity >= B at z; 0: none. */
static int32_t pmin_at(search_ctx *s, double z, int32_t plimit)
{
    const int32_t mu = s->m_used, b = s->b, nt = s->nt;
    const int32_t n_lo = s->tpl[0].num_nodes;
    int32_t n_hi = 0;
    int32_t *old = s->row0, *cur = s->row1;
    int lp_ok = 0;
    for (int32_t t = 0; t < nt; t++) {
        s->cap[t] = s->tpl[t].num_nodes <= mu ? capacity_at(&s->tpl[t], z, b) : 0;
        if (s->cap[t] > 0) {
            n_hi = s->tpl[t].num_nodes;
            /* Relaxation: capacity <= mu * max_t c_t / n_t. */
            lp_ok |= (int64_t)s->cap[t] * mu >= (int64_t)b * s->tpl[t].num_nodes;
        }
    }
    if (!lp_ok)
        return 0;
    int32_t prev_lo = 0, prev_hi = 0;
    old[0] = 0;
    for (int32_t p = 1; p <= plimit; p++) {
        /* States that can still reach exactly mu nodes within plimit pipelines. */
        int64_t lo64 = (int64_t)mu - (int64_t)(plimit - p) * n_hi;
        int64_t lo = (int64_t)p * n_lo > lo64 ? (int64_t)p * n_lo : lo64;
        int64_t hi = (int64_t)p * n_hi < mu ? (int64_t)p * n_hi : mu;
        if (lo > hi)
            return 0;
        for (int64_t n = lo; n <= hi; n++)
            cur[n] = NEG;
        for (int32_t t = 0; t < nt; t++) {
            const int32_t c = s->cap[t], sz = s->tpl[t].num_nodes;
            if (c <= 0)
                continue;
            int64_t a = (int64_t)prev_lo + sz > lo ? (int64_t)prev_lo + sz : lo;
            int64_t e = (int64_t)prev_hi + sz < hi ? (int64_t)prev_hi + sz : hi;
            if (a <= e)
                relax(cur + a, old + (a - sz), (int32_t)(e - a + 1), c);
        }
        clamp(cur + lo, (int32_t)(hi - lo + 1), b);
        if (hi == mu && p >= s->p_lo && s->reaches[p] && cur[mu] >= b)
            return p;
        int32_t *tmp = old;
        old = cur;
        cur = tmp;
        prev_lo = (int32_t)lo;
        prev_hi = (int32_t)hi;
    }
    return 0;
}

/*
 * Upper bound that ignores the limit on the number of pipelines: the largest capacity of any
 * mix on exactly M' nodes with at least p_lo pipelines (pipeline count tracked up to p_lo only),
 * a DP over node counts alone. Returns 0 when even that is below B (then no p is feasible), 1
 * otherwise. Exact for every plimit >= exact_limit. Leaves cap[] set for z.
 */
/* Sets cap[] for z; 0 when even the relaxation (capacity <= mu * max_t c_t / n_t) is below B. */
static int relaxation_ok(search_ctx *s, double z)
{
    const int32_t mu = s->m_used, b = s->b;
    int ok = 0;
    for (int32_t t = 0; t < s->nt; t++) {
        s->cap[t] = s->tpl[t].num_nodes <= mu ? capacity_at(&s->tpl[t], z, b) : 0;
        if (s->cap[t] > 0)
            ok |= (int64_t)s->cap[t] * mu >= (int64_t)b * s->tpl[t].num_nodes;
    }
    return ok;
}

static int countfree_ok(search_ctx *s, double z)
{
    const int32_t mu = s->m_used, b = s->b, nt = s->nt, K = s->p_lo;
    if (!relaxation_ok(s, z))
        return 0;
    const size_t w = (size_t)mu + 1;
    int32_t *dp = s->dp1; /* rows 0..K-1: exactly k pipelines; row K: at least K; row K+1: scratch */
    for (size_t i = 0; i < ((size_t)K + 1) * w; i++)
        dp[i] = NEG;
    dp[0] = 0;
    for (int32_t k = 1; k < K; k++) {
        int32_t *row = dp + (size_t)k * w;
        for (int32_t t = 0; t < nt; t++) {
            const int32_t c = s->cap[t], sz = s->tpl[t].num_nodes;
            if (c > 0 && sz <= mu)
                relax(row + sz, row - w, mu + 1 - sz, c);
        }
        clamp(row, mu + 1, b);
    }
    /* Row K depends on itself (any number of further pipelines): n ascending, scalar. */
    const int32_t *below = dp + (size_t)(K - 1) * w;
    int32_t *top = dp + (size_t)K * w, *comb = dp + (size_t)(K + 1) * w;
    for (int32_t n = 0; n <= mu; n++) {
        int32_t best = NEG;
        for (int32_t t = 0; t < nt; t++) {
            const int32_t c = s->cap[t], sz = s->tpl[t].num_nodes;
            if (c > 0 && sz <= n && comb[n - sz] >= 0) {
                int32_t v = comb[n - sz] + c;
                best = v > best ? v : best;
            }
        }
        top[n] = best > b ? b : best;
        comb[n] = top[n] > below[n] ? top[n] : below[n];
    }
    return dp[(size_t)K * w + (size_t)mu] >= b;
}

/* Is some p in [p_lo, plimit] feasible at z? plimit < 0: is the relaxation feasible? */
static int feasible(search_ctx *s, double z, int32_t plimit)
{
    if (plimit < 0)
        return relaxation_ok(s, z);
    if (!countfree_ok(s, z))
        return 0;
    if (plimit >= s->exact_limit)
        return 1;
    return pmin_at(s, z, plimit) != 0;
}

/* Smallest candidate value T_t(m) (m in 1..b) strictly greater than x; INFINITY if none. */
static double next_candidate(const search_ctx *s, double x)
{
    double best = INFINITY;
    for (int32_t t = 0; t < s->nt; t++) {
        const obk_pipeline_cost *c = &s->tpl[t];
        double v;
        if (c->sum_latency_ms > x) {
            v = t_ms(c, 1);
        } else if (c->bottleneck_ms <= 0.0) {
            continue;
        } else {
            int32_t m = capacity_at(c, x, s->b); /* largest m with T(m) <= x */
            if (m >= s->b)
                continue;
            v = t_ms(c, (int64_t)m + 1);
        }
        if (v < best)
            best = v;
    }
    return best;
}

/* Largest candidate value <= x; -INFINITY if none. */
static double prev_candidate(const search_ctx *s, double x)
{
    double best = -INFINITY;
    for (int32_t t = 0; t < s->nt; t++) {
        int32_t m = capacity_at(&s->tpl[t], x, s->b);
        if (m >= 1) {
            double v = t_ms(&s->tpl[t], m);
            if (v > best)
                best = v;
        }
    }
    return best;
}

/* Smallest candidate z in (lo, hi] feasible with at most plimit pipelines; hi is feasible. */
static double first_feasible(search_ctx *s, double lo, double hi, int32_t plimit)
{
    for (;;) {
        double c1 = next_candidate(s, lo);
        if (!(c1 < hi))
            return hi;
        double mid = lo + (hi - lo) / 2.0;
        double c = prev_candidate(s, mid);
        if (!(c > lo) || !(c < hi))
            c = c1;
        if (feasible(s, c, plimit))
            hi = c;
        else
            lo = c;
    }
}

static double sync_ms(int32_t p, double w, double bw)
{
    return 1000.0 * 2.0 * (double)(p - 1) / (double)p * w / bw;
}

static void suffix_step(int32_t *dst, const int32_t *next, int32_t Q, int32_t E, int32_t x, int32_t c, int32_t b);

static const int32_t *plane_of(int32_t t, int32_t nt, int32_t step, const int32_t *kept, const int32_t *empty,
                               int32_t *block, int32_t *block_start, size_t plane, const obk_pipeline_cost *tpl,
                               const int32_t *cap, int32_t Q, int32_t E, int32_t n0, int32_t b)
{
    if (t >= nt)
        return empty;
    if ((t - 1) % step == 0)
        return kept + (size_t)((t - 1) / step) * plane;
    const int32_t start = 1 + ((t - 1) / step) * step; /* kept plane of this block */
    if (*block_start != start) {
        const int32_t end = start + step < nt ? start + step : nt; /* next kept plane, or the empty one */
        const int32_t *next = end >= nt ? empty : kept + (size_t)((end - 1) / step) * plane;
        for (int32_t u = end - 1; u > start; u--) {
            int32_t *dst = block + (size_t)(u - start) * plane;
            suffix_step(dst, next, Q, E, tpl[u].num_nodes - n0, cap[u], b);
            next = dst;
        }
        *block_start = start;
    }
    return block + (size_t)(t - start) * plane;
}

/* Suffix table step: plane for templates t.. from the plane for t+1.. (see reconstruct). */
static void suffix_step(int32_t *dst, const int32_t *next, int32_t Q, int32_t E, int32_t x, int32_t c, int32_t b)
{
    const size_t w = (size_t)E + 1;
    for (int32_t q = 0; q <= Q; q++) {
        int32_t *row = dst + (size_t)q * w;
        memcpy(row, next + (size_t)q * w, sizeof(int32_t) * w);
        if (c > 0 && q >= 1 && x <= E) {
            /* row[e] = max(row[e], dst[q-1][e-x] + c) for e >= x; invalid sums stay negative. */
            relax(row + x, row - w, E + 1 - x, c);
            clamp(row + x, E + 1 - x, b);
        }
    }
}

/*
 * Lexicographically smallest count vector (k_0, k_1, ...) with exactly p pipelines on mu nodes
 * and capacity >= b at capacities cap[]. Works on "extras" x_t = n_t - n_0: templates t >= 1 have
 * x_t >= 1, so at most Q = min(p, E) of them, E = mu - p * n_0.
 * G_t[q][e] = best capacity of q pipelines of templates t.. with total extra e (a "plane").
 * Planes are needed for t = 1, 2, ..., nt in that order but computed from nt down: every s-th
 * plane is kept (s ~ sqrt(nt)) and a block of s planes is recomputed from the next kept one.
 */
static obk_status reconstruct(const obk_pipeline_cost *tpl, int32_t nt, const int32_t *cap, int32_t p, int32_t mu,
                              int32_t b, int32_t *counts, char *err, size_t err_len)
{
    const int32_t n0 = tpl[0].num_nodes;
    const int64_t e_tot = (int64_t)mu - (int64_t)p * n0;
    if (e_tot < 0)
        return obk_fail(OBK_EINVAL, err, err_len, "internal error: negative extra nodes");
    const int32_t E = (int32_t)e_tot;
    const int32_t Q = p < E ? p : E;
    const size_t w = (size_t)E + 1, plane = ((size_t)Q + 1) * w;
    int32_t step = 1;
    while ((int64_t)step * step < nt)
        step++;
    const int32_t nkeep = (nt - 1 + step - 1) / step; /* kept planes: t = 1, 1+step, ... < nt */
    const size_t nplanes = (size_t)nkeep + 1 /* empty suffix */ + (size_t)step /* block */ + 1 /* scratch */;
    if (nplanes * plane > MAX_TABLE_ENTRIES)
        return obk_fail(OBK_ENOMEM, err, err_len,
                        "instantiation too large to reconstruct (%d templates, %d pipelines, %d extra nodes)", (int)nt,
                        (int)p, (int)E);
    int32_t *mem = malloc(sizeof(int32_t) * plane * nplanes);
    if (mem == NULL)
        return obk_fail(OBK_ENOMEM, err, err_len, "out of memory reconstructing the instantiation");
    int32_t *kept = mem;                              /* kept[i] = plane for t = 1 + i*step */
    int32_t *empty = mem + (size_t)nkeep * plane;     /* t = nt */
    int32_t *block = empty + plane;                   /* block[j] = plane for t = block_start + j */
    int32_t *scratch = block + (size_t)step * plane;
    int32_t block_start = -1;
    for (size_t i = 0; i < plane; i++)
        empty[i] = NEG;
    empty[0] = 0;
    /* Forward pass from t = nt - 1 down to 1, keeping every step-th plane. */
    {
        const int32_t *next = empty;
        for (int32_t t = nt - 1; t >= 1; t--) {
            int32_t *dst = ((t - 1) % step == 0) ? kept + (size_t)((t - 1) / step) * plane
                                                 : (next == scratch ? block : scratch);
            suffix_step(dst, next, Q, E, tpl[t].num_nodes - n0, cap[t], b);
            next = dst;
        }
    }
/* Plane for templates t.. (1 <= t <= nt), recomputing its block when needed. */
#define PLANE(t) plane_of((t), nt, step, kept, empty, block, &block_start, plane, tpl, cap, Q, E, n0, b)
#define G(pl, q, e) (pl)[(size_t)(q) * w + (size_t)(e)]
    memset(counts, 0, sizeof(int32_t) * (size_t)nt);
    /* k_0 = p - q: smallest k_0 means the largest feasible q. */
    int32_t q_rem = -1, e_rem = E;
    int64_t need = 0;
    const int32_t *g1 = PLANE(1);
    for (int32_t q = Q; q >= 0; q--) {
        int64_t base = (int64_t)(p - q) * cap[0];
        if (p - q > 0 && cap[0] <= 0)
            continue;
        int32_t rest = G(g1, q, E);
        if (rest < 0)
            continue;
        if (base + rest >= b) {
            q_rem = q;
            need = base >= b ? 0 : (int64_t)b - base;
            counts[0] = p - q;
            break;
        }
    }
    if (q_rem < 0) {
        free(mem);
        return obk_fail(OBK_EINVAL, err, err_len, "internal error: no mix to reconstruct");
    }
    for (int32_t t = 1; t < nt; t++) {
        const int32_t x = tpl[t].num_nodes - n0, c = cap[t];
        const int32_t *gn = PLANE(t + 1);
        int32_t k = 0;
        for (;; k++) {
            int32_t qq = q_rem - k, ee = e_rem - k * x;
            if (qq < 0 || ee < 0 || (k > 0 && c <= 0)) {
                free(mem);
                return obk_fail(OBK_EINVAL, err, err_len, "internal error: reconstruction failed");
            }
            int64_t have = (int64_t)k * c;
            int32_t rest = G(gn, qq, ee);
            if (rest >= 0 && have + rest >= need)
                break;
        }
        counts[t] = k;
        q_rem -= k;
        e_rem -= k * x;
        need = (int64_t)k * c >= need ? 0 : need - (int64_t)k * c;
    }
#undef G
#undef PLANE
    free(mem);
    return OBK_OK;
}

/* Bitset helpers for reachability of (pipelines, nodes). */
static void shift_or(uint64_t *dst, const uint64_t *src, size_t words, int32_t shift)
{
    size_t ws = (size_t)shift / 64, bs = (size_t)shift % 64;
    for (size_t i = words; i-- > ws;) {
        uint64_t v = src[i - ws] << bs;
        if (bs && i - ws >= 1)
            v |= src[i - ws - 1] >> (64 - bs);
        dst[i] |= v;
    }
}

static int bit(const uint64_t *set, int32_t n)
{
    return (int)((set[n / 64] >> (n % 64)) & 1u);
}

obk_status obk_instantiate(const obk_pipeline_cost *templates, int32_t num_templates, int32_t num_nodes, int32_t ft,
                           int32_t microbatches, double max_node_param_bytes, double inter_node_bytes_per_s,
                           int32_t *pipeline_template, int32_t *pipeline_microbatches, double *pipeline_ms,
                           int32_t capacity, obk_instantiation *out, char *err, size_t err_len)
{
    obk_status st = check_costs(templates, num_templates, "templates", 1, err, err_len);
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
    int32_t p_hi = M / n0 < B ? M / n0 : B;

    obk_status rc = OBK_OK;
    const size_t words = (size_t)M / 64 + 1;
    uint64_t *ra = calloc(words, sizeof(uint64_t)), *rb = calloc(words, sizeof(uint64_t));
    const int32_t p_all = M / n0; /* most pipelines on M nodes, ignoring B */
    uint8_t *reaches = calloc((size_t)p_all + 1, 1);
    int32_t *dp1 = NULL;
    int32_t *cap = malloc(sizeof(int32_t) * (size_t)num_templates);
    int32_t *row0 = malloc(sizeof(int32_t) * ((size_t)M + 1)), *row1 = malloc(sizeof(int32_t) * ((size_t)M + 1));
    int32_t *counts = malloc(sizeof(int32_t) * (size_t)num_templates);
    if (!ra || !rb || !reaches || !cap || !row0 || !row1 || !counts) {
        rc = obk_fail(OBK_ENOMEM, err, err_len, "out of memory planning the instantiation");
        goto done;
    }

    /* Pass 1: the most nodes usable with p in [p_lo, p_hi] pipelines; pass 2: which p reach it. */
    int32_t mu = -1;
    const int32_t n_max = templates[num_templates - 1].num_nodes;
    int contiguous = n_max - n0 == num_templates - 1;
    if (contiguous) {
        /* Sizes n0..n_max: p pipelines cover exactly the node counts [p*n0, p*n_max]. */
        for (int32_t p = p_lo; p <= p_hi; p++) {
            int64_t top = (int64_t)p * n_max < M ? (int64_t)p * n_max : M;
            if ((int64_t)p * n0 <= M && top > mu)
                mu = (int32_t)top;
        }
        for (int32_t p = 1; p <= p_all; p++)
            reaches[p] = (int64_t)p * n0 <= mu && mu <= (int64_t)p * n_max;
    }
    for (int pass = 0; pass < 2 && !contiguous; pass++) {
        memset(ra, 0, words * sizeof(uint64_t));
        ra[0] = 1;
        for (int32_t p = 1; p <= (pass == 0 ? p_hi : p_all); p++) {
            memset(rb, 0, words * sizeof(uint64_t));
            for (int32_t t = 0; t < num_templates; t++)
                if (templates[t].num_nodes <= M)
                    shift_or(rb, ra, words, templates[t].num_nodes);
            /* Bits above M are junk-free: shift_or never writes past `words`, clear the tail. */
            if ((M + 1) % 64)
                rb[words - 1] &= (((uint64_t)1) << ((M + 1) % 64)) - 1;
            if (p >= p_lo) {
                if (pass == 0) {
                    for (int32_t n = M; n > mu; n--)
                        if (bit(rb, n)) {
                            mu = n;
                            break;
                        }
                } else {
                    reaches[p] = (uint8_t)bit(rb, mu);
                }
            }
            uint64_t *tmp = ra;
            ra = rb;
            rb = tmp;
        }
        if (pass == 0 && mu < 0) {
            rc = obk_fail(OBK_EINFEASIBLE, err, err_len,
                          "no mix of %d..%d pipelines fits %d nodes with the template sizes given", (int)p_lo,
                          (int)p_hi, (int)M);
            goto done;
        }
    }
    int32_t lo_reach = 0, hi_reach = 0, all_reach = 0;
    for (int32_t p = p_lo; p <= p_all; p++)
        if (reaches[p]) {
            if (!lo_reach)
                lo_reach = p;
            if (p <= p_hi)
                hi_reach = p;
            all_reach = p;
        }

    dp1 = malloc(sizeof(int32_t) * ((size_t)lo_reach + 2) * ((size_t)mu + 1));
    if (dp1 == NULL) {
        rc = obk_fail(OBK_ENOMEM, err, err_len, "out of memory planning the instantiation");
        goto done;
    }
    search_ctx s = {templates, num_templates, mu, B, lo_reach, hi_reach, reaches, cap, row0, row1, dp1, all_reach};
    double zmax = -INFINITY;
    for (int32_t t = 0; t < num_templates; t++)
        if (templates[t].num_nodes <= mu && t_ms(&templates[t], B) > zmax)
            zmax = t_ms(&templates[t], B);
    /* At zmax every pipeline takes all B microbatches, so lo_reach pipelines are feasible. */
    /* The relaxation's bound is usually close: start there and gallop up to a feasible z. */
    double lo = -1.0, hi = zmax;
    double z = first_feasible(&s, -1.0, zmax, -1);
    for (double step = fmax(fabs(z) * 1e-6, 1e-9);; step *= 4.0) {
        if (!(z < hi))
            break;
        if (feasible(&s, z, hi_reach)) {
            hi = z;
            break;
        }
        lo = z;
        double next = prev_candidate(&s, z + step);
        z = next > lo ? next : next_candidate(&s, lo);
    }
    z = first_feasible(&s, lo, hi, hi_reach);
    int32_t p_cur = pmin_at(&s, z, hi_reach);
    double best_z = z, best_est = z + sync_ms(p_cur, max_node_param_bytes, inter_node_bytes_per_s);
    int32_t best_p = p_cur;
    while (p_cur > lo_reach) {
        /*
         * Fewer pipelines need a larger z. A plan with p pipelines gives some pipeline at least
         * ceil(B/p) microbatches, so its estimate is at least max(z, z_lb(p)) + sync(p) with
         * z_lb(p) = min_t T_t(ceil(B/p)). Only counts whose bound can match the best are searched.
         */
        const double slack = best_est + 1e-9 * fabs(best_est);
        int32_t p_top = 0;
        double z_from = INFINITY, sync_min = INFINITY;
        for (int32_t p = p_cur - 1; p >= lo_reach; p--) {
            if (!reaches[p])
                continue;
            const int64_t m = ((int64_t)B + p - 1) / p;
            double zlb = INFINITY;
            for (int32_t t = 0; t < num_templates; t++)
                if (templates[t].num_nodes <= mu && t_ms(&templates[t], m) < zlb)
                    zlb = t_ms(&templates[t], m);
            zlb = fmax(zlb, z);
            const double sy = sync_ms(p, max_node_param_bytes, inter_node_bytes_per_s);
            if (zlb + sy <= slack) {
                if (!p_top)
                    p_top = p;
                z_from = fmin(z_from, zlb);
                sync_min = fmin(sync_min, sy);
            }
        }
        if (!p_top)
            break;
        double zl = prev_candidate(&s, slack - sync_min);
        if (!(zl > z) || !feasible(&s, zl, p_top))
            break;
        /* No count that can win is feasible below z_from. */
        double lo1 = prev_candidate(&s, z_from);
        lo1 = lo1 < z_from && lo1 > z ? lo1 : z;
        if (!(lo1 < zl))
            lo1 = z;
        double z1 = first_feasible(&s, lo1, zl, p_top);
        int32_t p1 = pmin_at(&s, z1, p_top);
        double est1 = z1 + sync_ms(p1, max_node_param_bytes, inter_node_bytes_per_s);
        if (est1 < best_est || ties(est1, best_est)) {
            best_est = est1;
            best_z = z1;
            best_p = p1;
        }
        z = z1;
        p_cur = p1;
    }

    for (int32_t t = 0; t < num_templates; t++)
        cap[t] = templates[t].num_nodes <= mu ? capacity_at(&templates[t], best_z, B) : 0;
    rc = reconstruct(templates, num_templates, cap, best_p, mu, B, counts, err, err_len);
    if (rc != OBK_OK)
        goto done;
    int32_t k = 0;
    for (int32_t t = 0; t < num_templates; t++)
        for (int32_t j = 0; j < counts[t]; j++)
            pipeline_template[k++] = t;
    rc = split(templates, pipeline_template, best_p, B, pipeline_microbatches, pipeline_ms, err, err_len);
    if (rc != OBK_OK)
        goto done;
    double zz = 0.0;
    for (int32_t i = 0; i < best_p; i++)
        zz = pipeline_ms[i] > zz ? pipeline_ms[i] : zz;
    out->num_pipelines = best_p;
    out->used_nodes = mu;
    out->degraded = degraded;
    out->max_pipeline_ms = zz;
    out->sync_ms = sync_ms(best_p, max_node_param_bytes, inter_node_bytes_per_s);
    out->iteration_ms = zz + out->sync_ms;
done:
    free(ra);
    free(rb);
    free(reaches);
    free(dp1);
    free(cap);
    free(row0);
    free(row1);
    free(counts);
    return rc;
}
