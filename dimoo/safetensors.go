package dimoo

// Safetensors reading: header validation, memory-mapped shards, and the
// sharded-checkpoint index.
//
// A safetensors file is an 8-byte little-endian header length N, N bytes of
// JSON (an object mapping tensor names to {dtype, shape, data_offsets}, plus
// an optional "__metadata__" object of strings), then the data section. Each
// tensor's data_offsets are [begin, end) relative to the data section. The
// parser trusts nothing: every length, offset and shape is checked, offsets
// must tile the data section exactly, and no input makes it panic.

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"unicode/utf8"
)

// DType is the element type of a tensor. The values equal the C enum
// dimoo_dtype of include/dimoo.h.
type DType int

// The element types libdimoo accepts.
const (
	DTypeF32  DType = 0
	DTypeF16  DType = 1
	DTypeBF16 DType = 2
)

// String gives the safetensors spelling: "F32", "F16" or "BF16".
func (d DType) String() string {
	switch d {
	case DTypeF32:
		return "F32"
	case DTypeF16:
		return "F16"
	case DTypeBF16:
		return "BF16"
	}
	return fmt.Sprintf("DType(%d)", int(d))
}

// Size is the size of one element in bytes (0 for an unknown DType).
func (d DType) Size() int {
	switch d {
	case DTypeF32:
		return 4
	case DTypeF16, DTypeBF16:
		return 2
	}
	return 0
}

