/*
 * Standalone driver for scripts/check-native.sh: calls every C entry point of the planner,
 * including error paths, so that AddressSanitizer/UBSan (or valgrind) see every allocation
 * and exit path. Exits non-zero on the first failed check.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "oobleck_planner.h"

static int failures = 0;

#define CHECK(cond)                                                                                                    \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);                                   \
            failures++;                                                                                                \
        }                                                                                                              \
    } while (0)

#define CHECK_ERR(call, status, fragment)                                                                              \
    do {                                                                                                               \
        char err[OBK_ERR_LEN] = "";                                                                                    \
        obk_status st_ = call;                                                                                         \
        if (st_ != (status) || strstr(err, (fragment)) == NULL) {                                                      \
            fprintf(stderr, "%s:%d: expected status %d with '%s', got %d: '%s'\n", __FILE__, __LINE__, (int)(status), \
                    (fragment), (int)st_, err);                                                                        \
            failures++;                                                                                                \
        }                                                                                                              \
    } while (0)

static void fill_layers(obk_layer *layers, int n)
{
    for (int i = 0; i < n; i++) {
        layers[i].forward_ms = 1.0 + i % 3;
        layers[i].backward_ms = 2.0;
        layers[i].param_bytes = 1e6 * (i + 1);
        layers[i].activation_bytes = 1e4;
        layers[i].output_bytes = 1e3;
    }
}

static void test_profile_and_templates(void)
{
    obk_layer layers[8];
    fill_layers(layers, 8);
    char err[OBK_ERR_LEN];
    CHECK(strlen(obk_version()) > 0);
    CHECK(obk_validate_profile(layers, 8, err, sizeof err) == OBK_OK);
    layers[2].forward_ms = -1.0;
    CHECK_ERR(obk_validate_profile(layers, 8, err, sizeof err), OBK_EINVAL, "layer 2");
    layers[2].forward_ms = 1.0;
    CHECK(obk_validate_profile(layers, 0, NULL, 0) == OBK_EINVAL); /* no error buffer */

    obk_cluster c = {8, 2, 1e9, 0.0, 3e11, 2.5e10, 4.0};
    obk_node_spec spec;
    obk_template tpl[8];
    obk_stage stages[8 * 8];
    int32_t uncovered[16];
    CHECK(obk_plan_templates(layers, 8, &c, 1, 16, 0, &spec, tpl, 8, stages, 64, uncovered, 16, err, sizeof err) ==
          OBK_OK);
    CHECK(spec.num_templates >= 1);
    CHECK_ERR(obk_plan_templates(layers, 8, &c, -1, 16, 0, &spec, tpl, 8, stages, 64, uncovered, 16, err, sizeof err),
              OBK_EINVAL, "ft");
}

static void test_distribute(void)
{
    obk_pipeline_cost p[3] = {{2, 10.0, 4.0}, {3, 9.0, 3.0}, {2, 10.0, 4.0}};
    int32_t m[3];
    double ms[3];
    char err[OBK_ERR_LEN];
    CHECK(obk_distribute_batch(p, 3, 10, m, ms, err, sizeof err) == OBK_OK);
    CHECK(m[0] + m[1] + m[2] == 10);
    CHECK(ms[1] == 9.0 + (m[1] - 1) * 3.0);
    CHECK_ERR(obk_distribute_batch(p, 3, 2, m, ms, err, sizeof err), OBK_EINFEASIBLE, "microbatches (2)");
    CHECK_ERR(obk_distribute_batch(p, 0, 2, m, ms, err, sizeof err), OBK_EINVAL, "at least one");
    CHECK_ERR(obk_distribute_batch(p, 3, 0, m, ms, err, sizeof err), OBK_EINVAL, "microbatches must be");
    CHECK_ERR(obk_distribute_batch(p, 3, 5, NULL, ms, err, sizeof err), OBK_EINVAL, "NULL");
    p[1].bottleneck_ms = NAN;
    CHECK_ERR(obk_distribute_batch(p, 3, 5, m, ms, err, sizeof err), OBK_EINVAL, "pipelines[1].bottleneck_ms");
}

