package dimoo

import (
	"bytes"
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNpyRoundTrip(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		shape    []int
		data     []float32
		dictText string
	}{
		{[]int{2, 3}, []float32{1, -2, 3.5, 0, float32(math.Inf(-1)), 1e-40}, "'shape': (2, 3), }"},
		{[]int{5}, []float32{0.1, 0.2, 0.3, 0.4, 0.5}, "'shape': (5,), }"},
		{[]int{}, []float32{42}, "'shape': (), }"},
		{[]int{0, 4}, []float32{}, "'shape': (0, 4), }"},
		{[]int{1, 1, 2}, []float32{float32(math.NaN()), -0}, "'shape': (1, 1, 2), }"},
	}
	for i, c := range cases {
		path := filepath.Join(dir, "a"+string(rune('0'+i))+".npy")
		require.NoError(t, WriteNpyFile(path, c.data, c.shape))

		raw, err := os.ReadFile(path)
		require.NoError(t, err)
		require.Equal(t, "\x93NUMPY\x01\x00", string(raw[:8]))
		hlen := int(binary.LittleEndian.Uint16(raw[8:10]))
		assert.Equal(t, 0, (10+hlen)%64, "data starts at a multiple of 64")
		assert.Equal(t, len(raw), 10+hlen+4*len(c.data))
		header := string(raw[10 : 10+hlen])
		assert.True(t, strings.HasPrefix(header, "{'descr': '<f4', 'fortran_order': False, "+c.dictText), header)
		assert.True(t, strings.HasSuffix(header, "\n"))

		data, shape, err := ReadNpyFile(path)
		require.NoError(t, err)
		assert.Equal(t, c.shape, shape)
		require.Len(t, data, len(c.data))
		for j := range data {
			if math.IsNaN(float64(c.data[j])) {
				assert.True(t, math.IsNaN(data[j]))
			} else {
				assert.Equal(t, float64(c.data[j]), data[j])
			}
		}
	}
}

func TestNpyWriteErrors(t *testing.T) {
	var b bytes.Buffer
	assert.ErrorIs(t, WriteNpy(&b, []float32{1, 2, 3}, []int{2, 2}), ErrInvalidArgument)
	assert.ErrorIs(t, WriteNpy(&b, []float32{}, []int{-1, 0}), ErrInvalidArgument)
	assert.ErrorIs(t, WriteNpy(&b, nil, []int{1 << 40, 1 << 40}), ErrInvalidArgument)
	assert.Error(t, WriteNpyFile(filepath.Join(t.TempDir(), "no", "such", "dir.npy"), []float32{1}, []int{1}))
}

// testNpyBytes builds a .npy file the way NumPy lays it out, for any version,
// dict and payload.
func testNpyBytes(major byte, dict string, payload []byte) []byte {
	prefix := 10
	if major >= 2 {
		prefix = 12
	}
	header := dict
	for (prefix+len(header)+1)%64 != 0 {
		header += " "
	}
	header += "\n"
	out := []byte("\x93NUMPY")
	out = append(out, major, 0)
	if major >= 2 {
		out = binary.LittleEndian.AppendUint32(out, uint32(len(header)))
	} else {
		out = binary.LittleEndian.AppendUint16(out, uint16(len(header)))
	}
	out = append(out, header...)
	return append(out, payload...)
}

func testF64Bytes(v ...float64) []byte {
	var b []byte
	for _, x := range v {
		b = binary.LittleEndian.AppendUint64(b, math.Float64bits(x))
	}
	return b
}

func TestNpyReadFloat64(t *testing.T) {
	dir := t.TempDir()
	vals := []float64{1, -2.5, math.Pi, 1e-300, math.MaxFloat64, 0}
	for _, c := range []struct {
		name  string
		major byte
		dict  string
	}{
		{"v1", 1, "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }"},
		{"v2", 2, "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }"},
		{"reordered keys, double quotes", 1, `{"shape": (2,3), "fortran_order": False, "descr": "<f8"}`},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(dir, c.name+".npy")
			require.NoError(t, os.WriteFile(path, testNpyBytes(c.major, c.dict, testF64Bytes(vals...)), 0o644))
			data, shape, err := ReadNpyFile(path)
			require.NoError(t, err)
			assert.Equal(t, []int{2, 3}, shape)
			assert.Equal(t, vals, data)
		})
	}
}

