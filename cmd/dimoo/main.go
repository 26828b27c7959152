// Command dimoo is the command-line front end of the dimoo engine.
//
//	dimoo info   [--model DIR]
//	dimoo logits [--model DIR] --tokens 5,17,3 [--positions 0,2] [--vocab-range 126356:134548] --out FILE.npy
//	dimoo version
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"

	"github.com/dimoo-dev/dimoo/dimoo"
)

const usage = `dimoo - native inference engine for Lumina-DiMOO

Usage:
  dimoo info    [--model DIR]           config, parameter count, dtypes, memory estimate
  dimoo logits  [--model DIR] --tokens IDS [--positions P] [--vocab-range A:B] --out FILE.npy
  dimoo generate   --prompt TEXT [--width W --height H --timesteps N --cfg_scale S --use-cache ...]
  dimoo generate   --prompt TEXT --painting_mode inpainting|outpainting --painting_image IMG
  dimoo edit       --prompt TEXT --image_path IMG [--edit_type edit|control|subject|style|dense]
  dimoo understand --prompt QUESTION --image_path IMG [--steps N --gen_length L --block_length B]
  dimoo bench      [--prompt TEXT --width W --height H --timesteps N --use-cache --runs R]
                   time text-to-image decodes: forward, outside-forward and sampling per step
  dimoo vq-encode  --vqvae DIR --image IN.png --out codes.txt
  dimoo vq-decode  --vqvae DIR --codes codes.txt --out OUT.png
  dimoo tokenize   --tokenizer FILE TEXT        text to token ids (comma-separated)
  dimoo detokenize --tokenizer FILE 5,17,3      token ids to text [--skip-special]
  dimoo version                         library version and backends

Common flags: --lib PATH (libdimoo to load), --device cpu|cuda, --threads N.
--model DIR defaults to $DIMOO_MODEL, else the shipped small model. Outputs never
replace an existing file unless --force; generate and edit take --output FILE.
dimoo CMD --help lists a command's flags with the defaults that apply.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil {
		msg := err.Error()
		if !strings.HasPrefix(msg, "dimoo:") {
			msg = "dimoo: " + msg
		}
		fmt.Fprintln(os.Stderr, msg)
		if errors.Is(err, errUsage) {
			// A known command's mistake points at its own flags.
			if _, ok := commandSynopsis[firstArg(os.Args[1:])]; ok {
				fmt.Fprintf(os.Stderr, "run 'dimoo %s --help' for its flags\n", os.Args[1])
			} else {
				fmt.Fprint(os.Stderr, usage)
			}
			os.Exit(2)
		}
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

func firstArg(args []string) string {
	if len(args) == 0 {
		return ""
	}
	return args[0]
}

func run(ctx context.Context, args []string, stdout io.Writer) error {
	err := dispatch(ctx, args, stdout)
	var h *helpShown
	if errors.As(err, &h) {
		fmt.Fprint(stdout, h.text)
		return nil
	}
	return err
}

func dispatch(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: no command", errUsage)
	}
	switch args[0] {
	case "info":
		return cmdInfo(ctx, args[1:], stdout)
	case "logits":
		return cmdLogits(ctx, args[1:], stdout)
	case "version":
		return cmdVersion(args[1:], stdout)
	case "vq-encode":
		return cmdVQEncode(ctx, args[1:], stdout)
	case "vq-decode":
		return cmdVQDecode(ctx, args[1:], stdout)
	case "generate":
		return cmdGenerate(ctx, args[1:], stdout)
	case "edit":
		return cmdEdit(ctx, args[1:], stdout)
	case "understand":
		return cmdUnderstand(ctx, args[1:], stdout)
	case "bench":
		return cmdBench(ctx, args[1:], stdout)
	case "serve":
		return cmdServe(ctx, args[1:], stdout)
	case "tokenize":
		return cmdTokenize(args[1:], stdout)
	case "detokenize":
		return cmdDetokenize(args[1:], stdout)
	case "help", "-h", "--help":
		if len(args) > 1 && args[1] != "help" && !strings.HasPrefix(args[1], "-") {
			return dispatch(ctx, []string{args[1], "--help"}, stdout)
		}
		fmt.Fprint(stdout, usage)
		return nil
	}
	return fmt.Errorf("%w: unknown command %q", errUsage, args[0])
}

// common holds the flags every engine command takes.
type common struct {
	lib       string
	device    string
	threads   int
	precision string
}

func (c *common) register(fs *flag.FlagSet) {
	fs.StringVar(&c.lib, "lib", "", "path of libdimoo (default: $DIMOO_LIBRARY, next to the executable, or lib/)")
	fs.StringVar(&c.device, "device", "cpu", "backend: cpu or cuda")
	fs.IntVar(&c.threads, "threads", 0, fmt.Sprintf("CPU threads (0: all %d cores)", runtime.NumCPU()))
	fs.StringVar(&c.precision, "precision", "auto",
		"transformer arithmetic: auto (as stored), bf16 (any checkpoint rounded to bf16: the fast CPU path) or fp32 (CPU only); the VQ-VAE is fp32")
}

func (c *common) library() (*dimoo.Library, error) {
	if c.lib != "" {
		return dimoo.OpenLibrary(dimoo.LibraryOptions{Path: c.lib})
	}
	return dimoo.DefaultLibrary()
}

func (c *common) loadOptions() (dimoo.LoadOptions, error) {
	lib, err := c.library()
	if err != nil {
		return dimoo.LoadOptions{}, err
	}
	c.capThreads()
	b, err := dimoo.ParseBackend(c.device)
	if err != nil {
		return dimoo.LoadOptions{}, err
	}
	p, err := dimoo.ParsePrecision(c.precision)
	if err != nil {
		return dimoo.LoadOptions{}, err
	}
	return dimoo.LoadOptions{Library: lib, Backend: b, Threads: c.threads, Precision: p}, nil
}

// capThreads keeps --threads within the CPUs: threads beyond them only
// wait for each other (every step hundreds of times slower).
func (c *common) capThreads() {
	if n := runtime.NumCPU(); c.threads > n {
		fmt.Fprintf(os.Stderr, "dimoo: warning: --threads %d is more than the %d CPUs here; using %d\n",
			c.threads, n, n)
		c.threads = n
	}
}

// parseFlags parses a command's flags (the task flags starting from the
// model's defaults), answers -h/--help with the command's own flags, and
// checks every value before the command reads any file.
func parseFlags(fs *flag.FlagSet, args []string) error {
	presetModelDefaults(fs, args)
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if isHelp(err) {
			return &helpShown{helpText(fs)}
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	if err := checkFlags(fs); err != nil {
		return err
	}
	return checkImageSize(fs)
}

func cmdVersion(args []string, w io.Writer) error {
	fs := flag.NewFlagSet("version", flag.ContinueOnError)
	var c common
	c.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	lib, err := c.library()
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "libdimoo %s\nloaded from %s (%s)\n", lib.Version(), lib.Path, lib.Source)
	fmt.Fprintf(w, "cuda backend: built=%v devices=%d\n", lib.BackendBuilt(dimoo.BackendCUDA),
		lib.DeviceCount(dimoo.BackendCUDA))
	return nil
}

func cmdInfo(ctx context.Context, args []string, w io.Writer) error {
	fs := flag.NewFlagSet("info", flag.ContinueOnError)
	var c common
	c.register(fs)
	dir := fs.String("model", "", "checkpoint folder (default: $DIMOO_MODEL, else the shipped small model)")
	load := fs.Bool("load", false, "also load the weights into the library and report its memory")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	var err error
	if *dir, err = defaultModelDir(*dir); err != nil {
		return err
	}
	info, err := dimoo.Inspect(*dir)
	if err != nil {
		return err
	}
	cfg := info.Config
	fmt.Fprintf(w, "model:      %s\n", *dir)
	fmt.Fprintf(w, "layers:     %d, d_model %d, heads %d (kv %d, head dim %d), mlp %d\n", cfg.NLayers, cfg.DModel,
		cfg.NHeads, cfg.NKVHeads, cfg.HeadDim(), cfg.MLPHidden())
	fmt.Fprintf(w, "vocab:      %d ids, %d embedding rows; max sequence %d\n", cfg.VocabSize, cfg.EmbeddingRows(),
		cfg.MaxSequenceLength)
	fmt.Fprintf(w, "rope:       theta %g; rms eps %g; mask id %d, eos id %d\n", cfg.RopeTheta, cfg.RMSNormEps,
		cfg.MaskTokenID, cfg.EOSTokenID)
	fmt.Fprintf(w, "parameters: %d (%s)\n", cfg.ParamCount(), count(cfg.ParamCount()))
	fmt.Fprintf(w, "shards:     %d files, %s\n", info.Shards, human(info.StoredBytes))
	var dts []string
	for dt, n := range info.DTypes {
		dts = append(dts, fmt.Sprintf("%s x%d", dt, n))
	}
	fmt.Fprintf(w, "dtypes:     %s\n", strings.Join(dts, ", "))
	if len(info.Extra) > 0 {
		fmt.Fprintf(w, "unused:     %d tensors not used by the forward (first: %s)\n", len(info.Extra), info.Extra[0])
	}
	T := cfg.MaxSequenceLength
	fmt.Fprintf(w, "memory:     weights %s as stored (bf16: %s); CPU activations for %d tokens: %s\n",
		human(info.WeightBytes), human(cfg.WeightBytes(dimoo.DTypeBF16)), T, human(cfg.ActivationBytes(T)))
	prec, err := dimoo.ParsePrecision(c.precision)
	if err != nil {
		return err
	}
	if lib, err := c.library(); err == nil {
		estimateLines(w, lib, cfg, info.DTypes, prec)
	}
	if *load {
		opts, err := c.loadOptions()
		if err != nil {
			return err
		}
		m, err := dimoo.LoadModel(ctx, *dir, opts)
		if err != nil {
			return err
		}
		defer m.Close()
		desc, _ := m.Runtime().Describe()
		fmt.Fprintf(w, "loaded:     %s on %s\n", human(m.WeightBytes()), desc)
	}
	return nil
}

// estimateLines prints the library's estimate of what the model and a
// text-to-image session (1024x1024 with CFG and ML-Cache: two sequences of
// 4228 tokens, K/V caches, kept image logits) take on each backend built in.
func estimateLines(w io.Writer, lib *dimoo.Library, cfg *dimoo.Config, dtypes map[string]int, prec dimoo.Precision) {
	dt, most := dimoo.DTypeF32, 0
	for name, n := range dtypes {
		for _, d := range []dimoo.DType{dimoo.DTypeF32, dimoo.DTypeF16, dimoo.DTypeBF16} {
			if d.String() == name && n > most {
				dt, most = d, n
			}
		}
	}
	T := min(4228, cfg.MaxSequenceLength)
	o := dimoo.SessionOptions{MaxTokens: T, Seqs: 2, KVCache: true, KeepCols: min(8192, cfg.EmbeddingRows())}
	for _, b := range []dimoo.Backend{dimoo.BackendCPU, dimoo.BackendCUDA} {
		if !lib.BackendBuilt(b) {
			continue
		}
		m, s, err := lib.Estimate(b, 0, cfg, dt, prec, &o)
		if err != nil {
			fmt.Fprintf(w, "            %s: no estimate: %v\n", b, err)
			continue
		}
		fmt.Fprintf(w, "            %s holds %s of weights (precision %s); a session of 2 x %d tokens (K/V caches, kept logits) %s\n",
			b, human(m), prec, T, human(s))
	}
}

func cmdLogits(ctx context.Context, args []string, w io.Writer) error {
	fs := flag.NewFlagSet("logits", flag.ContinueOnError)
	var c common
	c.register(fs)
	dir := fs.String("model", "", "checkpoint folder (default: $DIMOO_MODEL, else the shipped small model)")
	tokens := fs.String("tokens", "", "comma-separated token ids")
	positions := fs.String("positions", "", "comma-separated positions whose logits to write (default: all)")
	vrange := fs.String("vocab-range", "", "columns A:B of the output head (default: all)")
	out := fs.String("out", "", "output .npy file (float32, shape (positions, columns))")
	force := fs.Bool("force", false, "replace an existing --out file")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *tokens == "" || *out == "" {
		return fmt.Errorf("%w: --tokens and --out are required", errUsage)
	}
	if err := checkOutFile(*out, *force); err != nil {
		return err
	}
	var err error
	if *dir, err = defaultModelDir(*dir); err != nil {
		return err
	}
	toks, err := parseInts(*tokens, "--tokens")
	if err != nil {
		return err
	}
	var pos []int32
	if *positions != "" {
		if pos, err = parseInts(*positions, "--positions"); err != nil {
			return err
		}
	}
	vb, ve := 0, 0
	if *vrange != "" {
		a, b, ok := strings.Cut(*vrange, ":")
		va, e1 := strconv.Atoi(a)
		vz, e2 := strconv.Atoi(b)
		if !ok || e1 != nil || e2 != nil || va < 0 || vz <= va {
			return fmt.Errorf("%w: --vocab-range %q: want A:B with 0 <= A < B", errUsage, *vrange)
		}
		vb, ve = va, vz
	}
	opts, err := c.loadOptions()
	if err != nil {
		return err
	}
	m, err := dimoo.LoadModel(ctx, *dir, opts)
	if err != nil {
		return err
	}
	defer m.Close()
	l, err := m.Logits(ctx, toks, pos, vb, ve)
	if err != nil {
		return err
	}
	if err := writeOutput(*out, *force, func(w *bufio.Writer) error {
		return dimoo.WriteNpy(w, l.Data, []int{l.Rows, l.Cols})
	}); err != nil {
		return err
	}
	fmt.Fprintf(w, "wrote %s: float32 (%d, %d)\n", *out, l.Rows, l.Cols)
	return nil
}

func parseInts(s, flagName string) ([]int32, error) {
	parts := strings.Split(s, ",")
	out := make([]int32, 0, len(parts))
	for _, p := range parts {
		v, err := strconv.ParseInt(strings.TrimSpace(p), 10, 32)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %q is not an integer", errUsage, flagName, p)
		}
		out = append(out, int32(v))
	}
	return out, nil
}

func human(b int64) string {
	const unit = 1024
	if b < unit {
		return fmt.Sprintf("%d B", b)
	}
	div, exp := int64(unit), 0
	for n := b / unit; n >= unit; n /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(b)/float64(div), "KMGTPE"[exp])
}

// count prints a parameter count as 8.08 B, 2.13 M or 500 K.
func count(n int64) string {
	switch {
	case n >= 1e9:
		return fmt.Sprintf("%.2f B", float64(n)/1e9)
	case n >= 1e6:
		return fmt.Sprintf("%.2f M", float64(n)/1e6)
	}
	return fmt.Sprintf("%.1f K", float64(n)/1e3)
}
