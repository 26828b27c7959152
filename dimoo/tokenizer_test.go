package dimoo

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/text/unicode/norm"
)

// The files come from scripts/gen_tokenizer_testdata.py, which records what
// the Hugging Face `tokenizers` library makes of each case.
var tokenizerDir = filepath.Join("..", "testdata", "tokenizer")

type tokenizerCase struct {
	Text    string  `json:"text"`
	IDs     []int32 `json:"ids"`
	Norm    *string `json:"norm"`    // the normalized text, where it differs
	Skip    *string `json:"skip"`    // decoding without special tokens, where it differs from the text
	Decoded *string `json:"decoded"` // plain decoding, where it is not prefix + text
}

func loadTokenizerCases(t testing.TB, name string) []tokenizerCase {
	t.Helper()
	f, err := os.Open(filepath.Join(tokenizerDir, name))
	require.NoError(t, err)
	defer f.Close()
	var cases []tokenizerCase
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	for sc.Scan() {
		var c tokenizerCase
		require.NoError(t, json.Unmarshal(sc.Bytes(), &c), "line %d of %s", len(cases)+1, name)
		cases = append(cases, c)
	}
	require.NoError(t, sc.Err())
	return cases
}

func loadTestTokenizer(t testing.TB, name string) *Tokenizer {
	t.Helper()
	tok, err := LoadTokenizer(filepath.Join(tokenizerDir, name))
	require.NoError(t, err)
	return tok
}

// Every case encodes to the library's ids and decodes back to the text (the
// normalized text, after the post-processor's BOS), and skipping special
// tokens drops them.
func TestTokenizerMatchesReference(t *testing.T) {
	for _, tc := range []struct {
		json, cases, prefix string
		minCases            int
	}{
		{"tokenizer.json", "cases.jsonl", "<|startoftext|>", 10000},
		{"gpt2-style.json", "gpt2-cases.jsonl", "", 10000},
		{"gpt2-prefix.json", "gpt2-prefix-cases.jsonl", "", 1000},
	} {
		t.Run(tc.json, func(t *testing.T) {
			tok := loadTestTokenizer(t, tc.json)
			cases := loadTokenizerCases(t, tc.cases)
			require.GreaterOrEqual(t, len(cases), tc.minCases)
			start := time.Now()
			bad := 0
			for i, c := range cases {
				got := tok.Encode(c.Text)
				if !assert.Equal(t, c.IDs, got, "case %d: encode %q", i, c.Text) {
					if bad++; bad >= 10 {
						t.Fatal("too many mismatches")
					}
					continue
				}
				text := c.Text
				if c.Norm != nil {
					text = *c.Norm
				}
				want := tc.prefix + text
				if c.Decoded != nil {
					want = *c.Decoded
				}
				dec, err := tok.Decode(got, false)
				require.NoError(t, err)
				if !assert.Equal(t, want, dec, "case %d: decode %q", i, c.Text) {
					bad++
				}
				want = text
				if c.Skip != nil {
					want = *c.Skip
				}
				dec, err = tok.Decode(got, true)
				require.NoError(t, err)
				if !assert.Equal(t, want, dec, "case %d: decode %q skipping special tokens", i, c.Text) {
					bad++
				}
				if bad >= 10 {
					t.Fatal("too many mismatches")
				}
			}
			t.Logf("%d cases in %v", len(cases), time.Since(start))
		})
	}
}

// An exact round trip on the Llama-style tokenizer (no normalizer), BOS aside.
func TestTokenizerRoundTrip(t *testing.T) {
	tok := loadTestTokenizer(t, "tokenizer.json")
	bos, ok := tok.TokenID("<|startoftext|>")
	require.True(t, ok)
	for _, s := range []string{"", " ", "hello<user>world", "a\r\n\r\n b", "DON'T 'ſ", "日本語 😀👍🏽",
		"\x00\x01\x7f", "<img><img><img>", "<user", "  trailing  "} {
		ids := tok.Encode(s)
		require.NotEmpty(t, ids)
		assert.Equal(t, bos, ids[0])
		got, err := tok.Decode(ids[1:], false)
		require.NoError(t, err)
		assert.Equal(t, s, got)
	}
	// Invalid UTF-8 does not break anything: the bytes come back, made
	// valid the way Rust's from_utf8_lossy does.
	for _, s := range []string{"\xff", "a\xe2\x82b", "\xed\xa0\x80", "x\xf0\x9f\x98"} {
		ids := tok.Encode(s)
		got, err := tok.Decode(ids[1:], false)
		require.NoError(t, err)
		assert.Equal(t, lossyUTF8([]byte(s)), got)
	}
}