static void test_instantiate(void)
{
    obk_pipeline_cost t[4] = {{2, 20.0, 6.0}, {3, 18.0, 4.0}, {4, 17.0, 3.0}, {5, 19.0, 2.5}};
    int32_t pt[64], pm[64];
    double pms[64];
    obk_instantiation out;
    char err[OBK_ERR_LEN];
    CHECK(obk_instantiate(t, 4, 13, 1, 64, 1e9, 2.5e10, pt, pm, pms, 64, &out, err, sizeof err) == OBK_OK);
    CHECK(out.num_pipelines >= 2 && out.used_nodes == 13 && !out.degraded);
    int sum = 0, nodes = 0;
    for (int i = 0; i < out.num_pipelines; i++) {
        sum += pm[i];
        nodes += t[pt[i]].num_nodes;
        CHECK(i == 0 || pt[i] >= pt[i - 1]);
    }
    CHECK(sum == 64 && nodes == 13);
    CHECK(fabs(out.iteration_ms - out.max_pipeline_ms - out.sync_ms) < 1e-9);
    /* Larger instance: exercises the reconstruction blocks and the pipeline-count DP. */
    obk_pipeline_cost big[40];
    for (int i = 0; i < 40; i++)
        big[i] = (obk_pipeline_cost){i + 2, 100.0 + 3.0 * i, 60.0 / (i + 2) + 0.1 * (i % 7)};
    int32_t *bt = malloc(sizeof(int32_t) * 300), *bm = malloc(sizeof(int32_t) * 300);
    double *bms = malloc(sizeof(double) * 300);
    CHECK(obk_instantiate(big, 40, 300, 2, 2048, 5e9, 2.5e10, bt, bm, bms, 300, &out, err, sizeof err) == OBK_OK);
    CHECK(out.used_nodes == 300 && out.num_pipelines >= 3);
    /* Degraded, spares, and sizes with a gap (bitset reachability). */
    obk_pipeline_cost gap[2] = {{3, 5.0, 1.0}, {5, 4.0, 1.0}};
    CHECK(obk_instantiate(gap, 2, 7, 2, 8, 0.0, 1e9, pt, pm, pms, 64, &out, err, sizeof err) == OBK_OK);
    CHECK(out.degraded && out.used_nodes == 6);
    CHECK(obk_instantiate(gap, 2, 17, 1, 8, 0.0, 1e9, pt, pm, pms, 64, &out, err, sizeof err) == OBK_OK);
    CHECK(!out.degraded && out.used_nodes == 17);
    /* Errors. */
    CHECK_ERR(obk_instantiate(t, 4, 1, 1, 64, 0.0, 1e9, pt, pm, pms, 64, &out, err, sizeof err), OBK_EINFEASIBLE,
              "too few nodes: 1 available");
    CHECK_ERR(obk_instantiate(t, 4, 13, 3, 2, 0.0, 1e9, pt, pm, pms, 64, &out, err, sizeof err), OBK_EINFEASIBLE,
              "microbatches (2) must be >= the number of pipelines (4");
    CHECK_ERR(obk_instantiate(t, 4, 13, 1, 64, 0.0, 1e9, pt, pm, pms, 2, &out, err, sizeof err), OBK_ERANGE,
              "capacity");
    CHECK_ERR(obk_instantiate(t, 0, 13, 1, 64, 0.0, 1e9, pt, pm, pms, 64, &out, err, sizeof err), OBK_EINVAL,
              "at least one");
    CHECK_ERR(obk_instantiate(t, 4, 13, -1, 64, 0.0, 1e9, pt, pm, pms, 64, &out, err, sizeof err), OBK_EINVAL,
              "ft must be >= 0");
    CHECK_ERR(obk_instantiate(t, 4, 13, 1, 64, -1.0, 1e9, pt, pm, pms, 64, &out, err, sizeof err), OBK_EINVAL,
              "max_node_param_bytes");
    CHECK_ERR(obk_instantiate(t, 4, 13, 1, 64, 0.0, 0.0, pt, pm, pms, 64, &out, err, sizeof err), OBK_EINVAL,
              "inter_node_bytes_per_s");
    CHECK_ERR(obk_instantiate(t, 4, 13, 1, 64, 0.0, 1e9, pt, pm, pms, 64, NULL, err, sizeof err), OBK_EINVAL, "NULL");
    obk_pipeline_cost bad[2] = {{3, 1.0, 1.0}, {2, 1.0, 1.0}};
    CHECK_ERR(obk_instantiate(bad, 2, 13, 1, 64, 0.0, 1e9, pt, pm, pms, 64, &out, err, sizeof err), OBK_EINVAL,
              "templates[1].num_nodes must be larger");
    CHECK(obk_instantiate(bad, 2, 13, 1, 64, 0.0, 1e9, pt, pm, pms, 64, &out, NULL, 0) == OBK_EINVAL);
    free(bt);
    free(bm);
    free(bms);
}

