package dimoo

// Test helpers for building safetensors files, reusable by any test in
// package dimoo:
//
//	testSafetensorsBytes(tensors ...testTensor) []byte
//	    the bytes of a valid safetensors file holding tensors, laid out
//	    contiguously in the order given, header space-padded to a multiple of
//	    8 bytes, "__metadata__": {"format": "pt"}.
//	testWriteSafetensors(t testing.TB, path string, tensors ...testTensor)
//	    the same, written to path (t.Fatal on error).
//	testRawSafetensors(header string, dataLen int) []byte
//	    an arbitrary (possibly invalid) header followed by dataLen zero bytes.
//	testF32Bytes(v ...float32) []byte, testU16Bytes(v ...uint16) []byte
//	    little-endian tensor data.
//
// A testTensor's DType is written verbatim (so unsupported dtypes can be
// tested); a nil Data is filled with zeros of the size shape and dtype imply.

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testTensor is one tensor for testSafetensorsBytes and testWriteSafetensors.
type testTensor struct {
	Name  string
	DType string // "F32", "F16", "BF16", or anything else, written verbatim
	Shape []int64
	Data  []byte // little-endian bytes; nil: zeros of the implied size
}

func testSafetensorsBytes(tensors ...testTensor) []byte {
	header := map[string]any{"__metadata__": map[string]string{"format": "pt"}}
	var data []byte
	for _, t := range tensors {
		d := t.Data
		if d == nil {
			n := int64(safetensorsDTypes[t.DType] / 8)
			for _, s := range t.Shape {
				n *= s
			}
			d = make([]byte, n)
		}
		header[t.Name] = map[string]any{
			"dtype":        t.DType,
			"shape":        append([]int64{}, t.Shape...), // [] rather than null for scalars
			"data_offsets": []int{len(data), len(data) + len(d)},
		}
		data = append(data, d...)
	}
	js, err := json.Marshal(header)
	if err != nil {
		panic(err)
	}
	for len(js)%8 != 0 {
		js = append(js, ' ')
	}
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(js)))
	out = append(out, js...)
	return append(out, data...)
}

func testWriteSafetensors(t testing.TB, path string, tensors ...testTensor) {
	t.Helper()
	require.NoError(t, os.WriteFile(path, testSafetensorsBytes(tensors...), 0o644))
}

func testRawSafetensors(header string, dataLen int) []byte {
	out := binary.LittleEndian.AppendUint64(nil, uint64(len(header)))
	out = append(out, header...)
	return append(out, make([]byte, dataLen)...)
}

func testF32Bytes(v ...float32) []byte {
	var b []byte
	for _, x := range v {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(x))
	}
	return b
}

func testU16Bytes(v ...uint16) []byte {
	var b []byte
	for _, x := range v {
		b = binary.LittleEndian.AppendUint16(b, x)
	}
	return b
}

func TestSafetensorsDType(t *testing.T) {
	assert.Equal(t, 0, int(DTypeF32))
	assert.Equal(t, 1, int(DTypeF16))
	assert.Equal(t, 2, int(DTypeBF16))
	assert.Equal(t, "F32", DTypeF32.String())
	assert.Equal(t, "F16", DTypeF16.String())
	assert.Equal(t, "BF16", DTypeBF16.String())
	assert.Equal(t, "DType(7)", DType(7).String())
	assert.Equal(t, 4, DTypeF32.Size())
	assert.Equal(t, 2, DTypeF16.Size())
	assert.Equal(t, 2, DTypeBF16.Size())
	assert.Equal(t, 0, DType(-1).Size())
}

