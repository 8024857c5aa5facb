/*
 * Pipeline templates and node specification (planner.md, "Pipeline templates" and
 * "Node specification"). The method and the decisions planner.md leaves open are described in
 * include/oobleck_planner.h next to obk_plan_templates.
 *
 * DP states: the stage starting at layer x is the (q - t + 1)-th of the q stages of its node
 * ("pair" (q, t)); j nodes (this one included) and k stages (this one included: its 1F1B
 * in-flight count) remain. The k-free tables drop k; the full tables (h, e) keep it.
 *
 * No global or static mutable state: every table is allocated per call.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "oobleck_planner.h"

#define TIE_EPS 1e-9
#define MAX_CLUSTER_NODES 1000000

enum { LINK_NONE = 0, LINK_INTRA = 1, LINK_INTER = 2 };

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

static void ctx_free(ctx_t *c)
{
    free(c->qs);
    free(c->pstart);
    free(c->W);
    free(c->P);
    free(c->A);
    free(c->c_intra);
    free(c->c_inter);
    free(c->off);
    free(c->xlo);
    free(c->xhi);
    free(c->reach);
    free(c->bw);
    free(c->path);
    free(c->fw);
    free(c->alive);
    free(c->h);
    free(c->e);
    memset(c, 0, sizeof(*c));
}

static obk_status ctx_init(ctx_t *c, const obk_layer *layers, int32_t L, const obk_cluster *cl,
                           int32_t J, char *err, size_t err_len)
{
    memset(c, 0, sizeof(*c));
    c->L = L;
    c->G = cl->gpus_per_node;
    c->J = J;
    c->F = cl->optimizer_state_factor;
    c->mcap = cl->gpu_memory_bytes - cl->reserved_bytes;
    c->intra_bw = cl->intra_node_bytes_per_s;

    int32_t nq = 0;
    for (int64_t q = 1; q <= c->G && q <= L; q++)
        if (c->G % q == 0)
            nq++;
    c->nq = nq;
    c->qs = malloc(sizeof(int32_t) * (size_t)nq);
    c->pstart = malloc(sizeof(int32_t) * (size_t)nq);
    c->W = malloc(sizeof(double) * ((size_t)L + 1));
    c->P = malloc(sizeof(double) * ((size_t)L + 1));
    c->A = malloc(sizeof(double) * ((size_t)L + 1));
    c->c_intra = malloc(sizeof(double) * ((size_t)L + 1));
    c->c_inter = malloc(sizeof(double) * ((size_t)L + 1));
    c->off = malloc(sizeof(int64_t) * ((size_t)L + 1) * ((size_t)J + 1));
    c->xlo = calloc((size_t)J + 2, sizeof(int32_t));
    c->xhi = calloc((size_t)J + 2, sizeof(int32_t));
    c->reach = calloc((size_t)J + 2, sizeof(int32_t));
    if (!c->qs || !c->pstart || !c->W || !c->P || !c->A || !c->c_intra || !c->c_inter || !c->off ||
        !c->xlo || !c->xhi || !c->reach)
        return obk_fail(OBK_ENOMEM, err, err_len, "out of memory for the template tables");
    int32_t np = 0, qi = 0;
    for (int32_t q = 1; q <= c->G && q <= L; q++) {
        if (c->G % q == 0) {
            c->qs[qi] = q;
            c->pstart[qi] = np;
            np += q;
            qi++;
        }
    }
    c->np = np;

    c->W[0] = c->P[0] = c->A[0] = 0.0;
    c->c_intra[0] = c->c_inter[0] = c->c_intra[L] = c->c_inter[L] = 0.0;
    for (int32_t i = 0; i < L; i++) {
        c->W[i + 1] = c->W[i] + (layers[i].forward_ms + layers[i].backward_ms);
        c->P[i + 1] = c->P[i] + layers[i].param_bytes;
        c->A[i + 1] = c->A[i] + layers[i].activation_bytes;
        if (i > 0) {
            c->c_intra[i] = 1000.0 * layers[i - 1].output_bytes / cl->intra_node_bytes_per_s;
            c->c_inter[i] = 1000.0 * layers[i - 1].output_bytes / cl->inter_node_bytes_per_s;
        }
    }

    int64_t n = 0;
    for (int32_t x = 0; x <= L; x++) {
        int32_t rest = L - x;
        for (int32_t j = 0; j <= J; j++) {
            c->off[(int64_t)x * (J + 1) + j] = n;
            if (x < L && j >= 1 && j <= rest) {
                int64_t khi = imin64(rest, (int64_t)j * c->G);
                if (khi >= j)
                    n += khi - j + 1;
            }
        }
    }
    c->ncells = n;
    if (n * (int64_t)(np + 1) > OBK_TEMPLATES_MAX_CELLS)
        return obk_fail(OBK_ENOMEM, err, err_len,
                        "template search too large: %lld DP cells for %d layers, %d nodes, %d GPUs "
                        "per node (limit %d)",
                        (long long)(n * (np + 1)), (int)L, (int)J, (int)c->G,
                        OBK_TEMPLATES_MAX_CELLS);
    c->h = malloc(sizeof(double) * (size_t)(n > 0 ? n : 1) * (size_t)np);
    c->e = malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
    size_t kf = ((size_t)L + 1) * ((size_t)J + 1) * (size_t)np;
    c->bw = malloc(sizeof(double) * kf);
    c->fw = malloc(sizeof(double) * kf);
    c->alive = malloc(kf);
    c->path = malloc(sizeof(int64_t) * ((size_t)L + 1));
    if (!c->h || !c->e || !c->bw || !c->fw || !c->alive || !c->path)
        return obk_fail(OBK_ENOMEM, err, err_len, "out of memory for the template tables");
    return OBK_OK;
}

/* Farthest layer a stage of g GPUs starting at a can reach with base latency <= cap. */
static int32_t reach_forward(const ctx_t *c, int32_t a, int32_t g, double cap)
{
    int32_t b = a;
    while (b < c->L && stage_base(c, a, b + 1, g) <= cap)
        b++;
    return b;
}

