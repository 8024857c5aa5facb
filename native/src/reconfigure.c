/*
 * Reconfiguration after failures, compacted ranks and the layer-copy plan
 * (docs/planner.md).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "errors.h"
#include "oobleck_planner.h"

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static int contains(const int64_t *sorted, int32_t n, int64_t key)
{
    return n > 0 && bsearch(&key, sorted, (size_t)n, sizeof(int64_t), cmp_i64) != NULL;
}

/* A growable list of node ids. */
typedef struct {
    int64_t *v;
    int32_t len, cap;
} vec;

static int vec_push(vec *a, int64_t x)
{
    if (a->len == a->cap) {
        int32_t cap = a->cap ? 2 * a->cap : 4;
        int64_t *v = realloc(a->v, sizeof(int64_t) * (size_t)cap);
        if (v == NULL)
            return 0;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->len++] = x;
    return 1;
}

/* Pipelines sorted by (len, first node); insertion sort keeps it free of global state. */
static int vec_before(const vec *a, const vec *b)
{
    if (a->len != b->len)
        return a->len < b->len;
    return a->len > 0 && a->v[0] < b->v[0];
}

obk_status obk_reconfigure_pipelines(const int64_t *nodes, const int32_t *sizes, int32_t num_pipelines,
                                     const int64_t *lost, int32_t num_lost, int32_t min_nodes, int64_t *out_nodes,
                                     int32_t *out_sizes, int32_t *out_num_pipelines, char *err, size_t err_len)
{
    if (num_pipelines < 0)
        return obk_fail(OBK_EINVAL, err, err_len, "num_pipelines must be >= 0, got %d", (int)num_pipelines);
    if (num_lost < 0)
        return obk_fail(OBK_EINVAL, err, err_len, "num_lost must be >= 0, got %d", (int)num_lost);
    if (min_nodes < 1)
        return obk_fail(OBK_EINVAL, err, err_len, "min_nodes must be >= 1, got %d", (int)min_nodes);
    if ((num_pipelines > 0 && sizes == NULL) || (num_lost > 0 && lost == NULL) || out_sizes == NULL ||
        out_num_pipelines == NULL)
        return obk_fail(OBK_EINVAL, err, err_len, "input or output pointer is NULL");
    int64_t total = 0;
    for (int32_t i = 0; i < num_pipelines; i++) {
        if (sizes[i] < 0)
            return obk_fail(OBK_EINVAL, err, err_len, "pipeline %d: size must be >= 0, got %d", (int)i, (int)sizes[i]);
        total += sizes[i];
    }
    if (total > INT32_MAX)
        return obk_fail(OBK_EINVAL, err, err_len, "too many nodes (%lld)", (long long)total);
    if (total > 0 && (nodes == NULL || out_nodes == NULL))
        return obk_fail(OBK_EINVAL, err, err_len, "nodes pointer is NULL");

    obk_status rc = OBK_OK;
    int64_t *sorted = malloc(sizeof(int64_t) * (size_t)(total + 1));
    int64_t *lost_sorted = malloc(sizeof(int64_t) * (size_t)(num_lost + 1));
    vec *pl = calloc((size_t)num_pipelines + 1, sizeof(vec));
    int32_t *state = calloc((size_t)num_pipelines + 1, sizeof(int32_t)); /* 0 keep, 1 dropped, 2 short */
    int32_t *queue = malloc(sizeof(int32_t) * (size_t)(2 * num_pipelines + 1));
    int32_t *shorts = malloc(sizeof(int32_t) * (size_t)(num_pipelines + 1));
    int32_t *order = malloc(sizeof(int32_t) * (size_t)(num_pipelines + 1));
    if (!sorted || !lost_sorted || !pl || !state || !queue || !shorts || !order) {
        rc = obk_fail(OBK_ENOMEM, err, err_len, "out of memory reconfiguring pipelines");
        goto done;
    }
    if (total > 0)
        memcpy(sorted, nodes, sizeof(int64_t) * (size_t)total);
    qsort(sorted, (size_t)total, sizeof(int64_t), cmp_i64);
    for (int64_t i = 1; i < total; i++)
        if (sorted[i] == sorted[i - 1]) {
            rc = obk_fail(OBK_EINVAL, err, err_len, "pipelines: node %lld appears more than once",
                          (long long)sorted[i]);
            goto done;
        }
    if (num_lost > 0)
        memcpy(lost_sorted, lost, sizeof(int64_t) * (size_t)num_lost);
    qsort(lost_sorted, (size_t)num_lost, sizeof(int64_t), cmp_i64);

    /* Step 1: remove lost nodes, keeping order. */
    int64_t pos = 0, surviving = 0;
    for (int32_t i = 0; i < num_pipelines; i++) {
        for (int32_t j = 0; j < sizes[i]; j++, pos++)
            if (!contains(lost_sorted, num_lost, nodes[pos])) {
                if (!vec_push(&pl[i], nodes[pos])) {
                    rc = obk_fail(OBK_ENOMEM, err, err_len, "out of memory reconfiguring pipelines");
                    goto done;
                }
                surviving++;
            }
    }

    /* Step 2: drop empty pipelines, borrow nodes for short ones. */
    for (int32_t i = 0; i < num_pipelines; i++) {
        if (pl[i].len == 0) {
            state[i] = 1;
            continue;
        }
        while (pl[i].len < min_nodes) {
            int32_t donor = -1;
            for (int32_t j = 0; j < num_pipelines; j++)
                if (j != i && state[j] != 1 && pl[j].len > min_nodes && (donor < 0 || pl[j].len >= pl[donor].len))
                    donor = j;
            if (donor < 0) {
                state[i] = 2;
                break;
            }
            while (pl[i].len < min_nodes && pl[donor].len > min_nodes) {
                if (!vec_push(&pl[i], pl[donor].v[pl[donor].len - 1])) {
                    rc = obk_fail(OBK_ENOMEM, err, err_len, "out of memory reconfiguring pipelines");
                    goto done;
                }
                pl[donor].len--;
            }
        }
    }

    /* Step 3: merge short pipelines with each other, then with the first of the rest. */
    int32_t nshort = 0, qhead = 0, qtail = 0;
    for (int32_t i = 0; i < num_pipelines; i++) {
        if (state[i] == 2)
            shorts[nshort++] = i;
        else if (state[i] == 0)
            queue[qtail++] = i;
    }
    for (int32_t s = 0; s < nshort;) {
        int32_t cur = shorts[s++];
        while (pl[cur].len < min_nodes) {
            int32_t add;
            if (s < nshort)
                add = shorts[s++];
            else if (qhead < qtail)
                add = queue[qhead++];
            else {
                rc = obk_fail(OBK_EINFEASIBLE, err, err_len,
                              "insufficient nodes: %lld surviving, a pipeline needs at least %d", (long long)surviving,
                              (int)min_nodes);
                goto done;
            }
            for (int32_t j = 0; j < pl[add].len; j++)
                if (!vec_push(&pl[cur], pl[add].v[j])) {
                    rc = obk_fail(OBK_ENOMEM, err, err_len, "out of memory reconfiguring pipelines");
                    goto done;
                }
            pl[add].len = 0;
        }
        queue[qtail++] = cur;
    }
    int32_t nout = qtail - qhead;
    if (nout == 0) {
        rc = obk_fail(OBK_EINFEASIBLE, err, err_len, "insufficient nodes: %lld surviving, a pipeline needs at least %d",
                      (long long)surviving, (int)min_nodes);
        goto done;
    }

    /* Step 4: sort nodes in each pipeline, pipelines by (len, first node). */
    for (int32_t k = 0; k < nout; k++) {
        vec *p = &pl[queue[qhead + k]];
        qsort(p->v, (size_t)p->len, sizeof(int64_t), cmp_i64);
    }
    for (int32_t k = 0; k < nout; k++) {
        int32_t x = queue[qhead + k], j = k;
        while (j > 0 && vec_before(&pl[x], &pl[order[j - 1]])) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = x;
    }
    int64_t w = 0;
    for (int32_t k = 0; k < nout; k++) {
        const vec *p = &pl[order[k]];
        out_sizes[k] = p->len;
        memcpy(out_nodes + w, p->v, sizeof(int64_t) * (size_t)p->len);
        w += p->len;
    }
    *out_num_pipelines = nout;
done:
    if (pl != NULL)
        for (int32_t i = 0; i < num_pipelines; i++)
            free(pl[i].v);
    free(pl);
    free(sorted);
    free(lost_sorted);
    free(state);
    free(queue);
    free(shorts);
    free(order);
    return rc;
}