func TestSafetensorsRoundTrip(t *testing.T) {
	f32 := testF32Bytes(1, -2, 3.5, 0, float32(math.Inf(1)), 1e-30)
	f16 := testU16Bytes(0x3c00, 0xc000, 0x7bff, 0x0001)             // 1, -2, 65504, smallest subnormal
	bf16 := testU16Bytes(0x3f80, 0xc000, 0x4049, 0x7f80, 0x0000, 1) // 1, -2, ~3.14, inf, 0, tiny
	tensors := []testTensor{
		{Name: "a.f32", DType: "F32", Shape: []int64{2, 3}, Data: f32},
		{Name: "b.f16", DType: "F16", Shape: []int64{4}, Data: f16},
		{Name: "empty", DType: "F32", Shape: []int64{0, 5}, Data: []byte{}},
		{Name: "c.bf16", DType: "BF16", Shape: []int64{3, 1, 2}, Data: bf16},
		{Name: "scalar", DType: "F32", Shape: []int64{}, Data: testF32Bytes(42)},
	}
	path := filepath.Join(t.TempDir(), "model.safetensors")
	testWriteSafetensors(t, path, tensors...)

	f, err := OpenSafetensors(path)
	require.NoError(t, err)
	defer f.Close()
	assert.Equal(t, path, f.Path())
	st, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, st.Size(), f.Size())
	assert.Equal(t, int64(0), (f.DataStart()-8)%8, "header padded to 8")
	assert.Equal(t, map[string]string{"format": "pt"}, f.Metadata())
	assert.Equal(t, []string{"a.f32", "b.f16", "c.bf16", "empty", "scalar"}, f.Names())
	require.Len(t, f.Tensors(), len(tensors))

	wantDT := map[string]DType{"a.f32": DTypeF32, "b.f16": DTypeF16, "c.bf16": DTypeBF16, "empty": DTypeF32, "scalar": DTypeF32}
	for _, tt := range tensors {
		info := f.Tensors()[tt.Name]
		assert.Equal(t, tt.Name, info.Name)
		assert.Equal(t, wantDT[tt.Name], info.DType, tt.Name)
		assert.Equal(t, tt.DType, info.DTypeName)
		assert.Equal(t, tt.Shape, info.Shape, tt.Name)
		assert.Equal(t, int64(len(tt.Data)), info.Bytes())
		assert.Equal(t, info.Bytes(), info.NumElements()*int64(info.DType.Size()))
		data, err := f.Data(tt.Name)
		require.NoError(t, err)
		assert.Equal(t, tt.Data, data, tt.Name)
		assert.Equal(t, len(data), cap(data), "capacity ends at the tensor")
	}

	_, err = f.Data("nope")
	assert.ErrorIs(t, err, ErrBadCheckpoint)
	assert.ErrorContains(t, err, `"nope"`)

	require.NoError(t, f.Close())
	require.NoError(t, f.Close(), "Close is idempotent")
	_, err = f.Data("a.f32")
	assert.ErrorIs(t, err, ErrInvalidArgument)
}

// dropPages is advice only: a tensor spanning several pages, and its
// neighbours sharing its first and last page, read the same afterwards (the
// pages map again), and dropping unknown, empty or closed ones does nothing.
func TestSafetensorsDropPages(t *testing.T) {
	page := os.Getpagesize()
	big := make([]float32, 3*page/4+5) // about three pages, ends mid-page
	for i := range big {
		big[i] = float32(i)*0.5 - 7
	}
	tensors := []testTensor{
		{Name: "a", DType: "F32", Shape: []int64{3}, Data: testF32Bytes(1, 2, 3)},
		{Name: "big", DType: "F32", Shape: []int64{int64(len(big))}, Data: testF32Bytes(big...)},
		{Name: "c", DType: "F32", Shape: []int64{2}, Data: testF32Bytes(4, 5)},
		{Name: "empty", DType: "F32", Shape: []int64{0}, Data: []byte{}},
	}
	path := filepath.Join(t.TempDir(), "model.safetensors")
	testWriteSafetensors(t, path, tensors...)
	f, err := OpenSafetensors(path)
	require.NoError(t, err)
	for _, name := range []string{"big", "a", "c", "empty", "nope", "big"} {
		f.dropPages(name)
		for _, tt := range tensors {
			data, err := f.Data(tt.Name)
			require.NoError(t, err)
			assert.Equal(t, tt.Data, data, "%s after dropping %s", tt.Name, name)
		}
	}
	require.NoError(t, f.Close())
	f.dropPages("big") // closed: nothing to drop, no fault
}

