package dimoo

// NumPy .npy files: writing float32 arrays and reading the float32/float64
// arrays of the golden test data.
//
// A .npy file is the magic "\x93NUMPY", a major and minor version byte, the
// header length (uint16 little-endian in version 1, uint32 in versions 2 and
// 3), the header (a Python dict literal with 'descr', 'fortran_order' and
// 'shape', padded with spaces and ending in '\n'), then the raw data.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
)

const npyMagic = "\x93NUMPY"

// WriteNpy writes data as a C-order '<f4' array of the given shape, in .npy
// format version 1.0, with the header padded so the data starts at a
// multiple of 64 bytes. An empty shape is a scalar (one element).
func WriteNpy(w io.Writer, data []float32, shape []int) error {
	n := 1
	for _, d := range shape {
		if d < 0 {
			return fmt.Errorf("%w: npy shape %v has a negative dimension", ErrInvalidArgument, shape)
		}
		if d != 0 && n > math.MaxInt/d {
			return fmt.Errorf("%w: npy shape %v overflows", ErrInvalidArgument, shape)
		}
		n *= d
	}
	if n != len(data) {
		return fmt.Errorf("%w: npy shape %v holds %d elements but data has %d", ErrInvalidArgument, shape, n, len(data))
	}

	var dims strings.Builder
	dims.WriteByte('(')
	for i, d := range shape {
		if i > 0 {
			dims.WriteString(", ")
		}
		dims.WriteString(strconv.Itoa(d))
	}
	if len(shape) == 1 {
		dims.WriteByte(',')
	}
	dims.WriteByte(')')
	dict := fmt.Sprintf("{'descr': '<f4', 'fortran_order': False, 'shape': %s, }", dims.String())

	// magic(6) + version(2) + length(2) + dict + padding + '\n' = k*64
	const prefix = 10
	total := (prefix + len(dict) + 1 + 63) / 64 * 64
	hlen := total - prefix
	if hlen > math.MaxUint16 {
		return fmt.Errorf("%w: npy shape %v: header too long for format 1.0", ErrInvalidArgument, shape)
	}
	head := make([]byte, 0, total)
	head = append(head, npyMagic...)
	head = append(head, 1, 0)
	head = binary.LittleEndian.AppendUint16(head, uint16(hlen))
	head = append(head, dict...)
	for len(head) < total-1 {
		head = append(head, ' ')
	}
	head = append(head, '\n')
	if _, err := w.Write(head); err != nil {
		return err
	}

	buf := make([]byte, 0, 64<<10)
	for i, v := range data {
		buf = binary.LittleEndian.AppendUint32(buf, math.Float32bits(v))
		if len(buf) == cap(buf) || i == len(data)-1 {
			if _, err := w.Write(buf); err != nil {
				return err
			}
			buf = buf[:0]
		}
	}
	return nil
}