func TestNpyReadErrors(t *testing.T) {
	dir := t.TempDir()
	good := "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"
	cases := []struct {
		name    string
		file    []byte
		want    string
		wantErr error
	}{
		{"bad magic", []byte("NUMPY\x01\x00\x00\x00"), "magic", nil},
		{"empty", nil, "magic", nil},
		{"big endian", testNpyBytes(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", make([]byte, 8)), "'>f4'", ErrUnsupported},
		{"int32", testNpyBytes(1, "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }", make([]byte, 8)), "'<i4'", ErrUnsupported},
		{"float16", testNpyBytes(1, "{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }", make([]byte, 4)), "'<f2'", ErrUnsupported},
		{"fortran", testNpyBytes(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", make([]byte, 16)), "Fortran", ErrUnsupported},
		{"version 9", testNpyBytes(9, good, make([]byte, 8)), "version 9", ErrUnsupported},
		{"short data", testNpyBytes(1, good, make([]byte, 7)), "needs 8 data bytes", nil},
		{"extra data", testNpyBytes(1, good, make([]byte, 12)), "needs 8 data bytes", nil},
		{"header past end", []byte("\x93NUMPY\x01\x00\xff\x00{}"), "exceeds the file", nil},
		{"v2 header past end", []byte("\x93NUMPY\x02\x00\xff\xff\xff\xff{}"), "exceeds the file", nil},
		{"not a dict", testNpyBytes(1, "['descr']", nil), "not a dict", nil},
		{"no shape", testNpyBytes(1, "{'descr': '<f4', 'fortran_order': False}", nil), "'shape'", nil},
		{"negative shape", testNpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", nil), "shape", nil},
		{"huge shape", testNpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4611686018427387904), }", nil), "needs more", nil},
		{"unterminated", testNpyBytes(1, "{'descr': '<f4", nil), "unterminated", nil},
		{"trailing", testNpyBytes(1, good+" x", make([]byte, 8)), "trailing", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(c.name, " ", "_")+".npy")
			require.NoError(t, os.WriteFile(path, c.file, 0o644))
			_, _, err := ReadNpyFile(path)
			require.Error(t, err)
			assert.ErrorContains(t, err, c.want)
			assert.ErrorContains(t, err, path)
			if c.wantErr != nil {
				assert.ErrorIs(t, err, c.wantErr)
			}
		})
	}
	_, _, err := ReadNpyFile(filepath.Join(dir, "missing.npy"))
	assert.Error(t, err)
}

// The golden logits under testdata/ were written by NumPy.
func TestNpyReadGolden(t *testing.T) {
	path := "../testdata/official-small/logits_T5.npy"
	if _, err := os.Stat(path); err != nil {
		t.Skipf("%s not present", path)
	}
	data, shape, err := ReadNpyFile(path)
	require.NoError(t, err)
	assert.Equal(t, []int{5, 384}, shape)
	assert.Len(t, data, 5*384)
	for _, v := range data {
		require.False(t, math.IsNaN(v) || math.IsInf(v, 0))
	}
}

// FuzzParseNpy: no input makes the .npy reader panic, and what it accepts
// has as many values as its shape says.
func FuzzParseNpy(f *testing.F) {
	good, _ := os.ReadFile("../testdata/official-small/logits_T1.npy")
	f.Add(good)
	f.Add(testNpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", make([]byte, 8)))
	f.Add(testNpyBytes(2, "{'descr': '<f8', 'fortran_order': False, 'shape': (), }", make([]byte, 8)))
	f.Add(testNpyBytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3L, 0), }", nil))
	f.Add([]byte("\x93NUMPY\x01\x00\x05\x00{'a':"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		data, shape, err := parseNpy(raw)
		if err != nil {
			return
		}
		n := 1
		for _, d := range shape {
			if d < 0 {
				t.Fatalf("negative dim in %v", shape)
			}
			n *= d
		}
		if n != len(data) {
			t.Fatalf("shape %v but %d values", shape, len(data))
		}
	})
}
