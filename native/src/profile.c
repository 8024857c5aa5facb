/* Profile validation. */
#include <math.h>

#include "errors.h"
#include "oobleck_planner.h"

const char *obk_version(void)
{
    return "0.1.0";
}

static obk_status check_time(int32_t i, const char *field, double v, char *err, size_t err_len)
{
    if (isnan(v))
        return obk_fail(OBK_EINVAL, err, err_len, "layer %d: %s must be a number, got NaN", i, field);
    if (!isfinite(v))
        return obk_fail(OBK_EINVAL, err, err_len, "layer %d: %s must be finite, got %g", i, field, v);
    if (v < 0.0)
        return obk_fail(OBK_EINVAL, err, err_len, "layer %d: %s must be >= 0, got %g", i, field, v);
    return OBK_OK;
}

static obk_status check_bytes(int32_t i, const char *field, double v, char *err, size_t err_len)
{
    obk_status st = check_time(i, field, v, err, err_len);
    if (st != OBK_OK)
        return st;
    if (v != floor(v))
        return obk_fail(OBK_EINVAL, err, err_len, "layer %d: %s must be a whole number of bytes, got %g",
                        i, field, v);
    if (v > 9007199254740992.0) /* 2^53: beyond exact double integers */
        return obk_fail(OBK_EINVAL, err, err_len, "layer %d: %s is implausibly large (%g bytes)", i,
                        field, v);
    return OBK_OK;
}

obk_status obk_validate_profile(const obk_layer *layers, int32_t num_layers, char *err, size_t err_len)
{
    if (num_layers <= 0)
        return obk_fail(OBK_EINVAL, err, err_len, "profile must have at least one layer, got %d",
                        (int)num_layers);
    if (layers == NULL)
        return obk_fail(OBK_EINVAL, err, err_len, "profile layers pointer is NULL");
    for (int32_t i = 0; i < num_layers; i++) {
        const obk_layer *l = &layers[i];
        obk_status st;
        if ((st = check_time(i, "forward_ms", l->forward_ms, err, err_len)) != OBK_OK)
            return st;
        if ((st = check_time(i, "backward_ms", l->backward_ms, err, err_len)) != OBK_OK)
            return st;
        if ((st = check_bytes(i, "param_bytes", l->param_bytes, err, err_len)) != OBK_OK)
            return st;
        if ((st = check_bytes(i, "activation_bytes", l->activation_bytes, err, err_len)) != OBK_OK)
            return st;
        if ((st = check_bytes(i, "output_bytes", l->output_bytes, err, err_len)) != OBK_OK)
            return st;
    }
    return OBK_OK;
}
