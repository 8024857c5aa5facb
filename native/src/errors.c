#include "errors.h"

#include <stdarg.h>
#include <stdio.h>

obk_status obk_fail(obk_status status, char *err, size_t err_len, const char *fmt, ...)
{
    if (err != NULL && err_len > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_len, fmt, ap);
        va_end(ap);
    }
    return status;
}
