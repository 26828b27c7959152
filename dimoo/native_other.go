//go:build !linux

package dimoo

// Elsewhere calls run on the caller's thread (libgomp's per-thread pools,
// which the native thread exists for, are a glibc/Linux matter).
const nativeThreadSupported = false

func threadID() int { return 0 }
