package main

// Output files: where a task writes is settled before the model loads (a
// bad --output_dir costs nothing), names are readable and unique (kind,
// prompt, input image, seed; a numeric suffix when taken), and no existing
// file is replaced unless --force says so.

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"hash/fnv"
	"image"
	"image/png"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"unicode"

	"github.com/dimoo-dev/dimoo/dimoo"
)

// outputFlags choose where a command writes.
type outputFlags struct {
	output string
	force  bool
}

func (o *outputFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&o.output, "output", "", "output file (default: a new name in --output_dir)")
	fs.BoolVar(&o.force, "force", false, "replace existing output files")
}

// slug is a readable file-name part: lower-case letters and digits of any
// script, runs of anything else as one underscore, at most 60 characters.
// Text with no letter or digit gets a short hash, so different prompts
// still get different names.
func slug(s string) string {
	var sb strings.Builder
	n, gap := 0, false
	for _, r := range strings.ToLower(s) {
		if n >= 60 {
			break
		}
		if unicode.IsLetter(r) || unicode.IsDigit(r) {
			if gap && sb.Len() > 0 {
				sb.WriteByte('_')
				n++
			}
			sb.WriteRune(r)
			n++
			gap = false
		} else {
			gap = true
		}
	}
	if sb.Len() == 0 && s != "" {
		h := fnv.New32a()
		h.Write([]byte(s))
		return fmt.Sprintf("%08x", h.Sum32())
	}
	return sb.String()
}

// planOutputs picks the files a task will write: with --output the given
// file (and, for extras, its name with "_"+extra inserted before the
// extension); else names in outputDir made of the parts, with _2, _3, ...
// appended when any of them exists (unless --force). It checks that the
// folder exists or can be made and is writable, and that without --force
// no chosen file exists: all before the model is loaded.
func planOutputs(o outputFlags, outputDir string, parts []string, extras ...string) ([]string, error) {
	if o.output != "" {
		ext := filepath.Ext(o.output)
		stem := strings.TrimSuffix(o.output, ext)
		paths := []string{o.output}
		for _, x := range extras {
			paths = append(paths, stem+"_"+x+ext)
		}
		if err := checkDir(filepath.Dir(o.output)); err != nil {
			return nil, err
		}
		for _, p := range paths {
			if err := checkTarget(p, o.force); err != nil {
				return nil, err
			}
		}
		return paths, nil
	}
	if err := os.MkdirAll(outputDir, 0o755); err != nil {
		return nil, fmt.Errorf("%w: --output_dir: %v", errUsage, err)
	}
	if err := checkDir(outputDir); err != nil {
		return nil, err
	}
	var kept []string
	for _, p := range parts {
		if p != "" {
			kept = append(kept, p)
		}
	}
	base := strings.Join(kept, "_")
	for n := 1; ; n++ {
		name := base
		if n > 1 {
			name = fmt.Sprintf("%s_%d", base, n)
		}
		paths := []string{filepath.Join(outputDir, name+".png")}
		for _, x := range extras {
			paths = append(paths, filepath.Join(outputDir, name+"_"+x+".png"))
		}
		free := true
		for _, p := range paths {
			if err := checkTarget(p, o.force); err != nil {
				if !errors.Is(err, fs.ErrExist) {
					return nil, err
				}
				free = false
			}
		}
		if free {
			return paths, nil
		}
	}
}

// checkDir requires dir to be an existing folder this process can create
// files in.
func checkDir(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("%w: output folder: %v", errUsage, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%w: output folder %s is not a folder", errUsage, dir)
	}
	f, err := os.CreateTemp(dir, ".dimoo-write-check-*")
	if err != nil {
		return fmt.Errorf("%w: output folder %s is not writable: %v", errUsage, dir, err)
	}
	name := f.Name()
	f.Close()
	os.Remove(name)
	return nil
}

// errExists is an existing output file without --force; it wraps
// fs.ErrExist.
type errExists struct{ path string }

func (e *errExists) Error() string {
	return fmt.Sprintf("%s exists (pass --force to replace it, or choose another --output)", e.path)
}
func (e *errExists) Unwrap() []error { return []error{errUsage, fs.ErrExist} }

// checkTarget refuses a path that is a folder, or that exists when force
// is off.
func checkTarget(path string, force bool) error {
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("%w: output %v", errUsage, err)
	case fi.IsDir():
		return fmt.Errorf("%w: output %s is a folder", errUsage, path)
	case !force:
		return &errExists{path}
	}
	return nil
}

// writeOutput writes data through write to path: without force the file
// is created exclusively (one that appeared since planning is not
// replaced); with force through a temporary file renamed over it, so an
// interrupted write never leaves half a file in its place.
func writeOutput(path string, force bool, write func(w *bufio.Writer) error) error {
	var f *os.File
	var err error
	tmp := ""
	if force {
		f, err = os.CreateTemp(filepath.Dir(path), ".dimoo-out-*")
		if err == nil {
			tmp = f.Name()
		}
	} else {
		f, err = os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if errors.Is(err, fs.ErrExist) {
			return &errExists{path}
		}
	}
	if err != nil {
		return fmt.Errorf("dimoo: writing %s: %w", path, err)
	}
	w := bufio.NewWriter(f)
	err = write(w)
	if err == nil {
		err = w.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && tmp != "" {
		if err = os.Chmod(tmp, 0o644); err == nil {
			err = os.Rename(tmp, path)
		}
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("dimoo: writing %s: %w", path, err)
	}
	return nil
}

// savePNG writes img as a PNG under writeOutput's rules.
func savePNG(path string, img image.Image, force bool) error {
	return writeOutput(path, force, func(w *bufio.Writer) error { return png.Encode(w, img) })
}

// checkOutFile checks an explicit output file (--out) before any work: its
// folder writable, the file absent unless force.
func checkOutFile(path string, force bool) error {
	if err := checkDir(filepath.Dir(path)); err != nil {
		return err
	}
	return checkTarget(path, force)
}

// fileStem is a path's file name without its extension.
func fileStem(path string) string {
	b := filepath.Base(path)
	return strings.TrimSuffix(b, filepath.Ext(b))
}

// sideBySide puts the input, brought to the output's size (the bucket the
// model saw it at), next to the output: its size follows the output, not
// the input file.
func sideBySide(in, out image.Image) image.Image {
	b := out.Bounds()
	return dimoo.SideBySide(dimoo.CenterCropResize(in, b.Dx(), b.Dy()), out)
}

// greedyZero maps the CLI's temperature 0 ("greedy") to the API's spelling
// of argmax decoding (negative; the API reads 0 as the model's default).
func greedyZero(t float64) float64 {
	if t == 0 {
		return -1
	}
	return t
}
