package main

// Per-command help and the model's defaults: the task commands' sampler
// flags start from the model folder's dimoo.json values (before parsing, so
// `CMD --help` shows the defaults that will really apply), and `CMD --help`
// lists the command's own flags on stdout with exit status 0.

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/dimoo-dev/dimoo/dimoo"
)

// helpShown is returned by parseFlags for -h/--help: run prints its text
// to stdout and succeeds.
type helpShown struct{ text string }

func (h *helpShown) Error() string { return "help requested" }

// commandSynopsis is the first line of each command's help.
var commandSynopsis = map[string]string{
	"generate":   "dimoo generate --prompt TEXT [flags]: text-to-image, or in/outpainting with --painting_mode",
	"edit":       "dimoo edit --prompt TEXT --image_path IMG [flags]: image editing; writes the result and a side-by-side",
	"understand": "dimoo understand --prompt QUESTION --image_path IMG [flags]: answers a question about an image",
	"bench":      "dimoo bench [--json] [--profile DIR] [flags]: times text-to-image decodes (JSON report, pprof + trace, GPU telemetry)",
	"info":       "dimoo info [--model DIR] [--load]: config, parameter count, dtypes, memory estimate",
	"logits":     "dimoo logits --tokens IDS --out FILE.npy [flags]: logits of chosen positions and columns",
	"version":    "dimoo version: which libdimoo was loaded, which backends it has",
	"vq-encode":  "dimoo vq-encode --vqvae DIR --image IN.png --out codes.txt [--resize WxH|auto]",
	"vq-decode":  "dimoo vq-decode --vqvae DIR --codes codes.txt --out OUT.png",
	"tokenize":   "dimoo tokenize --tokenizer FILE TEXT: text to token ids",
	"detokenize": "dimoo detokenize --tokenizer FILE 5,17,3: token ids to text",
}

// helpText lists a flag set's flags with their defaults.
func helpText(fs *flag.FlagSet) string {
	var sb strings.Builder
	if s, ok := commandSynopsis[fs.Name()]; ok {
		fmt.Fprintf(&sb, "Usage: %s\n\nFlags:\n", s)
	} else {
		fmt.Fprintf(&sb, "Usage: dimoo %s [flags]\n\nFlags:\n", fs.Name())
	}
	fs.SetOutput(&sb)
	fs.PrintDefaults()
	return sb.String()
}

// defaultModelDir resolves a --model value: itself, else $DIMOO_MODEL, else
// the shipped small model.
func defaultModelDir(flagValue string) (string, error) {
	if flagValue != "" {
		return flagValue, nil
	}
	if d := os.Getenv("DIMOO_MODEL"); d != "" {
		return d, nil
	}
	if d := dimoo.ShippedModelDir(); d != "" {
		return d, nil
	}
	return "", fmt.Errorf("%w: no --model given, $DIMOO_MODEL unset, and no shipped model found", errUsage)
}

// modelArg finds the --model value among unparsed arguments ("" if none).
func modelArg(args []string) string {
	for i, a := range args {
		if a == "--" {
			break
		}
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != "model" {
			continue
		}
		if hasVal {
			return val
		}
		if i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

// presetModelDefaults sets the task flags that the model's dimoo.json
// covers to its values, as defaults (before parsing): what the command
// will use unless a flag says otherwise. A folder whose dimoo.json cannot
// be read is left for the load to report.
func presetModelDefaults(fs *flag.FlagSet, args []string) {
	if fs.Lookup("model") == nil || fs.Lookup("timesteps") == nil && fs.Lookup("gen_length") == nil {
		return
	}
	dir, err := defaultModelDir(modelArg(args))
	if err != nil {
		return
	}
	d, err := dimoo.LoadDefaults(dir)
	if err != nil {
		return
	}
	ds := d.Sampling
	setDefault := func(name, value string) {
		if f := fs.Lookup(name); f != nil && f.Value.Set(value) == nil {
			f.DefValue = value
		}
	}
	float := func(v *float64) string { return strconv.FormatFloat(*v, 'g', -1, 64) }
	if fs.Name() == "understand" {
		if ds.GenLength > 0 {
			setDefault("steps", strconv.Itoa(ds.TextSteps))
			setDefault("gen_length", strconv.Itoa(ds.GenLength))
			setDefault("block_length", strconv.Itoa(ds.BlockLength))
		}
		return
	}
	if ds.Timesteps > 0 {
		setDefault("timesteps", strconv.Itoa(ds.Timesteps))
	}
	if ds.Temperature != nil {
		setDefault("temperature", float(ds.Temperature))
	}
	cfg := ds.CFGScale
	if fs.Name() == "edit" {
		cfg = ds.CFGText
		if ds.CFGImage != nil {
			setDefault("cfg_img", float(ds.CFGImage))
		}
	}
	if cfg != nil {
		setDefault("cfg_scale", float(cfg))
	}
	if f := fs.Lookup("width"); f != nil && d.Width > 0 && d.Height > 0 {
		f.Usage = fmt.Sprintf("image width in pixels (default: the model's native size, %dx%d)", d.Width, d.Height)
	}
}

// isHelp reports whether err is flag's help request.
func isHelp(err error) bool { return errors.Is(err, flag.ErrHelp) }
