package main

// The VQ-VAE commands:
//
//	dimoo vq-encode --vqvae DIR --image IN.png --out codes.txt [--resize WxH|auto]
//	dimoo vq-decode --vqvae DIR --codes codes.txt --out OUT.png
//
// A codes file holds one line per row of the code grid, the codes of the
// row separated by commas.

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/dimoo-dev/dimoo/dimoo"
)

// The largest image the VQ commands encode or decode (2048x2048): the
// VQ-VAE's activations take about 20 bytes per pixel and channel of its
// first block (5 GB for the shipped model's 4000x4000), so larger images
// are refused rather than left to exhaust memory.
const maxVQPixels = 1 << 22

// A codes file holds at most maxCodes codes (a 2048x2048 grid), written in
// at most maxCodesFile bytes (12 characters a code, with spaces).
const (
	maxCodes     = 1 << 22
	maxCodesFile = 12 * maxCodes
)

// The area `--resize auto` aims for, and the multiple its sides keep.
const (
	autoArea     = 512 * 512
	autoMultiple = 32
)

func cmdVQEncode(ctx context.Context, args []string, w io.Writer) error {
	fs := flag.NewFlagSet("vq-encode", flag.ContinueOnError)
	var c common
	c.register(fs)
	dir := fs.String("vqvae", "", "VQ-VAE folder (config.json, diffusion_pytorch_model.safetensors)")
	in := fs.String("image", "", "input PNG or JPEG")
	out := fs.String("out", "", "output codes file (one line per grid row, comma-separated)")
	resize := fs.String("resize", "", "centre-crop and resize to WxH first, or `auto`: the 512x512-area bucket "+
		"(sides multiples of 32) nearest the image's aspect ratio")
	force := fs.Bool("force", false, "replace an existing --out file")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *dir == "" || *in == "" || *out == "" {
		return fmt.Errorf("%w: --vqvae, --image and --out are required", errUsage)
	}
	if err := checkOutFile(*out, *force); err != nil {
		return err
	}
	var rw, rh int
	if *resize != "" && *resize != "auto" {
		var err error
		if rw, rh, err = parseSize(*resize); err != nil {
			return err
		}
	}
	img, err := dimoo.LoadImage(*in)
	if err != nil {
		return err
	}
	if *resize == "auto" {
		b := img.Bounds()
		rw, rh = dimoo.AspectBucket(b.Dx(), b.Dy(), autoArea, autoMultiple)
	}
	if rw > 0 {
		img = dimoo.CenterCropResize(img, rw, rh)
	}
	cfg, err := dimoo.LoadVQConfig(*dir)
	if err != nil {
		return err
	}
	b := img.Bounds()
	if b.Dx() > maxVQPixels/b.Dy() {
		return fmt.Errorf("%w: %s is %dx%d, more than the %d pixels vq-encode takes; pass --resize WxH or auto",
			dimoo.ErrInvalidArgument, *in, b.Dx(), b.Dy(), maxVQPixels)
	}
	if f := cfg.Factor(); b.Dx()%f != 0 || b.Dy()%f != 0 {
		sw, sh := dimoo.AspectBucket(b.Dx(), b.Dy(), b.Dx()*b.Dy(), f)
		return fmt.Errorf("%w: %s is %dx%d, not a multiple of the VQ-VAE's factor %d; pass --resize %dx%d (or auto)",
			dimoo.ErrInvalidArgument, *in, b.Dx(), b.Dy(), f, sw, sh)
	}
	opts, err := c.loadOptions()
	if err != nil {
		return err
	}
	m, err := dimoo.LoadVQModel(ctx, *dir, opts)
	if err != nil {
		return err
	}
	defer m.Close()
	codes, h, gw, err := m.Encode(ctx, img)
	if err != nil {
		return err
	}
	if err := writeCodes(*out, codes, h, gw, *force); err != nil {
		return err
	}
	fmt.Fprintf(w, "wrote %s: %dx%d codes (image %dx%d)\n", *out, gw, h, b.Dx(), b.Dy())
	return nil
}

