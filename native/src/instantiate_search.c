/*
 * The search of instantiation (docs/planner.md, "Instantiation and batch distribution"; the
 * method is described in instantiate.c): the bound z ranges over the candidate values T_t(m);
 * the smallest feasible z gives the first pipeline count, then the search moves to the
 * breakpoints where fewer pipelines become feasible while their estimate can still win.
 * See instantiate_internal.h.
 */
#include <math.h>
#include <stdint.h>

#include "instantiate_internal.h"

static int ties(double a, double b)
{
    double scale = fmax(fabs(a), fabs(b));
    return fabs(a - b) <= 1e-9 * scale;
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
        if (inst_feasible(s, c, plimit))
            hi = c;
        else
            lo = c;
    }
}

/* The smallest z at which some pipeline count in [p_lo, p_hi] is feasible. */
static double smallest_feasible(search_ctx *s)
{
    double zmax = -INFINITY;
    for (int32_t t = 0; t < s->nt; t++)
        if (s->tpl[t].num_nodes <= s->m_used && t_ms(&s->tpl[t], s->b) > zmax)
            zmax = t_ms(&s->tpl[t], s->b);
    /* At zmax every pipeline takes all B microbatches, so p_lo pipelines are feasible. */
    /* The relaxation's bound is usually close: start there and gallop up to a feasible z. */
    double lo = -1.0, hi = zmax;
    double z = first_feasible(s, -1.0, zmax, -1);
    for (double step = fmax(fabs(z) * 1e-6, 1e-9);; step *= 4.0) {
        if (!(z < hi))
            break;
        if (inst_feasible(s, z, s->p_hi)) {
            hi = z;
            break;
        }
        lo = z;
        double next = prev_candidate(s, z + step);
        z = next > lo ? next : next_candidate(s, lo);
    }
    return first_feasible(s, lo, hi, s->p_hi);
}

/*
 * The pipeline counts below p_cur that can still match the best estimate (within `slack`):
 * a plan with p pipelines gives some pipeline at least ceil(B/p) microbatches, so its estimate
 * is at least max(z, z_lb(p)) + sync(p) with z_lb(p) = min_t T_t(ceil(B/p)). Returns the
 * largest such count (0: none); *z_from and *sync_min get the least z_lb and sync among them.
 */
static int32_t winnable_counts(const search_ctx *s, double z, int32_t p_cur, double slack, double w, double bw,
                               double *z_from, double *sync_min)
{
    int32_t p_top = 0;
    *z_from = INFINITY;
    *sync_min = INFINITY;
    for (int32_t p = p_cur - 1; p >= s->p_lo; p--) {
        if (!s->reaches[p])
            continue;
        const int64_t m = ((int64_t)s->b + p - 1) / p;
        double zlb = INFINITY;
        for (int32_t t = 0; t < s->nt; t++)
            if (s->tpl[t].num_nodes <= s->m_used && t_ms(&s->tpl[t], m) < zlb)
                zlb = t_ms(&s->tpl[t], m);
        zlb = fmax(zlb, z);
        const double sy = sync_ms(p, w, bw);
        if (zlb + sy <= slack) {
            if (!p_top)
                p_top = p;
            *z_from = fmin(*z_from, zlb);
            *sync_min = fmin(*sync_min, sy);
        }
    }
    return p_top;
}

/*
 * The chosen (z, P): the least estimate z + sync(P) over the breakpoints of pmin (estimates
 * within a relative 1e-9 are equal; then fewer pipelines). w: the largest parameter bytes of
 * a node, bw: inter-node bytes per second.
 */
void inst_search(search_ctx *s, double w, double bw, double *best_z_out, int32_t *best_p_out)
{
    double z = smallest_feasible(s);
    int32_t p_cur = inst_pmin_at(s, z, s->p_hi);
    double best_z = z, best_est = z + sync_ms(p_cur, w, bw);
    int32_t best_p = p_cur;
    while (p_cur > s->p_lo) {
        /* Fewer pipelines need a larger z; only counts whose bound can match the best are searched. */
        const double slack = best_est + 1e-9 * fabs(best_est);
        double z_from, sync_min;
        int32_t p_top = winnable_counts(s, z, p_cur, slack, w, bw, &z_from, &sync_min);
        if (!p_top)
            break;
        double zl = prev_candidate(s, slack - sync_min);
        if (!(zl > z) || !inst_feasible(s, zl, p_top))
            break;
        /* No count that can win is feasible below z_from. */
        double lo1 = prev_candidate(s, z_from);
        lo1 = lo1 < z_from && lo1 > z ? lo1 : z;
        if (!(lo1 < zl))
            lo1 = z;
        double z1 = first_feasible(s, lo1, zl, p_top);
        int32_t p1 = inst_pmin_at(s, z1, p_top);
        double est1 = z1 + sync_ms(p1, w, bw);
        if (est1 < best_est || ties(est1, best_est)) {
            best_est = est1;
            best_z = z1;
            best_p = p1;
        }
        z = z1;
        p_cur = p1;
    }
    *best_z_out = best_z;
    *best_p_out = best_p;
}
