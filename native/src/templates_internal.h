/*
 * Internal interface of the template planner (obk_plan_templates), shared by its units:
 *   templates.c         the entry point and its phases (least bottlenecks, node range, per-size
 *                       search, template output, uncovered node counts)
 *   templates_checks.c  input checks and the explanation of infeasible memory
 *   templates_tables.c  the DP context: prefix sums, link costs, table layout, state windows
 *   templates_dp.c      the DPs: with the in-flight dimension k (run_dp) and without (k-free)
 *   templates_trace.c   following one optimal layout through a DP table
 *   templates_search.c  the candidate caps and the branch-and-bound search over them
 *   templates_rebuild.c rebuilding the chosen layout under the tie rules
 * The method and the decisions docs/planner.md leaves open are described in
 * include/oobleck_planner.h next to obk_plan_templates.
 *
 * DP states: the stage starting at layer x is the (q - t + 1)-th of the q stages of its node
 * ("pair" (q, t)); j nodes (this one included) and k stages (this one included: its 1F1B
 * in-flight count) remain. The k-free tables drop k; the full tables (h, e) keep it.
 *
 * No global or static mutable state: every table is allocated per call.
 */
#ifndef OBK_TEMPLATES_INTERNAL_H
#define OBK_TEMPLATES_INTERNAL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "oobleck_planner.h"

#define TIE_EPS 1e-9
#define MAX_CLUSTER_NODES 1000000

enum { LINK_NONE = 0, LINK_INTRA = 1, LINK_INTER = 2 };

/* Flags of tpl_kfree_backward. */
#define KF_PESSIMISTIC 1
#define KF_MAX 2 /* min of the largest stage latency instead of the least sum */

typedef struct {
    int32_t L, G, J;
    int32_t nq;      /* allowed stage counts per node: divisors q of G with q <= L */
    int32_t *qs;     /* ascending */
    int32_t *pstart; /* q index -> index of the pair (q, t = 1); pair (q, t) = pstart + t - 1 */
    int32_t np;      /* number of (q, t) pairs */
    double *W, *P, *A;         /* prefix sums over layers of (fwd + bwd), params, activations */
    double *c_intra, *c_inter; /* link cost at boundary b (between layers b-1 and b) */
    double F, mcap, intra_bw;
    int64_t *off; /* (x, j) -> first cell; cell (x, j, k) = off + k - j */
    int32_t *xlo, *xhi; /* per j: the x range the last run_dp computed (its window) */
    int32_t *reach;     /* scratch, J + 2 */
    double *bw, *fw;      /* k-free tables, (L + 1) (J + 1) np */
    int64_t *path;        /* scratch, L + 1 */
    unsigned char *alive; /* same shape */
    int64_t ncells;
    double *h; /* ncells * np: min sum (or max) of the stages from x on */
    double *e; /* ncells: min over q of h(x, j, k, q, t = q), i.e. a node starts at x */
} ctx_t;

/* ---- small helpers (inline: they sit in the DPs' inner loops) ------------------------- */

static inline int32_t imin32(int32_t a, int32_t b)
{
    return a < b ? a : b;
}

static inline int64_t imin64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

static inline double stage_base(const ctx_t *c, int32_t a, int32_t b, int32_t g)
{
    double comp = (c->W[b] - c->W[a]) / g;
    double sync = 0.0;
    if (g > 1)
        sync = 1000.0 * 2.0 * (double)(g - 1) / (double)g * (c->P[b] - c->P[a]) / c->intra_bw;
    return comp + sync;
}

static inline double link_cost(const ctx_t *c, int32_t boundary, int type)
{
    if (type == LINK_INTRA)
        return c->c_intra[boundary];
    if (type == LINK_INTER)
        return c->c_inter[boundary];
    return 0.0;
}

static inline double stage_latency(const ctx_t *c, int32_t a, int32_t b, int32_t g, int in_type,
                                   int out_type)
{
    return (stage_base(c, a, b, g) + link_cost(c, a, in_type)) + link_cost(c, b, out_type);
}

static inline double stage_memory(const ctx_t *c, int32_t a, int32_t b, int32_t g, int32_t k)
{
    return (c->F * (c->P[b] - c->P[a]) + (double)k * (c->A[b] - c->A[a])) / g;
}

/* Index of the cell (x, j, k), or -1 when that state cannot exist. */
static inline int64_t cell(const ctx_t *c, int32_t x, int32_t j, int32_t k)
{
    int32_t rest = c->L - x;
    if (x < 0 || x >= c->L || j < 1 || j > imin32(c->J, rest) || k < j)
        return -1;
    if ((int64_t)k > imin64(rest, (int64_t)j * c->G))
        return -1;
    if (x < c->xlo[j] || x > c->xhi[j])
        return -1;
    return c->off[(int64_t)x * (c->J + 1) + j] + (k - j);
}

