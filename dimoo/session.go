package dimoo

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"
	"time"
	"unsafe"
)

// CacheMode is the ML-Cache mode of one forward (dimoo_cache_mode).
type CacheMode int32

// The dimoo_cache_mode values.
const (
	// CacheNone: a plain forward over every position.
	CacheNone CacheMode = 0
	// CacheStore: a forward over every position that keeps each layer's K/V.
	CacheStore CacheMode = 1
	// CacheUse: only Compute positions run; other K/V come from the cache.
	CacheUse CacheMode = 2
)

// SessionOptions size a Session's memory.
type SessionOptions struct {
	// MaxTokens is the longest sequence the session will run.
	MaxTokens int
	// Seqs is the number of sequence slots (2 for cond + uncond); default 1.
	Seqs int
	// KVCache allocates per-sequence, per-layer K/V caches for ML-Cache.
	KVCache bool
	// KeepRows x KeepCols floats per sequence hold logits that stay in the
	// library (on the GPU for CUDA) for the decode steps: rows of any width
	// w <= KeepCols, up to KeepRows*KeepCols/w of them (KeepRows 0:
	// MaxTokens). KeepCols 0: none; the decoders then sample host logits.
	KeepRows, KeepCols int
}

// keepCapacity is how many kept rows of width w a sequence of the session
// holds (0 without kept logits).
func (o SessionOptions) keepCapacity(w int) int {
	if o.KeepCols <= 0 || w <= 0 || w > o.KeepCols {
		return 0
	}
	rows := o.KeepRows
	if rows == 0 {
		rows = o.MaxTokens
	}
	return min(o.MaxTokens, rows*o.KeepCols/w)
}

// Session is one request's execution state in the library: scratch memory,
// K/V caches and (on CUDA) a stream. Its methods serialize on a mutex, so a
// Session may be shared, but concurrent requests should each have their own.
type Session struct {
	m    *Model
	opts SessionOptions

	mu          sync.Mutex
	h           uintptr
	forwardTime time.Duration // wall time spent inside dimoo_forward
	forwards    int
	sampleTime  time.Duration // wall time the decode loops spent in the library's samplers
	samples     int
	cachedCalls int   // forward calls with an ML-Cache USE request
	rows        int64 // token rows run through the network
}

// workStats reports the forward calls that ran only some positions and the
// token rows all forwards ran.
func (s *Session) workStats() (cached int, rows int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cachedCalls, s.rows
}

// decodeStats is the timing of a decode loop that ran alone on s since t0
// (s's counters are the decode's own), over branches of seqLens tokens.
func (s *Session) decodeStats(steps int, t0 time.Time, seqLens []int) DecodeStats {
	st := DecodeStats{Steps: steps, Total: time.Since(t0), Start: t0, SeqLens: seqLens}
	st.Forwards, st.Forward = s.ForwardStats()
	_, st.Sampling = s.SampleStats()
	st.CachedForwards, st.Rows = s.workStats()
	return st
}

// SampleStats reports how many library sampling calls the session's decode
// loops made and the wall time they took (a part of what is spent outside
// the forwards).
func (s *Session) SampleStats() (calls int, total time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.samples, s.sampleTime
}

// addSample records one sampling call.
func (s *Session) addSample(d time.Duration) {
	s.mu.Lock()
	s.samples++
	s.sampleTime += d
	s.mu.Unlock()
}

// NewSession allocates a session for the model.
func (m *Model) NewSession(opts SessionOptions) (*Session, error) {
	if opts.Seqs == 0 {
		opts.Seqs = 1
	}
	if opts.MaxTokens <= 0 {
		return nil, fmt.Errorf("%w: SessionOptions.MaxTokens must be positive", ErrInvalidArgument)
	}
	if opts.KeepRows < 0 || opts.KeepCols < 0 || opts.KeepRows > opts.MaxTokens {
		return nil, fmt.Errorf("%w: SessionOptions.KeepRows must be in [0, MaxTokens] and KeepCols >= 0", ErrInvalidArgument)
	}
	p := cCtxParams{NSeqs: int32(opts.Seqs), MaxTokens: int32(opts.MaxTokens), KeepRows: int32(opts.KeepRows),
		KeepCols: int32(opts.KeepCols)}
	if opts.KVCache {
		p.Flags = 1 // DIMOO_CTX_KV_CACHE
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.h == 0 {
		return nil, errClosed
	}
	var out uintptr
	var eb errBuf
	st := m.rt.lib.ctxCreate(m.h, &p, &out, eb.ptr(), eb.len())
	if err := statusError(st, "dimoo_ctx_create", eb.String); err != nil {
		return nil, err
	}
	return &Session{m: m, opts: opts, h: out}, nil
}

// Bytes is the scratch and cache memory the session holds.
func (s *Session) Bytes() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.h == 0 {
		return 0
	}
	return s.m.rt.lib.ctxBytes(s.h)
}