func TestTokenizerLossyUTF8(t *testing.T) {
	for in, want := range map[string]string{
		"abc":              "abc",
		"\xe2\x82":         "\ufffd",
		"\xe2\x82x":        "\ufffdx",
		"\xf0\x80":         "\ufffd\ufffd",
		"\xed\xa0\x80":     "\ufffd\ufffd\ufffd",
		"\xf0\x9f\x98":     "\ufffd",
		"\xf0\x9f\x98\x80": "😀",
		"\xc0\xaf":         "\ufffd\ufffd",
		"\xf4\x90\x80\x80": "\ufffd\ufffd\ufffd\ufffd",
		"\xff\xfe":         "\ufffd\ufffd",
	} {
		assert.Equal(t, want, lossyUTF8([]byte(in)), "%q", in)
	}
}

func TestTokenizerSpecialTokens(t *testing.T) {
	tok := loadTestTokenizer(t, "tokenizer.json")
	user, ok := tok.TokenID("<user>")
	require.True(t, ok)
	mask, ok := tok.TokenID("<|mdm_mask|>")
	require.True(t, ok)
	assert.True(t, tok.IsSpecial(user))
	think, ok := tok.TokenID("<think>")
	require.True(t, ok)
	assert.False(t, tok.IsSpecial(think))

	ids := tok.Encode("hello<user>world<|mdm_mask|><|mdm_mask|><think>")
	assert.Contains(t, ids, user)
	n := 0
	for _, id := range ids {
		if id == mask {
			n++
		}
	}
	assert.Equal(t, 2, n)
	s, err := tok.Decode(ids, true)
	require.NoError(t, err)
	assert.Equal(t, "helloworld<think>", s)
	s, err = tok.Decode(ids, false)
	require.NoError(t, err)
	assert.Equal(t, "<|startoftext|>hello<user>world<|mdm_mask|><|mdm_mask|><think>", s)

	// Leftmost-longest: "<img><img>" is one token, then "<img>".
	two, _ := tok.TokenID("<img><img>")
	one, _ := tok.TokenID("<img>")
	assert.Equal(t, []int32{ids[0], two, one}, tok.Encode("<img><img><img>"))

	// Vocabulary lookups.
	id, ok := tok.TokenID("Ġ")
	require.True(t, ok)
	str, ok := tok.Token(id)
	assert.True(t, ok)
	assert.Equal(t, "Ġ", str)
	_, ok = tok.TokenID("no such token")
	assert.False(t, ok)
	eot, _ := tok.TokenID("<|endoftext|>")
	assert.Greater(t, tok.VocabSize(), int(eot))
	assert.Greater(t, tok.VocabSize(), 3000)
}

func TestTokenizerDecodeOutOfRange(t *testing.T) {
	tok := loadTestTokenizer(t, "tokenizer.json")
	for _, id := range []int32{-1, int32(tok.VocabSize()), 1 << 30} {
		_, err := tok.Decode([]int32{5, id}, false)
		assert.ErrorIs(t, err, ErrInvalidArgument, "id %d", id)
		assert.ErrorContains(t, err, fmt.Sprint(id))
	}
	s, err := tok.Decode(nil, false)
	require.NoError(t, err)
	assert.Equal(t, "", s)
}

// tokenizerJSON returns the Llama-style test tokenizer as a map to edit.
func tokenizerJSON(t *testing.T) map[string]any {
	data, err := os.ReadFile(filepath.Join(tokenizerDir, "tokenizer.json"))
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(data, &m))
	return m
}

