package dimoo

import (
	"runtime"
	"sync"
	"sync/atomic"
)

// nativeThread is the one OS thread on which a Library runs every call that
// computes with OpenMP (forwards, sampling, the VQ-VAE, weight packing).
//
// libgomp keeps a worker pool per calling thread, and once it manages more
// threads than there are CPUs it stops spinning: idle workers sleep on a
// futex after every parallel region and must be woken for the next. Go moves
// goroutines between threads, so without this each thread that ever called
// in grew a pool of its own; on a 2-CPU machine the second pool tipped
// libgomp into that mode and cost thousands of context switches a second
// (forwards 1.5x slower, sampling 2-3x). Decode loops run whole on this
// thread, so their many calls pay no hand-off; their progress callbacks run
// on it too, and must not wait for other library work (which would queue
// behind them). One thread per library also serializes devices: a
// multi-GPU process will want one per device.
type nativeThread struct {
	once sync.Once
	jobs chan func()
	tid  atomic.Int64
}

func (n *nativeThread) start() {
	n.jobs = make(chan func())
	ready := make(chan struct{})
	go func() {
		runtime.LockOSThread() // never unlocked: this goroutine owns the thread
		n.tid.Store(int64(threadID()))
		close(ready)
		for f := range n.jobs {
			f()
		}
	}()
	<-ready
}

// locked runs f on the native thread with mu held, taking mu only once on
// the thread: a goroutine that held a handle's mutex while queueing for the
// thread would deadlock with a decode on the thread that needs the mutex.
func (n *nativeThread) locked(mu *sync.Mutex, f func()) {
	n.do(func() {
		mu.Lock()
		defer mu.Unlock()
		f()
	})
}

// do runs f on the native thread and returns when it is done; directly when
// the caller already is that thread (a decode loop calling Forward). A panic
// in f is raised again in the caller. Calls from many goroutines queue.
func (n *nativeThread) do(f func()) {
	if !nativeThreadSupported {
		f()
		return
	}
	n.once.Do(n.start)
	if int64(threadID()) == n.tid.Load() {
		f()
		return
	}
	var p any
	done := make(chan struct{})
	n.jobs <- func() {
		defer close(done)
		defer func() { p = recover() }()
		f()
	}
	<-done
	if p != nil {
		panic(p)
	}
}
