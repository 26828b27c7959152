package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/dimoo-dev/dimoo/dimoo"
	"github.com/dimoo-dev/dimoo/internal/gpu"
	"github.com/dimoo-dev/dimoo/serve"
)

// cmdServe runs the HTTP service (see package serve): one engine per
// device, each with its own library thread, pipeline and batcher.
func cmdServe(ctx context.Context, args []string, w io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	var t taskFlags
	t.register(fs)
	addr := fs.String("addr", "127.0.0.1:8080", "listen address (host:port; :8080 for every interface)")
	devices := fs.String("devices", "", "engines: cpu, all (every GPU), or GPU indices like 0,1 (default: --device)")
	batch := fs.Int("batch", 8, "sequence slots shared by concurrent image decodes per engine (0: no batching)")
	batchTokens := fs.Int("batch_tokens", 0, "longest batched sequence (0: the model's max_sequence_length)")
	kv := fs.Bool("batch_kv_cache", false,
		"give batch slots K/V caches so ML-Cache requests batch too (memory: slots x layers x batch_tokens x K/V width)")
	inflight := fs.Int("max_inflight", 16, "requests running at once")
	queue := fs.Int("max_queue", 64, "requests waiting beyond those (then 429)")
	bodyMB := fs.Int("max_body_mb", 32, "largest request body, MiB")
	pixels := fs.Int("max_pixels", 4096*4096, "largest input or output image, pixels")
	timeout := fs.Duration("request_timeout", 10*time.Minute, "deadline of each request, waiting included")
	grace := fs.Duration("shutdown_timeout", 60*time.Second, "on SIGINT/SIGTERM: time running requests get to finish")
	name := fs.String("model_name", "dimoo", "the model's name in the API")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	dir, err := t.modelDir()
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))

	// GPUs: NVML when present; the library's own count otherwise.
	gpus, gerr := gpu.Open()
	if gerr != nil {
		log.Info("no GPU telemetry", "reason", gerr)
		gpus = nil
	} else {
		defer gpus.Close()
	}
	lib, err := t.library()
	if err != nil {
		return err
	}
	count := lib.DeviceCount(dimoo.BackendCUDA)
	if gpus != nil {
		if n, err := gpus.Count(); err == nil && n < count {
			count = n
		}
	}
	spec := *devices
	if spec == "" {
		spec = "cpu"
		if t.device == "cuda" {
			spec = "0"
		}
	}
	idx, err := gpu.ParseDevices(spec, count)
	if err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if spec == "all" && len(idx) == 0 {
		log.Info("--devices all: no GPU, serving on the CPU")
	}

	var engines []*serve.Engine
	defer func() {
		for _, e := range engines {
			if e.Batcher != nil {
				e.Batcher.Close()
			}
			e.Pipeline.Close()
		}
	}()
	open := func(name string, opts dimoo.LoadOptions, gpuIndex int) error {
		p, err := dimoo.OpenPipeline(ctx, dir, dimoo.PipelineOptions{LoadOptions: opts,
			MaxConcurrent: *inflight * 4})
		if err != nil {
			return fmt.Errorf("engine %s: %w", name, err)
		}
		e := &serve.Engine{Name: name, Pipeline: p, GPU: gpuIndex}
		engines = append(engines, e)
		if *batch > 0 {
			if e.Batcher, err = p.NewBatcher(dimoo.BatchOptions{Seqs: *batch, MaxTokens: *batchTokens,
				KVCache: *kv}); err != nil {
				return fmt.Errorf("engine %s: %w", name, err)
			}
		}
		var batchBytes int64
		if e.Batcher != nil {
			batchBytes = e.Batcher.Bytes()
		}
		log.Info("engine ready", "engine", name, "model", dir, "batch_slots", *batch, "batch_bytes", batchBytes)
		return nil
	}
	if len(idx) == 0 {
		opts, err := t.loadOptions()
		if err != nil {
			return err
		}
		opts.Backend = dimoo.BackendCPU
		if err := open("cpu", opts, -1); err != nil {
			return err
		}
	}
	for _, i := range idx {
		// A library handle per device: each has its own compute thread, so
		// devices do not wait for each other's calls.
		l, err := dimoo.OpenLibrary(dimoo.LibraryOptions{Path: lib.Path})
		if err != nil {
			return err
		}
		opts := dimoo.LoadOptions{Library: l, Backend: dimoo.BackendCUDA, Device: i, Threads: t.threads}
		if err := open(fmt.Sprintf("cuda:%d", i), opts, i); err != nil {
			return err
		}
	}

	srv, err := serve.New(engines, serve.Options{MaxInflight: *inflight, MaxQueue: *queue,
		MaxBodyBytes: int64(*bodyMB) << 20, MaxImagePixels: *pixels, RequestTimeout: *timeout, ModelName: *name,
		GPUs: gpus, Log: log})
	if err != nil {
		return err
	}
	l, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "dimoo serve: http://%s (%d engine(s))\n", l.Addr(), len(engines))
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM)
	defer stop()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down", "grace", *grace)
	sctx, cancel := context.WithTimeout(context.Background(), *grace)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return <-served
}