// A file whose tensors are all empty has an empty data section: nothing past
// the header, yet it maps and reads.
func TestSafetensorsEmptyDataSection(t *testing.T) {
	dir := t.TempDir()
	for name, tensors := range map[string][]testTensor{
		"zero-length": {{Name: "z", DType: "BF16", Shape: []int64{0}, Data: []byte{}},
			{Name: "z2", DType: "F16", Shape: []int64{3, 0}}},
		"no-tensors": nil,
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(dir, name+".safetensors")
			testWriteSafetensors(t, path, tensors...)
			f, err := OpenSafetensors(path)
			require.NoError(t, err)
			defer f.Close()
			assert.Equal(t, f.Size(), f.DataStart())
			for _, tt := range tensors {
				data, err := f.Data(tt.Name)
				require.NoError(t, err)
				assert.Empty(t, data)
			}
		})
	}
}

func TestSafetensorsConcurrentData(t *testing.T) {
	path := filepath.Join(t.TempDir(), "m.safetensors")
	var tensors []testTensor
	for i := range 16 {
		tensors = append(tensors, testTensor{Name: fmt.Sprint("t", i), DType: "F32", Shape: []int64{1}, Data: testF32Bytes(float32(i))})
	}
	testWriteSafetensors(t, path, tensors...)
	f, err := OpenSafetensors(path)
	require.NoError(t, err)
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				d, err := f.Data(fmt.Sprint("t", i))
				if assert.NoError(t, err) {
					assert.Equal(t, float32(i), math.Float32frombits(binary.LittleEndian.Uint32(d)))
				}
			}
		}()
	}
	wg.Wait()
	require.NoError(t, f.Close())
}

