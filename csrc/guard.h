// guard.h - the exception barrier every extern "C" function goes through.
#pragma once

#include <cstdio>
#include <new>
#include <string>

#include "common.h"

namespace dimoo {

// Runs f, mapping every exception to a status and a message in `err`.
template <class F> inline int32_t guard(std::string *err, F &&f) {
    try {
        f();
        if (err) err->clear();
        return DIMOO_OK;
    } catch (const dimoo::Error &e) {
        if (err) *err = e.what();
        return e.status();
    } catch (const std::bad_alloc &) {
        if (err) *err = "host memory allocation failed";
        return DIMOO_ERR_OUT_OF_MEMORY;
    } catch (const std::exception &e) {
        if (err) *err = std::string("internal error: ") + e.what();
        return DIMOO_ERR_INTERNAL;
    } catch (...) {
        if (err) *err = "internal error: unknown exception";
        return DIMOO_ERR_INTERNAL;
    }
}

inline void copy_err(const std::string &msg, char *buf, size_t len) {
    if (!buf || len == 0) return;
    std::snprintf(buf, len, "%s", msg.c_str());
}

} // namespace dimoo