obk_status obk_compact_ranks(const int32_t *sizes, int32_t num_pipelines, int32_t gpus_per_node, int64_t *first_rank,
                             int64_t *world_size, char *err, size_t err_len)
{
    if (num_pipelines < 0)
        return obk_fail(OBK_EINVAL, err, err_len, "num_pipelines must be >= 0, got %d", (int)num_pipelines);
    if (gpus_per_node < 1)
        return obk_fail(OBK_EINVAL, err, err_len, "gpus_per_node must be >= 1, got %d", (int)gpus_per_node);
    if ((num_pipelines > 0 && sizes == NULL) || world_size == NULL)
        return obk_fail(OBK_EINVAL, err, err_len, "input or output pointer is NULL");
    int64_t node = 0, rank = 0;
    for (int32_t i = 0; i < num_pipelines; i++) {
        if (sizes[i] < 1)
            return obk_fail(OBK_EINVAL, err, err_len, "pipeline %d: size must be >= 1, got %d", (int)i, (int)sizes[i]);
        if (first_rank == NULL)
            return obk_fail(OBK_EINVAL, err, err_len, "first_rank pointer is NULL");
        for (int32_t j = 0; j < sizes[i]; j++, node++) {
            first_rank[node] = rank;
            rank += gpus_per_node;
        }
    }
    *world_size = rank;
    return OBK_OK;
}

