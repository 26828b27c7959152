package dimoo

import (
	"context"
	"errors"
	"fmt"
	"image"
	"slices"
	"sync"
	"time"
)

// BatchOptions size a Batcher's shared session.
type BatchOptions struct {
	// Seqs is the number of sequence slots the running decodes share
	// (default 8). A request takes one slot per guidance branch (text to
	// image with CFG: 2; editing with text and image guidance: 3).
	Seqs int
	// MaxTokens is the longest sequence a batched request may have
	// (default: the model's max_sequence_length); longer ones run alone.
	MaxTokens int
	// KVCache gives every slot K/V caches, so ML-Cache requests batch too
	// (without it they run alone).
	KVCache bool
}

// Batcher runs the image decodes of concurrent requests together: each
// decode is a step machine, and every step of the batcher's loop joins the
// running decodes' forwards into one library call over the distinct
// sequence slots of one session (dimoo_forward's n sequences). Requests
// join and leave between steps, each at its own step, so one need not wait
// for a batch to fill or to finish. A decode's decisions depend only on its
// own logit rows, seed, step and positions, so a request gives the same
// bytes batched or alone.
//
// Requests go through the Pipeline's methods as usual (the Batcher's
// GenerateImage, EditImage, Inpaint, InpaintMask, Understand: image and
// text decodes share the batch); those whose shape does not fit (more
// branches than slots, longer than MaxTokens, ML-Cache without KVCache)
// run alone in a session of their own.
type Batcher struct {
	p    *Pipeline
	s    *Session
	opts BatchOptions

	ctx    context.Context // cancelled by Close: stops a forward in flight
	cancel context.CancelFunc
	wake   chan struct{}
	done   chan struct{}

	mu      sync.Mutex
	pending []*batchJob
	closed  bool
	stats   BatchStats
}

// BatchStats count a Batcher's work since it started.
type BatchStats struct {
	Forwards  int64 // batched forward calls
	Sequences int64 // sequences over those calls (Sequences/Forwards: mean batch width)
	Steps     int64 // decode steps run (each request's steps summed)
	Requests  int64 // decodes finished
	Running   int   // decodes in the batch now
	Waiting   int   // decodes waiting for slots
}

// stepper is a decode as a step machine (imageStepper, textStepper).
type stepper interface {
	requests() []ForwardRequest // the next step's forwards (may be none)
	finish(outs []*Logits) error
	done() bool
	result() []int32
	steps() int
}

func (st *imageStepper) result() []int32 { return st.answer }
func (st *imageStepper) steps() int      { return st.t }

// textBatch adapts textStepper, whose finish cannot fail.
type textBatch struct{ *textStepper }

func (st textBatch) finish(outs []*Logits) error { st.textStepper.finish(outs); return st.err }
func (st textBatch) result() []int32             { return st.x }
func (st textBatch) steps() int                  { return st.step }

type batchJob struct {
	ctx      context.Context
	width    int                                         // sequence slots
	start    func(s *Session, base int) (stepper, error) // the decode, at slots base..base+width-1
	st       stepper
	base     int
	t0       time.Time
	forward  time.Duration
	forwards int
	res      chan batchResult // buffered: the loop never blocks on a reply
}

type batchResult struct {
	answer []int32
	err    error
	stats  DecodeStats
}

// NewBatcher allocates the shared session and starts the batching loop.
func (p *Pipeline) NewBatcher(opts BatchOptions) (*Batcher, error) {
	if opts.Seqs == 0 {
		opts.Seqs = 8
	}
	if opts.MaxTokens == 0 {
		opts.MaxTokens = p.Model.Config.MaxSequenceLength
	}
	if opts.Seqs < 1 || opts.MaxTokens < 1 || opts.MaxTokens > p.Model.Config.MaxSequenceLength {
		return nil, fmt.Errorf("%w: batch of %d sequences of up to %d tokens (the model allows %d)", ErrInvalidArgument,
			opts.Seqs, opts.MaxTokens, p.Model.Config.MaxSequenceLength)
	}
	// Kept logits sized for images (every position x the codebook); text
	// blocks fit when block x vocabulary is no more.
	s, err := p.Model.NewSession(SessionOptions{MaxTokens: opts.MaxTokens, Seqs: opts.Seqs, KVCache: opts.KVCache,
		KeepCols: int(p.Special.Codebook)})
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	b := &Batcher{p: p, s: s, opts: opts, ctx: ctx, cancel: cancel, wake: make(chan struct{}, 1),
		done: make(chan struct{})}
	go b.loop()
	return b, nil
}

// Bytes is the memory the shared session holds (scratch and K/V caches).
func (b *Batcher) Bytes() int64 { return b.s.Bytes() }

// Options are the batcher's sizes.
func (b *Batcher) Options() BatchOptions { return b.opts }

