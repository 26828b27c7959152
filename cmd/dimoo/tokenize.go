package main

// dimoo tokenize   --tokenizer FILE TEXT
// dimoo detokenize --tokenizer FILE [--skip-special] IDS

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/dimoo-dev/dimoo/dimoo"
)

// cmdTokenize prints the ids of TEXT, comma-separated, on one line.
func cmdTokenize(args []string, w io.Writer) error {
	fs := flag.NewFlagSet("tokenize", flag.ContinueOnError)
	path := fs.String("tokenizer", "", "tokenizer.json, or a checkpoint folder holding one")
	pos, err := parseFlagsAndArgs(fs, args)
	if err != nil {
		return err
	}
	if *path == "" {
		return fmt.Errorf("%w: --tokenizer is required", errUsage)
	}
	if len(pos) != 1 {
		return fmt.Errorf("%w: tokenize takes one TEXT argument (quote it; put -- before text starting with -), got %d",
			errUsage, len(pos))
	}
	tok, err := loadTokenizerArg(*path)
	if err != nil {
		return err
	}
	ids := tok.Encode(pos[0])
	var b strings.Builder
	for i, id := range ids {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.Itoa(int(id)))
	}
	b.WriteByte('\n')
	_, err = io.WriteString(w, b.String())
	return err
}

// cmdDetokenize prints the text of comma-separated ids (one or more
// arguments).
func cmdDetokenize(args []string, w io.Writer) error {
	fs := flag.NewFlagSet("detokenize", flag.ContinueOnError)
	path := fs.String("tokenizer", "", "tokenizer.json, or a checkpoint folder holding one")
	skip := fs.Bool("skip-special", false, "leave out special tokens")
	pos, err := parseFlagsAndArgs(fs, args)
	if err != nil {
		return err
	}
	if *path == "" {
		return fmt.Errorf("%w: --tokenizer is required", errUsage)
	}
	if len(pos) == 0 {
		return fmt.Errorf("%w: detokenize takes token ids, e.g. 5,17,3", errUsage)
	}
	var ids []int32
	for _, p := range pos {
		if strings.TrimSpace(p) == "" {
			continue
		}
		v, err := parseInts(p, "IDS")
		if err != nil {
			return err
		}
		ids = append(ids, v...)
	}
	tok, err := loadTokenizerArg(*path)
	if err != nil {
		return err
	}
	text, err := tok.Decode(ids, *skip)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, text)
	return err
}

// parseFlagsAndArgs parses flags that may come before, between or after the
// positional arguments, which it returns. Everything after "--" is
// positional.
func parseFlagsAndArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	fs.SetOutput(io.Discard)
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if isHelp(err) {
				return nil, &helpShown{helpText(fs)}
			}
			return nil, fmt.Errorf("%w: %v", errUsage, err)
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// loadTokenizerArg loads --tokenizer: a tokenizer.json file, or a folder
// with one.
func loadTokenizerArg(path string) (*dimoo.Tokenizer, error) {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		path = filepath.Join(path, "tokenizer.json")
	}
	return dimoo.LoadTokenizer(path)
}