// safetensorsDTypes maps every dtype string the safetensors format defines to
// its element size in bits. Only F32, F16 and BF16 are accepted; the others
// are known so that the error can say "unsupported" rather than "unknown".
var safetensorsDTypes = map[string]int{
	"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
	"I16": 16, "U16": 16, "F16": 16, "BF16": 16,
	"I32": 32, "U32": 32, "F32": 32,
	"I64": 64, "U64": 64, "F64": 64, "C64": 64,
	"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

func parseDType(s string) (DType, bool) {
	switch s {
	case "F32":
		return DTypeF32, true
	case "F16":
		return DTypeF16, true
	case "BF16":
		return DTypeBF16, true
	}
	return 0, false
}

// TensorInfo describes one tensor of a safetensors file. Begin and End are
// byte offsets relative to the start of the data section, End exclusive.
type TensorInfo struct {
	Name  string
	DType DType
	// DTypeName is the dtype string as the file spells it.
	DTypeName string
	Shape     []int64
	Begin     int64
	End       int64
}

// NumElements is the product of the shape (1 for a scalar).
func (t TensorInfo) NumElements() int64 {
	n := int64(1)
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// Bytes is End - Begin.
func (t TensorInfo) Bytes() int64 { return t.End - t.Begin }

// MaxSafetensorsHeader is the largest JSON header accepted (100 MB). Real
// headers are a few hundred kilobytes at most.
const MaxSafetensorsHeader = 100 << 20

// ParseSafetensorsHeader parses and validates the header of a safetensors
// file of fileSize bytes. buf holds the beginning of the file: at least the
// 8-byte length and the whole JSON header (more is ignored). It returns the
// tensors by name and the file offset of the data section (8 + header
// length). Every error wraps ErrBadCheckpoint and says what is wrong.
func ParseSafetensorsHeader(buf []byte, fileSize int64) (tensors map[string]TensorInfo, dataStart int64, err error) {
	tensors, _, dataStart, err = parseSafetensorsHeader("safetensors", buf, fileSize)
	return tensors, dataStart, err
}

// parseSafetensorsHeader is ParseSafetensorsHeader with the file name for
// error messages, also returning the "__metadata__" strings.
func parseSafetensorsHeader(path string, buf []byte, fileSize int64) (map[string]TensorInfo, map[string]string, int64, error) {
	n, err := safetensorsHeaderLen(path, buf, fileSize)
	if err != nil {
		return nil, nil, 0, err
	}
	if int64(len(buf)) < 8+n {
		return nil, nil, 0, checkpointError(path, "header is %d bytes but only %d were read", n, int64(len(buf))-8)
	}
	header := buf[8 : 8+n]
	dataSize := fileSize - 8 - n

	if !utf8.Valid(header) {
		return nil, nil, 0, checkpointError(path, "header is not valid UTF-8")
	}
	keys, fields, err := decodeJSONObject(header)
	if err != nil {
		return nil, nil, 0, checkpointError(path, "header: %v", err)
	}

	var metadata map[string]string
	tensors := make(map[string]TensorInfo, len(keys))
	list := make([]TensorInfo, 0, len(keys))
	for _, name := range keys {
		raw := fields[name]
		if name == "__metadata__" {
			if metadata, err = decodeStringMap(raw); err != nil {
				return nil, nil, 0, checkpointError(path, "__metadata__: %v", err)
			}
			continue
		}
		info, err := parseTensorEntry(name, raw, dataSize)
		if err != nil {
			return nil, nil, 0, checkpointError(path, "%v", err)
		}
		tensors[name] = info
		list = append(list, info)
	}

	// The tensors must tile the data section: sorted by offset, each begins
	// where the previous one ended, and the last ends at the end of the file.
	sort.Slice(list, func(i, j int) bool {
		if list[i].Begin != list[j].Begin {
			return list[i].Begin < list[j].Begin
		}
		if list[i].End != list[j].End {
			return list[i].End < list[j].End
		}
		return list[i].Name < list[j].Name
	})
	var pos int64
	for i, t := range list {
		switch {
		case t.Begin < pos:
			prev := list[i-1]
			return nil, nil, 0, checkpointError(path, "tensor %q (bytes %d..%d) overlaps tensor %q (bytes %d..%d)",
				t.Name, t.Begin, t.End, prev.Name, prev.Begin, prev.End)
		case t.Begin > pos:
			return nil, nil, 0, checkpointError(path, "%d bytes of the data section before tensor %q (offset %d) belong to no tensor",
				t.Begin-pos, t.Name, t.Begin)
		}
		pos = t.End
	}
	if pos != dataSize {
		return nil, nil, 0, checkpointError(path, "the data section is %d bytes but the tensors cover %d", dataSize, pos)
	}
	return tensors, metadata, 8 + n, nil
}

// safetensorsHeaderLen reads and bounds-checks the 8-byte header length.
func safetensorsHeaderLen(path string, buf []byte, fileSize int64) (int64, error) {
	if fileSize < 8 || len(buf) < 8 {
		size := fileSize
		if int64(len(buf)) < size {
			size = int64(len(buf))
		}
		return 0, checkpointError(path, "file is %d bytes, too short for the 8-byte header length", size)
	}
	u := binary.LittleEndian.Uint64(buf[:8])
	if u > MaxSafetensorsHeader {
		return 0, checkpointError(path, "header length %d exceeds the %d-byte limit", u, MaxSafetensorsHeader)
	}
	n := int64(u)
	if n > fileSize-8 {
		return 0, checkpointError(path, "header length %d is larger than the %d bytes that follow it (truncated file?)", n, fileSize-8)
	}
	if n < 2 {
		return 0, checkpointError(path, "header length %d is too short for a JSON object", n)
	}
	return n, nil
}

// parseTensorEntry validates one {dtype, shape, data_offsets} entry against a
// data section of dataSize bytes.
func parseTensorEntry(name string, raw json.RawMessage, dataSize int64) (TensorInfo, error) {
	info := TensorInfo{Name: name}
	if name == "" {
		return info, errors.New("a tensor has an empty name")
	}
	// Unknown fields are ignored, as other readers do.
	_, fields, err := decodeJSONObject(raw)
	if err != nil {
		return info, fmt.Errorf("tensor %q: %v", name, err)
	}

	// dtype
	rawDT, ok := fields["dtype"]
	if !ok {
		return info, fmt.Errorf("tensor %q: dtype is missing", name)
	}
	if len(rawDT) == 0 || rawDT[0] != '"' || json.Unmarshal(rawDT, &info.DTypeName) != nil {
		return info, fmt.Errorf("tensor %q: dtype is %s, not a string", name, clip(rawDT))
	}
	dt, supported := parseDType(info.DTypeName)
	if !supported {
		if _, known := safetensorsDTypes[info.DTypeName]; known {
			return info, fmt.Errorf("tensor %q: unsupported dtype %q (only F32, F16 and BF16 are supported)", name, info.DTypeName)
		}
		return info, fmt.Errorf("tensor %q: unknown dtype %q", name, clip([]byte(info.DTypeName)))
	}
	info.DType = dt

	// shape
	rawShape, ok := fields["shape"]
	if !ok {
		return info, fmt.Errorf("tensor %q: shape is missing", name)
	}
	shape, err := decodeIntArray(rawShape)
	if err != nil {
		return info, fmt.Errorf("tensor %q: shape: %v", name, err)
	}
	info.Shape = shape
	nbytes, err := shapeBytes(shape, int64(dt.Size()))
	if err != nil {
		return info, fmt.Errorf("tensor %q: shape %v: %v", name, shape, err)
	}

	// data_offsets
	rawOff, ok := fields["data_offsets"]
	if !ok {
		return info, fmt.Errorf("tensor %q: data_offsets is missing", name)
	}
	off, err := decodeIntArray(rawOff)
	if err != nil {
		return info, fmt.Errorf("tensor %q: data_offsets: %v", name, err)
	}
	if len(off) != 2 {
		return info, fmt.Errorf("tensor %q: data_offsets has %d entries, want 2 ([begin, end])", name, len(off))
	}
	info.Begin, info.End = off[0], off[1]
	if info.Begin > info.End {
		return info, fmt.Errorf("tensor %q: data_offsets [%d, %d] end before they begin", name, info.Begin, info.End)
	}
	if info.End > dataSize {
		return info, fmt.Errorf("tensor %q: data_offsets [%d, %d] run past the %d-byte data section (truncated file?)",
			name, info.Begin, info.End, dataSize)
	}
	if info.End-info.Begin != nbytes {
		return info, fmt.Errorf("tensor %q: data_offsets [%d, %d] span %d bytes but %s%v needs %d",
			name, info.Begin, info.End, info.End-info.Begin, info.DTypeName, shape, nbytes)
	}
	return info, nil
}

// shapeBytes is product(shape)*elemSize, or an error if it exceeds int64.
func shapeBytes(shape []int64, elemSize int64) (int64, error) {
	for _, d := range shape {
		if d == 0 {
			return 0, nil
		}
	}
	n := elemSize
	for _, d := range shape {
		if n > math.MaxInt64/d {
			return 0, errors.New("size overflows 64 bits")
		}
		n *= d
	}
	return n, nil
}

// decodeJSONObject decodes data as exactly one JSON object (surrounding
// whitespace allowed) and returns its keys in order and their raw values.
// Duplicate keys are an error: they would hide one of two tensors.
func decodeJSONObject(data []byte) ([]string, map[string]json.RawMessage, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return nil, nil, fmt.Errorf("not valid JSON: %v", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, nil, fmt.Errorf("not a JSON object: starts with %s", clip(data))
	}
	var keys []string
	fields := map[string]json.RawMessage{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, nil, fmt.Errorf("not valid JSON: %v", err)
		}
		key, ok := tok.(string)
		if !ok {
			return nil, nil, fmt.Errorf("not valid JSON: object key %v", tok)
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, nil, fmt.Errorf("not valid JSON: value of %q: %v", clip([]byte(key)), err)
		}
		if _, dup := fields[key]; dup {
			return nil, nil, fmt.Errorf("key %q appears twice", clip([]byte(key)))
		}
		keys = append(keys, key)
		fields[key] = raw
	}
	if _, err := dec.Token(); err != nil {
		return nil, nil, fmt.Errorf("not valid JSON: %v", err)
	}
	if rest := data[dec.InputOffset():]; len(bytes.TrimLeft(rest, " \t\r\n")) != 0 {
		return nil, nil, fmt.Errorf("trailing data after the JSON object: %s", clip(bytes.TrimLeft(rest, " \t\r\n")))
	}
	return keys, fields, nil
}

// decodeStringMap decodes a JSON object whose values are all strings.
func decodeStringMap(raw json.RawMessage) (map[string]string, error) {
	keys, fields, err := decodeJSONObject(raw)
	if err != nil {
		return nil, err
	}
	m := make(map[string]string, len(keys))
	for _, k := range keys {
		v := fields[k]
		var s string
		if len(v) == 0 || v[0] != '"' || json.Unmarshal(v, &s) != nil {
			return nil, fmt.Errorf("value of %q is %s, not a string", clip([]byte(k)), clip(v))
		}
		m[k] = s
	}
	return m, nil
}

// decodeIntArray decodes a JSON array of non-negative integers that fit in
// int64. Strings, fractions, exponents and negative numbers are errors.
func decodeIntArray(raw json.RawMessage) ([]int64, error) {
	var items []json.RawMessage
	if err := json.Unmarshal(raw, &items); err != nil || items == nil {
		return nil, fmt.Errorf("%s is not an array", clip(raw))
	}
	out := make([]int64, len(items))
	for i, it := range items {
		v, err := strconv.ParseInt(string(it), 10, 64)
		switch {
		case errors.Is(err, strconv.ErrRange):
			return nil, fmt.Errorf("%s does not fit in 64 bits", clip(it))
		case err != nil:
			return nil, fmt.Errorf("entry %s is not an integer", clip(it))
		case v < 0:
			return nil, fmt.Errorf("entry %d is negative", v)
		}
		out[i] = v
	}
	return out, nil
}

// clip shortens b to at most 64 bytes (on a rune boundary) for an error
// message.
func clip(b []byte) string {
	const limit = 64
	if len(b) <= limit {
		return string(b)
	}
	cut := limit
	for cut > 0 && !utf8.RuneStart(b[cut]) {
		cut--
	}
	return string(b[:cut]) + "..."
}

// SafetensorsFile is one safetensors file, validated and memory-mapped
// read-only. Its methods are safe for concurrent use; slices returned by Data
// stay valid until Close.
type SafetensorsFile struct {
	path      string
	size      int64
	dataStart int64
	tensors   map[string]TensorInfo
	metadata  map[string]string

	mu sync.RWMutex
	mm []byte // the whole file; nil once closed
}

// OpenSafetensors reads and validates the header of path, then maps the
// whole file read-only. A truncated file, or one whose header disagrees with
// its size, is an error wrapping ErrBadCheckpoint.
func OpenSafetensors(path string) (*SafetensorsFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, checkpointError(path, "%v", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, checkpointError(path, "%v", err)
	}
	if !st.Mode().IsRegular() {
		return nil, checkpointError(path, "not a regular file")
	}
	size := st.Size()

	var lenBuf [8]byte
	if _, err := io.ReadFull(f, lenBuf[:min(8, max(size, 0))]); err != nil {
		return nil, checkpointError(path, "reading the header length: %v", err)
	}
	n, err := safetensorsHeaderLen(path, lenBuf[:], size)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, 8+n)
	copy(buf, lenBuf[:])
	if _, err := io.ReadFull(f, buf[8:]); err != nil {
		return nil, checkpointError(path, "reading the %d-byte header: %v", n, err)
	}
	tensors, metadata, dataStart, err := parseSafetensorsHeader(path, buf, size)
	if err != nil {
		return nil, err
	}
	if int64(int(size)) != size {
		return nil, fmt.Errorf("%w: %s: %d bytes cannot be mapped on this platform", ErrUnsupported, path, size)
	}
	mm, err := syscall.Mmap(int(f.Fd()), 0, int(size), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return nil, checkpointError(path, "mmap: %v", err)
	}
	return &SafetensorsFile{
		path:      path,
		size:      size,
		dataStart: dataStart,
		tensors:   tensors,
		metadata:  metadata,
		mm:        mm,
	}, nil
}

