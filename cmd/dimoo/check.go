package main

// Flag checks that run right after parsing, before any file is read or any
// model loaded: every number finite and in range, and no flag that would
// be silently ignored. They go by flag name, so every command that takes a
// flag gets its check.

import (
	"flag"
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/dimoo-dev/dimoo/dimoo"
)

// floatRange is the accepted range of a float flag.
type floatRange struct {
	lo, hi float64
	hiOpen bool // hi itself excluded
}

var floatFlags = map[string]floatRange{
	"temperature":  {0, dimoo.MaxTemperature, false},
	"cfg_scale":    {0, dimoo.MaxGuidance, false},
	"cfg_img":      {0, dimoo.MaxGuidance, false},
	"cache_ratio":  {0, 1, true},
	"warmup_ratio": {0, 1, false},
	"mask_h_ratio": {0, 1, false},
	"mask_w_ratio": {0, 1, false},
}

// intFlags are the integer flags and their smallest accepted value.
var intFlags = map[string]int64{
	"timesteps":        1,
	"refresh_interval": 1,
	"steps":            1,
	"gen_length":       1,
	"block_length":     1,
	"threads":          0,
	"width":            0,
	"height":           0,
	"runs":             1,
	"warmup":           0,
}

// cacheFlags only mean something with --use-cache.
var cacheFlags = []string{"cache_ratio", "warmup_ratio", "refresh_interval"}

// checkFlags validates the parsed flags of fs.
func checkFlags(fs *flag.FlagSet) error {
	set := setFlags(fs)
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if err != nil {
			return
		}
		if r, ok := floatFlags[f.Name]; ok {
			v, perr := strconv.ParseFloat(f.Value.String(), 64)
			if perr != nil || math.IsNaN(v) || math.IsInf(v, 0) || v < r.lo || v > r.hi || r.hiOpen && v == r.hi {
				bracket := "]"
				if r.hiOpen {
					bracket = ")"
				}
				err = fmt.Errorf("%w: --%s %s: want a finite number in [%g, %g%s", errUsage, f.Name, f.Value,
					r.lo, r.hi, bracket)
			}
		}
		if lo, ok := intFlags[f.Name]; ok {
			v, perr := strconv.ParseInt(f.Value.String(), 10, 64)
			if perr != nil || v < lo {
				err = fmt.Errorf("%w: --%s %s: must be >= %d", errUsage, f.Name, f.Value, lo)
			}
		}
	})
	if err != nil {
		return err
	}
	if uc := fs.Lookup("use-cache"); uc != nil && uc.Value.String() != "true" {
		for _, name := range cacheFlags {
			if set[name] {
				return fmt.Errorf("%w: --%s only applies with --use-cache", errUsage, name)
			}
		}
	}
	// bench's --steps are image steps unless --task understand.
	t := fs.Lookup("task")
	imageSteps := t != nil && t.Value.String() != "understand"
	if s, g := fs.Lookup("steps"), fs.Lookup("gen_length"); s != nil && g != nil && !imageSteps {
		sv, _ := strconv.Atoi(s.Value.String())
		gv, _ := strconv.Atoi(g.Value.String())
		if sv > gv {
			return fmt.Errorf("%w: --steps %d is more than --gen_length %d (at most one token per step)", errUsage,
				sv, gv)
		}
	}
	if fs.Name() == "edit" {
		if p := fs.Lookup("prompt"); p != nil && strings.TrimSpace(p.Value.String()) == "" {
			return fmt.Errorf("%w: --prompt is required: an edit needs an instruction", errUsage)
		}
	}
	return nil
}

// checkImageSize checks text-to-image's output size and step count against
// the model folder's config.json and vqvae/config.json (small files read
// without loading anything), so an impossible size is refused at once
// rather than after loading an 8B model. Folders whose configs cannot be
// read are left for the load to report.
func checkImageSize(fs *flag.FlagSet) error {
	wf, hf, mf := fs.Lookup("width"), fs.Lookup("height"), fs.Lookup("model")
	if wf == nil || hf == nil || mf == nil {
		return nil
	}
	if fs.Lookup("edit_type") != nil {
		return nil // edit takes --width/--height and ignores them, as the official script does
	}
	if pm := fs.Lookup("painting_mode"); pm != nil && pm.Value.String() != "" {
		return nil // the size comes from the painted image
	}
	w, _ := strconv.Atoi(wf.Value.String())
	h, _ := strconv.Atoi(hf.Value.String())
	if (w == 0) != (h == 0) {
		return fmt.Errorf("%w: give both --width and --height, or neither (the model's native size)", errUsage)
	}
	dir, err := defaultModelDir(mf.Value.String())
	if err != nil {
		return nil
	}
	what := "image size"
	if w == 0 {
		d, err := dimoo.LoadDefaults(dir)
		if err != nil || d.Width <= 0 || d.Height <= 0 {
			return nil
		}
		w, h = d.Width, d.Height
		what = "the native size in " + dir + "/dimoo.json,"
	}
	cfg, err := dimoo.LoadConfig(dir)
	if err != nil {
		return nil
	}
	vq, err := dimoo.LoadVQConfig(dir + "/vqvae")
	if err != nil {
		return nil
	}
	f, maxT := vq.Factor(), cfg.MaxSequenceLength
	if w%f != 0 || h%f != 0 {
		return fmt.Errorf("%w: %s %dx%d: both sides must be multiples of the VQ-VAE's factor %d",
			dimoo.ErrInvalidArgument, what, w, h, f)
	}
	gw, gh := w/f, h/f
	// Divided rather than multiplied: no product can overflow.
	if maxT < 5 || gw > maxT || gh > (maxT-4)/(gw+1) {
		return fmt.Errorf("%w: %s %dx%d is a %dx%d code grid, more than the model's max_sequence_length "+
			"of %d tokens", dimoo.ErrInvalidArgument, what, w, h, gw, gh, maxT)
	}
	// An explicit step count beyond the codes is a mistake worth naming (the
	// API would cap it); a default one is capped quietly.
	if ts := fs.Lookup("timesteps"); ts != nil && setFlags(fs)["timesteps"] {
		if n, _ := strconv.Atoi(ts.Value.String()); n > gw*gh {
			return fmt.Errorf("%w: --timesteps %d is more than the %d codes of a %dx%d image (at least one code "+
				"per step)", errUsage, n, gw*gh, w, h)
		}
	}
	return nil
}
