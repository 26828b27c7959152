package dimoo

// Fuzz targets for every file a checkpoint folder or a user hands dimoo:
// config.json, tokenizer.json, the VQ-VAE's config, special_tokens.json,
// dimoo.json and images (.npy files: FuzzParseNpy in npy_test.go). Each must turn any bytes into a value
// or an error, never a panic, and an accepted value must be usable. The
// seed corpora (the shipped model's and testdata's files, and broken
// variants) run in `make test`; `make fuzz` explores.

import (
	"bytes"
	"errors"
	"image"
	"image/color"
	"image/jpeg"
	"image/png"
	"os"
	"path/filepath"
	"testing"
)

// seedFiles adds the files that exist (skipping the others) to a corpus.
func seedFiles(f *testing.F, paths ...string) {
	f.Helper()
	for _, p := range paths {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
}

func shippedFile(parts ...string) string {
	return filepath.Join(append([]string{"..", "models", "dimoo-small"}, parts...)...)
}

// Broken variants every JSON corpus gets.
var jsonSeeds = []string{"", "garbage", "{", "[]", "null", `{"a":`, "{}", `{"d_model": -1}`,
	`{"d_model": 1099511627776}`, `{"n_layers": 1e400}`, "\xff\xfe{}"}

func FuzzParseConfig(f *testing.F) {
	seedFiles(f, shippedFile("config.json"), testdataDir("small-f32", "config.json"),
		testdataDir("small-gqa-f16", "config.json"), testdataDir("small-bf16", "config.json"))
	for _, s := range jsonSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig(data)
		if err != nil {
			if !errors.Is(err, ErrBadCheckpoint) && !errors.Is(err, ErrUnsupported) {
				t.Fatalf("error wraps neither ErrBadCheckpoint nor ErrUnsupported: %v", err)
			}
			return
		}
		if c.DModel < 1 || c.NHeads < 1 || c.NLayers < 1 || c.VocabSize < 1 || c.MaxSequenceLength < 1 ||
			c.DModel%c.NHeads != 0 {
			t.Fatalf("accepted an unusable config: %+v", c)
		}
		_ = c.ParamCount()
		_ = c.ActivationBytes(c.MaxSequenceLength)
		_ = c.ExpectedTensors()
	})
}