static void test_reconfigure(void)
{
    const int64_t nodes[14] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13};
    const int32_t sizes[4] = {2, 3, 4, 5};
    int64_t out[14];
    int32_t out_sizes[4], n = 0;
    char err[OBK_ERR_LEN];
    const int64_t lost1[2] = {6, 8};
    CHECK(obk_reconfigure_pipelines(nodes, sizes, 4, lost1, 2, 2, out, out_sizes, &n, err, sizeof err) == OBK_OK);
    CHECK(n == 4 && out_sizes[0] == 2 && out_sizes[1] == 2 && out[2] == 5 && out[3] == 7);
    const int64_t lost2[11] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
    CHECK(obk_reconfigure_pipelines(nodes, sizes, 4, lost2, 11, 2, out, out_sizes, &n, err, sizeof err) == OBK_OK);
    CHECK(n == 1 && out_sizes[0] == 3 && out[0] == 0 && out[1] == 12 && out[2] == 13);
    const int64_t lost3[13] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13};
    CHECK_ERR(obk_reconfigure_pipelines(nodes, sizes, 4, lost3, 13, 2, out, out_sizes, &n, err, sizeof err),
              OBK_EINFEASIBLE, "insufficient nodes: 1 surviving");
    CHECK_ERR(obk_reconfigure_pipelines(nodes, sizes, 4, NULL, 0, 100, out, out_sizes, &n, err, sizeof err),
              OBK_EINFEASIBLE, "insufficient nodes");
    const int64_t dup[4] = {0, 1, 1, 2};
    const int32_t dsizes[2] = {2, 2};
    CHECK_ERR(obk_reconfigure_pipelines(dup, dsizes, 2, NULL, 0, 1, out, out_sizes, &n, err, sizeof err), OBK_EINVAL,
              "node 1 appears more than once");
    CHECK_ERR(obk_reconfigure_pipelines(nodes, sizes, 4, NULL, 0, 0, out, out_sizes, &n, err, sizeof err), OBK_EINVAL,
              "min_nodes");
    const int32_t neg[1] = {-1};
    CHECK_ERR(obk_reconfigure_pipelines(nodes, neg, 1, NULL, 0, 1, out, out_sizes, &n, err, sizeof err), OBK_EINVAL,
              "size must be >= 0");
    CHECK_ERR(obk_reconfigure_pipelines(nodes, sizes, 4, NULL, 0, 1, out, NULL, &n, err, sizeof err), OBK_EINVAL,
              "NULL");

    int64_t first[14], world = 0;
    CHECK(obk_compact_ranks(sizes, 4, 8, first, &world, err, sizeof err) == OBK_OK);
    CHECK(world == 14 * 8 && first[13] == 13 * 8);
    CHECK_ERR(obk_compact_ranks(sizes, 4, 0, first, &world, err, sizeof err), OBK_EINVAL, "gpus_per_node");
    CHECK_ERR(obk_compact_ranks(neg, 1, 1, first, &world, err, sizeof err), OBK_EINVAL, "size must be >= 1");
}

