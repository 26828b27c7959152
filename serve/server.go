// Package serve is dimoo's HTTP service: OpenAI-style image generation,
// image edits and chat completions (image understanding) over one or more
// engines (a pipeline and its batcher per device), with a bounded admission
// queue, per-request deadlines, cancellation when the client goes away,
// Prometheus metrics, optional per-step progress as server-sent events, and
// a graceful shutdown that answers every accepted request.
package serve

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dimoo-dev/dimoo/dimoo"
	"github.com/dimoo-dev/dimoo/internal/gpu"
)

// Engine is one model instance: a pipeline on one device, with the batcher
// that shares its forwards among concurrent image requests (nil: each
// request decodes alone).
type Engine struct {
	Name     string // e.g. "cpu" or "cuda:0"
	Pipeline *dimoo.Pipeline
	Batcher  *dimoo.Batcher
	GPU      int // index of the engine's device for telemetry, or -1

	load atomic.Int64 // requests routed here and not finished
}

// Load is the number of requests the engine is working on.
func (e *Engine) Load() int64 { return e.load.Load() }

// Options bound what the server accepts.
type Options struct {
	// MaxInflight requests run at once (default 16); MaxQueue more wait for
	// a turn (default 64); beyond that, requests get 429 with Retry-After.
	MaxInflight int
	MaxQueue    int
	// MaxBodyBytes caps a request body (default 32 MiB): larger gets 413.
	MaxBodyBytes int64
	// MaxImagePixels caps input and output images (default 4096*4096).
	MaxImagePixels int
	// MaxN caps the images per request (default 4); MaxSteps the sampling
	// steps (default 1000).
	MaxN     int
	MaxSteps int
	// RequestTimeout is each request's deadline, waiting included (default
	// 10 minutes); a request may ask for less with a "timeout" (seconds).
	RequestTimeout time.Duration
	// RetryAfter is the hint sent with 429 and 503 (default 1 s).
	RetryAfter time.Duration
	// ModelName is what responses and /v1/models call the model (default
	// "dimoo"); requests may name it or leave "model" out.
	ModelName string
	// GPUs, when set, adds device telemetry to /metrics.
	GPUs gpu.Provider
	Log  *slog.Logger
}

func (o *Options) fill() {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&o.MaxInflight, 16)
	def(&o.MaxQueue, 64)
	def(&o.MaxImagePixels, 4096*4096)
	def(&o.MaxN, 4)
	def(&o.MaxSteps, 1000)
	if o.MaxBodyBytes <= 0 {
		o.MaxBodyBytes = 32 << 20
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = 10 * time.Minute
	}
	if o.RetryAfter <= 0 {
		o.RetryAfter = time.Second
	}
	if o.ModelName == "" {
		o.ModelName = "dimoo"
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
}

// Server routes requests to engines. Create it with New; serve
// Handler() with any http.Server, or call Serve and Shutdown.
type Server struct {
	engines []*Engine
	opts    Options
	m       *metrics

	admitted atomic.Int64  // waiting + running
	waiting  atomic.Int64  // admitted, not yet running
	run      chan struct{} // running slots
	rr       atomic.Uint64 // round-robin start for routing ties

	draining atomic.Bool
	hard     context.Context // cancelled when shutdown stops waiting
	stopHard context.CancelFunc
	active   tracker // accepted requests not yet answered

	mu  sync.Mutex
	srv *http.Server
}

// New makes a server over at least one engine.
func New(engines []*Engine, opts Options) (*Server, error) {
	if len(engines) == 0 {
		return nil, errors.New("serve: no engines")
	}
	for _, e := range engines {
		if e == nil || e.Pipeline == nil {
			return nil, errors.New("serve: an engine without a pipeline")
		}
	}
	opts.fill()
	hard, stop := context.WithCancel(context.Background())
	s := &Server{engines: engines, opts: opts, m: newMetrics(), run: make(chan struct{}, opts.MaxInflight),
		hard: hard, stopHard: stop}
	return s, nil
}

// Engines are the server's engines.
func (s *Server) Engines() []*Engine { return s.engines }

