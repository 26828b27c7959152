package dimoo

import "syscall"

const nativeThreadSupported = true

func threadID() int { return syscall.Gettid() }
