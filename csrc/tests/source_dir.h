// source_dir.h - where the tests find the repo's data: $DIMOO_SOURCE_DIR when
// set (a test binary built on another machine and run from another checkout,
// as the device check does with a carried build), else the source tree the
// binary was built from.
#pragma once

#include <cstdlib>
#include <string>

namespace dimoo::test {

inline std::string source_path(const std::string &rel) {
    const char *e = std::getenv("DIMOO_SOURCE_DIR");
    return std::string(e && *e ? e : DIMOO_SOURCE_DIR) + "/" + rel;
}

} // namespace dimoo::test