// ForwardStats reports how many library forward calls the session made and
// the wall time they took, so callers can see what share of a request the
// network itself is.
func (s *Session) ForwardStats() (calls int, total time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.forwards, s.forwardTime
}

// Close frees the session.
func (s *Session) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.h != 0 {
		s.m.rt.lib.ctxFree(s.h)
		s.h = 0
	}
	return nil
}

// ForwardRequest is one sequence's forward (see dimoo_forward_args).
type ForwardRequest struct {
	Seq       int
	Tokens    []int32
	CacheMode CacheMode
	// Compute lists the positions to run under CacheUse (increasing).
	Compute []int32
	// Logits: when false, no logits are computed. Positions selects the rows
	// (nil: every position); [VocabBegin, VocabEnd) the columns (VocabEnd 0:
	// all of the output head).
	Logits     bool
	Positions  []int32
	VocabBegin int
	VocabEnd   int
	// Out, when its capacity holds the rows x columns, receives the logits
	// (the result's Data is Out[:rows*cols]), so a sampler reuses its buffers
	// instead of allocating one per step.
	Out []float32
	// RowMax asks for each row's largest logit (Logits.Max), computed by the
	// library as it writes the row; MaxOut is reused like Out.
	RowMax bool
	MaxOut []float32
	// Keep also leaves the rows in the session (see SessionOptions.KeepCols)
	// for the library's decode steps; with Logits false nothing comes back.
	Keep bool
}

// Logits is a row-major (Rows, Cols) matrix of float32 logits, and with
// RowMax each row's largest value.
type Logits struct {
	Rows, Cols int
	Data       []float32
	Max        []float32
}

// Row returns row i.
func (l *Logits) Row(i int) []float32 { return l.Data[i*l.Cols : (i+1)*l.Cols] }

// Forward runs the requests (distinct Seqs) in one library call. The
// context cancels between layers. Results are in request order (nil where
// Logits was false).
func (s *Session) Forward(ctx context.Context, reqs ...ForwardRequest) ([]*Logits, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCancelled, err)
	}
	if len(reqs) == 0 {
		return nil, fmt.Errorf("%w: no forward requests", ErrInvalidArgument)
	}
	cfg := s.m.Config
	args := make([]cForwardArgs, len(reqs))
	outs := make([]*Logits, len(reqs))
	var pin runtime.Pinner
	defer pin.Unpin()
	ptr := func(v []int32) unsafe.Pointer {
		if len(v) == 0 {
			return nil
		}
		pin.Pin(&v[0])
		return unsafe.Pointer(&v[0])
	}
	for i, r := range reqs {
		// Lengths cross as int32: reject what would wrap before converting.
		if len(r.Tokens) > s.opts.MaxTokens {
			return nil, fmt.Errorf("%w: %d tokens exceed the session's MaxTokens %d", ErrInvalidArgument,
				len(r.Tokens), s.opts.MaxTokens)
		}
		a := cForwardArgs{
			Seq:       int32(r.Seq),
			NTokens:   int32(len(r.Tokens)),
			Tokens:    ptr(r.Tokens),
			CacheMode: int32(r.CacheMode),
			NCompute:  int32(len(r.Compute)),
			Compute:   ptr(r.Compute),
		}
		if r.Keep {
			a.Keep = 1
		}
		if r.Logits || r.Keep {
			rows := len(r.Tokens)
			if r.Positions != nil {
				if len(r.Positions) == 0 {
					return nil, fmt.Errorf("%w: empty Positions (use nil for every position)", ErrInvalidArgument)
				}
				rows = len(r.Positions)
				a.NOut = int32(rows)
				a.OutPositions = ptr(r.Positions)
			}
			end := r.VocabEnd
			if end == 0 {
				end = cfg.EmbeddingRows()
			}
			cols := end - r.VocabBegin
			if cols <= 0 || r.VocabBegin < 0 || end > cfg.EmbeddingRows() {
				return nil, fmt.Errorf("%w: vocab range [%d, %d) is not inside [0, %d)", ErrInvalidArgument,
					r.VocabBegin, end, cfg.EmbeddingRows())
			}
			a.VocabBegin, a.VocabEnd = int32(r.VocabBegin), int32(r.VocabEnd)
			if !r.Logits {
				args[i] = a
				continue
			}
			var data []float32
			if cap(r.Out) >= rows*cols {
				data = r.Out[:rows*cols]
			} else {
				data = make([]float32, rows*cols)
			}
			out := &Logits{Rows: rows, Cols: cols, Data: data}
			if r.RowMax && rows > 0 {
				if cap(r.MaxOut) >= rows {
					out.Max = r.MaxOut[:rows]
				} else {
					out.Max = make([]float32, rows)
				}
				pin.Pin(&out.Max[0])
				a.RowMax = unsafe.Pointer(&out.Max[0])
			}
			outs[i] = out
			if len(out.Data) > 0 {
				pin.Pin(&out.Data[0])
				a.Logits = unsafe.Pointer(&out.Data[0])
			}
			a.VocabBegin, a.VocabEnd = int32(r.VocabBegin), int32(r.VocabEnd)
		}
		args[i] = a
	}

	pin.Pin(&args[0])
	err := errClosed
	s.m.rt.lib.native.locked(&s.mu, func() {
		if s.h == 0 {
			return
		}
		// While the call runs, a cancelled context asks the library to stop
		// between layers. (AfterFunc starts no goroutine unless it fires: a
		// goroutine per forward woke a thread that competed with the compute.)
		var cancelMu sync.Mutex
		running := true
		stop := context.AfterFunc(ctx, func() {
			cancelMu.Lock()
			defer cancelMu.Unlock()
			if running {
				s.m.rt.lib.ctxCancel(s.h)
			}
		})
		t0 := time.Now()
		st := s.m.rt.lib.forward(s.h, &args[0], int32(len(args)))
		s.forwardTime += time.Since(t0)
		s.forwards++
		if st == 0 {
			used := false
			for _, r := range reqs {
				if r.CacheMode == CacheUse {
					s.rows += int64(len(r.Compute))
					used = true
				} else {
					s.rows += int64(len(r.Tokens))
				}
			}
			if used {
				s.cachedCalls++
			}
		}
		stop()
		cancelMu.Lock() // a cancel in flight finishes; a later one does nothing
		running = false
		cancelMu.Unlock()
		err = statusError(st, "dimoo_forward", func() string { return s.m.rt.lib.ctxError(s.h) })
	})
	if err != nil {
		if errors.Is(err, ErrCancelled) && ctx.Err() != nil {
			return nil, fmt.Errorf("%w: %w", err, ctx.Err())
		}
		return nil, err
	}
	return outs, nil
}