// safetensorsBadCases are malformed files, each with a substring its error
// must contain. They double as fuzz seeds.
func safetensorsBadCases() []struct {
	name string
	file []byte
	want string
} {
	valid := testSafetensorsBytes(
		testTensor{Name: "w", DType: "F32", Shape: []int64{2, 2}, Data: testF32Bytes(1, 2, 3, 4)},
		testTensor{Name: "b", DType: "BF16", Shape: []int64{2}})
	hugeLen := binary.LittleEndian.AppendUint64(nil, 1<<62)
	hugeLen = append(hugeLen, `{"a":1}`...)
	longLen := binary.LittleEndian.AppendUint64(nil, 1000)
	longLen = append(longLen, `{}`...)
	tensor := func(body string) string { return `{"t":` + body + `}` }

	return []struct {
		name string
		file []byte
		want string
	}{
		{"empty file", nil, "too short"},
		{"five bytes", []byte{1, 2, 3, 4, 5}, "too short"},
		{"header length past the end", longLen, "larger than"},
		{"huge header length", hugeLen, "exceeds"},
		{"zero header length", testRawSafetensors("", 0), "too short for a JSON object"},
		{"truncated data", valid[:len(valid)-3], "truncated"},
		{"trailing bytes", append(append([]byte{}, valid...), 0, 0, 0, 0), "tensors cover"},
		{"malformed JSON", testRawSafetensors(`{"t": {"dtype": "F32",`, 0), "not valid JSON"},
		{"JSON array", testRawSafetensors(`[1, 2]`, 0), "not a JSON object"},
		{"JSON string", testRawSafetensors(`"abc"`, 0), "not a JSON object"},
		{"trailing garbage", testRawSafetensors(`{} {}`, 0), "trailing data"},
		{"invalid UTF-8", testRawSafetensors("{\"\xff\": 1}", 0), "UTF-8"},
		{"duplicate tensor", testRawSafetensors(`{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, 8), "appears twice"},
		{"entry not an object", testRawSafetensors(tensor(`[1]`), 0), `tensor "t": not a JSON object`},
		{"empty name", testRawSafetensors(`{"":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}`, 0), "empty name"},
		{"missing dtype", testRawSafetensors(tensor(`{"shape":[1],"data_offsets":[0,4]}`), 4), "dtype is missing"},
		{"dtype not a string", testRawSafetensors(tensor(`{"dtype":4,"shape":[1],"data_offsets":[0,4]}`), 4), "not a string"},
		{"unsupported dtype", testRawSafetensors(tensor(`{"dtype":"I64","shape":[1],"data_offsets":[0,8]}`), 8), `tensor "t": unsupported dtype "I64"`},
		{"unknown dtype", testRawSafetensors(tensor(`{"dtype":"Q4_K","shape":[1],"data_offsets":[0,4]}`), 4), `unknown dtype "Q4_K"`},
		{"missing shape", testRawSafetensors(tensor(`{"dtype":"F32","data_offsets":[0,4]}`), 4), "shape is missing"},
		{"shape not an array", testRawSafetensors(tensor(`{"dtype":"F32","shape":4,"data_offsets":[0,16]}`), 16), "not an array"},
		{"negative shape", testRawSafetensors(tensor(`{"dtype":"F32","shape":[-1, 4],"data_offsets":[0,0]}`), 0), "negative"},
		{"fractional shape", testRawSafetensors(tensor(`{"dtype":"F32","shape":[2.5],"data_offsets":[0,10]}`), 10), "not an integer"},
		{"string shape", testRawSafetensors(tensor(`{"dtype":"F32","shape":["4"],"data_offsets":[0,16]}`), 16), "not an integer"},
		{"shape beyond int64", testRawSafetensors(tensor(`{"dtype":"F32","shape":[100000000000000000000],"data_offsets":[0,0]}`), 0), "does not fit"},
		{"overflowing shape", testRawSafetensors(tensor(`{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}`), 0), "overflows"},
		{"missing data_offsets", testRawSafetensors(tensor(`{"dtype":"F32","shape":[1]}`), 4), "data_offsets is missing"},
		{"one data_offset", testRawSafetensors(tensor(`{"dtype":"F32","shape":[1],"data_offsets":[4]}`), 4), "data_offsets has 1 entries"},
		{"three data_offsets", testRawSafetensors(tensor(`{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}`), 8), "data_offsets has 3 entries"},
		{"reversed data_offsets", testRawSafetensors(tensor(`{"dtype":"F32","shape":[1],"data_offsets":[8,4]}`), 8), "end before they begin"},
		{"negative data_offset", testRawSafetensors(tensor(`{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}`), 4), "negative"},
		{"offsets past the end", testRawSafetensors(tensor(`{"dtype":"F32","shape":[2],"data_offsets":[0,8]}`), 4), "past the 4-byte data section"},
		{"size disagrees with shape", testRawSafetensors(tensor(`{"dtype":"F32","shape":[4],"data_offsets":[0,8]}`), 8), "span 8 bytes but F32[4] needs 16"},
		{"overlapping tensors", testRawSafetensors(`{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}`, 24), "overlaps"},
		{"same offsets", testRawSafetensors(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}`, 8), "overlaps"},
		{"gap", testRawSafetensors(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, 8), "belong to no tensor"},
		{"metadata not strings", testRawSafetensors(`{"__metadata__":{"format":1}}`, 0), "__metadata__"},
		{"metadata not an object", testRawSafetensors(`{"__metadata__":"pt"}`, 0), "__metadata__"},
	}
}

func TestSafetensorsMalformed(t *testing.T) {
	dir := t.TempDir()
	for i, c := range safetensorsBadCases() {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := ParseSafetensorsHeader(c.file, int64(len(c.file)))
			require.Error(t, err)
			t.Log(err)
			assert.ErrorIs(t, err, ErrBadCheckpoint)
			assert.ErrorContains(t, err, c.want)

			path := filepath.Join(dir, fmt.Sprintf("case%d.safetensors", i))
			require.NoError(t, os.WriteFile(path, c.file, 0o644))
			f, err := OpenSafetensors(path)
			require.Error(t, err)
			assert.Nil(t, f)
			assert.ErrorIs(t, err, ErrBadCheckpoint)
			assert.ErrorContains(t, err, c.want)
			assert.ErrorContains(t, err, path)
		})
	}
}

