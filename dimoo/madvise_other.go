//go:build !linux

package dimoo

// dontNeed does nothing here: the pages go when the file is closed.
func dontNeed([]byte) {}
