/*
 * The count vector of instantiation (docs/planner.md, "Instantiation and batch distribution";
 * the method is described in instantiate.c): for the chosen (z, P), the lexicographically
 * smallest (k_0, k_1, ...) with exactly P pipelines on M' nodes and capacity >= B, traced
 * front to back through suffix tables over the templates. See instantiate_internal.h.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "instantiate_internal.h"

/*
 * The suffix tables. Works on "extras" x_t = n_t - n_0: templates t >= 1 have x_t >= 1, so at
 * most Q = min(p, E) of them, E = mu - p * n_0. G_t[q][e] = best capacity of q pipelines of
 * templates t.. with total extra e (a "plane"). Planes are needed for t = 1, 2, ..., nt in that
 * order but computed from nt down: every step-th plane is kept (step ~ sqrt(nt)) and a block of
 * step planes is recomputed from the next kept one.
 */
typedef struct {
    const obk_pipeline_cost *tpl;
    const int32_t *cap;
    int32_t nt, n0, b, Q, E, step;
    size_t w, plane; /* row width E + 1; plane size (Q + 1) w */
    int32_t *mem;
    int32_t *kept;       /* kept[i] = plane for t = 1 + i*step */
    int32_t *empty;      /* t = nt */
    int32_t *block;      /* block[j] = plane for t = block_start + j */
    int32_t *scratch;
    int32_t block_start;
} planes_t;

/* Suffix table step: plane for templates t.. from the plane for t+1.. */
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

/* Allocate the planes and compute the kept ones, from t = nt - 1 down to 1. */
static obk_status planes_init(planes_t *pl, int32_t p, char *err, size_t err_len)
{
    const int32_t nt = pl->nt, E = pl->E, Q = pl->Q;
    pl->w = (size_t)E + 1;
    pl->plane = ((size_t)Q + 1) * pl->w;
    const size_t plane = pl->plane;
    int32_t step = 1;
    while ((int64_t)step * step < nt)
        step++;
    pl->step = step;
    const int32_t nkeep = (nt - 1 + step - 1) / step; /* kept planes: t = 1, 1+step, ... < nt */
    const size_t nplanes = (size_t)nkeep + 1 /* empty suffix */ + (size_t)step /* block */ + 1 /* scratch */;
    if (nplanes * plane > MAX_TABLE_ENTRIES)
        return obk_fail(OBK_ENOMEM, err, err_len,
                        "instantiation too large to reconstruct (%d templates, %d pipelines, %d extra nodes)", (int)nt,
                        (int)p, (int)E);
    pl->mem = malloc(sizeof(int32_t) * plane * nplanes);
    if (pl->mem == NULL)
        return obk_fail(OBK_ENOMEM, err, err_len, "out of memory reconstructing the instantiation");
    pl->kept = pl->mem;
    pl->empty = pl->mem + (size_t)nkeep * plane;
    pl->block = pl->empty + plane;
    pl->scratch = pl->block + (size_t)step * plane;
    pl->block_start = -1;
    for (size_t i = 0; i < plane; i++)
        pl->empty[i] = NEG;
    pl->empty[0] = 0;
    const int32_t *next = pl->empty;
    for (int32_t t = nt - 1; t >= 1; t--) {
        int32_t *dst = ((t - 1) % step == 0) ? pl->kept + (size_t)((t - 1) / step) * plane
                                             : (next == pl->scratch ? pl->block : pl->scratch);
        suffix_step(dst, next, Q, E, pl->tpl[t].num_nodes - pl->n0, pl->cap[t], pl->b);
        next = dst;
    }
    return OBK_OK;
}

/* Plane for templates t.. (1 <= t <= nt), recomputing its block when needed. */
static const int32_t *plane_of(planes_t *pl, int32_t t)
{
    const int32_t nt = pl->nt, step = pl->step;
    const size_t plane = pl->plane;
    if (t >= nt)
        return pl->empty;
    if ((t - 1) % step == 0)
        return pl->kept + (size_t)((t - 1) / step) * plane;
    const int32_t start = 1 + ((t - 1) / step) * step; /* kept plane of this block */
    if (pl->block_start != start) {
        const int32_t end = start + step < nt ? start + step : nt; /* next kept plane, or the empty one */
        const int32_t *next = end >= nt ? pl->empty : pl->kept + (size_t)((end - 1) / step) * plane;
        for (int32_t u = end - 1; u > start; u--) {
            int32_t *dst = pl->block + (size_t)(u - start) * plane;
            suffix_step(dst, next, pl->Q, pl->E, pl->tpl[u].num_nodes - pl->n0, pl->cap[u], pl->b);
            next = dst;
        }
        pl->block_start = start;
    }
    return pl->block + (size_t)(t - start) * plane;
}