func TestSafetensorsHeaderParse(t *testing.T) {
	file := testSafetensorsBytes(
		testTensor{Name: "x", DType: "F16", Shape: []int64{3}},
		testTensor{Name: "y", DType: "F32", Shape: []int64{1, 2}})
	tensors, dataStart, err := ParseSafetensorsHeader(file, int64(len(file)))
	require.NoError(t, err)
	assert.Equal(t, int64(len(file)-6-8), dataStart)
	assert.Equal(t, TensorInfo{Name: "x", DType: DTypeF16, DTypeName: "F16", Shape: []int64{3}, Begin: 0, End: 6}, tensors["x"])
	assert.Equal(t, TensorInfo{Name: "y", DType: DTypeF32, DTypeName: "F32", Shape: []int64{1, 2}, Begin: 6, End: 14}, tensors["y"])

	// Only the header needs to be in buf; the file size is what counts.
	_, _, err = ParseSafetensorsHeader(file[:dataStart], int64(len(file)))
	require.NoError(t, err)
	// A buffer that stops inside the header is an error, not a panic.
	_, _, err = ParseSafetensorsHeader(file[:20], int64(len(file)))
	assert.ErrorIs(t, err, ErrBadCheckpoint)
	assert.ErrorContains(t, err, "only 12 were read")
	// A file size smaller than the buffer's header says is a truncated file.
	_, _, err = ParseSafetensorsHeader(file, int64(len(file))-1)
	assert.ErrorIs(t, err, ErrBadCheckpoint)
	assert.ErrorContains(t, err, `tensor "y"`)
	_, _, err = ParseSafetensorsHeader(file, -5)
	assert.ErrorIs(t, err, ErrBadCheckpoint)

	// Whitespace padding and unknown entry fields are accepted.
	raw := testRawSafetensors(`  {"t": {"dtype":"BF16","shape":[2],"data_offsets":[0,4],"extra":true}}   `, 4)
	tensors, _, err = ParseSafetensorsHeader(raw, int64(len(raw)))
	require.NoError(t, err)
	assert.Equal(t, DTypeBF16, tensors["t"].DType)

	// Zero-length tensors may sit anywhere, even at the end, and a zero
	// dimension makes any other dimension harmless.
	raw = testRawSafetensors(`{"e":{"dtype":"F16","shape":[0],"data_offsets":[4,4]},
		"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},
		"z":{"dtype":"F32","shape":[9223372036854775807,9223372036854775807,0],"data_offsets":[4,4]}}`, 4)
	tensors, _, err = ParseSafetensorsHeader(raw, int64(len(raw)))
	require.NoError(t, err)
	assert.Len(t, tensors, 3)
	assert.Equal(t, int64(0), tensors["z"].NumElements())
}

func TestSafetensorsOpenErrors(t *testing.T) {
	_, err := OpenSafetensors(filepath.Join(t.TempDir(), "missing.safetensors"))
	assert.ErrorIs(t, err, ErrBadCheckpoint)
	_, err = OpenSafetensors(t.TempDir())
	assert.ErrorIs(t, err, ErrBadCheckpoint)
}

func testFileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func testWriteIndex(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "model.safetensors.index.json")
	require.NoError(t, os.WriteFile(path, []byte(body), 0o644))
	return path
}