// Logits runs one plain forward over tokens and returns the logits of the
// chosen positions (nil: all) and columns [vocabBegin, vocabEnd) (0: all).
func (m *Model) Logits(ctx context.Context, tokens, positions []int32, vocabBegin, vocabEnd int) (*Logits, error) {
	if len(tokens) == 0 {
		return nil, fmt.Errorf("%w: empty token sequence", ErrInvalidArgument)
	}
	if len(tokens) > m.Config.MaxSequenceLength {
		return nil, fmt.Errorf("%w: %d tokens exceed max_sequence_length %d", ErrInvalidArgument, len(tokens),
			m.Config.MaxSequenceLength)
	}
	s, err := m.NewSession(SessionOptions{MaxTokens: len(tokens)})
	if err != nil {
		return nil, err
	}
	defer s.Close()
	out, err := s.Forward(ctx, ForwardRequest{Tokens: tokens, Logits: true, Positions: positions,
		VocabBegin: vocabBegin, VocabEnd: vocabEnd})
	if err != nil {
		return nil, err
	}
	return out[0], nil
}

// Estimate reports the bytes a model of cfg whose matrices are stored as dt,
// loaded with precision prec, would take on backend b (threads as for
// NewRuntime), and a session with
// opts (nil: none, session 0), without loading or allocating anything: what
// Model.WeightBytes and Session.Bytes would then report. For choosing a
// device, or refusing a request, before reading gigabytes.
func (l *Library) Estimate(b Backend, threads int, cfg *Config, dt DType, prec Precision, opts *SessionOptions) (model,
	session int64, err error) {
	if cfg == nil {
		return 0, 0, fmt.Errorf("%w: no config", ErrInvalidArgument)
	}
	c := cfg.cConfig(prec)
	var p *cCtxParams
	if opts != nil {
		o := *opts
		if o.MaxTokens > math.MaxInt32 || o.KeepRows > math.MaxInt32 || o.KeepCols > math.MaxInt32 ||
			o.Seqs > math.MaxInt32 {
			return 0, 0, fmt.Errorf("%w: session sizes beyond int32", ErrInvalidArgument)
		}
		if o.Seqs == 0 {
			o.Seqs = 1
		}
		p = &cCtxParams{NSeqs: int32(o.Seqs), MaxTokens: int32(o.MaxTokens), KeepRows: int32(o.KeepRows),
			KeepCols: int32(o.KeepCols)}
		if o.KVCache {
			p.Flags = 1
		}
	}
	var eb errBuf
	st := l.estimate(int32(b), int32(threads), &c, int32(dt), p, &model, &session, eb.ptr(), eb.len())
	if err := statusError(st, "dimoo_estimate", eb.String); err != nil {
		return 0, 0, err
	}
	return model, session, nil
}