// Stats reports the batcher's counters.
func (b *Batcher) Stats() BatchStats {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.stats
}

// Close fails the decodes still waiting or running (ErrShutdown), stops the
// loop and frees the session. The pipeline stays open.
func (b *Batcher) Close() error {
	b.mu.Lock()
	already := b.closed
	b.closed = true
	b.mu.Unlock()
	if already {
		<-b.done
		return nil
	}
	b.cancel()
	b.signal()
	<-b.done
	return b.s.Close()
}

// GenerateImage is Pipeline.GenerateImage with the decode batched.
func (b *Batcher) GenerateImage(ctx context.Context, req ImageRequest) (image.Image, error) {
	return b.p.GenerateImage(b.with(ctx), req)
}

// EditImage is Pipeline.EditImage with the decode batched.
func (b *Batcher) EditImage(ctx context.Context, req EditRequest) (image.Image, error) {
	return b.p.EditImage(b.with(ctx), req)
}

// Inpaint is Pipeline.Inpaint with the decode batched.
func (b *Batcher) Inpaint(ctx context.Context, req InpaintRequest) (image.Image, error) {
	return b.p.Inpaint(b.with(ctx), req)
}

// Understand is Pipeline.Understand with the decode batched.
func (b *Batcher) Understand(ctx context.Context, req UnderstandRequest) (string, error) {
	return b.p.Understand(b.with(ctx), req)
}

// InpaintMask is Pipeline.InpaintMask with the decode batched.
func (b *Batcher) InpaintMask(ctx context.Context, req InpaintRequest, mask image.Image) (image.Image, error) {
	return b.p.InpaintMask(b.with(ctx), req, mask)
}

// ErrShutdown: the batcher (or the service using it) closed before the
// request's decode finished.
var ErrShutdown = errors.New("shut down")

type batcherKey struct{}

func (b *Batcher) with(ctx context.Context) context.Context {
	return context.WithValue(ctx, batcherKey{}, b)
}

// batcherFor returns the batcher a request's context names when the
// decode fits it (nil: run alone).
func batcherFor(ctx context.Context, p *Pipeline, branches, tokens int, o ImageSampling) *Batcher {
	b, _ := ctx.Value(batcherKey{}).(*Batcher)
	if b == nil || b.p != p || branches > b.opts.Seqs || tokens > b.opts.MaxTokens || (o.UseCache && !b.opts.KVCache) {
		return nil
	}
	return b
}

// textBatcherFor is batcherFor for understanding decodes of model m.
func textBatcherFor(ctx context.Context, m *Model, seqs, tokens int) *Batcher {
	b, _ := ctx.Value(batcherKey{}).(*Batcher)
	if b == nil || b.p.Model != m || seqs > b.opts.Seqs || tokens > b.opts.MaxTokens {
		return nil
	}
	return b
}

// decodeImage is Pipeline.decodeImage through the batch.
func (b *Batcher) decodeImage(ctx context.Context, prefixes [][]int32, weights []float32, answer []int32,
	gw, gh int, o ImageSampling, progress func(int, int), stats *DecodeStats) (image.Image, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	d := &imageDecode{prefixes: prefixes, answer: answer, weights: weights, special: b.p.Special,
		codebook: int(b.p.Special.Codebook)}
	r := b.submit(&batchJob{ctx: ctx, width: len(prefixes), start: func(s *Session, base int) (stepper, error) {
		st, err := d.start(s, o, imageHooks{progress: progress}, base)
		if err != nil {
			return nil, err // a nil *imageStepper is not a nil stepper
		}
		return st, nil
	}})
	if r.err != nil {
		return nil, r.err
	}
	if stats != nil {
		*stats = r.stats
	}
	return b.p.VQ.Decode(ctx, b.p.Special.gridCodes(r.answer, gh, gw), gh, gw)
}

// submit queues a job and waits for its answer: the loop answers every job
// it was given (done, failed, cancelled or closed), within a step of the
// context's end.
func (b *Batcher) submit(j *batchJob) batchResult {
	j.res = make(chan batchResult, 1)
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return batchResult{err: fmt.Errorf("%w: the batcher is closed", ErrShutdown)}
	}
	b.pending = append(b.pending, j)
	b.mu.Unlock()
	b.signal()
	return <-j.res
}

// decodeText runs an understanding decode through the batch (see
// textDecode.run).
func (b *Batcher) decodeText(ctx context.Context, d *textDecode, o TextSampling, h imageHooks) ([]int32, error) {
	guided := o.CFGScale > 0
	width := 1
	if guided {
		width = 2
	}
	r := b.submit(&batchJob{ctx: ctx, width: width, start: func(s *Session, base int) (stepper, error) {
		return textBatch{d.start(s, o, h, nil, guided, base)}, nil
	}})
	if r.err == nil && d.stats != nil {
		*d.stats = r.stats
	}
	return r.answer, r.err
}

