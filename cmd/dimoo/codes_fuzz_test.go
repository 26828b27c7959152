package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dimoo-dev/dimoo/dimoo"
)

// FuzzReadCodes: no codes file makes the reader panic; what it accepts is a
// full grid within the size limit, and writes back to the same grid.
func FuzzReadCodes(f *testing.F) {
	for _, s := range []string{"1,2,3\n4,5,6\n", "1, 2,3\n\n4,5,6 \n", "7\n", "", "\n\n", "1,2\n3\n", "1,x\n",
		"99999999999\n", "-1,-2\n", ",\n", "1,,2\n", strings.Repeat("5,", 300) + "5\n", "\xff\xfe1\n",
		"1\r\n2\r\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), "codes.txt")
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		codes, h, w, err := readCodes(path)
		if err != nil {
			if !errors.Is(err, dimoo.ErrInvalidArgument) {
				t.Fatalf("error does not wrap ErrInvalidArgument: %v", err)
			}
			return
		}
		if h < 1 || w < 1 || len(codes) != h*w || len(codes) > maxCodes {
			t.Fatalf("accepted %d codes as a %dx%d grid", len(codes), h, w)
		}
		out := filepath.Join(t.TempDir(), "out.txt")
		if err := writeCodes(out, codes, h, w, false); err != nil {
			t.Fatal(err)
		}
		again, h2, w2, err := readCodes(out)
		if err != nil || h2 != h || w2 != w || len(again) != len(codes) {
			t.Fatalf("round trip: %v, %dx%d", err, h2, w2)
		}
		for i := range codes {
			if again[i] != codes[i] {
				t.Fatalf("round trip changed code %d: %d -> %d", i, codes[i], again[i])
			}
		}
	})
}