func FuzzParseTokenizer(f *testing.F) {
	seedFiles(f, shippedFile("tokenizer.json"))
	for _, s := range jsonSeeds {
		f.Add([]byte(s))
	}
	f.Add([]byte(`{"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]}}`))
	f.Add([]byte(`{"model":{"type":"BPE","vocab":{"a":0},"merges":["a b"]},"added_tokens":[{"id":-5,"content":"x"}]}`))
	f.Add([]byte(`{"model":{"type":"BPE","vocab":{"a":2147483647}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		tok, err := ParseTokenizer(data)
		if err != nil {
			return
		}
		ids := tok.Encode("a red circle at the top left, 红色 🙂")
		for _, id := range ids {
			if id < 0 || int(id) >= tok.VocabSize() {
				t.Fatalf("id %d outside the vocabulary of %d", id, tok.VocabSize())
			}
		}
		if _, err := tok.Decode(ids, false); err != nil {
			t.Fatalf("its own ids do not decode: %v", err)
		}
	})
}

func FuzzParseVQConfig(f *testing.F) {
	seedFiles(f, shippedFile("vqvae", "config.json"), testdataDir("vq", "tiny-f32", "config.json"),
		testdataDir("vq", "attn2-bf16", "config.json"), testdataDir("vq", "attn3-f32", "config.json"))
	for _, s := range jsonSeeds {
		f.Add([]byte(s))
	}
	f.Add([]byte(`{"block_out_channels":[]}`))
	f.Add([]byte(`{"block_out_channels":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseVQConfig(data)
		if err != nil {
			if !errors.Is(err, ErrBadCheckpoint) && !errors.Is(err, ErrUnsupported) {
				t.Fatalf("error wraps neither ErrBadCheckpoint nor ErrUnsupported: %v", err)
			}
			return
		}
		if f := c.Factor(); f < 1 {
			t.Fatalf("accepted a config with factor %d", f)
		}
		if c.NumVQEmbeddings < 1 {
			t.Fatalf("accepted %d codebook entries", c.NumVQEmbeddings)
		}
	})
}

// writeTemp writes data as dir/name in a fresh folder.
func writeTemp(t *testing.T, name string, data []byte) string {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func FuzzSpecialTokens(f *testing.F) {
	seedFiles(f, shippedFile("special_tokens.json"), testdataDir("official-small", "special_tokens.json"))
	for _, s := range jsonSeeds {
		f.Add([]byte(s))
	}
	f.Add([]byte(`{"mask":1,"newline":2,"boa":3,"eoa":4,"boi":5,"eoi":6,"uncondition":7,"eos":0,"image_offset":8,"codebook_size":2147483647}`))
	f.Add([]byte(`{"mask":-1}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := LoadSpecialTokens(writeTemp(t, "special_tokens.json", data))
		if err != nil {
			if !errors.Is(err, ErrBadCheckpoint) {
				t.Fatalf("error does not wrap ErrBadCheckpoint: %v", err)
			}
			return
		}
		if err := st.validate(); err != nil {
			t.Fatalf("accepted invalid ids: %v", err)
		}
		_ = st.checkVocab(1000) // must not overflow or panic
	})
}

func FuzzDefaults(f *testing.F) {
	seedFiles(f, shippedFile("dimoo.json"))
	for _, s := range jsonSeeds {
		f.Add([]byte(s))
	}
	f.Add([]byte(`{"width":1000000,"height":32}`))
	f.Add([]byte(`{"sampling":{"temperature":-1}}`))
	f.Add([]byte(`{"sampling":{"steps":4,"gen_length":0,"block_length":4}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := loadDefaults(writeTemp(t, "dimoo.json", data))
		if err != nil {
			if !errors.Is(err, ErrBadCheckpoint) {
				t.Fatalf("error does not wrap ErrBadCheckpoint: %v", err)
			}
			return
		}
		if d.Width < 0 || d.Height < 0 || d.InputArea < 0 || d.Sampling.Timesteps < 0 || d.Sampling.GenLength < 0 {
			t.Fatalf("accepted negative sizes: %+v", d)
		}
	})
}

func FuzzLoadImage(f *testing.F) {
	img := image.NewNRGBA(image.Rect(0, 0, 6, 4))
	for i := range img.Pix {
		img.Pix[i] = byte(i * 7)
	}
	var p, j bytes.Buffer
	if err := png.Encode(&p, img); err != nil {
		f.Fatal(err)
	}
	if err := jpeg.Encode(&j, img, nil); err != nil {
		f.Fatal(err)
	}
	f.Add(p.Bytes())
	f.Add(j.Bytes())
	f.Add(p.Bytes()[:p.Len()/2])
	f.Add(j.Bytes()[:j.Len()/2])
	f.Add(pngHeader(20000, 20000))
	f.Add(pngHeader(0, 5))
	f.Add(pngHeader(1<<31-1, 1<<31-1))
	var g bytes.Buffer
	if err := png.Encode(&g, image.NewGray16(image.Rect(0, 0, 3, 3))); err != nil {
		f.Fatal(err)
	}
	f.Add(g.Bytes())
	f.Add([]byte("GIF89a"))
	f.Add([]byte{})
	// Fuzzing keeps decodes small; the cap's logic is the same.
	saved := MaxImagePixels
	MaxImagePixels = 1 << 16
	f.Cleanup(func() { MaxImagePixels = saved })
	f.Fuzz(func(t *testing.T, data []byte) {
		img, err := LoadImage(filepath.Join(writeTemp(t, "in.img", data), "in.img"))
		if err != nil {
			if !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("error does not wrap ErrInvalidArgument: %v", err)
			}
			return
		}
		b := img.Bounds()
		if b.Dx() < 1 || b.Dy() < 1 || b.Dx()*b.Dy() > MaxImagePixels {
			t.Fatalf("accepted a %v image (cap %d pixels)", b, MaxImagePixels)
		}
		_ = color.NRGBAModel.Convert(img.At(b.Min.X, b.Min.Y))
	})
}