static int32_t reach_backward(const ctx_t *c, int32_t b, int32_t g, double cap)
{
    int32_t a = b;
    while (a > 0 && stage_base(c, a - 1, b, g) <= cap)
        a--;
    return a;
}

/*
 * The window of states run_dp computes: for j <= jlim, the x range. With target n > 0 it keeps
 * only states that can lie on a layout of exactly n nodes whose stages all have base latency
 * (compute + shard sync, a lower bound on L_s) <= cap: [0, x) must fit on the n - j nodes
 * before (plus part of the current one) and [x, L) on j nodes. Stages only grow latency with
 * more layers, so greedy filling gives the farthest reach; links and memory are ignored, so the
 * window holds every state of every layout that the DP accepts.
 */
static void set_window(ctx_t *c, double cap, int32_t jlim, int32_t n)
{
    const int32_t L = c->L, G = c->G;
    for (int32_t j = 0; j <= c->J; j++) {
        c->xlo[j] = 1;
        c->xhi[j] = 0;
    }
    if (n <= 0) {
        for (int32_t j = 1; j <= jlim; j++) {
            c->xlo[j] = 0;
            c->xhi[j] = L - j;
        }
        return;
    }
    int32_t *fwd = c->reach; /* fwd[u]: farthest layer covered by u nodes from layer 0 */
    fwd[0] = 0;
    for (int32_t u = 1; u <= n; u++) {
        int32_t best = fwd[u - 1];
        for (int32_t qi = 0; qi < c->nq; qi++) {
            int32_t q = c->qs[qi], g = G / q, b = fwd[u - 1];
            for (int32_t t = 0; t < q && b < L; t++) {
                int32_t nb = reach_forward(c, b, g, cap);
                if (nb == b)
                    break;
                b = nb;
            }
            if (b > best)
                best = b;
        }
        fwd[u] = best;
    }
    for (int32_t j = 1; j <= n; j++)
        c->xhi[j] = imin32(L - j, fwd[n - j + 1]);
    /* backward: the first layer of the suffix that j nodes can cover */
    int32_t start = L;
    for (int32_t j = 1; j <= n; j++) {
        int32_t best = start;
        for (int32_t qi = 0; qi < c->nq; qi++) {
            int32_t q = c->qs[qi], g = G / q, a = start;
            for (int32_t t = 0; t < q && a > 0; t++) {
                int32_t na = reach_backward(c, a, g, cap);
                if (na == a)
                    break;
                a = na;
            }
            if (a < best)
                best = a;
        }
        start = best;
        c->xlo[j] = start;
    }
}

static inline size_t kf_index(const ctx_t *c, int32_t x, int32_t j, int32_t pi)
{
    return ((size_t)x * (size_t)(c->J + 1) + (size_t)j) * (size_t)c->np + (size_t)pi;
}

/*
 * Fill h and e for the states of the current window (set_window, or window_from_alive).
 * mode_max = 0: min sum of latencies with every stage latency <= cap; mode_max = 1: min of the
 * largest stage latency (cap ignored). alive (NULL: all) marks the (x, j, pair) states to
 * compute; the others are +inf.
 */