// Handler serves the API.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/images/generations", s.admit("images_generations", s.handleGenerations))
	mux.HandleFunc("POST /v1/images/edits", s.admit("images_edits", s.handleEdits))
	mux.HandleFunc("POST /v1/chat/completions", s.admit("chat_completions", s.handleChat))
	mux.HandleFunc("GET /v1/models", s.handleModels)
	mux.HandleFunc("GET /healthz", s.handleHealth)
	mux.HandleFunc("GET /metrics", s.handleMetrics)
	known := map[string]string{"/v1/images/generations": "POST", "/v1/images/edits": "POST",
		"/v1/chat/completions": "POST", "/v1/models": "GET", "/healthz": "GET", "/metrics": "GET"}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if m, ok := known[r.URL.Path]; ok {
			w.Header().Set("Allow", m)
			writeError(w, http.StatusMethodNotAllowed, "method_not_allowed",
				fmt.Sprintf("%s takes %s, not %s", r.URL.Path, m, r.Method))
			return
		}
		writeError(w, http.StatusNotFound, "not_found", fmt.Sprintf("no endpoint %s %s", r.Method, r.URL.Path))
	})
	return mux
}

// Serve accepts connections on l until Shutdown.
func (s *Server) Serve(l net.Listener) error {
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
	s.mu.Lock()
	s.srv = srv
	s.mu.Unlock()
	if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Shutdown stops accepting requests (new ones get 503) and waits for the
// accepted ones to be answered. When ctx ends first, the requests still
// waiting or decoding are cancelled and answered 503; Shutdown then waits
// for those answers and returns ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	s.draining.Store(true)
	s.mu.Lock()
	srv := s.srv
	s.mu.Unlock()
	done := s.active.close()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
		s.stopHard()
		<-done // every request answers within a decode step of the cancel
	}
	if srv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if e := srv.Shutdown(sctx); e != nil && err == nil {
			err = e
		}
	}
	return err
}

// handler serves one admitted request: it returns the status it answered
// (for the metrics) after writing the whole answer. It calls release once
// its decode has ended, before writing what is left of the answer: the run
// slot and the engine's load are for decoding, not for a slow reader.
type handler func(ctx context.Context, w http.ResponseWriter, r *http.Request, e *Engine, release func()) int