static inline int32_t plane_at(const planes_t *pl, const int32_t *g, int32_t q, int32_t e)
{
    return g[(size_t)q * pl->w + (size_t)e];
}

/*
 * k_0 = p - q: the smallest k_0 means the largest feasible q. Sets counts[0], *q_rem and
 * *need (capacity still needed from templates 1..); -1 when there is no mix.
 */
static int trace_first(planes_t *pl, int32_t p, int32_t *counts, int32_t *q_rem, int64_t *need)
{
    const int32_t *g1 = plane_of(pl, 1);
    const int32_t c0 = pl->cap[0], b = pl->b;
    for (int32_t q = pl->Q; q >= 0; q--) {
        int64_t base = (int64_t)(p - q) * c0;
        if (p - q > 0 && c0 <= 0)
            continue;
        int32_t rest = plane_at(pl, g1, q, pl->E);
        if (rest < 0)
            continue;
        if (base + rest >= b) {
            *q_rem = q;
            *need = base >= b ? 0 : (int64_t)b - base;
            counts[0] = p - q;
            return 0;
        }
    }
    return -1;
}

/* counts[1..]: at each template the fewest pipelines that keep a completion. -1 if lost. */
static int trace_rest(planes_t *pl, int32_t *counts, int32_t q_rem, int64_t need)
{
    int32_t e_rem = pl->E;
    for (int32_t t = 1; t < pl->nt; t++) {
        const int32_t x = pl->tpl[t].num_nodes - pl->n0, c = pl->cap[t];
        const int32_t *gn = plane_of(pl, t + 1);
        int32_t k = 0;
        for (;; k++) {
            int32_t qq = q_rem - k, ee = e_rem - k * x;
            if (qq < 0 || ee < 0 || (k > 0 && c <= 0))
                return -1;
            int64_t have = (int64_t)k * c;
            int32_t rest = plane_at(pl, gn, qq, ee);
            if (rest >= 0 && have + rest >= need)
                break;
        }
        counts[t] = k;
        q_rem -= k;
        e_rem -= k * x;
        need = (int64_t)k * c >= need ? 0 : need - (int64_t)k * c;
    }
    return 0;
}

/*
 * Lexicographically smallest count vector (k_0, k_1, ...) with exactly p pipelines on mu nodes
 * and capacity >= b at capacities cap[].
 */
obk_status inst_reconstruct(const obk_pipeline_cost *tpl, int32_t nt, const int32_t *cap, int32_t p, int32_t mu,
                            int32_t b, int32_t *counts, char *err, size_t err_len)
{
    const int32_t n0 = tpl[0].num_nodes;
    const int64_t e_tot = (int64_t)mu - (int64_t)p * n0;
    if (e_tot < 0)
        return obk_fail(OBK_EINVAL, err, err_len, "internal error: negative extra nodes");
    planes_t pl;
    memset(&pl, 0, sizeof(pl));
    pl.tpl = tpl;
    pl.cap = cap;
    pl.nt = nt;
    pl.n0 = n0;
    pl.b = b;
    pl.E = (int32_t)e_tot;
    pl.Q = p < pl.E ? p : pl.E;
    obk_status st = planes_init(&pl, p, err, err_len);
    if (st != OBK_OK)
        return st;
    memset(counts, 0, sizeof(int32_t) * (size_t)nt);
    int32_t q_rem = -1;
    int64_t need = 0;
    if (trace_first(&pl, p, counts, &q_rem, &need) != 0)
        st = obk_fail(OBK_EINVAL, err, err_len, "internal error: no mix to reconstruct");
    else if (trace_rest(&pl, counts, q_rem, need) != 0)
        st = obk_fail(OBK_EINVAL, err, err_len, "internal error: reconstruction failed");
    free(pl.mem);
    return st;
}