// WriteNpyFile writes data to path with WriteNpy.
func WriteNpyFile(path string, data []float32, shape []int) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	bw := bufio.NewWriter(f)
	err = WriteNpy(bw, data, shape)
	if err == nil {
		err = bw.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// ReadNpyFile reads a C-order '<f4' or '<f8' array (format versions 1.0,
// 2.0 and 3.0) and returns its values widened to float64 and its shape
// (empty for a scalar). Other dtypes and Fortran order are errors wrapping
// ErrUnsupported; a malformed file is an error naming the path.
func ReadNpyFile(path string) (data []float64, shape []int, err error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	data, shape, err = parseNpy(raw)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	return data, shape, nil
}

func parseNpy(raw []byte) ([]float64, []int, error) {
	if len(raw) < 10 || string(raw[:6]) != npyMagic {
		return nil, nil, errors.New("not a .npy file (bad magic)")
	}
	major, minor := raw[6], raw[7]
	var hlen, start int
	switch major {
	case 1:
		hlen, start = int(binary.LittleEndian.Uint16(raw[8:10])), 10
	case 2, 3:
		if len(raw) < 12 {
			return nil, nil, errors.New("truncated .npy header")
		}
		h := binary.LittleEndian.Uint32(raw[8:12])
		if int64(h) > int64(len(raw)) {
			return nil, nil, fmt.Errorf("npy header length %d exceeds the file", h)
		}
		hlen, start = int(h), 12
	default:
		return nil, nil, fmt.Errorf("%w: npy format version %d.%d", ErrUnsupported, major, minor)
	}
	if start+hlen > len(raw) {
		return nil, nil, fmt.Errorf("npy header length %d exceeds the file", hlen)
	}
	header, body := raw[start:start+hlen], raw[start+hlen:]

	dict, err := parsePyDict(string(header))
	if err != nil {
		return nil, nil, fmt.Errorf("npy header %q: %v", clip(header), err)
	}
	descr, ok := dict["descr"].(string)
	if !ok {
		return nil, nil, errors.New("npy header has no string 'descr'")
	}
	fortran, ok := dict["fortran_order"].(bool)
	if !ok {
		return nil, nil, errors.New("npy header has no boolean 'fortran_order'")
	}
	shape, ok := dict["shape"].([]int)
	if !ok {
		return nil, nil, errors.New("npy header has no tuple 'shape'")
	}
	var size int
	switch descr {
	case "<f4":
		size = 4
	case "<f8":
		size = 8
	default:
		return nil, nil, fmt.Errorf("%w: npy dtype '%s' (only '<f4' and '<f8' are read)", ErrUnsupported, descr)
	}
	if fortran {
		return nil, nil, fmt.Errorf("%w: npy array in Fortran order", ErrUnsupported)
	}
	n := 1
	for _, d := range shape {
		if d != 0 && n > len(body)/d {
			return nil, nil, fmt.Errorf("npy shape %v needs more than the %d data bytes", shape, len(body))
		}
		n *= d
	}
	if n*size != len(body) {
		return nil, nil, fmt.Errorf("npy shape %v of %s needs %d data bytes, file has %d", shape, descr, n*size, len(body))
	}
	data := make([]float64, n)
	for i := range data {
		if size == 4 {
			data[i] = float64(math.Float32frombits(binary.LittleEndian.Uint32(body[4*i:])))
		} else {
			data[i] = math.Float64frombits(binary.LittleEndian.Uint64(body[8*i:]))
		}
	}
	return data, shape, nil
}

// parsePyDict parses the Python dict literal of a .npy header. Keys are
// strings; values are strings, True/False, or tuples of non-negative ints
// (returned as string, bool and []int).
func parsePyDict(s string) (map[string]any, error) {
	p := pyParser{s: strings.TrimRight(s, " \t\r\n\x00")}
	p.skip()
	if !p.eat('{') {
		return nil, errors.New("not a dict")
	}
	out := map[string]any{}
	for {
		p.skip()
		if p.eat('}') {
			break
		}
		key, err := p.str()
		if err != nil {
			return nil, err
		}
		p.skip()
		if !p.eat(':') {
			return nil, fmt.Errorf("no ':' after key %q", key)
		}
		p.skip()
		val, err := p.value()
		if err != nil {
			return nil, fmt.Errorf("key %q: %v", key, err)
		}
		if _, dup := out[key]; dup {
			return nil, fmt.Errorf("key %q appears twice", key)
		}
		out[key] = val
		p.skip()
		if p.eat(',') {
			continue
		}
		p.skip()
		if !p.eat('}') {
			return nil, errors.New("expected ',' or '}'")
		}
		break
	}
	p.skip()
	if p.i != len(p.s) {
		return nil, errors.New("trailing text after the dict")
	}
	return out, nil
}

type pyParser struct {
	s string
	i int
}

func (p *pyParser) skip() {
	for p.i < len(p.s) && strings.IndexByte(" \t\r\n", p.s[p.i]) >= 0 {
		p.i++
	}
}

func (p *pyParser) eat(c byte) bool {
	if p.i < len(p.s) && p.s[p.i] == c {
		p.i++
		return true
	}
	return false
}

// str parses a quoted string without escapes (npy headers need none).
func (p *pyParser) str() (string, error) {
	if p.i >= len(p.s) || (p.s[p.i] != '\'' && p.s[p.i] != '"') {
		return "", errors.New("expected a quoted string")
	}
	q := p.s[p.i]
	end := strings.IndexByte(p.s[p.i+1:], q)
	if end < 0 {
		return "", errors.New("unterminated string")
	}
	v := p.s[p.i+1 : p.i+1+end]
	if strings.IndexByte(v, '\\') >= 0 {
		return "", errors.New("escapes in strings are not supported")
	}
	p.i += end + 2
	return v, nil
}

func (p *pyParser) value() (any, error) {
	switch {
	case strings.HasPrefix(p.s[p.i:], "True"):
		p.i += 4
		return true, nil
	case strings.HasPrefix(p.s[p.i:], "False"):
		p.i += 5
		return false, nil
	case p.eat('('):
		dims := []int{}
		for {
			p.skip()
			if p.eat(')') {
				return dims, nil
			}
			j := p.i
			for p.i < len(p.s) && p.s[p.i] >= '0' && p.s[p.i] <= '9' {
				p.i++
			}
			d, err := strconv.Atoi(p.s[j:p.i])
			if err != nil {
				return nil, fmt.Errorf("bad shape entry %q", p.s[j:min(p.i+1, len(p.s))])
			}
			p.eat('L') // Python 2 long
			dims = append(dims, d)
			p.skip()
			if p.eat(',') {
				continue
			}
			p.skip()
			if !p.eat(')') {
				return nil, errors.New("expected ',' or ')' in the shape")
			}
			return dims, nil
		}
	}
	return p.str()
}
