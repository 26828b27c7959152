package main

import (
	"bytes"
	"context"
	"image"
	"image/color"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimoo-dev/dimoo/dimoo"
)

var tinyVQ = filepath.Join("..", "..", "testdata", "vq", "tiny-f32")

// testPicture is a smooth w x h picture.
func testPicture(w, h int) *image.NRGBA {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			img.SetNRGBA(x, y, color.NRGBA{uint8(40 + 5*x), uint8(200 - 7*y), uint8((x * y) % 256), 255})
		}
	}
	return img
}

// vq-encode then vq-decode write exactly what the Go API computes.
func TestVQCommandsRoundTrip(t *testing.T) {
	needLibrary(t)
	ctx := context.Background()
	dir := t.TempDir()
	in, codesPath, outPNG := filepath.Join(dir, "in.png"), filepath.Join(dir, "codes.txt"), filepath.Join(dir, "out.png")
	pic := testPicture(20, 14)
	require.NoError(t, dimoo.SavePNG(in, pic))

	var stdout bytes.Buffer
	require.NoError(t, cmdVQEncode(ctx, []string{"--vqvae", tinyVQ, "--image", in, "--out", codesPath}, &stdout))
	assert.Contains(t, stdout.String(), "10x7 codes (image 20x14)")
	codes, h, w, err := readCodes(codesPath)
	require.NoError(t, err)
	assert.Equal(t, 7, h)
	assert.Equal(t, 10, w)

	m, err := dimoo.LoadVQModel(ctx, tinyVQ, dimoo.LoadOptions{})
	require.NoError(t, err)
	defer m.Close()
	want, wh, ww, err := m.Encode(ctx, pic)
	require.NoError(t, err)
	assert.Equal(t, want, codes)
	assert.Equal(t, [2]int{7, 10}, [2]int{wh, ww})

	stdout.Reset()
	require.NoError(t, cmdVQDecode(ctx, []string{"--vqvae", tinyVQ, "--codes", codesPath, "--out", outPNG}, &stdout))
	assert.Contains(t, stdout.String(), "20x14 pixels from 10x7 codes")
	got, err := dimoo.LoadImage(outPNG)
	require.NoError(t, err)
	wantImg, err := m.Decode(ctx, codes, h, w)
	require.NoError(t, err)
	assert.Equal(t, wantImg.Bounds(), got.Bounds())
	assert.Equal(t, wantImg.Pix, dimoo.PixelsToImage(dimoo.ImageToPixels(got), 20, 14).Pix)
}

func TestVQEncodeResize(t *testing.T) {
	needLibrary(t)
	ctx := context.Background()
	dir := t.TempDir()
	in, codesPath := filepath.Join(dir, "in.png"), filepath.Join(dir, "codes.txt")
	require.NoError(t, dimoo.SavePNG(in, testPicture(37, 23)))
	var stdout bytes.Buffer

	// Not a multiple of the factor: an error that suggests a size.
	err := cmdVQEncode(ctx, []string{"--vqvae", tinyVQ, "--image", in, "--out", codesPath}, &stdout)
	require.Error(t, err)
	assert.ErrorIs(t, err, dimoo.ErrInvalidArgument)
	assert.Contains(t, err.Error(), "37x23, not a multiple of the VQ-VAE's factor 2; pass --resize")

	require.NoError(t, cmdVQEncode(ctx, []string{"--vqvae", tinyVQ, "--image", in, "--out", codesPath,
		"--resize", "16x12", "--force"}, &stdout))
	assert.Contains(t, stdout.String(), "8x6 codes (image 16x12)")

	stdout.Reset()
	require.NoError(t, cmdVQEncode(ctx, []string{"--vqvae", tinyVQ, "--image", in, "--out", codesPath,
		"--resize", "auto", "--force"}, &stdout))
	bw, bh := dimoo.AspectBucket(37, 23, 512*512, 32)
	_, h, w, err := readCodes(codesPath)
	require.NoError(t, err)
	assert.Equal(t, [2]int{bh / 2, bw / 2}, [2]int{h, w})
}

func TestVQCommandErrors(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	var stdout bytes.Buffer
	for _, tc := range []struct {
		cmd  func(context.Context, []string, io.Writer) error
		args []string
		msg  string
	}{
		{cmdVQEncode, []string{"--vqvae", tinyVQ}, "--vqvae, --image and --out are required"},
		{cmdVQDecode, []string{"--codes", "c.txt", "--out", "o.png"}, "--vqvae, --codes and --out are required"},
		{cmdVQEncode, []string{"--vqvae", tinyVQ, "--image", "i.png", "--out", "c.txt", "--resize", "12by8"}, "--resize"},
		{cmdVQEncode, []string{"--bogus"}, "bogus"},
	} {
		err := tc.cmd(ctx, tc.args, &stdout)
		require.Error(t, err, "%v", tc.args)
		assert.ErrorIs(t, err, errUsage)
		assert.Contains(t, err.Error(), tc.msg)
	}

	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, []byte(text), 0o644))
		return p
	}
	for _, tc := range []struct {
		text, msg string
	}{
		{"1,2,3\n4,5\n", "line 2: 2 codes, the first row has 3"},
		{"1,2\n3,x\n", `line 2: "x" is not an integer`},
		{"\n\n", "holds no codes"},
	} {
		_, _, _, err := readCodes(write("bad.txt", tc.text))
		require.Error(t, err)
		assert.ErrorIs(t, err, dimoo.ErrInvalidArgument)
		assert.Contains(t, err.Error(), tc.msg)
	}
	codes, h, w, err := readCodes(write("ok.txt", "1, 2,3\n\n4,5,6 \n"))
	require.NoError(t, err)
	assert.Equal(t, []int32{1, 2, 3, 4, 5, 6}, codes)
	assert.Equal(t, [2]int{2, 3}, [2]int{h, w})

	err = cmdVQEncode(ctx, []string{"--vqvae", tinyVQ, "--image", filepath.Join(dir, "missing.png"), "--out", "c.txt"}, &stdout)
	assert.ErrorIs(t, err, dimoo.ErrInvalidArgument)
	assert.Contains(t, err.Error(), "missing.png")

	needLibrary(t)
	// A code outside the codebook (64 codes).
	err = cmdVQDecode(ctx, []string{"--vqvae", tinyVQ, "--codes", write("big.txt", "1,64\n"), "--out",
		filepath.Join(dir, "o.png")}, &stdout)
	assert.ErrorIs(t, err, dimoo.ErrInvalidArgument)
	assert.Contains(t, err.Error(), "code 64 at row 0, column 1 is outside the codebook")
	err = cmdVQDecode(ctx, []string{"--vqvae", dir, "--codes", write("ok2.txt", "1\n"), "--out",
		filepath.Join(dir, "o.png")}, &stdout)
	assert.ErrorIs(t, err, dimoo.ErrBadCheckpoint)
}
