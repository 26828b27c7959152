package dimoo

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"golang.org/x/sync/errgroup"
)

// LoadOptions say where and how a checkpoint is loaded.
type LoadOptions struct {
	// Library to use; nil means DefaultLibrary().
	Library *Library
	// Backend and Device pick the runtime (default: the CPU).
	Backend Backend
	Device  int
	// Threads is the number of CPU threads (0: every core).
	Threads int
	// Precision of the transformer's arithmetic (default: as stored).
	// Ignored by LoadVQModel: the VQ-VAE computes in fp32.
	Precision Precision
}

// Precision is the arithmetic of a model's matrices.
type Precision int32

const (
	// PrecisionAuto computes as the checkpoint is stored. CPU: bf16
	// checkpoints in bf16 (the fast path), fp32 ones in fp32, fp16 or mixed
	// ones in fp32 packed per call (slow). CUDA: bf16.
	PrecisionAuto Precision = 0
	// PrecisionBF16 rounds the embedding and every matrix to bf16 at load,
	// whatever the checkpoint's dtype (norm weights stay fp32), and
	// accumulates in fp32: the official model's arithmetic and the fast CPU
	// path, at half the memory of fp32.
	PrecisionBF16 Precision = 1
	// PrecisionF32 computes in fp32, bf16 and fp16 weights widened exactly:
	// a reference for the bf16 path's error, at twice its memory. CPU only.
	PrecisionF32 Precision = 2
)

func (p Precision) String() string {
	switch p {
	case PrecisionAuto:
		return "auto"
	case PrecisionBF16:
		return "bf16"
	case PrecisionF32:
		return "fp32"
	}
	return fmt.Sprintf("precision(%d)", int32(p))
}

// ParsePrecision turns "auto", "bf16" or "fp32" into a Precision.
func ParsePrecision(s string) (Precision, error) {
	for _, p := range []Precision{PrecisionAuto, PrecisionBF16, PrecisionF32} {
		if s == p.String() {
			return p, nil
		}
	}
	return 0, fmt.Errorf("%w: unknown precision %q (want auto, bf16 or fp32)", ErrInvalidArgument, s)
}

// Model is a DiMOO transformer loaded into libdimoo. A loaded model is
// read-only and safe for concurrent use: each Session owns its scratch
// memory and caches.
type Model struct {
	Dir    string
	Config *Config
	// Precision the model was loaded with.
	Precision Precision
	// Tensors lists the checkpoint tensors the model uses, with their stored
	// dtype; Extra lists tensors of the checkpoint the forward does not use.
	Tensors []TensorInfo
	Extra   []string

	rt  *Runtime
	own bool // the model created rt and closes it

	mu sync.Mutex // guards h and the handle's error message
	h  uintptr
}

// shardSet is the set of safetensors files of a checkpoint, opened and
// validated, keyed by tensor name.
type shardSet struct {
	files  []*SafetensorsFile
	byName map[string]*SafetensorsFile
}

func (s *shardSet) Close() {
	for _, f := range s.files {
		if f != nil { // a shard that failed to open
			f.Close()
		}
	}
}

// openShards reads model.safetensors.index.json (or model.safetensors alone)
// and opens every shard in parallel.
func openShards(dir string) (*shardSet, error) {
	index := filepath.Join(dir, "model.safetensors.index.json")
	var names []string
	var weightMap map[string]string
	if _, err := os.Stat(index); err == nil {
		weightMap, err = ReadSafetensorsIndex(index)
		if err != nil {
			return nil, err
		}
		seen := map[string]bool{}
		for _, f := range weightMap {
			if !seen[f] {
				seen[f] = true
				names = append(names, f)
			}
		}
		sort.Strings(names)
	} else if _, err := os.Stat(filepath.Join(dir, "model.safetensors")); err == nil {
		names = []string{"model.safetensors"}
	} else {
		return nil, checkpointError(dir, "neither model.safetensors.index.json nor model.safetensors exists")
	}

	set := &shardSet{files: make([]*SafetensorsFile, len(names)), byName: map[string]*SafetensorsFile{}}
	var g errgroup.Group
	for i, n := range names {
		g.Go(func() error {
			f, err := OpenSafetensors(filepath.Join(dir, n))
			set.files[i] = f
			return err
		})
	}
	if err := g.Wait(); err != nil {
		set.Close()
		return nil, err
	}
	for _, f := range set.files {
		for name := range f.Tensors() {
			if prev, dup := set.byName[name]; dup {
				set.Close()
				return nil, checkpointError(dir, "tensor %q is stored in both %s and %s", name,
					filepath.Base(prev.Path()), filepath.Base(f.Path()))
			}
			set.byName[name] = f
		}
	}
	// The index must agree with the shards it names.
	for name, file := range weightMap {
		f, ok := set.byName[name]
		if !ok {
			set.Close()
			return nil, checkpointError(index, "tensor %q is listed in %s but no shard stores it", name, file)
		}
		if filepath.Base(f.Path()) != file {
			set.Close()
			return nil, checkpointError(index, "tensor %q is listed in %s but stored in %s", name, file,
				filepath.Base(f.Path()))
		}
	}
	return set, nil
}

