/*
 * The canonical batch split (docs/planner.md, "Instantiation and batch distribution"): every
 * pipeline starts with 1 microbatch, the rest go one at a time to the pipeline with the
 * smallest T_p(m_p + 1) (exact comparison; ties: lower index). A binary heap keeps the order.
 */
#include <stdint.h>
#include <stdlib.h>

#include "errors.h"
#include "instantiate_internal.h"

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
obk_status inst_split(const obk_pipeline_cost *costs, const int32_t *idx, int32_t n, int32_t b, int32_t *m,
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
    obk_status st = inst_check_costs(pipelines, num_pipelines, "pipelines", 0, err, err_len);
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
    return inst_split(pipelines, NULL, num_pipelines, microbatches, out_microbatches, out_ms, err, err_len);
}
