package serve

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"sync"
)

// events writes server-sent events: "progress" after every decode step
// (coalesced: a slow reader sees the latest step of each image), then one
// "result" or "error".
type events struct {
	w     http.ResponseWriter
	flush func()

	mu     sync.Mutex
	latest map[int][2]int // image -> (step, total) not yet sent
	wake   chan struct{}
}

func startEvents(w http.ResponseWriter) *events {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	ev := &events{w: w, flush: func() {}, latest: map[int][2]int{}, wake: make(chan struct{}, 1)}
	if f, ok := w.(http.Flusher); ok {
		ev.flush = f.Flush
		f.Flush()
	}
	return ev
}

// progress is called on the library's compute thread: it only records.
func (e *events) progress(image, step, total int) {
	e.mu.Lock()
	e.latest[image] = [2]int{step, total}
	e.mu.Unlock()
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// pump writes progress events until done closes.
func (e *events) pump(done <-chan struct{}) {
	for {
		select {
		case <-e.wake:
			e.drain()
		case <-done:
			e.drain()
			return
		}
	}
}

func (e *events) drain() {
	e.mu.Lock()
	pending := e.latest
	e.latest = map[int][2]int{}
	e.mu.Unlock()
	for _, i := range slices.Sorted(maps.Keys(pending)) {
		v := pending[i]
		e.send("progress", map[string]int{"image": i, "step": v[0], "total": v[1]})
	}
}

func (e *events) send(event string, v any) {
	b, _ := json.Marshal(v)
	fmt.Fprintf(e.w, "event: %s\ndata: %s\n\n", event, b)
	e.flush()
}

// data writes an event with no name (OpenAI's streams), and done their end.
func (e *events) data(v any) {
	b, _ := json.Marshal(v)
	fmt.Fprintf(e.w, "data: %s\n\n", b)
	e.flush()
}

func (e *events) done() {
	fmt.Fprint(e.w, "data: [DONE]\n\n")
	e.flush()
}