// validateTensors checks presence, dtype and shape of every tensor the config
// implies, before anything is allocated in the library.
func validateTensors(dir string, cfg *Config, set *shardSet) (used []TensorInfo, extra []string, err error) {
	want := cfg.ExpectedTensors()
	wanted := map[string]bool{}
	for _, spec := range want {
		wanted[spec.Name] = true
		f, ok := set.byName[spec.Name]
		if !ok {
			return nil, nil, checkpointError(dir, "tensor %q is missing", spec.Name)
		}
		info := f.Tensors()[spec.Name]
		if !shapeEqual(info.Shape, spec.Shape) {
			return nil, nil, checkpointError(f.Path(), "tensor %q has shape %v but config.json implies %v",
				spec.Name, info.Shape, spec.Shape)
		}
		used = append(used, info)
	}
	for name := range set.byName {
		if !wanted[name] {
			extra = append(extra, name)
		}
	}
	sort.Strings(extra)
	return used, extra, nil
}

func shapeEqual(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// LoadModel reads a Hugging Face checkpoint folder (config.json plus
// model.safetensors or a sharded index), validates it against the config, and
// copies the weights into the library once, straight from the memory-mapped
// shards.
func LoadModel(ctx context.Context, dir string, opts LoadOptions) (*Model, error) {
	lib := opts.Library
	if lib == nil {
		var err error
		if lib, err = DefaultLibrary(); err != nil {
			return nil, err
		}
	}
	cfg, set, used, extra, err := openCheckpoint(dir)
	if err != nil {
		return nil, err
	}
	defer set.Close()

	rt, err := lib.NewRuntime(opts.Backend, opts.Device, opts.Threads)
	if err != nil {
		return nil, err
	}
	m, err := newModel(rt, cfg, opts.Precision)
	if err != nil {
		rt.Close()
		return nil, err
	}
	m.own = true
	m.Dir = dir
	m.Tensors = used
	m.Extra = extra

	// Each shard's pages are faulted in by its own goroutine (the disk reads
	// overlap); the copies into the library are serialized, since a model's
	// mutating calls may not run concurrently.
	g, gctx := errgroup.WithContext(ctx)
	for _, f := range set.files {
		g.Go(func() error {
			for _, info := range used {
				if set.byName[info.Name] != f {
					continue
				}
				if err := gctx.Err(); err != nil {
					return fmt.Errorf("%w: loading %s: %w", ErrCancelled, dir, err)
				}
				data, err := f.Data(info.Name)
				if err != nil {
					return err
				}
				prefault(data)
				if err := m.setWeight(info, data); err != nil {
					return err
				}
				f.dropPages(info.Name) // the library has its copy
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		m.Close()
		return nil, err
	}
	if err := m.finalize(); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// prefault touches one byte per page so the copy that follows does not stall
// on the disk.
func prefault(b []byte) {
	var sink byte
	for i := 0; i < len(b); i += 4096 {
		sink += b[i]
	}
	_ = sink
}

func (c *Config) cConfig(p Precision) cModelConfig {
	return cModelConfig{
		Precision:         int32(p),
		DModel:            int32(c.DModel),
		NLayers:           int32(c.NLayers),
		NHeads:            int32(c.NHeads),
		NKVHeads:          int32(c.NKVHeads),
		MLPHiddenSize:     int32(c.MLPHidden()),
		VocabSize:         int32(c.VocabSize),
		EmbeddingSize:     int32(c.EmbeddingRows()),
		MaxSequenceLength: int32(c.MaxSequenceLength),
		RopeTheta:         float32(c.RopeTheta),
		RMSNormEps:        float32(c.RMSNormEps),
	}
}

// newModel creates an empty model on rt; weights follow with setWeight.
func newModel(rt *Runtime, cfg *Config, prec Precision) (*Model, error) {
	cc := cfg.cConfig(prec)
	var out uintptr
	var eb errBuf
	h, err := rt.handle()
	if err != nil {
		return nil, err
	}
	st := rt.lib.modelCreate(h, &cc, &out, eb.ptr(), eb.len())
	if err := statusError(st, "dimoo_model_create", eb.String); err != nil {
		return nil, err
	}
	return &Model{Config: cfg, Precision: prec, rt: rt, h: out}, nil
}

func (m *Model) setWeight(info TensorInfo, data []byte) error {
	p, sp, nd := tensorArgs(info, data)
	err := errClosed
	m.rt.lib.native.locked(&m.mu, func() {
		if m.h != 0 {
			st := m.rt.lib.modelSetW(m.h, info.Name, int32(info.DType), sp, nd, p, uint64(len(data)))
			err = statusError(st, "dimoo_model_set_weight", func() string { return m.rt.lib.modelError(m.h) })
		}
	})
	return err
}

func (m *Model) finalize() error {
	var err error
	m.rt.lib.native.locked(&m.mu, func() {
		st := m.rt.lib.modelFinalize(m.h)
		err = statusError(st, "dimoo_model_finalize", func() string { return m.rt.lib.modelError(m.h) })
	})
	return err
}

// Runtime is the runtime the model lives on.
func (m *Model) Runtime() *Runtime { return m.rt }

// WeightBytes is the memory the weights take inside the library.
func (m *Model) WeightBytes() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.h == 0 {
		return 0
	}
	return m.rt.lib.modelWBytes(m.h)
}

// Close frees the weights (and the runtime, if LoadModel made it). Sessions
// must be closed first.
func (m *Model) Close() error {
	m.mu.Lock()
	if m.h != 0 {
		m.rt.lib.modelFree(m.h)
		m.h = 0
	}
	m.mu.Unlock()
	if m.own {
		m.own = false
		return m.rt.Close()
	}
	return nil
}

// CheckpointInfo describes a checkpoint folder without loading its weights.
type CheckpointInfo struct {
	Config      *Config
	Shards      int
	StoredBytes int64          // bytes of tensor data in the shards
	WeightBytes int64          // bytes of the tensors the forward uses, as stored
	DTypes      map[string]int // stored dtype -> number of used tensors
	Extra       []string       // tensors the forward does not use
}

// openCheckpoint reads config.json, opens the shards and validates every
// tensor against the config. The caller closes the shard set.
func openCheckpoint(dir string) (cfg *Config, set *shardSet, used []TensorInfo, extra []string, err error) {
	if cfg, err = LoadConfig(dir); err != nil {
		return nil, nil, nil, nil, err
	}
	if set, err = openShards(dir); err != nil {
		return nil, nil, nil, nil, err
	}
	if used, extra, err = validateTensors(dir, cfg, set); err != nil {
		set.Close()
		return nil, nil, nil, nil, err
	}
	return cfg, set, used, extra, nil
}

// Inspect reads and validates a checkpoint's config and shard headers (every
// tensor's presence, dtype and shape) without copying any weights.
func Inspect(dir string) (*CheckpointInfo, error) {
	cfg, set, used, extra, err := openCheckpoint(dir)
	if err != nil {
		return nil, err
	}
	defer set.Close()
	info := &CheckpointInfo{Config: cfg, Shards: len(set.files), DTypes: map[string]int{}, Extra: extra}
	for _, f := range set.files {
		for _, t := range f.Tensors() {
			info.StoredBytes += t.End - t.Begin
		}
	}
	for _, t := range used {
		info.WeightBytes += t.End - t.Begin
		info.DTypes[t.DType.String()]++
	}
	return info, nil
}