static void run_dp(ctx_t *c, double cap, int mode_max, int32_t jlim, const unsigned char *alive)
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
                    int32_t q = c->qs[qi], g = G / q;
                    for (int32_t t = 1; t <= q; t++) {
                        double best = INFINITY;
                        if (alive && !alive[kf_index(c, x, j, c->pstart[qi] + t - 1)]) {
                            /* not on any layout within the bound: stays +inf */
                        } else if (k >= t + j - 1 && (int64_t)(k - t) <= (int64_t)(j - 1) * G) {
                            int in_type = t < q ? LINK_INTRA : (x > 0 ? LINK_INTER : LINK_NONE);
                            double lin = link_cost(c, x, in_type);
                            if (t == 1 && j == 1) {
                                /* last stage of the pipeline: it must end at L */
                                if (k == 1 && stage_memory(c, x, L, g, k) <= c->mcap) {
                                    double lat = stage_base(c, x, L, g) + lin + 0.0;
                                    if (lat <= cap)
                                        best = lat;
                                }
                            } else {
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
                            }
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

/* A k-free table entry, +inf outside the window. */
static inline double kf_get(const ctx_t *c, const double *tab, int32_t x, int32_t j, int32_t pi)
{
    if (j < 1 || x < c->xlo[j] || x > c->xhi[j])
        return INFINITY;
    return tab[kf_index(c, x, j, pi)];
}

/*
 * The DP without the in-flight dimension k, over states (x, j, pair) of the window of
 * set_window(cap, n, n): bw = least sum of the stages from x on. A stage's memory is checked
 * with the fewest (optimistic) or the most (pessimistic) in-flight microbatches it can have
 * there: k_lo = t + j - 1, k_hi = min(L - x, t + (j - 1) G). Returns whether some examined stage
 * fits with k_lo but not k_hi; if not, the optimistic values are exact.
 */
#define KF_PESSIMISTIC 1
#define KF_MAX 2 /* min of the largest stage latency instead of the least sum */

static inline double combine(int mode_max, double lat, double rest)
{
    return mode_max ? (lat > rest ? lat : rest) : lat + rest;
}

static int kfree_backward(const ctx_t *c, double cap, int32_t n, int flags, double *bw)
{
    const int pessimistic = flags & KF_PESSIMISTIC, mode_max = (flags & KF_MAX) != 0;
    const int32_t L = c->L, G = c->G;
    int ambiguous = 0;
    for (int32_t x = L - 1; x >= 0; x--) {
        int32_t jhi = imin32(n, L - x);
        for (int32_t j = 1; j <= jhi; j++) {
            if (x < c->xlo[j] || x > c->xhi[j])
                continue;
            for (int32_t qi = 0; qi < c->nq; qi++) {
                int32_t q = c->qs[qi], g = G / q;
                for (int32_t t = 1; t <= q; t++) {
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
                            ambiguous = 1;
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
                            for (int32_t q2 = 0; q2 < c->nq; q2++) {
                                double v = kf_get(c, bw, y, j - 1, c->pstart[q2] + c->qs[q2] - 1);
                                if (v < nxt)
                                    nxt = v;
                            }
                        double v = combine(mode_max, lat, nxt);
                        if (v < best)
                            best = v;
                    }
                    bw[kf_index(c, x, j, pi)] = best;
                }
            }
        }
    }
    return ambiguous;
}

/* min over the first node's stage count of a k-free table at the root (0, n). */
static double kf_root(const ctx_t *c, const double *tab, int32_t n)
{
    double best = INFINITY;
    for (int32_t qi = 0; qi < c->nq; qi++) {
        double v = kf_get(c, tab, 0, n, c->pstart[qi] + c->qs[qi] - 1);
        if (v < best)
            best = v;
    }
    return best;
}

/* Forward k-free DP (optimistic memory): fw = least sum of the stages before x. */
static void kfree_forward(const ctx_t *c, double cap, int32_t n, double *fw)
{
    const int32_t L = c->L, G = c->G, np = c->np;
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
                int32_t q = c->qs[qi], g = G / q;
                for (int32_t t = 1; t <= q; t++) {
                    int32_t pi = c->pstart[qi] + t - 1;
                    double pre = fw[kf_index(c, x, j, pi)];
                    if (!(pre < INFINITY))
                        continue;
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
            }
        }
    }
}

/*
 * Mark the states whose best prefix + best suffix (optimistic, so lower bounds) is within
 * `bound`, and shrink the window to them. Returns the number of states kept.
 */
static int64_t window_from_alive(ctx_t *c, int32_t n, const double *fw, const double *bw,
                                 double bound, unsigned char *alive)
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

