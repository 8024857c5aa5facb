/*
 * The template DP context (docs/planner.md, "Pipeline templates"): the stage counts allowed per
 * node, prefix sums over the layers, link costs at the layer boundaries, the layout of the DP
 * tables, and the windows of states the DPs compute. See templates_internal.h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "templates_internal.h"

void tpl_ctx_free(ctx_t *c)
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

/* The divisors q of G with q <= L (ascending) and where their pairs (q, t) start. */
static void init_pairs(ctx_t *c)
{
    int32_t np = 0, qi = 0;
    for (int32_t q = 1; q <= c->G && q <= c->L; q++) {
        if (c->G % q == 0) {
            c->qs[qi] = q;
            c->pstart[qi] = np;
            np += q;
            qi++;
        }
    }
    c->np = np;
}

/* Prefix sums of work, params and activations; link costs at the inner boundaries. */
static void init_prefix_sums(ctx_t *c, const obk_layer *layers, const obk_cluster *cl)
{
    const int32_t L = c->L;
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
}

/* Offsets of the (x, j) rows of the tables with k; returns the number of cells. */
static int64_t init_offsets(ctx_t *c)
{
    const int32_t L = c->L, J = c->J;
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
    return n;
}

obk_status tpl_ctx_init(ctx_t *c, const obk_layer *layers, int32_t L, const obk_cluster *cl, int32_t J,
                        char *err, size_t err_len)
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
    init_pairs(c);
    init_prefix_sums(c, layers, cl);

    const int32_t np = c->np;
    int64_t n = init_offsets(c);
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

/* fwd[u] for u <= n: the farthest layer u nodes can cover from layer 0 (greedy filling). */
static void reach_prefixes(const ctx_t *c, double cap, int32_t n, int32_t *fwd)
{
    const int32_t L = c->L, G = c->G;
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
}

/* xlo[j] for j <= n: the first layer of the suffix that j nodes can cover (greedy filling). */
static void reach_suffixes(ctx_t *c, double cap, int32_t n)
{
    const int32_t L = c->L, G = c->G;
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

/*
 * The window of states run_dp computes: for j <= jlim, the x range. With target n > 0 it keeps
 * only states that can lie on a layout of exactly n nodes whose stages all have base latency
 * (compute + shard sync, a lower bound on L_s) <= cap: [0, x) must fit on the n - j nodes
 * before (plus part of the current one) and [x, L) on j nodes. Stages only grow latency with
 * more layers, so greedy filling gives the farthest reach; links and memory are ignored, so the
 * window holds every state of every layout that the DP accepts.
 */
void tpl_set_window(ctx_t *c, double cap, int32_t jlim, int32_t n)
{
    const int32_t L = c->L;
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
    reach_prefixes(c, cap, n, fwd);
    for (int32_t j = 1; j <= n; j++)
        c->xhi[j] = imin32(L - j, fwd[n - j + 1]);
    /* backward: the first layer of the suffix that j nodes can cover */
    reach_suffixes(c, cap, n);
}