static void test_copies(void)
{
    obk_layer layers[6];
    fill_layers(layers, 6);
    /* Before: pipeline A = nodes 1,2 (layers [0,3), [3,6)); pipeline B = nodes 3,4,5. */
    obk_holding before[5] = {{1, 0, 3}, {2, 3, 6}, {3, 0, 2}, {4, 2, 4}, {5, 4, 6}};
    /* After losing 2 and 5: A' = 1 alone holds everything; B' = 3,4 split in halves. */
    obk_holding after[3] = {{1, 0, 6}, {3, 0, 3}, {4, 3, 6}};
    const int64_t lost[2] = {2, 5};
    obk_copy copies[32];
    int32_t nc = 0, nr = 0, restore[6];
    double ms = 0.0;
    char err[OBK_ERR_LEN];
    CHECK(obk_plan_copies(layers, 6, 4.0, 1e9, before, 5, lost, 2, after, 3, copies, 32, &nc, restore, &nr, &ms, err,
                          sizeof err) == OBK_OK);
    /* Node 3 needs layer 2 (holders 1 and 4, tie: lowest id 1); node 1 needs 3 (holder 4), 4 and 5 (no
     * holder: restore); node 4 needs 4 and 5 (restore). Layers ascending. */
    CHECK(nr == 2 && restore[0] == 4 && restore[1] == 5);
    CHECK(nc == 2);
    CHECK(copies[0].layer == 2 && copies[0].src == 1 && copies[0].dst == 3);
    CHECK(copies[1].layer == 3 && copies[1].src == 4 && copies[1].dst == 1);
    for (int i = 0; i < nc; i++)
        CHECK(copies[i].bytes == layers[copies[i].layer].param_bytes * 3.0);
    CHECK(ms > 0.0);
    CHECK_ERR(obk_plan_copies(layers, 6, 4.0, 1e9, before, 5, lost, 2, after, 3, copies, 1, &nc, restore, &nr, &ms,
                              err, sizeof err),
              OBK_ERANGE, "capacity");
    obk_holding badr[1] = {{1, 4, 9}};
    CHECK_ERR(obk_plan_copies(layers, 6, 4.0, 1e9, badr, 1, lost, 2, after, 3, copies, 32, &nc, restore, &nr, &ms, err,
                              sizeof err),
              OBK_EINVAL, "layer range [4, 9)");
    obk_holding dup[2] = {{1, 0, 3}, {1, 3, 6}};
    CHECK_ERR(obk_plan_copies(layers, 6, 4.0, 1e9, before, 5, lost, 2, dup, 2, copies, 32, &nc, restore, &nr, &ms, err,
                              sizeof err),
              OBK_EINVAL, "node 1 appears more than once");
    obk_holding lost_after[1] = {{2, 0, 6}};
    CHECK_ERR(obk_plan_copies(layers, 6, 4.0, 1e9, before, 5, lost, 2, lost_after, 1, copies, 32, &nc, restore, &nr,
                              &ms, err, sizeof err),
              OBK_EINVAL, "node 2 is lost");
    CHECK_ERR(obk_plan_copies(layers, 6, 0.0, 1e9, before, 5, lost, 2, after, 3, copies, 32, &nc, restore, &nr, &ms,
                              err, sizeof err),
              OBK_EINVAL, "optimizer_state_factor");
    CHECK_ERR(obk_plan_copies(layers, 0, 4.0, 1e9, before, 5, lost, 2, after, 3, copies, 32, &nc, restore, &nr, &ms,
                              err, sizeof err),
              OBK_EINVAL, "at least one layer");
    CHECK_ERR(obk_plan_copies(layers, 6, 4.0, 1e9, before, 5, lost, 2, after, 3, copies, 32, NULL, restore, &nr, &ms,
                              err, sizeof err),
              OBK_EINVAL, "NULL");
}

int main(void)
{
    test_profile_and_templates();
    test_distribute();
    test_instantiate();
    test_reconfigure();
    test_copies();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("native planner checks passed\n");
    return 0;
}
