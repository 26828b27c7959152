package dimoo

import "syscall"

// dontNeed drops b's pages (page-aligned, from a file mapping) from the
// process's resident set; advice only, so an error is ignored.
func dontNeed(b []byte) { _ = syscall.Madvise(b, syscall.MADV_DONTNEED) }