func TestTokenizerErrors(t *testing.T) {
	_, err := LoadTokenizer(filepath.Join(t.TempDir(), "missing.json"))
	assert.ErrorIs(t, err, ErrBadCheckpoint)

	path := filepath.Join(t.TempDir(), "tokenizer.json")
	require.NoError(t, os.WriteFile(path, []byte(`{"model": {`), 0o644))
	_, err = LoadTokenizer(path)
	assert.ErrorIs(t, err, ErrBadCheckpoint)
	assert.ErrorContains(t, err, path)
	assert.ErrorContains(t, err, "malformed JSON")

	edit := func(f func(m map[string]any)) error {
		m := tokenizerJSON(t)
		f(m)
		data, err := json.Marshal(m)
		require.NoError(t, err)
		_, err = ParseTokenizer(data)
		return err
	}
	model := func(m map[string]any) map[string]any { return m["model"].(map[string]any) }
	pre := func(m map[string]any) map[string]any {
		return m["pre_tokenizer"].(map[string]any)["pretokenizers"].([]any)[0].(map[string]any)
	}
	for _, tc := range []struct {
		name     string
		edit     func(m map[string]any)
		sentinel error
		msg      string
	}{
		{"no model", func(m map[string]any) { delete(m, "model") }, ErrBadCheckpoint, `no "model"`},
		{"null model", func(m map[string]any) { m["model"] = nil }, ErrBadCheckpoint, `no "model"`},
		{"unigram", func(m map[string]any) {
			m["model"] = map[string]any{"type": "Unigram", "vocab": []any{[]any{"a", -1.0}}}
		}, ErrUnsupported, `"Unigram"`},
		{"wordpiece", func(m map[string]any) { model(m)["type"] = "WordPiece" }, ErrUnsupported, `"WordPiece"`},
		{"no vocab", func(m map[string]any) { delete(model(m), "vocab") }, ErrBadCheckpoint, "vocab"},
		{"negative id", func(m map[string]any) { model(m)["vocab"].(map[string]any)["Ġ"] = -3 }, ErrBadCheckpoint, "-3"},
		{"shared id", func(m map[string]any) { model(m)["vocab"].(map[string]any)["zzz"] = 5 }, ErrBadCheckpoint, "share id 5"},
		{"merge not in vocab", func(m map[string]any) {
			model(m)["merges"] = append(model(m)["merges"].([]any), []any{"Ġ", "nosuch"})
		}, ErrBadCheckpoint, "nosuch"},
		{"merge result not in vocab", func(m map[string]any) {
			model(m)["merges"] = append(model(m)["merges"].([]any), []any{"q", "q"})
		}, ErrBadCheckpoint, `"qq"`},
		{"bad merge string", func(m map[string]any) { model(m)["merges"] = []any{"a b c"} }, ErrBadCheckpoint, "a b c"},
		{"bad merges", func(m map[string]any) { model(m)["merges"] = 7 }, ErrBadCheckpoint, "merges"},
		{"dropout", func(m map[string]any) { model(m)["dropout"] = 0.1 }, ErrUnsupported, "dropout"},
		{"regex", func(m map[string]any) { pre(m)["pattern"] = map[string]any{"Regex": `\w+|\s+`} },
			ErrUnsupported, `"\\w+|\\s+"`},
		{"string pattern", func(m map[string]any) { pre(m)["pattern"] = map[string]any{"String": " "} },
			ErrUnsupported, `Split on the string " "`},
		{"behavior", func(m map[string]any) { pre(m)["behavior"] = "Removed" }, ErrUnsupported, "Removed"},
		{"pre-tokenizer type", func(m map[string]any) { m["pre_tokenizer"] = map[string]any{"type": "Metaspace"} },
			ErrUnsupported, "Metaspace"},
		{"split after byte level", func(m map[string]any) {
			p := m["pre_tokenizer"].(map[string]any)
			l := p["pretokenizers"].([]any)
			p["pretokenizers"] = []any{l[1], l[0]}
		}, ErrUnsupported, "after ByteLevel"},
		{"normalizer", func(m map[string]any) { m["normalizer"] = map[string]any{"type": "Lowercase"} },
			ErrUnsupported, "Lowercase"},
		{"decoder", func(m map[string]any) { m["decoder"] = map[string]any{"type": "WordPiece"} },
			ErrUnsupported, "WordPiece"},
		{"post-processor", func(m map[string]any) { m["post_processor"] = map[string]any{"type": "Nope"} },
			ErrUnsupported, "Nope"},
		{"template id", func(m map[string]any) {
			seq := m["post_processor"].(map[string]any)["processors"].([]any)
			st := seq[1].(map[string]any)["special_tokens"].(map[string]any)["<|startoftext|>"].(map[string]any)
			st["ids"] = []any{999999}
		}, ErrBadCheckpoint, "999999"},
		{"added token without content", func(m map[string]any) {
			delete(m["added_tokens"].([]any)[0].(map[string]any), "content")
		}, ErrBadCheckpoint, "content"},
		{"padding", func(m map[string]any) {
			m["padding"] = map[string]any{"strategy": map[string]any{"Fixed": 16}}
		}, ErrUnsupported, "padding"},
	} {
		err := edit(tc.edit)
		if assert.Error(t, err, tc.name) {
			assert.ErrorIs(t, err, tc.sentinel, tc.name)
			assert.ErrorContains(t, err, tc.msg, tc.name)
			assert.ErrorContains(t, err, "tokenizer.json", tc.name)
		}
	}
	// The reference file itself parses.
	require.NoError(t, edit(func(map[string]any) {}))
}