/* ---- layer-copy plan ------------------------------------------------------------------ */

static obk_status check_holdings(const obk_holding *h, int32_t n, const char *what, int32_t num_layers,
                                 int64_t *ids, char *err, size_t err_len)
{
    if (n < 0)
        return obk_fail(OBK_EINVAL, err, err_len, "%s: count must be >= 0, got %d", what, (int)n);
    if (n > 0 && h == NULL)
        return obk_fail(OBK_EINVAL, err, err_len, "%s: pointer is NULL", what);
    for (int32_t i = 0; i < n; i++) {
        if (h[i].layer_start < 0 || h[i].layer_end > num_layers || h[i].layer_start >= h[i].layer_end)
            return obk_fail(OBK_EINVAL, err, err_len, "%s: node %lld: layer range [%d, %d) is not within [0, %d)",
                            what, (long long)h[i].node, (int)h[i].layer_start, (int)h[i].layer_end,
                            (int)num_layers);
        ids[i] = h[i].node;
    }
    qsort(ids, (size_t)n, sizeof(int64_t), cmp_i64);
    for (int32_t i = 1; i < n; i++)
        if (ids[i] == ids[i - 1])
            return obk_fail(OBK_EINVAL, err, err_len, "%s: node %lld appears more than once", what,
                            (long long)ids[i]);
    return OBK_OK;
}

static int32_t index_of(const int64_t *sorted, int32_t n, int64_t key)
{
    const int64_t *p = bsearch(&key, sorted, (size_t)n, sizeof(int64_t), cmp_i64);
    return p == NULL ? -1 : (int32_t)(p - sorted);
}