// Path is the file name given to OpenSafetensors.
func (f *SafetensorsFile) Path() string { return f.path }

// Size is the file size in bytes.
func (f *SafetensorsFile) Size() int64 { return f.size }

// DataStart is the file offset of the data section.
func (f *SafetensorsFile) DataStart() int64 { return f.dataStart }

// Tensors returns the tensors by name. The map is shared: do not modify it.
func (f *SafetensorsFile) Tensors() map[string]TensorInfo { return f.tensors }

// Names returns the tensor names, sorted.
func (f *SafetensorsFile) Names() []string {
	names := make([]string, 0, len(f.tensors))
	for n := range f.tensors {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Metadata returns the "__metadata__" strings (nil if absent). Do not modify.
func (f *SafetensorsFile) Metadata() map[string]string { return f.metadata }

// Data returns the bytes of tensor name, little-endian, straight from the
// mapping (no copy; the slice's capacity ends at the tensor). The slice must
// not be written to and is invalid after Close.
func (f *SafetensorsFile) Data(name string) ([]byte, error) {
	info, ok := f.tensors[name]
	if !ok {
		return nil, checkpointError(f.path, "no tensor %q", name)
	}
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.mm == nil {
		return nil, fmt.Errorf("%w: %s: safetensors file is closed", ErrInvalidArgument, f.path)
	}
	lo, hi := f.dataStart+info.Begin, f.dataStart+info.End
	return f.mm[lo:hi:hi], nil
}

// dropPages tells the kernel that the mapped pages wholly inside tensor
// name's bytes are not needed any more (madvise MADV_DONTNEED), once the
// library holds its own copy: the pages leave this process's resident set
// (they stay in the page cache, and a later read maps them again). Without
// it a loaded checkpoint's pages count in the RSS until the file is closed,
// on top of the library's copy of the weights. Advice only: an error is ignored.
func (f *SafetensorsFile) dropPages(name string) {
	info, ok := f.tensors[name]
	if !ok {
		return
	}
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.mm == nil {
		return
	}
	page := int64(os.Getpagesize())
	lo := (f.dataStart + info.Begin + page - 1) / page * page
	hi := (f.dataStart + info.End) / page * page
	if hi > lo {
		dontNeed(f.mm[lo:hi])
	}
}

// Close unmaps the file. It is idempotent.
func (f *SafetensorsFile) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.mm == nil {
		return nil
	}
	err := syscall.Munmap(f.mm)
	f.mm = nil
	if err != nil {
		return fmt.Errorf("dimoo: %s: munmap: %w", f.path, err)
	}
	return nil
}

// maxIndexSize bounds model.safetensors.index.json (real ones are ~100 kB).
const maxIndexSize = 64 << 20

// ReadSafetensorsIndex reads a sharded checkpoint's
// model.safetensors.index.json and returns its weight_map: tensor name to
// shard file name. The map must be non-empty, and every shard must be a plain
// file name in the same folder (no path separators, no "..").
func ReadSafetensorsIndex(path string) (weightMap map[string]string, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, checkpointError(path, "%v", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxIndexSize+1))
	if err != nil {
		return nil, checkpointError(path, "%v", err)
	}
	if len(data) > maxIndexSize {
		return nil, checkpointError(path, "larger than %d bytes", maxIndexSize)
	}
	return parseSafetensorsIndex(path, data)
}

