package dimoo

import (
	"encoding/binary"
	"errors"
	"testing"
)

// FuzzParseSafetensorsHeader feeds arbitrary bytes to the header parser as a
// file of len(data)+extra bytes. It must never panic, every error must wrap
// ErrBadCheckpoint, and an accepted header must describe tensors that lie
// inside the file, match their shapes, and tile the data section.
func FuzzParseSafetensorsHeader(f *testing.F) {
	valid := testSafetensorsBytes(
		testTensor{Name: "w", DType: "F32", Shape: []int64{2, 3}, Data: testF32Bytes(1, 2, 3, 4, 5, 6)},
		testTensor{Name: "h", DType: "F16", Shape: []int64{2}},
		testTensor{Name: "b", DType: "BF16", Shape: []int64{1, 1, 2}},
		testTensor{Name: "z", DType: "F32", Shape: []int64{0, 7}})
	f.Add(valid, int64(0))
	f.Add(valid, int64(100))              // file larger than the buffer: trailing bytes
	f.Add(valid[:len(valid)-1], int64(0)) // truncated data
	f.Add(valid[:12], int64(0))           // truncated header
	f.Add([]byte{}, int64(0))
	f.Add([]byte{}, int64(-8))
	f.Add(testRawSafetensors(`{}`, 0), int64(0))
	f.Add(binary.LittleEndian.AppendUint64(nil, 1<<63), int64(0)) // huge length
	f.Add(binary.LittleEndian.AppendUint64(nil, 64), int64(1<<40))
	f.Add(testRawSafetensors(`{"t": {"dtype": "F32", "shape": [1], `, 4), int64(0)) // bad JSON
	f.Add(testRawSafetensors(`{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}`, 24), int64(0))
	f.Add(testRawSafetensors(`{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}`, 4), int64(0))
	f.Add(testRawSafetensors(`{"t":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}}`, 0), int64(0))
	f.Add(testRawSafetensors(`{"t":{"dtype":"BF16","shape":[0,9223372036854775807,9223372036854775807],"data_offsets":[0,0]}}`, 0), int64(0))
	f.Add(testRawSafetensors(`{"t":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}`, 4), int64(0))
	f.Add(testRawSafetensors(`{"__metadata__":{"k":"v"},"t":{"dtype":"F16","shape":[],"data_offsets":[0,2]}}`, 2), int64(0))
	for _, c := range safetensorsBadCases() {
		f.Add(c.file, int64(0))
	}

	f.Fuzz(func(t *testing.T, data []byte, extra int64) {
		fileSize := int64(len(data)) + extra
		tensors, dataStart, err := ParseSafetensorsHeader(data, fileSize)
		if err != nil {
			if !errors.Is(err, ErrBadCheckpoint) {
				t.Fatalf("error does not wrap ErrBadCheckpoint: %v", err)
			}
			if tensors != nil || dataStart != 0 {
				t.Fatalf("error with results: %v, %d", tensors, dataStart)
			}
			return
		}
		if dataStart < 10 || dataStart > fileSize || dataStart > int64(len(data)) {
			t.Fatalf("dataStart %d outside file of %d bytes (buffer %d)", dataStart, fileSize, len(data))
		}
		dataSize := fileSize - dataStart
		var covered int64
		for name, info := range tensors {
			if name != info.Name || name == "" {
				t.Fatalf("tensor keyed %q is named %q", name, info.Name)
			}
			if info.DType.Size() == 0 || info.DType.String() != info.DTypeName {
				t.Fatalf("tensor %q: bad dtype %v (%q)", name, info.DType, info.DTypeName)
			}
			if info.Begin < 0 || info.Begin > info.End || info.End > dataSize {
				t.Fatalf("tensor %q: offsets [%d, %d] outside the %d-byte data section", name, info.Begin, info.End, dataSize)
			}
			n := int64(info.DType.Size())
			for _, d := range info.Shape {
				if d < 0 {
					t.Fatalf("tensor %q: negative dim in %v", name, info.Shape)
				}
				n *= d // may wrap only when a later dim is 0, which zeroes it
			}
			if n != info.End-info.Begin {
				t.Fatalf("tensor %q: %d bytes for %s%v, offsets span %d", name, n, info.DTypeName, info.Shape, info.End-info.Begin)
			}
			covered += n
			if dataStart+info.End <= int64(len(data)) {
				_ = data[dataStart+info.Begin : dataStart+info.End]
			}
		}
		if covered != dataSize {
			t.Fatalf("tensors cover %d of %d data bytes", covered, dataSize)
		}
	})
}
