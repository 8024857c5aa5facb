/* Internal helpers for reporting errors into the caller's buffer. */
#ifndef OBK_ERRORS_H
#define OBK_ERRORS_H

#include <stddef.h>

#include "oobleck_planner.h"

/* Format a message into err (if any) and return `status`. */
obk_status obk_fail(obk_status status, char *err, size_t err_len, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

#endif