func parseSafetensorsIndex(path string, data []byte) (map[string]string, error) {
	_, fields, err := decodeJSONObject(data)
	if err != nil {
		return nil, checkpointError(path, "%v", err)
	}
	if md, ok := fields["metadata"]; ok && string(md) != "null" {
		if _, _, err := decodeJSONObject(md); err != nil {
			return nil, checkpointError(path, "metadata: %v", err)
		}
	}
	raw, ok := fields["weight_map"]
	if !ok || string(raw) == "null" {
		return nil, checkpointError(path, "weight_map is missing")
	}
	wm, err := decodeStringMap(raw)
	if err != nil {
		return nil, checkpointError(path, "weight_map: %v", err)
	}
	if len(wm) == 0 {
		return nil, checkpointError(path, "weight_map is empty")
	}
	for name, file := range wm {
		if name == "" {
			return nil, checkpointError(path, "weight_map has an empty tensor name")
		}
		if !plainFileName(file) {
			return nil, checkpointError(path, "tensor %q: shard %q is not a plain file name", name, file)
		}
	}
	return wm, nil
}

// plainFileName reports whether s names a file in the current folder: not
// empty, not "." or "..", no separators, no NUL.
func plainFileName(s string) bool {
	if s == "" || s == "." || s == ".." {
		return false
	}
	if strings.ContainsAny(s, "/\\\x00") || strings.ContainsRune(s, filepath.Separator) {
		return false
	}
	return filepath.Base(s) == s && !strings.Contains(s, "..")
}