static inline size_t kf_index(const ctx_t *c, int32_t x, int32_t j, int32_t pi)
{
    return ((size_t)x * (size_t)(c->J + 1) + (size_t)j) * (size_t)c->np + (size_t)pi;
}

/* A k-free table entry, +inf outside the window. */
static inline double kf_get(const ctx_t *c, const double *tab, int32_t x, int32_t j, int32_t pi)
{
    if (j < 1 || x < c->xlo[j] || x > c->xhi[j])
        return INFINITY;
    return tab[kf_index(c, x, j, pi)];
}

static inline double combine(int mode_max, double lat, double rest)
{
    return mode_max ? (lat > rest ? lat : rest) : lat + rest;
}

/* ---- templates_tables.c ---------------------------------------------------------------- */

obk_status tpl_ctx_init(ctx_t *c, const obk_layer *layers, int32_t L, const obk_cluster *cl, int32_t J,
                        char *err, size_t err_len);
void tpl_ctx_free(ctx_t *c);
void tpl_set_window(ctx_t *c, double cap, int32_t jlim, int32_t n);

/* ---- templates_dp.c -------------------------------------------------------------------- */

void tpl_run_dp(ctx_t *c, double cap, int mode_max, int32_t jlim, const unsigned char *alive);
int tpl_kfree_backward(const ctx_t *c, double cap, int32_t n, int flags, double *bw);
void tpl_kfree_forward(const ctx_t *c, double cap, int32_t n, double *fw);
double tpl_kf_root(const ctx_t *c, const double *tab, int32_t n);
double tpl_root_value(const ctx_t *c, int32_t n);
void tpl_root_values(const ctx_t *c, int32_t jlim, double *out);
int64_t tpl_window_from_alive(ctx_t *c, int32_t n, const double *fw, const double *bw, double bound,
                              unsigned char *alive);

/* ---- templates_trace.c ----------------------------------------------------------------- */

double tpl_trace_path(const ctx_t *c, const double *kf, double cap, int32_t n, int mode_max, int64_t *path,
                      int32_t *S_out);
double tpl_kf_trace_max(const ctx_t *c, const double *bw, double cap, int32_t n, int mode_max, int *fits,
                        int64_t *path);
double tpl_dp_trace_max(const ctx_t *c, double cap, int32_t n);

/* ---- templates_search.c ---------------------------------------------------------------- */

/*
 * The candidate caps V (every distinct stage latency, then V[nv] = +inf) and, per candidate
 * index i, for the n being searched (stamp[i] == n when known): value[i] = min_sum(n, V_i), and
 * vidx[i] = the index of the largest stage latency of one layout with that sum (so that layout
 * is also within every cap from V[vidx[i]] on).
 */
typedef struct {
    ctx_t *c;
    double *V; /* nv + 1 values, V[nv] = +inf */
    int64_t nv;
    double *value;
    int64_t *vidx;
    int32_t *stamp;
    int64_t evals;
} cache_t;

obk_status tpl_cache_init(cache_t *cc, ctx_t *c, char *err, size_t err_len);
void tpl_cache_free(cache_t *cc);
int64_t tpl_cap_index(const cache_t *cc, double v);
int64_t tpl_search_caps(cache_t *cc, int32_t n, int64_t m, double bottleneck, double lbsum, double *budget);

/* ---- templates_rebuild.c --------------------------------------------------------------- */

/* Scratch of the rebuild: front and next hold (J+1)*np values, hb (L+1)*(J+1)*np. */
typedef struct {
    double *front, *next, *hb;
    int32_t *bounds, *gpus; /* L + 1 each: the rebuilt layout */
} rebuild_t;

obk_status tpl_rebuild_init(rebuild_t *rb, const ctx_t *c);
void tpl_rebuild_free(rebuild_t *rb);
int tpl_rebuild_layout(ctx_t *c, int32_t n, double capM, double budget, rebuild_t *rb, int32_t *S_out);

/* ---- templates_checks.c ---------------------------------------------------------------- */

obk_status tpl_validate_args(const obk_layer *layers, int32_t num_layers, const obk_cluster *cluster,
                             int32_t ft, int32_t microbatches, int32_t min_nodes, obk_node_spec *spec,
                             const obk_template *templates, int32_t max_templates, const obk_stage *stages,
                             int32_t max_stages, const int32_t *uncovered, int32_t max_uncovered, char *err,
                             size_t err_len);
obk_status tpl_check_cost_range(const ctx_t *c, int32_t microbatches, char *err, size_t err_len);
obk_status tpl_memory_failure(const ctx_t *c, const obk_cluster *cl, char *err, size_t err_len);
obk_status tpl_find_uncovered(const unsigned char *ok, int32_t smin, int32_t smax, int64_t parts, int32_t lo,
                              int32_t hi, int32_t *out, int32_t cap, int32_t *count);

#endif