func (b *Batcher) signal() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// loop admits waiting jobs into free slots, runs one step of every running
// decode per forward call, and answers each job once.
func (b *Batcher) loop() {
	defer close(b.done)
	used := make([]bool, b.opts.Seqs)
	var active []*batchJob
	release := func(j *batchJob) {
		for i := 0; i < j.width; i++ {
			used[j.base+i] = false
		}
	}
	reply := func(j *batchJob, r batchResult) { j.res <- r }
	for {
		b.mu.Lock()
		if b.closed {
			pend := b.pending
			b.pending = nil
			b.stats.Running, b.stats.Waiting = 0, 0
			b.mu.Unlock()
			err := fmt.Errorf("%w: the server is shutting down", ErrShutdown)
			for _, j := range append(active, pend...) {
				reply(j, batchResult{err: err})
			}
			return
		}
		// Admit in order of arrival while the first waiting job fits: a
		// wide job is not overtaken forever by narrow ones.
		for len(b.pending) > 0 {
			j := b.pending[0]
			if j.ctx.Err() != nil {
				b.pending = b.pending[1:]
				reply(j, batchResult{err: fmt.Errorf("%w: %w", ErrCancelled, j.ctx.Err())})
				continue
			}
			base := freeRun(used, j.width)
			if base < 0 {
				break
			}
			b.pending = b.pending[1:]
			st, err := j.start(b.s, base)
			if err != nil {
				reply(j, batchResult{err: err})
				continue
			}
			for i := 0; i < j.width; i++ {
				used[base+i] = true
			}
			j.st, j.base, j.t0 = st, base, time.Now()
			active = append(active, j)
		}
		b.stats.Running, b.stats.Waiting = len(active), len(b.pending)
		b.mu.Unlock()

		// Leave between steps: cancelled jobs, and those whose decode is done.
		kept := active[:0]
		for _, j := range active {
			switch {
			case j.ctx.Err() != nil:
				release(j)
				reply(j, batchResult{err: fmt.Errorf("%w: %w", ErrCancelled, j.ctx.Err())})
			case j.st.done():
				release(j)
				b.mu.Lock()
				b.stats.Requests++
				b.mu.Unlock()
				reply(j, batchResult{answer: j.st.result(), stats: DecodeStats{Steps: j.st.steps(), Forwards: j.forwards,
					Total: time.Since(j.t0), Forward: j.forward}})
			default:
				kept = append(kept, j)
			}
		}
		clear(active[len(kept):])
		active = kept
		if len(active) == 0 {
			b.mu.Lock()
			idle := len(b.pending) == 0 && !b.closed
			b.mu.Unlock()
			if idle {
				<-b.wake
			}
			continue
		}
		b.step(active, release, reply)
		active = slices.DeleteFunc(active, func(j *batchJob) bool { return j.st == nil })
	}
}

// step runs one forward over every active decode and samples each; a job
// that fails is answered and marked (st = nil) for removal.
func (b *Batcher) step(active []*batchJob, release func(*batchJob), reply func(*batchJob, batchResult)) {
	b.p.Model.rt.lib.native.do(func() {
		var reqs []ForwardRequest
		n := make([]int, len(active))
		for k, j := range active {
			r := j.st.requests()
			n[k] = len(r)
			reqs = append(reqs, r...)
		}
		var outs []*Logits
		var err error
		var dt time.Duration
		if len(reqs) > 0 { // text decodes may have a step without a forward
			t0 := time.Now()
			outs, err = b.s.Forward(b.ctx, reqs...)
			dt = time.Since(t0)
		}
		if err != nil {
			if errors.Is(err, ErrCancelled) && b.ctx.Err() != nil {
				err = fmt.Errorf("%w: the server is shutting down", ErrShutdown)
			}
			for _, j := range active {
				release(j)
				reply(j, batchResult{err: err})
				j.st = nil
			}
			return
		}
		b.mu.Lock()
		if len(reqs) > 0 {
			b.stats.Forwards++
		}
		b.stats.Sequences += int64(len(reqs))
		b.stats.Steps += int64(len(active))
		b.mu.Unlock()
		off := 0
		for k, j := range active {
			if n[k] > 0 {
				j.forward += dt
				j.forwards++
			}
			if err := j.st.finish(outs[off : off+n[k]]); err != nil {
				release(j)
				reply(j, batchResult{err: err})
				j.st = nil
			}
			off += n[k]
		}
	})
}

// freeRun finds n adjacent free slots (first fit), or -1.
func freeRun(used []bool, n int) int {
	run := 0
	for i, u := range used {
		if u {
			run = 0
			continue
		}
		run++
		if run == n {
			return i - n + 1
		}
	}
	return -1
}