func TestSafetensorsIndex(t *testing.T) {
	path := testWriteIndex(t, `{"metadata": {"total_size": 24}, "weight_map": {
		"a": "model-00001-of-00002.safetensors",
		"b": "model-00002-of-00002.safetensors",
		"c": "model-00002-of-00002.safetensors"}}`)
	wm, err := ReadSafetensorsIndex(path)
	require.NoError(t, err)
	assert.Equal(t, map[string]string{
		"a": "model-00001-of-00002.safetensors",
		"b": "model-00002-of-00002.safetensors",
		"c": "model-00002-of-00002.safetensors",
	}, wm)

	// metadata is optional.
	wm, err = ReadSafetensorsIndex(testWriteIndex(t, `{"weight_map": {"a": "x.safetensors"}}`))
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"a": "x.safetensors"}, wm)

	bad := []struct{ name, body, want string }{
		{"not JSON", `{"weight_map": `, "not valid JSON"},
		{"array", `[]`, "not a JSON object"},
		{"no weight_map", `{"metadata": {}}`, "weight_map is missing"},
		{"null weight_map", `{"weight_map": null}`, "weight_map is missing"},
		{"empty weight_map", `{"weight_map": {}}`, "weight_map is empty"},
		{"weight_map array", `{"weight_map": ["a"]}`, "weight_map: not a JSON object"},
		{"shard not a string", `{"weight_map": {"a": 3}}`, "not a string"},
		{"parent dir", `{"weight_map": {"a": "../x.safetensors"}}`, "not a plain file name"},
		{"dotdot", `{"weight_map": {"a": ".."}}`, "not a plain file name"},
		{"subdir", `{"weight_map": {"a": "sub/x.safetensors"}}`, "not a plain file name"},
		{"absolute", `{"weight_map": {"a": "/etc/passwd"}}`, "not a plain file name"},
		{"backslash", `{"weight_map": {"a": "..\\x.safetensors"}}`, "not a plain file name"},
		{"empty shard", `{"weight_map": {"a": ""}}`, "not a plain file name"},
		{"empty tensor name", `{"weight_map": {"": "x.safetensors"}}`, "empty tensor name"},
		{"duplicate tensor", `{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}`, "appears twice"},
		{"metadata not an object", `{"metadata": 5, "weight_map": {"a": "x.safetensors"}}`, "metadata"},
	}
	for _, c := range bad {
		t.Run(c.name, func(t *testing.T) {
			path := testWriteIndex(t, c.body)
			_, err := ReadSafetensorsIndex(path)
			require.Error(t, err)
			assert.ErrorIs(t, err, ErrBadCheckpoint)
			assert.ErrorContains(t, err, c.want)
			assert.ErrorContains(t, err, path)
		})
	}

	_, err = ReadSafetensorsIndex(filepath.Join(t.TempDir(), "missing.json"))
	assert.ErrorIs(t, err, ErrBadCheckpoint)
}

// The checkpoints under testdata/ (written by PyTorch's safetensors) open,
// agree with their index, and hold exactly the tensors their config implies.
func TestSafetensorsRepoCheckpoints(t *testing.T) {
	for _, dir := range []string{
		"../testdata/official-small/checkpoint",
		"../testdata/small-f32",
		"../testdata/small-bf16",
		"../testdata/small-gqa-f16",
	} {
		t.Run(filepath.Base(filepath.Dir(dir))+"/"+filepath.Base(dir), func(t *testing.T) {
			if !testFileExists(filepath.Join(dir, "config.json")) {
				t.Skipf("%s not present", dir)
			}
			cfg, err := LoadConfig(dir)
			require.NoError(t, err)

			shards := []string{"model.safetensors"}
			var weightMap map[string]string
			if index := filepath.Join(dir, "model.safetensors.index.json"); testFileExists(index) {
				weightMap, err = ReadSafetensorsIndex(index)
				require.NoError(t, err)
				shards = nil
				seen := map[string]bool{}
				for _, s := range weightMap {
					if !seen[s] {
						seen[s] = true
						shards = append(shards, s)
					}
				}
			}

			all := map[string]TensorInfo{}
			for _, s := range shards {
				f, err := OpenSafetensors(filepath.Join(dir, s))
				require.NoError(t, err)
				for name, info := range f.Tensors() {
					if weightMap != nil {
						assert.Equal(t, s, weightMap[name], name)
					}
					data, err := f.Data(name)
					require.NoError(t, err)
					assert.Equal(t, info.NumElements()*int64(info.DType.Size()), int64(len(data)))
					all[name] = info
				}
				require.NoError(t, f.Close())
			}
			specs := cfg.ExpectedTensors()
			require.Len(t, all, len(specs))
			var params int64
			for _, s := range specs {
				info, ok := all[s.Name]
				require.True(t, ok, s.Name)
				assert.Equal(t, s.Shape, info.Shape, s.Name)
				params += info.NumElements()
			}
			assert.Equal(t, cfg.ParamCount(), params)
		})
	}
}