// admit applies the admission rules around h: draining (503), the bounded
// queue (429), the body limit, the deadline and the client's going away,
// then routes to the least-loaded engine.
func (s *Server) admit(endpoint string, h handler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		retry := strconv.Itoa(max(1, int(s.opts.RetryAfter.Round(time.Second)/time.Second)))
		if s.draining.Load() {
			w.Header().Set("Retry-After", retry)
			writeError(w, http.StatusServiceUnavailable, "shutting_down", "the server is shutting down")
			s.m.request(endpoint, "shutdown")
			return
		}
		if n := s.admitted.Add(1); n > int64(s.opts.MaxInflight+s.opts.MaxQueue) {
			s.admitted.Add(-1)
			w.Header().Set("Retry-After", retry)
			writeError(w, http.StatusTooManyRequests, "queue_full",
				fmt.Sprintf("the queue is full (%d running, %d waiting); retry later", s.opts.MaxInflight, s.opts.MaxQueue))
			s.m.request(endpoint, "rejected")
			return
		}
		if !s.active.enter() {
			s.admitted.Add(-1)
			w.Header().Set("Retry-After", retry)
			writeError(w, http.StatusServiceUnavailable, "shutting_down", "the server is shutting down")
			s.m.request(endpoint, "shutdown")
			return
		}
		defer s.active.leave()
		defer s.admitted.Add(-1)
		r.Body = http.MaxBytesReader(w, r.Body, s.opts.MaxBodyBytes)

		timeout := s.opts.RequestTimeout
		if v := r.URL.Query().Get("timeout"); v != "" {
			sec, err := strconv.ParseFloat(v, 64)
			if err != nil || sec <= 0 {
				writeError(w, http.StatusBadRequest, "invalid_request_error", "timeout must be a positive number of seconds")
				s.m.request(endpoint, "bad_request")
				return
			}
			timeout = min(timeout, time.Duration(sec*float64(time.Second)))
		}
		// The request's context ends with the client's connection, its
		// deadline, or a shutdown that stopped waiting.
		ctx, cancel := context.WithTimeoutCause(r.Context(), timeout, errDeadline)
		defer cancel()
		stop := context.AfterFunc(s.hard, func() { cancel() })
		defer stop()

		s.waiting.Add(1)
		// The body arrives before a run slot is taken: a slow upload holds
		// a place in the queue, never one of the slots the engines serve.
		if err := readBody(ctx, w, r); err != nil {
			s.waiting.Add(-1)
			st := s.fail(ctx, w, err, "while reading the request body")
			s.m.request(endpoint, outcome(st))
			return
		}
		select {
		case s.run <- struct{}{}:
			s.waiting.Add(-1)
		case <-ctx.Done():
			s.waiting.Add(-1)
			st := s.fail(ctx, w, ctx.Err(), "while waiting in the queue")
			s.m.request(endpoint, outcome(st))
			return
		}
		e := s.route()
		var once sync.Once
		release := func() {
			once.Do(func() {
				e.load.Add(-1)
				<-s.run
			})
		}
		defer release()
		// A reader that stops reading blocks the answer's writes until the
		// request ends (its deadline, its client, a hard shutdown), and then
		// for writeGrace more (the time to write its error answer), not longer.
		rc := http.NewResponseController(w)
		writes := deadlineAtEnd(ctx, rc.SetWriteDeadline, func() time.Time { return time.Now().Add(writeGrace) })
		st := h(ctx, w, r, e, release)
		if writes.end() {
			// What is buffered goes out under the deadline; then the
			// connection's next request gets none.
			_ = rc.Flush()
			_ = rc.SetWriteDeadline(time.Time{})
		}
		s.m.request(endpoint, outcome(st))
	}
}

var errDeadline = errors.New("the request's deadline passed")

// writeGrace bounds the writes of a request that has ended.
const writeGrace = 5 * time.Second

// readBody reads r's body into memory (within the body limit set on it) and
// puts it back as r.Body. The read stops when ctx ends (deadline, shutdown):
// the connection's read deadline is moved to the past then.
func readBody(ctx context.Context, w http.ResponseWriter, r *http.Request) error {
	rc := http.NewResponseController(w)
	d := deadlineAtEnd(ctx, rc.SetReadDeadline, func() time.Time { return time.Unix(1, 0) })
	b, err := io.ReadAll(r.Body)
	fired := d.end()
	if err != nil {
		// The rest of the body stays unread: the connection closes after the
		// answer (else net/http would wait to read the rest after it).
		w.Header().Set("Connection", "close")
		var mb *http.MaxBytesError
		switch {
		case errors.As(err, &mb):
			return tooLarge{mb.Limit}
		case ctx.Err() != nil:
			return ctx.Err()
		}
		return bad("could not read the request body: %v", err)
	}
	if fired {
		rc.SetReadDeadline(time.Time{}) // for the connection's next request
	}
	r.Body = io.NopCloser(bytes.NewReader(b))
	return nil
}

// endDeadline sets a connection's read or write deadline once a request's
// context ends, so that I/O blocked on a client stops.
type endDeadline struct {
	mu   sync.Mutex
	done bool
	stop func() bool
}

// deadlineAtEnd calls set(when()) when ctx ends, unless end came first.
// Connections that cannot take deadlines (test recorders) just go on.
func deadlineAtEnd(ctx context.Context, set func(time.Time) error, when func() time.Time) *endDeadline {
	d := &endDeadline{}
	d.stop = context.AfterFunc(ctx, func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		if !d.done {
			_ = set(when())
		}
	})
	return d
}

// end reports whether the deadline was set; after it, it never is.
func (d *endDeadline) end() bool {
	fired := !d.stop()
	d.mu.Lock()
	d.done = true
	d.mu.Unlock()
	return fired
}