func cmdVQDecode(ctx context.Context, args []string, w io.Writer) error {
	fs := flag.NewFlagSet("vq-decode", flag.ContinueOnError)
	var c common
	c.register(fs)
	dir := fs.String("vqvae", "", "VQ-VAE folder (config.json, diffusion_pytorch_model.safetensors)")
	in := fs.String("codes", "", "codes file (one line per grid row, comma-separated)")
	out := fs.String("out", "", "output PNG")
	force := fs.Bool("force", false, "replace an existing --out file")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *dir == "" || *in == "" || *out == "" {
		return fmt.Errorf("%w: --vqvae, --codes and --out are required", errUsage)
	}
	if err := checkOutFile(*out, *force); err != nil {
		return err
	}
	codes, h, gw, err := readCodes(*in)
	if err != nil {
		return err
	}
	// The image's size, from the config alone, before the weights load.
	if cfg, err := dimoo.LoadVQConfig(*dir); err == nil {
		f := cfg.Factor()
		if gw > maxVQPixels/f/f/h {
			return fmt.Errorf("%w: %s is a %dx%d code grid: a %dx%d image, more than the %d pixels vq-decode makes",
				dimoo.ErrInvalidArgument, *in, gw, h, gw*f, h*f, maxVQPixels)
		}
		if gw*h*f*f >= 1<<20 {
			fmt.Fprintf(os.Stderr, "dimoo: decoding %dx%d codes to a %dx%d image\n", gw, h, gw*f, h*f)
		}
	}
	opts, err := c.loadOptions()
	if err != nil {
		return err
	}
	m, err := dimoo.LoadVQModel(ctx, *dir, opts)
	if err != nil {
		return err
	}
	defer m.Close()
	img, err := m.Decode(ctx, codes, h, gw)
	if err != nil {
		return err
	}
	if err := savePNG(*out, img, *force); err != nil {
		return err
	}
	fmt.Fprintf(w, "wrote %s: %dx%d pixels from %dx%d codes\n", *out, img.Bounds().Dx(), img.Bounds().Dy(), gw, h)
	return nil
}

// parseSize reads "WxH" with positive sides.
func parseSize(s string) (w, h int, err error) {
	a, b, ok := strings.Cut(strings.ToLower(s), "x")
	w, e1 := strconv.Atoi(a)
	h, e2 := strconv.Atoi(b)
	if !ok || e1 != nil || e2 != nil || w <= 0 || h <= 0 {
		return 0, 0, fmt.Errorf("%w: --resize %q: want WxH with positive sides, or auto", errUsage, s)
	}
	if w > maxVQPixels/h {
		return 0, 0, fmt.Errorf("%w: --resize %s is more than the %d pixels vq-encode takes", errUsage, s,
			maxVQPixels)
	}
	return w, h, nil
}

// writeCodes writes an h x w grid, one comma-separated line per row
// (replacing an existing file only with force).
func writeCodes(path string, codes []int32, h, w int, force bool) error {
	var sb strings.Builder
	for r := 0; r < h; r++ {
		for c := 0; c < w; c++ {
			if c > 0 {
				sb.WriteByte(',')
			}
			sb.WriteString(strconv.Itoa(int(codes[r*w+c])))
		}
		sb.WriteByte('\n')
	}
	return writeOutput(path, force, func(w *bufio.Writer) error {
		_, err := w.WriteString(sb.String())
		return err
	})
}

// readCodes reads a codes file: blank lines are skipped, every other line is
// a grid row of comma-separated integers, all rows as long as the first.
func readCodes(path string) (codes []int32, h, w int, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, 0, fmt.Errorf("%w: codes %v", dimoo.ErrInvalidArgument, err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > maxCodesFile {
		return nil, 0, 0, fmt.Errorf("%w: %s is %d bytes, more than a codes file of at most %d codes can be",
			dimoo.ErrInvalidArgument, path, fi.Size(), maxCodes)
	}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<16), 1<<26)
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" {
			continue
		}
		parts := strings.Split(text, ",")
		if h > 0 && len(parts) != w {
			return nil, 0, 0, fmt.Errorf("%w: %s line %d: %d codes, the first row has %d", dimoo.ErrInvalidArgument,
				path, line, len(parts), w)
		}
		for _, p := range parts {
			v, err := strconv.ParseInt(strings.TrimSpace(p), 10, 32)
			if err != nil {
				return nil, 0, 0, fmt.Errorf("%w: %s line %d: %q is not an integer", dimoo.ErrInvalidArgument,
					path, line, strings.TrimSpace(p))
			}
			codes = append(codes, int32(v))
		}
		if len(codes) > maxCodes {
			return nil, 0, 0, fmt.Errorf("%w: %s holds more than %d codes", dimoo.ErrInvalidArgument, path, maxCodes)
		}
		w = len(parts)
		h++
	}
	if err := sc.Err(); err != nil {
		return nil, 0, 0, fmt.Errorf("%w: %s: %v", dimoo.ErrInvalidArgument, path, err)
	}
	if h == 0 {
		return nil, 0, 0, fmt.Errorf("%w: %s holds no codes", dimoo.ErrInvalidArgument, path)
	}
	return codes, h, w, nil
}