obk_status obk_plan_copies(const obk_layer *layers, int32_t num_layers, double optimizer_state_factor,
                           double inter_node_bytes_per_s, const obk_holding *before, int32_t num_before,
                           const int64_t *lost, int32_t num_lost, const obk_holding *after, int32_t num_after,
                           obk_copy *copies, int32_t copies_capacity, int32_t *num_copies, int32_t *restore_layers,
                           int32_t *num_restore, double *copy_ms, char *err, size_t err_len)
{
    obk_status rc = obk_validate_profile(layers, num_layers, err, err_len);
    if (rc != OBK_OK)
        return rc;
    if (!isfinite(optimizer_state_factor) || optimizer_state_factor <= 0.0)
        return obk_fail(OBK_EINVAL, err, err_len, "optimizer_state_factor must be finite and > 0, got %g",
                        optimizer_state_factor);
    if (!isfinite(inter_node_bytes_per_s) || inter_node_bytes_per_s <= 0.0)
        return obk_fail(OBK_EINVAL, err, err_len, "inter_node_bytes_per_s must be finite and > 0, got %g",
                        inter_node_bytes_per_s);
    if (num_lost < 0 || (num_lost > 0 && lost == NULL))
        return obk_fail(OBK_EINVAL, err, err_len, "lost: bad count %d or NULL pointer", (int)num_lost);
    if (num_copies == NULL || num_restore == NULL || copy_ms == NULL || restore_layers == NULL ||
        copies_capacity < 0 || (copies_capacity > 0 && copies == NULL))
        return obk_fail(OBK_EINVAL, err, err_len, "output pointer is NULL");
    if (num_before < 0 || num_after < 0)
        return obk_fail(OBK_EINVAL, err, err_len, "holding counts must be >= 0");

    int64_t *bids = malloc(sizeof(int64_t) * ((size_t)num_before + 1));
    int64_t *aids = malloc(sizeof(int64_t) * ((size_t)num_after + 1));
    int64_t *lost_sorted = malloc(sizeof(int64_t) * ((size_t)num_lost + 1));
    int32_t *bpos = malloc(sizeof(int32_t) * ((size_t)num_before + 1)); /* sorted id index -> before entry */
    int32_t *apos = malloc(sizeof(int32_t) * ((size_t)num_after + 1));
    double *sent = calloc((size_t)num_before + 1, sizeof(double));
    double *recv = calloc((size_t)num_after + 1, sizeof(double));
    int32_t *hstart = calloc((size_t)num_layers + 1, sizeof(int32_t));
    int32_t *holders = NULL;
    if (!bids || !aids || !lost_sorted || !bpos || !apos || !sent || !recv || !hstart) {
        rc = obk_fail(OBK_ENOMEM, err, err_len, "out of memory planning layer copies");
        goto done;
    }
    if ((rc = check_holdings(before, num_before, "before", num_layers, bids, err, err_len)) != OBK_OK)
        goto done;
    if ((rc = check_holdings(after, num_after, "after", num_layers, aids, err, err_len)) != OBK_OK)
        goto done;
    if (num_lost > 0)
        memcpy(lost_sorted, lost, sizeof(int64_t) * (size_t)num_lost);
    qsort(lost_sorted, (size_t)num_lost, sizeof(int64_t), cmp_i64);
    for (int32_t i = 0; i < num_after; i++)
        if (contains(lost_sorted, num_lost, after[i].node)) {
            rc = obk_fail(OBK_EINVAL, err, err_len, "after: node %lld is lost but in the new plan",
                          (long long)after[i].node);
            goto done;
        }
    for (int32_t i = 0; i < num_before; i++)
        bpos[index_of(bids, num_before, before[i].node)] = i;
    for (int32_t i = 0; i < num_after; i++)
        apos[index_of(aids, num_after, after[i].node)] = i;

    /* Surviving holders per layer (CSR), each list in ascending node id. */
    int64_t nh = 0;
    for (int32_t k = 0; k < num_before; k++) {
        const obk_holding *h = &before[bpos[k]];
        if (contains(lost_sorted, num_lost, h->node))
            continue;
        for (int32_t l = h->layer_start; l < h->layer_end; l++)
            hstart[l + 1]++;
        nh += h->layer_end - h->layer_start;
    }
    for (int32_t l = 0; l < num_layers; l++)
        hstart[l + 1] += hstart[l];
    holders = malloc(sizeof(int32_t) * (size_t)(nh + 1)); /* sorted-before index */
    int32_t *fill = malloc(sizeof(int32_t) * ((size_t)num_layers + 1));
    if (!holders || !fill) {
        free(fill);
        rc = obk_fail(OBK_ENOMEM, err, err_len, "out of memory planning layer copies");
        goto done;
    }
    memcpy(fill, hstart, sizeof(int32_t) * (size_t)num_layers);
    for (int32_t k = 0; k < num_before; k++) {
        const obk_holding *h = &before[bpos[k]];
        if (contains(lost_sorted, num_lost, h->node))
            continue;
        for (int32_t l = h->layer_start; l < h->layer_end; l++)
            holders[fill[l]++] = k;
    }
    free(fill);

    const double factor = optimizer_state_factor > 1.0 ? optimizer_state_factor - 1.0 : 0.0;
    int32_t nc = 0, nr = 0;
    for (int32_t l = 0; l < num_layers; l++) {
        const double bytes = layers[l].param_bytes * factor;
        int restore = 0;
        for (int32_t k = 0; k < num_after; k++) {
            const obk_holding *a = &after[apos[k]];
            if (l < a->layer_start || l >= a->layer_end)
                continue;
            int32_t b = index_of(bids, num_before, a->node);
            if (b >= 0 && l >= before[bpos[b]].layer_start && l < before[bpos[b]].layer_end)
                continue; /* held before, stays */
            if (hstart[l] == hstart[l + 1]) {
                restore = 1;
                continue;
            }
            int32_t src = holders[hstart[l]];
            for (int32_t h = hstart[l] + 1; h < hstart[l + 1]; h++)
                if (sent[holders[h]] < sent[src])
                    src = holders[h];
            if (nc >= copies_capacity) {
                rc = obk_fail(OBK_ERANGE, err, err_len, "copies: output capacity %d is too small",
                              (int)copies_capacity);
                goto done;
            }
            copies[nc].layer = l;
            copies[nc].src = bids[src];
            copies[nc].dst = a->node;
            copies[nc].bytes = bytes;
            nc++;
            sent[src] += bytes;
            recv[k] += bytes;
        }
        if (restore)
            restore_layers[nr++] = l;
    }
    double most = 0.0;
    for (int32_t k = 0; k < num_before; k++)
        most = sent[k] > most ? sent[k] : most;
    for (int32_t k = 0; k < num_after; k++)
        most = recv[k] > most ? recv[k] : most;
    /* A node both sending and receiving: max(sent, received) per node, as above. */
    *num_copies = nc;
    *num_restore = nr;
    *copy_ms = 1000.0 * most / inter_node_bytes_per_s;
done:
    free(bids);
    free(aids);
    free(lost_sorted);
    free(bpos);
    free(apos);
    free(sent);
    free(recv);
    free(hstart);
    free(holders);
    return rc;
}
