/*
 * The DP tables of instantiation (docs/planner.md, "Instantiation and batch distribution"; the
 * method is described in instantiate.c): which node counts p pipelines can cover exactly, a
 * template's capacity c_t(z) at a bound z, and whether some pipeline count reaches capacity B
 * on exactly M' nodes at z. See instantiate_internal.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "instantiate_internal.h"

/* ---- node counts pipelines can cover ---------------------------------------------------- */

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

/*
 * Pass 1: M' (*mu), the most nodes usable with p in [p_lo, p_hi] pipelines; pass 2: which p in
 * 1..p_all cover exactly M' nodes (reaches[p], p_all + 1 entries, zeroed by the caller).
 */
obk_status inst_usable_nodes(const obk_pipeline_cost *templates, int32_t num_templates, int32_t M,
                             const inst_limits *lim, uint8_t *reaches, int32_t *mu_out, char *err, size_t err_len)
{
    const int32_t n0 = lim->n0, p_lo = lim->p_lo, p_hi = lim->p_hi, p_all = lim->p_all;
    const size_t words = (size_t)M / 64 + 1;
    uint64_t *ra = calloc(words, sizeof(uint64_t)), *rb = calloc(words, sizeof(uint64_t));
    obk_status rc = OBK_OK;
    if (!ra || !rb) {
        rc = obk_fail(OBK_ENOMEM, err, err_len, "out of memory planning the instantiation");
        goto done;
    }
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
    *mu_out = mu;
done:
    free(ra);
    free(rb);
    return rc;
}

/* ---- capacity of pipeline mixes at a bound z ------------------------------------------- */

/* Fewest pipelines in [p_lo, plimit] on exactly M' nodes with total capacity >= B at z; 0: none. */
int32_t inst_pmin_at(search_ctx *s, double z, int32_t plimit)
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

/*
 * Upper bound that ignores the limit on the number of pipelines: the largest capacity of any
 * mix on exactly M' nodes with at least p_lo pipelines (pipeline count tracked up to p_lo only),
 * a DP over node counts alone. Returns 0 when even that is below B (then no p is feasible), 1
 * otherwise. Exact for every plimit >= exact_limit. Leaves cap[] set for z.
 */
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
int inst_feasible(search_ctx *s, double z, int32_t plimit)
{
    if (plimit < 0)
        return relaxation_ok(s, z);
    if (!countfree_ok(s, z))
        return 0;
    if (plimit >= s->exact_limit)
        return 1;
    return inst_pmin_at(s, z, plimit) != 0;
}