// Options the test files do not exercise, checked against hand-made
// tokenizers.
func TestTokenizerSmallModels(t *testing.T) {
	// A char-level BPE without a pre-tokenizer or decoder; unknown
	// characters become <unk> (fused), byte fallback where possible.
	data := `{"model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": true,
		"vocab": {"<unk>": 0, "a": 1, "b": 2, "ab": 3, "abb": 4, "<0x21>": 5},
		"merges": [["a", "b"], ["ab", "b"]]}}`
	tok, err := ParseTokenizer([]byte(data))
	require.NoError(t, err)
	assert.Equal(t, []int32{4, 3, 0, 1}, tok.Encode("abbabxya"))
	s, err := tok.Decode([]int32{4, 3}, false)
	require.NoError(t, err)
	assert.Equal(t, "abb ab", s)

	data = strings.Replace(data, `"fuse_unk": true`, `"fuse_unk": false, "byte_fallback": true`, 1)
	tok, err = ParseTokenizer([]byte(data))
	require.NoError(t, err)
	assert.Equal(t, []int32{1, 5, 0, 0, 2}, tok.Encode("a!xyb"))

	// Subword prefix and suffix.
	tok, err = ParseTokenizer([]byte(`{"model": {"type": "BPE", "continuing_subword_prefix": "##",
		"vocab": {"<unk>": 0, "a": 1, "##b": 2, "ab": 3, "##a": 4, "b": 5}, "merges": [["a", "##b"]]}}`))
	require.NoError(t, err)
	assert.Equal(t, []int32{3, 4, 2}, tok.Encode("abab"))
	assert.Equal(t, []int32{5, 4}, tok.Encode("ba"))
	tok, err = ParseTokenizer([]byte(`{"model": {"type": "BPE", "end_of_word_suffix": "</w>",
		"vocab": {"<unk>": 0, "a": 1, "b</w>": 2, "ab</w>": 3, "b": 4, "a</w>": 5}, "merges": ["a b</w>"]}}`))
	require.NoError(t, err)
	assert.Equal(t, []int32{3}, tok.Encode("ab"))
	assert.Equal(t, []int32{4, 5}, tok.Encode("ba"))

	// Truncation (left) keeps room for the template's tokens; Roberta
	// processing adds <s> and </s>.
	data = `{"truncation": {"max_length": 4, "direction": "Left"},
		"model": {"type": "BPE", "vocab": {"<s>": 0, "</s>": 1, "a": 2, "b": 3}, "merges": []},
		"post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 1], "cls": ["<s>", 0]}}`
	tok, err = ParseTokenizer([]byte(data))
	require.NoError(t, err)
	assert.Equal(t, []int32{0, 2, 3, 1}, tok.Encode("aab"))
	assert.Equal(t, []int32{0, 2, 1}, tok.Encode("a"))

	// A Qwen2-style split (single digits) and a ByteLevel without regex.
	m := tokenizerJSON(t)
	p := m["pre_tokenizer"].(map[string]any)["pretokenizers"].([]any)[0].(map[string]any)
	p["pattern"] = map[string]any{"Regex": qwen2Pattern}
	buf, err := json.Marshal(m)
	require.NoError(t, err)
	tok, err = ParseTokenizer(buf)
	require.NoError(t, err)
	one, _ := tok.TokenID("1")
	two, _ := tok.TokenID("2")
	three, _ := tok.TokenID("3")
	assert.Equal(t, []int32{one, two, three}, tok.Encode("123")[1:])
}

// The pre-tokenizers split the way the regexes match.
func TestTokenizerSplitPatterns(t *testing.T) {
	split := func(s string, next func(string, int) int) []string {
		var out []string
		for i := 0; i < len(s); {
			j := next(s, i)
			out = append(out, s[i:j])
			i = j
		}
		return out
	}
	llama := func(s string, i int) int { return nextLlama3(s, i, 3) }
	assert.Equal(t, []string{"Hello", " world", "'s", " ", "123", "4", "!!!\n\n", "abc"},
		split("Hello world's 1234!!!\n\nabc", llama))
	assert.Equal(t, []string{"DON", "'T", " I", "'M", " we", "'ſ"}, split("DON'T I'M we'ſ", llama))
	assert.Equal(t, []string{"  \n", " ", " hello"}, split("  \n  hello", llama))
	assert.Equal(t, []string{"a", "  ", " b", "   "}, split("a   b   ", llama))
	assert.Equal(t, []string{"\thello", "(", "\u3000x", "\n", "x"}, split("\thello(\u3000x\nx", llama))
	assert.Equal(t, []string{"Hello", " world", "'s", " 1234", "!!!", "\n", "\n", "abc"},
		split("Hello world's 1234!!!\n\nabc", nextGPT2))
	assert.Equal(t, []string{"DON", "'", "T", " we", "'s"}, split("DON'T we's", nextGPT2))
	assert.Equal(t, []string{"a", "  ", " b", "   "}, split("a   b   ", nextGPT2))
}

