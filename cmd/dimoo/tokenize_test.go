package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimoo-dev/dimoo/dimoo"
)

var testTokenizer = filepath.Join("..", "..", "testdata", "tokenizer", "tokenizer.json")

func formatIDs(ids []int32) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = strconv.Itoa(int(id))
	}
	return strings.Join(s, ",")
}

func TestTokenizeCommand(t *testing.T) {
	tok, err := dimoo.LoadTokenizer(testTokenizer)
	require.NoError(t, err)
	for _, args := range [][]string{
		{"--tokenizer", testTokenizer, "hello<user>world, DON'T"},
		{"hello<user>world, DON'T", "--tokenizer", testTokenizer},               // flags after the text
		{"--tokenizer", filepath.Dir(testTokenizer), "hello<user>world, DON'T"}, // a folder
	} {
		var out bytes.Buffer
		require.NoError(t, cmdTokenize(args, &out), "%q", args)
		assert.Equal(t, formatIDs(tok.Encode("hello<user>world, DON'T"))+"\n", out.String())
	}

	// Text that looks like a flag goes after --; empty text is fine.
	var out bytes.Buffer
	require.NoError(t, cmdTokenize([]string{"--tokenizer", testTokenizer, "--", "-5 apples"}, &out))
	assert.Equal(t, formatIDs(tok.Encode("-5 apples"))+"\n", out.String())
	out.Reset()
	require.NoError(t, cmdTokenize([]string{"--tokenizer", testTokenizer, ""}, &out))
	assert.Equal(t, formatIDs(tok.Encode(""))+"\n", out.String())

	for _, args := range [][]string{
		{"hello"},                      // no --tokenizer
		{"--tokenizer", testTokenizer}, // no text
		{"--tokenizer", testTokenizer, "a", "b"},
		{"--tokenizer", testTokenizer, "--bogus", "a"},
	} {
		assert.ErrorIs(t, cmdTokenize(args, &out), errUsage, "%q", args)
	}
	err = cmdTokenize([]string{"--tokenizer", filepath.Join(t.TempDir(), "none.json"), "a"}, &out)
	assert.ErrorIs(t, err, dimoo.ErrBadCheckpoint)
}

func TestTokenizeDetokenizeCommand(t *testing.T) {
	tok, err := dimoo.LoadTokenizer(testTokenizer)
	require.NoError(t, err)
	text := "<system>Be brief.</system><user>Draw a cat 🐱\nplease</user>"
	ids := formatIDs(tok.Encode(text))

	var out bytes.Buffer
	require.NoError(t, cmdDetokenize([]string{"--tokenizer", testTokenizer, ids}, &out))
	assert.Equal(t, "<|startoftext|>"+text+"\n", out.String())

	out.Reset()
	require.NoError(t, cmdDetokenize([]string{ids, "--skip-special", "--tokenizer", testTokenizer}, &out))
	assert.Equal(t, "Be brief.Draw a cat 🐱\nplease\n", out.String())

	// Ids may be split over several arguments.
	parts := strings.SplitN(ids, ",", 3)
	out.Reset()
	require.NoError(t, cmdDetokenize(append([]string{"--tokenizer", testTokenizer}, parts...), &out))
	assert.Equal(t, "<|startoftext|>"+text+"\n", out.String())

	for _, args := range [][]string{
		{"5,17"},                       // no --tokenizer
		{"--tokenizer", testTokenizer}, // no ids
		{"--tokenizer", testTokenizer, "5,x"},
	} {
		assert.ErrorIs(t, cmdDetokenize(args, &out), errUsage, "%q", args)
	}
	err = cmdDetokenize([]string{"--tokenizer", testTokenizer, "5," + strconv.Itoa(tok.VocabSize())}, &out)
	assert.ErrorIs(t, err, dimoo.ErrInvalidArgument)

	bad := filepath.Join(t.TempDir(), "tokenizer.json")
	require.NoError(t, os.WriteFile(bad, []byte("{"), 0o644))
	err = cmdDetokenize([]string{"--tokenizer", bad, "5"}, &out)
	assert.ErrorIs(t, err, dimoo.ErrBadCheckpoint)
}