/* min over k of e(0, n, k) for every n <= jlim, into out[n] (out[0] unused). */
static void root_values(const ctx_t *c, int32_t jlim, double *out)
{
    out[0] = INFINITY;
    for (int32_t n = 1; n <= jlim; n++) {
        double best = INFINITY;
        int32_t khi = (int32_t)imin64(c->L, (int64_t)n * c->G);
        for (int32_t k = n; k <= khi; k++) {
            int64_t ci = cell(c, 0, n, k);
            if (ci >= 0 && c->e[ci] < best)
                best = c->e[ci];
        }
        out[n] = best;
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Every distinct latency a stage can have in some layout (and that fits with 1 in flight). */
static obk_status candidate_caps(const ctx_t *c, double **out, int64_t *count, char *err,
                                 size_t err_len)
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

static double kf_trace_path(const ctx_t *c, const double *bw, double cap, int32_t n, int mode_max,
                            int64_t *path, int32_t *S_out);

/*
 * Follow one least-sum layout of an optimistic k-free run from the root (0, n) (equal values)
 * and return its largest stage latency (+inf when there is none). *fits says whether the layout
 * fits in memory with its real in-flight counts, in which case its sum is the exact optimum.
 * path holds L + 1 ints (stage starts, then per stage g, packed as start * (G + 1) + g).
 */
static double kf_trace_max(const ctx_t *c, const double *bw, double cap, int32_t n, int mode_max,
                           int *fits, int64_t *path)
{
    int32_t S = 0;
    double mx = kf_trace_path(c, bw, cap, n, mode_max, path, &S);
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

static double kf_trace_path(const ctx_t *c, const double *bw, double cap, int32_t n, int mode_max,
                            int64_t *path, int32_t *S_out)
{
    const int32_t L = c->L, G = c->G;
    int32_t qi = -1;
    double v = INFINITY;
    for (int32_t i = 0; i < c->nq; i++) {
        double w = kf_get(c, bw, 0, n, c->pstart[i] + c->qs[i] - 1);
        if (w < v) {
            v = w;
            qi = i;
        }
    }
    if (qi < 0)
        return INFINITY;
    int32_t x = 0, j = n, t = c->qs[qi], S = 0;
    double mx = 0.0;
    for (;;) {
        int32_t q = c->qs[qi], g = G / q, klo = t + j - 1, pi = c->pstart[qi] + t - 1;
        if (S >= L)
            return cap;
        path[S++] = (int64_t)x * (G + 1) + g;
        int in_type = t < q ? LINK_INTRA : (x > 0 ? LINK_INTER : LINK_NONE);
        double lin = link_cost(c, x, in_type);
        int32_t ylo = x + 1, yhi = L - (klo - 1);
        if (t == 1 && j == 1)
            ylo = yhi = L;
        int moved = 0;
        for (int32_t y = ylo; y <= yhi && !moved; y++) {
            double base = stage_base(c, x, y, g);
            if (base > cap || stage_memory(c, x, y, g, klo) > c->mcap)
                break;
            double lout = t > 1 ? c->c_intra[y] : (y < L ? c->c_inter[y] : 0.0);
            double lat = (base + lin) + lout;
            if (lat > cap)
                continue;
            if (t > 1) {
                double nxt = kf_get(c, bw, y, j, pi - 1);
                if (combine(mode_max, lat, nxt) == v) {
                    t--;
                    v = nxt;
                    moved = 1;
                }
            } else if (y == L) {
                if (combine(mode_max, lat, 0.0) == v) {
                    *S_out = S;
                    return lat > mx ? lat : mx;
                }
            } else {
                for (int32_t q2 = 0; q2 < c->nq && !moved; q2++) {
                    double nxt = kf_get(c, bw, y, j - 1, c->pstart[q2] + c->qs[q2] - 1);
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
            }
        }
        if (!moved)
            return cap; /* not expected; cap is always a safe answer */
    }
}

/* The same for the tables of run_dp (sum mode). */
static double dp_trace_max(const ctx_t *c, double cap, int32_t n)
{
    const int32_t L = c->L, G = c->G, np = c->np;
    int32_t qi = -1, k = -1;
    double v = INFINITY;
    int32_t khi = (int32_t)imin64(L, (int64_t)n * G);
    for (int32_t kk = n; kk <= khi; kk++) {
        int64_t ci = cell(c, 0, n, kk);
        if (ci < 0)
            continue;
        for (int32_t i = 0; i < c->nq; i++) {
            double w = c->h[ci * np + c->pstart[i] + c->qs[i] - 1];
            if (w < v) {
                v = w;
                qi = i;
                k = kk;
            }
        }
    }
    if (qi < 0)
        return INFINITY;
    int32_t x = 0, j = n, t = c->qs[qi];
    double mx = 0.0;
    for (;;) {
        int32_t q = c->qs[qi], g = G / q, pi = c->pstart[qi] + t - 1;
        int in_type = t < q ? LINK_INTRA : (x > 0 ? LINK_INTER : LINK_NONE);
        double lin = link_cost(c, x, in_type);
        int32_t ylo = x + 1, yhi = L - (k - 1);
        if (t == 1 && j == 1)
            ylo = yhi = L;
        int moved = 0;
        for (int32_t y = ylo; y <= yhi && !moved; y++) {
            double base = stage_base(c, x, y, g);
            if (base > cap || stage_memory(c, x, y, g, k) > c->mcap)
                break;
            double lout = t > 1 ? c->c_intra[y] : (y < L ? c->c_inter[y] : 0.0);
            double lat = (base + lin) + lout;
            if (lat > cap)
                continue;
            if (t > 1) {
                int64_t ni = cell(c, y, j, k - 1);
                if (ni >= 0 && lat + c->h[ni * np + pi - 1] == v) {
                    v = c->h[ni * np + pi - 1];
                    t--;
                    moved = 1;
                }
            } else if (y == L) {
                if (j == 1 && k == 1 && lat + 0.0 == v)
                    return lat > mx ? lat : mx;
            } else {
                int64_t ni = cell(c, y, j - 1, k - 1);
                for (int32_t q2 = 0; ni >= 0 && q2 < c->nq && !moved; q2++) {
                    double nxt = c->h[ni * np + c->pstart[q2] + c->qs[q2] - 1];
                    if (lat + nxt == v) {
                        v = nxt;
                        j--;
                        qi = q2;
                        t = c->qs[q2];
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
            return cap;
    }
}

/*
 * Per candidate index i, for the n being searched (stamp[i] == n when known): value[i] =
 * min_sum(n, V_i), and vidx[i] = the index of the largest stage latency of one layout with that
 * sum (so that layout is also within every cap from V[vidx[i]] on).
 */
typedef struct {
    ctx_t *c;
    const double *V; /* nv + 1 values, V[nv] = +inf */
    int64_t nv;
    double *value;
    int64_t *vidx;
    int32_t *stamp;
    int64_t evals;
} cache_t;

static int64_t cap_index(const cache_t *cc, double v)
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

static double cache_get(cache_t *cc, int64_t i, int32_t n)
{
    if (cc->stamp[i] == n)
        return cc->value[i];
    ctx_t *c = cc->c;
    double cap = cc->V[i], f, mx;
    set_window(c, cap, n, n);
    kfree_backward(c, cap, n, 0, c->bw);
    f = kf_root(c, c->bw, n);
    int fits = 0;
    mx = f < INFINITY ? kf_trace_max(c, c->bw, cap, n, 0, &fits, c->path) : INFINITY;
    if (f < INFINITY && !fits) {
        /* memory depends on k somewhere: the exact DP, over the states that can be optimal */
        kfree_backward(c, cap, n, KF_PESSIMISTIC, c->fw);
        double pes = kf_root(c, c->fw, n);
        kfree_forward(c, cap, n, c->fw);
        window_from_alive(c, n, c->fw, c->bw, pes, c->alive);
        run_dp(c, cap, 0, n, c->alive);
        f = INFINITY;
        int64_t khi = imin64(c->L, (int64_t)n * c->G);
        for (int32_t k = n; k <= khi; k++) {
            int64_t ci = cell(c, 0, n, k);
            if (ci >= 0 && c->e[ci] < f)
                f = c->e[ci];
        }
        mx = f < INFINITY ? dp_trace_max(c, cap, n) : INFINITY;
    }
    int64_t vi = i;
    if (f < INFINITY && mx <= cap) {
        vi = cap_index(cc, mx);
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
 * Continuation value of the state (y, j, k, pair pi) for the rebuild: from the DP tables
 * (hb == NULL) or from hb, the table of the same values along fixed boundaries, at stage s.
 */
static inline double cont_value(const ctx_t *c, const double *hb, int32_t s, int32_t y, int32_t j,
                                int32_t k, size_t pi)
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
static int rebuild_step(const ctx_t *c, int32_t n, int32_t s, int32_t x, int32_t y, int32_t k,
                        int32_t qlo, int32_t qhi, double cap, double budget, const double *hb,
                        const double *front, double *next)
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

/*
 * Rebuild the layout for n nodes from the tables of run_dp(cap) under the tie rules: fewest
 * stages with sum <= budget, then lexicographically smallest boundaries, then GPU counts.
 * Writes S, bounds[0..S] and gpus[0..S-1]. front and next hold (J+1)*np values, hb
 * (L+1)*(J+1)*np. Returns 0 on success.
 */
static int reconstruct(const ctx_t *c, int32_t n, double cap, double budget, int32_t *S_out,
                       int32_t *bounds, int32_t *gpus, double *front, double *next, double *hb)
{
    const int32_t L = c->L, G = c->G, np = c->np, J = c->J;
    int32_t S = -1;
    int32_t khi = (int32_t)imin64(L, (int64_t)n * G);
    for (int32_t k = n; k <= khi; k++) {
        int64_t ci = cell(c, 0, n, k);
        if (ci >= 0 && c->e[ci] <= budget) {
            S = k;
            break;
        }
    }
    if (S < 0)
        return -1;
    bounds[0] = 0;
    bounds[S] = L;

    /* 1. boundaries: the smallest next boundary that still has a completion within budget */
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

    /* 2. least sum of the remaining stages along these boundaries, per state */
    const size_t row = (size_t)(J + 1) * (size_t)np;
    for (size_t i = 0; i < (size_t)(S + 1) * row; i++)
        hb[i] = INFINITY;
    for (int32_t s = S - 1; s >= 0; s--) {
        int32_t x = bounds[s], y = bounds[s + 1], k = S - s;
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
                        rest = hb[(size_t)(s + 1) * row + (size_t)j * np + c->pstart[qi] + t - 2];
                    else if (y == L)
                        rest = (j == 1 && k == 1) ? 0.0 : INFINITY;
                    else if (j > 1)
                        for (int32_t q2i = 0; q2i < c->nq; q2i++) {
                            double v = hb[(size_t)(s + 1) * row + (size_t)(j - 1) * np +
                                          c->pstart[q2i] + c->qs[q2i] - 1];
                            if (v < rest)
                                rest = v;
                        }
                    hb[(size_t)s * row + (size_t)j * np + c->pstart[qi] + t - 1] = lat + rest;
                }
            }
        }
    }

    /* 3. GPU counts: the smallest g (largest q) at each stage that keeps a completion */
    rebuild_start(c, n, front);
    for (int32_t s = 0; s < S; s++) {
        int32_t k = S - s, x = bounds[s], y = bounds[s + 1], qi;
        for (qi = c->nq - 1; qi >= 0; qi--)
            if (rebuild_step(c, n, s, x, y, k, qi, qi, cap, budget, hb, front, next))
                break;
        if (qi < 0)
            return -1;
        gpus[s] = G / c->qs[qi];
        double *tmp = front;
        front = next;
        next = tmp;
    }
    *S_out = S;
    return 0;
}

static obk_status validate_cluster(const obk_cluster *cl, char *err, size_t err_len)
{
    if (cl == NULL)
        return obk_fail(OBK_EINVAL, err, err_len, "cluster pointer is NULL");
    if (cl->num_nodes < 1)
        return obk_fail(OBK_EINVAL, err, err_len, "nodes: must be >= 1, got %d", (int)cl->num_nodes);
    if (cl->num_nodes > MAX_CLUSTER_NODES)
        return obk_fail(OBK_EINVAL, err, err_len, "nodes: at most %d supported, got %d",
                        MAX_CLUSTER_NODES, (int)cl->num_nodes);
    if (cl->gpus_per_node < 1)
        return obk_fail(OBK_EINVAL, err, err_len, "gpus_per_node: must be >= 1, got %d",
                        (int)cl->gpus_per_node);
    if (!isfinite(cl->gpu_memory_bytes) || cl->gpu_memory_bytes <= 0)
        return obk_fail(OBK_EINVAL, err, err_len, "gpu_memory_bytes: must be finite and > 0, got %g",
                        cl->gpu_memory_bytes);
    if (!isfinite(cl->reserved_bytes) || cl->reserved_bytes < 0 ||
        cl->reserved_bytes >= cl->gpu_memory_bytes)
        return obk_fail(OBK_EINVAL, err, err_len,
                        "reserved_bytes: must be >= 0 and < gpu_memory_bytes (%.0f), got %g",
                        cl->gpu_memory_bytes, cl->reserved_bytes);
    if (!isfinite(cl->intra_node_bytes_per_s) || cl->intra_node_bytes_per_s <= 0)
        return obk_fail(OBK_EINVAL, err, err_len, "intra_node_bytes_per_s: must be finite and > 0, got %g",
                        cl->intra_node_bytes_per_s);
    if (!isfinite(cl->inter_node_bytes_per_s) || cl->inter_node_bytes_per_s <= 0)
        return obk_fail(OBK_EINVAL, err, err_len, "inter_node_bytes_per_s: must be finite and > 0, got %g",
                        cl->inter_node_bytes_per_s);
    if (!isfinite(cl->optimizer_state_factor) || cl->optimizer_state_factor <= 0)
        return obk_fail(OBK_EINVAL, err, err_len, "optimizer_state_factor: must be finite and > 0, got %g",
                        cl->optimizer_state_factor);
    return OBK_OK;
}

/* Explain why no layout fits in memory (see the header for which layout is described). */
static obk_status memory_failure(const ctx_t *c, const obk_cluster *cl, char *err, size_t err_len)
{
    const int32_t L = c->L, G = c->G;
    int32_t worst = -1;
    double worst_need = 0.0;
    for (int32_t i = 0; i < L; i++) {
        double need = stage_memory(c, i, i + 1, G, 1);
        if (need > c->mcap && (worst < 0 || need > worst_need)) {
            worst = i;
            worst_need = need;
        }
    }
    if (worst >= 0)
        return obk_fail(OBK_EINFEASIBLE, err, err_len,
                        "no layout fits in GPU memory: layer %d alone on all %d GPUs of a node with 1 "
                        "microbatch in flight needs %.0f bytes per GPU, %.0f more than the %.0f "
                        "available (gpu_memory_bytes - reserved_bytes)",
                        (int)worst, (int)G, ceil(worst_need), ceil(worst_need - c->mcap), c->mcap);
    int32_t S = imin32(L, cl->num_nodes);
    int32_t ws = 0, wa = 0, wb = 0;
    double wneed = -INFINITY;
    for (int32_t s = 0; s < S; s++) {
        int32_t a = (int32_t)((int64_t)s * L / S), b = (int32_t)((int64_t)(s + 1) * L / S);
        double need = stage_memory(c, a, b, G, S - s);
        if (need > wneed) {
            wneed = need;
            ws = s;
            wa = a;
            wb = b;
        }
    }
    return obk_fail(OBK_EINFEASIBLE, err, err_len,
                    "no layout fits in GPU memory: with %d stages of one node each (all %d GPUs, equal "
                    "layer counts), stage %d (layers [%d, %d)) with %d microbatches in flight needs "
                    "%.0f bytes per GPU, %.0f more than the %.0f available (gpu_memory_bytes - "
                    "reserved_bytes)",
                    (int)S, (int)G, (int)ws, (int)wa, (int)wb, (int)(S - ws), ceil(wneed),
                    ceil(wneed - c->mcap), c->mcap);
}

/* Node counts in [lo, hi] that are not a sum of >= parts sizes from `ok` (ok[s] != 0). */
static obk_status find_uncovered(const unsigned char *ok, int32_t smin, int32_t smax, int64_t parts,
                                 int32_t lo, int32_t hi, int32_t *out, int32_t cap, int32_t *count)
{
    *count = 0;
    int contiguous = 1;
    for (int32_t s = smin; s <= smax; s++)
        if (!ok[s])
            contiguous = 0;
    if (contiguous && (int64_t)smax >= 2 * (int64_t)smin - 1)
        return OBK_OK; /* every M >= parts * smin is covered (planner.md) */
    /* maxparts[M] = the most sizes summing to exactly M (-1: none) */
    int32_t *mp = malloc(sizeof(int32_t) * ((size_t)hi + 1));
    if (!mp)
        return OBK_ENOMEM;
    mp[0] = 0;
    for (int32_t M = 1; M <= hi; M++) {
        int32_t best = -1;
        for (int32_t s = smin; s <= smax && s <= M; s++)
            if (ok[s] && mp[M - s] >= 0 && mp[M - s] + 1 > best)
                best = mp[M - s] + 1;
        mp[M] = best;
    }
    for (int32_t M = lo; M <= hi; M++) {
        if (mp[M] < parts) {
            if (*count < cap)
                out[*count] = M;
            (*count)++;
        }
    }
    free(mp);
    return OBK_OK;
}

obk_status obk_plan_templates(const obk_layer *layers, int32_t num_layers, const obk_cluster *cluster,
                              int32_t ft, int32_t microbatches, int32_t min_nodes,
                              obk_node_spec *spec, obk_template *templates, int32_t max_templates,
                              obk_stage *stages, int32_t max_stages, int32_t *uncovered,
                              int32_t max_uncovered, char *err, size_t err_len)
{
    obk_status st = obk_validate_profile(layers, num_layers, err, err_len);
    if (st != OBK_OK)
        return st;
    if ((st = validate_cluster(cluster, err, err_len)) != OBK_OK)
        return st;
    if (spec == NULL)
        return obk_fail(OBK_EINVAL, err, err_len, "spec pointer is NULL");
    memset(spec, 0, sizeof(*spec));
    if (max_templates < 0 || max_stages < 0 || max_uncovered < 0 ||
        (max_templates > 0 && templates == NULL) || (max_stages > 0 && stages == NULL) ||
        (max_uncovered > 0 && uncovered == NULL))
        return obk_fail(OBK_EINVAL, err, err_len, "output arrays: NULL pointer or negative capacity");
    if (ft < 0)
        return obk_fail(OBK_EINVAL, err, err_len, "ft: must be >= 0, got %d", (int)ft);
    if (microbatches < 1)
        return obk_fail(OBK_EINVAL, err, err_len, "microbatches: must be >= 1, got %d", (int)microbatches);
    const int32_t N = cluster->num_nodes, L = num_layers;
    const int32_t Jall = imin32(N, L);
    if (min_nodes < 0 || min_nodes > Jall)
        return obk_fail(OBK_EINVAL, err, err_len,
                        "min_nodes: must be between 1 and min(nodes, layers) = %d, got %d", (int)Jall,
                        (int)min_nodes);
    if (min_nodes > 0 && (int64_t)N < ((int64_t)ft + 1) * min_nodes)
        return obk_fail(OBK_EINVAL, err, err_len,
                        "too few nodes for ft: %d nodes < (ft+1)*min_nodes = (%d+1)*%d = %lld", (int)N,
                        (int)ft, (int)min_nodes, (long long)(((int64_t)ft + 1) * min_nodes));

    ctx_t c;
    cache_t cc;
    memset(&cc, 0, sizeof(cc));
    double *V = NULL, *bottleneck = NULL, *front = NULL, *next = NULL, *hb = NULL, *lbsum = NULL;
    int32_t *bounds = NULL, *gpus = NULL;
    unsigned char *feasible = NULL;
    if ((st = ctx_init(&c, layers, L, cluster, Jall, err, err_len)) != OBK_OK)
        goto done;

    /* every cost below must stay finite: bound the largest stage latency and T(m) */
    double maxlink = 0.0;
    for (int32_t b = 1; b < L; b++) {
        if (c.c_intra[b] > maxlink)
            maxlink = c.c_intra[b];
        if (c.c_inter[b] > maxlink)
            maxlink = c.c_inter[b];
    }
    double worst = c.W[L] + 2000.0 * c.P[L] / c.intra_bw + 2.0 * maxlink;
    if (!isfinite(worst) || !isfinite(worst * ((double)L + (double)microbatches))) {
        st = obk_fail(OBK_EINVAL, err, err_len,
                      "costs too large: a stage latency can reach %g ms, so T(m) overflows with %d "
                      "microbatches; check the profile's times and the cluster's bandwidths",
                      worst, (int)microbatches);
        goto done;
    }

    /* 1. the least bottleneck for every n: feasibility and the lowest useful cap */
    bottleneck = malloc(sizeof(double) * ((size_t)Jall + 1));
    feasible = calloc((size_t)Jall + 1, 1);
    if (!bottleneck || !feasible) {
        st = obk_fail(OBK_ENOMEM, err, err_len, "out of memory");
        goto done;
    }
    /* optimistic k-free min-max for every n; a result whose layout fits with its real in-flight
       counts is exact, the others come from the DP with k */
    set_window(&c, INFINITY, Jall, 0);
    kfree_backward(&c, INFINITY, Jall, KF_MAX, c.bw);
    int32_t unresolved = 0;
    for (int32_t n = 1; n <= Jall; n++) {
        bottleneck[n] = kf_root(&c, c.bw, n);
        int fits = 0;
        if (bottleneck[n] < INFINITY) {
            kf_trace_max(&c, c.bw, INFINITY, n, 1, &fits, c.path);
            if (!fits)
                unresolved = n;
        }
    }
    if (unresolved > 0) {
        double *exact = malloc(sizeof(double) * ((size_t)unresolved + 1));
        if (!exact) {
            st = obk_fail(OBK_ENOMEM, err, err_len, "out of memory");
            goto done;
        }
        set_window(&c, INFINITY, unresolved, 0);
        run_dp(&c, INFINITY, 1, unresolved, NULL);
        root_values(&c, unresolved, exact);
        for (int32_t n = 1; n <= unresolved; n++)
            bottleneck[n] = exact[n];
        free(exact);
    }
    int32_t first = 0, last = 0;
    for (int32_t n = 1; n <= Jall; n++) {
        if (bottleneck[n] < INFINITY) {
            feasible[n] = 1;
            if (!first)
                first = n;
            last = n;
        }
    }
    if (!first) {
        st = memory_failure(&c, cluster, err, err_len);
        goto done;
    }
    int32_t n0 = min_nodes > 0 ? min_nodes : first;
    if ((int64_t)N < ((int64_t)ft + 1) * n0) {
        st = obk_fail(OBK_EINVAL, err, err_len,
                      "too few nodes for ft: %d nodes < (ft+1)*n0 = (%d+1)*%d = %lld (n0 = the smallest "
                      "node count with a feasible template)",
                      (int)N, (int)ft, (int)n0, (long long)(((int64_t)ft + 1) * n0));
        goto done;
    }
    int32_t nmax = (int32_t)imin64((int64_t)N - (int64_t)ft * n0, last);
    int32_t ntempl = 0;
    for (int32_t n = n0; n <= nmax; n++)
        ntempl += feasible[n];
    if (ntempl == 0) {
        st = obk_fail(OBK_EINFEASIBLE, err, err_len,
                      "no feasible template with between min_nodes = %d and %d nodes: the largest node "
                      "count with a layout that fits in memory is %d",
                      (int)n0, (int)imin64((int64_t)N - (int64_t)ft * n0, Jall), (int)last);
        goto done;
    }
    spec->min_nodes = n0;
    spec->max_nodes = nmax;
    spec->ft = ft;
    spec->range_lo = (int32_t)(((int64_t)ft + 1) * n0);
    spec->range_hi = N;

    /* 2. candidate caps and the per-n search */
    int64_t nv = 0;
    if ((st = candidate_caps(&c, &V, &nv, err, err_len)) != OBK_OK)
        goto done;
    cc.c = &c;
    cc.V = V;
    cc.nv = nv;
    cc.value = malloc(sizeof(double) * ((size_t)nv + 1));
    cc.stamp = calloc((size_t)nv + 1, sizeof(int32_t));
    cc.vidx = malloc(sizeof(int64_t) * ((size_t)nv + 1));
    lbsum = malloc(sizeof(double) * ((size_t)nmax + 1));
    const size_t fsize = (size_t)(c.J + 1) * (size_t)c.np;
    front = malloc(sizeof(double) * fsize);
    next = malloc(sizeof(double) * fsize);
    bounds = malloc(sizeof(int32_t) * ((size_t)L + 1));
    gpus = malloc(sizeof(int32_t) * ((size_t)L + 1));
    hb = malloc(sizeof(double) * fsize * ((size_t)L + 1));
    if (!cc.value || !cc.stamp || !cc.vidx || !lbsum || !front || !next || !bounds || !gpus || !hb) {
        st = obk_fail(OBK_ENOMEM, err, err_len, "out of memory");
        goto done;
    }

    /* the least sum with no cap, memory checked optimistically: a lower bound for every cap */
    set_window(&c, INFINITY, nmax, 0);
    kfree_backward(&c, INFINITY, nmax, 0, c.bw);
    for (int32_t n = 1; n <= nmax; n++)
        lbsum[n] = kf_root(&c, c.bw, n);

    int32_t ti = 0, si = 0;
    for (int32_t n = n0; n <= nmax; n++) {
        if (!feasible[n])
            continue;
        int64_t m = ((int64_t)2 * microbatches * n + N) / ((int64_t)2 * N);
        if (m < 1)
            m = 1;
        /* V0 = bottleneck[n] is one of the candidates (the same arithmetic produced both) */
        int64_t lo = 0, hi = nv;
        while (lo < hi) {
            int64_t mid = lo + (hi - lo) / 2;
            if (V[mid] < bottleneck[n])
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo >= nv)
            lo = nv - 1;
        search_t s = {.cc = &cc, .n = n, .m1 = (double)(m - 1), .ub = INFINITY, .ubidx = -1};
        double lb = sum_lower_bound(&c, n);
        if (lbsum[n] * (1.0 - 1e-12) > lb)
            lb = lbsum[n] * (1.0 - 1e-12);
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
        if (best < 0 || best >= nv) {
            st = obk_fail(OBK_EINVAL, err, err_len,
                          "internal error: template search for %d nodes lost its optimum", (int)n);
            goto done;
        }
        double Mstar = V[best];
        double capM = Mstar + TIE_EPS * fabs(Mstar);
        double budget = s.thr - s.m1 * Mstar;
        set_window(&c, capM, n, n);
        kfree_backward(&c, capM, n, 0, c.bw);
        kfree_forward(&c, capM, n, c.fw);
        window_from_alive(&c, n, c.fw, c.bw, budget, c.alive);
        run_dp(&c, capM, 0, n, c.alive);
        int32_t S = 0;
        if (reconstruct(&c, n, capM, budget, &S, bounds, gpus, front, next, hb) != 0) {
            st = obk_fail(OBK_EINVAL, err, err_len,
                          "internal error: template for %d nodes could not be rebuilt", (int)n);
            goto done;
        }
        /* write the template */
        if (ti < max_templates && si + S <= max_stages) {
            obk_template *tp = &templates[ti];
            double sum = 0.0, mx = 0.0;
            int32_t node = 0;
            int32_t in_node = 0; /* stages already placed on the current node */
            for (int32_t k = 0; k < S; k++) {
                int32_t g = gpus[k], q = c.G / g;
                int first_of_node = in_node == 0;
                int last_of_node = in_node + 1 == q;
                int in_type = k == 0 ? LINK_NONE : (first_of_node ? LINK_INTER : LINK_INTRA);
                int out_type = k == S - 1 ? LINK_NONE : (last_of_node ? LINK_INTER : LINK_INTRA);
                obk_stage *sp = &stages[si + k];
                sp->layer_start = bounds[k];
                sp->layer_end = bounds[k + 1];
                sp->node = node;
                sp->gpus = g;
                sp->latency_ms = stage_latency(&c, bounds[k], bounds[k + 1], g, in_type, out_type);
                sp->memory_bytes = ceil(stage_memory(&c, bounds[k], bounds[k + 1], g, S - k));
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
            tp->first_stage = si;
            tp->microbatches = (int32_t)m;
            tp->sum_latency_ms = sum;
            tp->bottleneck_ms = mx;
            tp->iteration_ms = sum + (double)(m - 1) * mx;
            tp->gap = 0.0;
        }
        ti++;
        si += S;
    }
    spec->num_templates = ti;
    spec->num_stages = si;

    /* 3. node counts in the guaranteed range that no mix of >= ft+1 templates covers */
    int32_t nunc = 0;
    if (spec->range_lo <= N) {
        if (find_uncovered(feasible, n0, nmax, (int64_t)ft + 1, spec->range_lo, N, uncovered,
                           max_uncovered, &nunc) != OBK_OK) {
            st = obk_fail(OBK_ENOMEM, err, err_len, "out of memory");
            goto done;
        }
    }
    spec->num_uncovered = nunc;
    if (ti > max_templates || si > max_stages || nunc > max_uncovered)
        st = obk_fail(OBK_ERANGE, err, err_len,
                      "output arrays too small: need %d templates, %d stages, %d uncovered", (int)ti,
                      (int)si, (int)nunc);

done:
    free(cc.value);
    free(cc.stamp);
    free(cc.vidx);
    free(lbsum);
    free(V);
    free(bottleneck);
    free(feasible);
    free(front);
    free(next);
    free(bounds);
    free(gpus);
    free(hb);
    ctx_free(&c);
    return st;
}