// mergeSmall and mergeLarge agree (both merge lowest rank, leftmost first).
func TestTokenizerMergeVariantsAgree(t *testing.T) {
	tok := loadTestTokenizer(t, "tokenizer.json")
	rng := rand.New(rand.NewPCG(1, 2))
	for n := 0; n < 3000; n++ {
		l := 2 + rng.IntN(47)
		syms := make([]int32, l)
		for i := range syms {
			if rng.IntN(3) == 0 {
				syms[i] = tok.bpe.byteIDs[" etaoinshr"[rng.IntN(10)]]
			} else {
				syms[i] = tok.bpe.byteIDs[byte(rng.IntN(256))]
			}
		}
		a := tok.bpe.mergeSmall(append([]int32(nil), syms...))
		b := tok.bpe.mergeLarge(append([]int32(nil), syms...))
		require.Equal(t, a, b, "symbols %v", syms)
	}
}

// Encode is safe to call from several goroutines.
func TestTokenizerConcurrent(t *testing.T) {
	tok := loadTestTokenizer(t, "tokenizer.json")
	cases := loadTokenizerCases(t, "cases.jsonl")
	var wg sync.WaitGroup
	errs := make(chan string, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := g; i < len(cases); i += 8 {
				if got := tok.Encode(cases[i].Text); !assert.ObjectsAreEqual(cases[i].IDs, got) {
					errs <- fmt.Sprintf("case %d differs", i)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

func BenchmarkTokenizerEncode(b *testing.B) {
	tok := loadTestTokenizer(b, "tokenizer.json")
	cases := loadTokenizerCases(b, "cases.jsonl")
	n := 0
	for _, c := range cases {
		n += len(c.Text)
	}
	b.SetBytes(int64(n))
	b.ResetTimer()
	for b.Loop() {
		for _, c := range cases {
			tok.Encode(c.Text)
		}
	}
	b.ReportMetric(float64(len(cases))*float64(b.N)/b.Elapsed().Seconds(), "strings/s")
}

// The round trip above on any input: the Llama-style tokenizer (byte
// fallback, no normalizer) gives back every string, invalid UTF-8 made
// valid; the GPT-2-style one (byte-level) every valid one. Ids stay in the
// vocabulary. `make fuzz` runs it longer.
func FuzzTokenizerRoundTrip(f *testing.F) {
	llama := loadTestTokenizer(f, "tokenizer.json")
	gpt2 := loadTestTokenizer(f, "gpt2-style.json")
	bos, ok := llama.TokenID("<|startoftext|>")
	require.True(f, ok)
	for _, s := range []string{"", "a red circle", "hello<user>world", "a\r\n\r\n b", "日本語 😀👍🏽",
		"\x00\x01\x7f", "<img><img>", "x\xf0\x9f\x98", "  trailing  ", "DON'T 'ſ", "\u0301e\u200d"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ids := llama.Encode(s)
		if len(ids) == 0 || ids[0] != bos {
			t.Fatalf("%q: no BOS first: %v", s, ids)
		}
		for _, tk := range [](*Tokenizer){llama, gpt2} {
			got := tk.Encode(s)
			for _, id := range got {
				if id < 0 || int(id) >= tk.VocabSize() {
					t.Fatalf("%q: id %d outside the vocabulary of %d", s, id, tk.VocabSize())
				}
			}
		}
		got, err := llama.Decode(ids[1:], false)
		if err != nil {
			t.Fatalf("%q: %v", s, err)
		}
		if want := lossyUTF8([]byte(s)); got != want {
			t.Fatalf("llama-style: %q came back as %q", want, got)
		}
		if utf8.ValidString(s) {
			got, err := gpt2.Decode(gpt2.Encode(s), false)
			if err != nil {
				t.Fatalf("%q: %v", s, err)
			}
			if want := norm.NFC.String(s); got != want {
				t.Fatalf("gpt2-style: %q (NFC) came back as %q", want, got)
			}
		}
	})
}