// route picks the engine with the least load (ties: round robin).
func (s *Server) route() *Engine {
	start := int(s.rr.Add(1))
	var best *Engine
	for i := range s.engines {
		e := s.engines[(start+i)%len(s.engines)]
		if best == nil || e.load.Load() < best.load.Load() {
			best = e
		}
	}
	best.load.Add(1)
	return best
}

// fail answers a request that ended with err and returns the status.
func (s *Server) fail(ctx context.Context, w http.ResponseWriter, err error, where string) int {
	st, kind, msg := s.classify(ctx, err)
	if where != "" {
		msg += " (" + where + ")"
	}
	if st == http.StatusServiceUnavailable {
		w.Header().Set("Retry-After", strconv.Itoa(max(1, int(s.opts.RetryAfter/time.Second))))
	}
	writeError(w, st, kind, msg)
	return st
}

// classify maps an error to a status, an error type and a message.
func (s *Server) classify(ctx context.Context, err error) (int, string, string) {
	var br badRequest
	var tl tooLarge
	switch {
	case errors.As(err, &br):
		return http.StatusBadRequest, "invalid_request_error", br.msg
	case errors.As(err, &tl):
		return http.StatusRequestEntityTooLarge, "request_too_large", tl.Error()
	case errors.Is(err, dimoo.ErrShutdown) || (s.hard.Err() != nil && ctx.Err() != nil):
		return http.StatusServiceUnavailable, "shutting_down", "the server shut down before the request finished"
	case context.Cause(ctx) == errDeadline:
		return http.StatusGatewayTimeout, "timeout", "the request's deadline passed"
	case ctx.Err() != nil:
		// The client went away: nobody reads this, but the status counts.
		return statusClientClosed, "cancelled", "the client closed the request"
	case errors.Is(err, dimoo.ErrInvalidArgument):
		return http.StatusBadRequest, "invalid_request_error", err.Error()
	case errors.Is(err, dimoo.ErrOutOfMemory):
		return http.StatusServiceUnavailable, "out_of_memory", err.Error()
	case errors.Is(err, dimoo.ErrUnsupported):
		return http.StatusBadRequest, "unsupported", err.Error()
	}
	return http.StatusInternalServerError, "server_error", err.Error()
}

// statusClientClosed is nginx's "client closed request".
const statusClientClosed = 499

func outcome(status int) string {
	switch {
	case status < 300:
		return "ok"
	case status == http.StatusTooManyRequests:
		return "rejected"
	case status == http.StatusGatewayTimeout:
		return "timeout"
	case status == statusClientClosed:
		return "cancelled"
	case status == http.StatusServiceUnavailable:
		return "shutdown"
	case status < 500:
		return "bad_request"
	}
	return "error"
}

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	type eng struct {
		Name string `json:"name"`
		Load int64  `json:"load"`
	}
	out := struct {
		Status  string `json:"status"`
		Engines []eng  `json:"engines"`
		Waiting int64  `json:"waiting"`
	}{Status: "ok", Waiting: s.waiting.Load()}
	for _, e := range s.engines {
		out.Engines = append(out.Engines, eng{e.Name, e.load.Load()})
	}
	st := http.StatusOK
	if s.draining.Load() {
		out.Status, st = "shutting_down", http.StatusServiceUnavailable
	}
	writeJSON(w, st, out)
}

func (s *Server) handleModels(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": []map[string]any{
		{"id": s.opts.ModelName, "object": "model", "owned_by": "dimoo"}}})
}

// tracker counts accepted requests; once closed it accepts none and its
// channel closes when the last one leaves.
type tracker struct {
	mu     sync.Mutex
	n      int
	closed bool
	zero   chan struct{}
}

func (t *tracker) enter() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return false
	}
	t.n++
	return true
}

func (t *tracker) leave() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.n--
	if t.closed && t.n == 0 {
		close(t.zero)
	}
}

func (t *tracker) close() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.closed {
		t.closed = true
		t.zero = make(chan struct{})
		if t.n == 0 {
			close(t.zero)
		}
	}
	return t.zero
}
