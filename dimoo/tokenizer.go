package dimoo

// A native reader and runner for Hugging Face tokenizer.json files of the
// byte-level BPE kind (GPT-2, Llama-3, LLaDA / Lumina-DiMOO).
//
// The pipeline follows the `tokenizers` library step by step, so that ids
// come out identical:
//
//  1. added tokens that are matched on the raw text (normalized: false, the
//     usual case for special tokens) are cut out, leftmost-longest;
//  2. every remaining piece is normalized (null, NFC, NFD, NFKC, NFKD) and
//     the added tokens matched on normalized text are cut out the same way;
//  3. the pre-tokenizer splits each piece: a Split with one of the known
//     regexes, ByteLevel (with or without the GPT-2 regex and a prefix
//     space), or a Sequence of them;
//  4. the BPE model merges each word by rank, over byte-level symbols;
//  5. the post-processor (TemplateProcessing, Roberta/Bert, ByteLevel,
//     Sequence) adds BOS/EOS ids.
//
// The split regexes of these tokenizers rely on look-ahead and Unicode
// classes that Go's regexp lacks, so each supported pattern is implemented
// by hand below; a tokenizer.json with any other pattern is refused.
//
// Anything else the file may hold and this code does not implement (other
// models, normalizers, pre-tokenizers, decoders and post-processors, BPE
// dropout, fixed-length padding) is refused with ErrUnsupported rather than
// run differently; a malformed file is ErrBadCheckpoint. Unlike the library,
// Decode fails on unknown ids instead of dropping them. Offsets, pairs of
// sequences and the "encode_special_tokens" switch are not provided.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
)

// Tokenizer is a loaded tokenizer.json. It is safe for concurrent use.
type Tokenizer struct {
	name string // file path or "tokenizer.json", for messages

	vocab     map[string]int32 // the BPE model's vocabulary
	tokens    []string         // id -> token string (added tokens win)
	known     []bool           // id -> has a token
	special   []bool           // id -> is a special added token
	decoded   []byte           // byte-level decodings of all tokens, back to back
	decodedAt []uint32         // id -> start in decoded; id+1 -> end
	added     map[string]int32 // added token content -> id
	vocabSize int

	rawAdded      *addedMatcher // added tokens matched before normalization
	normAdded     *addedMatcher // added tokens matched after normalization
	normAddedList []addedToken  // while loading: the tokens for normAdded
	normalize     func(string) string

	pre       []preStep
	byteLevel bool // the pre-tokenizer maps bytes to the GPT-2 byte alphabet
	rawBytes  bool // BPE runs on raw bytes (byte-level fast path)

	bpe bpeModel

	prefix, suffix []int32 // post-processor ids around a single sequence
	hasTrunc       bool    // truncation is on
	truncate       int     // its max_length
	truncLeft      bool
	decoder        decoderKind

	cache bpeCache
}

type decoderKind int

const (
	decoderNone      decoderKind = iota // tokens joined with spaces
	decoderByteLevel                    // GPT-2 byte alphabet back to bytes
)

// LoadTokenizer reads a Hugging Face tokenizer.json file.
func LoadTokenizer(path string) (*Tokenizer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, checkpointError(path, "%v", err)
	}
	return parseTokenizer(data, path)
}

// ParseTokenizer parses the contents of a tokenizer.json file.
func ParseTokenizer(data []byte) (*Tokenizer, error) {
	return parseTokenizer(data, "tokenizer.json")
}

// Encode turns text into token ids the way the `tokenizers` library's
// encode(text, add_special_tokens=True) does: added tokens, normalizer,
// pre-tokenizer, BPE, truncation and post-processor.
func (t *Tokenizer) Encode(text string) []int32 {
	out := make([]int32, len(t.prefix), len(t.prefix)+len(text)/3+len(t.suffix)+1)
	copy(out, t.prefix)
	out = t.encodeText(text, out)
	if t.hasTrunc {
		keep := t.truncate - len(t.prefix) - len(t.suffix)
		if keep < 0 {
			keep = 0
		}
		if body := out[len(t.prefix):]; len(body) > keep {
			if t.truncLeft {
				copy(body, body[len(body)-keep:])
			}
			out = out[:len(t.prefix)+keep]
		}
	}
	return append(out, t.suffix...)
}

// Decode turns ids back into text: the tokens' strings are concatenated and
// mapped from the byte-level alphabet back to bytes, and invalid UTF-8 is
// replaced with U+FFFD. With skipSpecial, special added tokens are left out.
// An id that names no token is an ErrInvalidArgument error.
func (t *Tokenizer) Decode(ids []int32, skipSpecial bool) (string, error) {
	var buf []byte
	n := 0
	for i, id := range ids {
		if id < 0 || int(id) >= len(t.known) || !t.known[id] {
			return "", fmt.Errorf("%w: token id %d (position %d) is not in the tokenizer's vocabulary (%d ids)",
				ErrInvalidArgument, id, i, t.vocabSize)
		}
		if skipSpecial && t.special[id] {
			continue
		}
		if t.decoder == decoderByteLevel {
			buf = append(buf, t.decoded[t.decodedAt[id]:t.decodedAt[id+1]]...)
			continue
		}
		if n > 0 {
			buf = append(buf, ' ')
		}
		buf = append(buf, t.tokens[id]...)
		n++
	}
	if t.decoder == decoderByteLevel {
		return lossyUTF8(buf), nil
	}
	return string(buf), nil
}

// TokenID returns the id of a token string: an added token's content, or a
// vocabulary entry (in the byte-level alphabet, e.g. "Ġthe").
func (t *Tokenizer) TokenID(s string) (int32, bool) {
	if id, ok := t.added[s]; ok {
		return id, true
	}
	id, ok := t.vocab[s]
	return id, ok
}

// Token returns the string of token id: an added token's content or a
// vocabulary entry in the byte-level alphabet.
func (t *Tokenizer) Token(id int32) (string, bool) {
	if id < 0 || int(id) >= len(t.known) || !t.known[id] {
		return "", false
	}
	return t.tokens[id], true
}

// IsSpecial reports whether id is a special added token (the ones Decode
// drops with skipSpecial).
func (t *Tokenizer) IsSpecial(id int32) bool {
	return id >= 0 && int(id) < len(t.special) && t.special[id]
}

// VocabSize is the largest token id plus one.
func (t *Tokenizer) VocabSize() int { return t.vocabSize }

// encodeText runs everything but the post-processor.
func (t *Tokenizer) encodeText(text string, out []int32) []int32 {
	var segs [16]segment
	for _, s := range t.rawAdded.split(text, segs[:0]) {
		if s.id >= 0 {
			out = append(out, s.id)
			continue
		}
		piece := text[s.start:s.end]
		if t.normalize != nil {
			piece = t.normalize(piece)
		}
		var segs2 [16]segment
		for _, s2 := range t.normAdded.split(piece, segs2[:0]) {
			if s2.id >= 0 {
				out = append(out, s2.id)
				continue
			}
			out = t.preTokenize(piece[s2.start:s2.end], 0, out)
		}
	}
	return out
}

// ---------------------------------------------------------------------------
// Added tokens

type addedToken struct {
	id                                  int32
	content                             string
	singleWord, lstrip, rstrip, special bool
	normalized                          bool
}

// addedMatcher finds added tokens in a string with leftmost-longest
// semantics (the `tokenizers` library uses Aho-Corasick with
// MatchKind::LeftmostLongest) and applies their single_word, lstrip and
// rstrip options.
type addedMatcher struct {
	nodes  []trieNode
	first  [256]bool
	tokens []addedToken
}

type trieNode struct {
	next    map[byte]int32
	pattern int32 // index in tokens, -1 if no pattern ends here
}

func newAddedMatcher(tokens []addedToken) *addedMatcher {
	m := &addedMatcher{nodes: []trieNode{{pattern: -1}}}
	for _, tok := range tokens {
		if tok.content == "" {
			continue
		}
		n := int32(0)
		for i := 0; i < len(tok.content); i++ {
			c := tok.content[i]
			nx, ok := m.nodes[n].next[c]
			if !ok {
				nx = int32(len(m.nodes))
				m.nodes = append(m.nodes, trieNode{pattern: -1})
				if m.nodes[n].next == nil {
					m.nodes[n].next = make(map[byte]int32)
				}
				m.nodes[n].next[c] = nx
			}
			n = nx
		}
		m.first[tok.content[0]] = true
		// A repeated content keeps the last entry's options, as the
		// library's added-token map does.
		if p := m.nodes[n].pattern; p >= 0 {
			m.tokens[p] = tok
		} else {
			m.nodes[n].pattern = int32(len(m.tokens))
			m.tokens = append(m.tokens, tok)
		}
	}
	return m
}

// segment is a byte range of the string being split: an added token (id >= 0)
// or text still to tokenize (id < 0).
type segment struct {
	start, end int
	id         int32
}

// split cuts s into text and added-token segments. Empty text segments are
// left out.
func (m *addedMatcher) split(s string, segs []segment) []segment {
	if m == nil || len(m.tokens) == 0 {
		if s != "" {
			segs = append(segs, segment{0, len(s), -1})
		}
		return segs
	}
	startOffset := 0
	for i := 0; i < len(s); {
		if !m.first[s[i]] {
			i++
			continue
		}
		best, bestEnd := int32(-1), 0
		n := int32(0)
		for j := i; j < len(s); j++ {
			nx, ok := m.nodes[n].next[s[j]]
			if !ok {
				break
			}
			n = nx
			if p := m.nodes[n].pattern; p >= 0 {
				best, bestEnd = p, j+1
			}
		}
		if best < 0 {
			i++
			continue
		}
		start, stop := i, bestEnd
		i = bestEnd // the search resumes after the match even when it is discarded
		tok := &m.tokens[best]
		if tok.singleWord {
			startOK := start == 0 || !endsWithWordChar(s[:start])
			stopOK := stop == len(s) || !startsWithWordChar(s[stop:])
			if !startOK || !stopOK {
				continue
			}
		}
		if tok.lstrip {
			start = max(trailingSpaceStart(s[:start]), startOffset)
		}
		if tok.rstrip {
			stop += leadingSpaceLen(s[stop:])
		}
		if startOffset < start {
			segs = append(segs, segment{startOffset, start, -1})
		}
		segs = append(segs, segment{start, stop, tok.id})
		startOffset = stop
	}
	if startOffset < len(s) {
		segs = append(segs, segment{startOffset, len(s), -1})
	}
	return segs
}

// isWordChar is the Unicode \w of Rust's regex crate, which the library
// uses for single_word: Alphabetic, marks, decimal digits, connector
// punctuation and the joiners.
func isWordChar(r rune) bool {
	if r < utf8.RuneSelf {
		return r == '_' || ('0' <= r && r <= '9') || ('a' <= r && r <= 'z') || ('A' <= r && r <= 'Z')
	}
	return unicode.IsLetter(r) || unicode.IsMark(r) || unicode.Is(unicode.Nd, r) ||
		unicode.Is(unicode.Nl, r) || unicode.Is(unicode.Other_Alphabetic, r) ||
		unicode.Is(unicode.Pc, r) || r == 0x200C || r == 0x200D
}

func endsWithWordChar(s string) bool {
	r, _ := utf8.DecodeLastRuneInString(s)
	return s != "" && isWordChar(r)
}

func startsWithWordChar(s string) bool {
	r, _ := utf8.DecodeRuneInString(s)
	return s != "" && isWordChar(r)
}

// trailingSpaceStart is where the run of white space that ends s begins.
func trailingSpaceStart(s string) int {
	i := len(s)
	for i > 0 {
		r, w := utf8.DecodeLastRuneInString(s[:i])
		if !unicode.IsSpace(r) {
			break
		}
		i -= w
	}
	return i
}

// leadingSpaceLen is the length of the run of white space that starts s.
func leadingSpaceLen(s string) int {
	i := 0
	for i < len(s) {
		r, w := utf8.DecodeRuneInString(s[i:])
		if !unicode.IsSpace(r) {
			break
		}
		i += w
	}
	return i
}

// ---------------------------------------------------------------------------
// Pre-tokenizers

type preKind int

const (
	preSplitGPT2   preKind = iota // the GPT-2 regex
	preSplitLlama3                // the Llama-3 / cl100k regex (Qwen2 with maxDigits 1)
	preByteLevel
)

type preStep struct {
	kind      preKind
	maxDigits int  // preSplitLlama3: \p{N}{1,maxDigits}
	addPrefix bool // preByteLevel: add_prefix_space
	useRegex  bool // preByteLevel: use_regex (the GPT-2 regex)
}

// The split patterns recognised in tokenizer.json, exactly as written there.
const (
	gpt2Pattern   = `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
	llama3Pattern = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	qwen2Pattern  = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
)

// preTokenize runs pre-tokenizer steps from step on, then the model, on one
// piece. Empty pieces produce nothing, as the library drops them.
func (t *Tokenizer) preTokenize(s string, step int, out []int32) []int32 {
	if s == "" {
		return out
	}
	if step == len(t.pre) {
		return t.encodeWord(s, out)
	}
	p := &t.pre[step]
	switch p.kind {
	case preSplitGPT2:
		for i := 0; i < len(s); {
			j := nextGPT2(s, i)
			out = t.preTokenize(s[i:j], step+1, out)
			i = j
		}
	case preSplitLlama3:
		for i := 0; i < len(s); {
			j := nextLlama3(s, i, p.maxDigits)
			out = t.preTokenize(s[i:j], step+1, out)
			i = j
		}
	case preByteLevel:
		if p.addPrefix && s[0] != ' ' {
			s = " " + s
		}
		if !p.useRegex {
			return t.byteLevelWord(s, step+1, out)
		}
		for i := 0; i < len(s); {
			j := nextGPT2(s, i)
			out = t.byteLevelWord(s[i:j], step+1, out)
			i = j
		}
	}
	return out
}

// byteLevelWord maps a piece to the byte alphabet (unless the model runs on
// raw bytes) and passes it on.
func (t *Tokenizer) byteLevelWord(s string, step int, out []int32) []int32 {
	if !t.rawBytes {
		var b strings.Builder
		b.Grow(2 * len(s))
		for i := 0; i < len(s); i++ {
			b.WriteRune(byteToRune[s[i]])
		}
		s = b.String()
	}
	return t.preTokenize(s, step, out)
}

// Character classes of the split patterns: \p{L}, \p{N}, \s and the rest.
const (
	clsOther uint8 = iota
	clsLetter
	clsNumber
	clsSpace
)

var asciiClass = func() (c [utf8.RuneSelf]uint8) {
	for r := rune(0); r < utf8.RuneSelf; r++ {
		switch {
		case 'a' <= r && r <= 'z', 'A' <= r && r <= 'Z':
			c[r] = clsLetter
		case '0' <= r && r <= '9':
			c[r] = clsNumber
		case r == ' ', '\t' <= r && r <= '\r':
			c[r] = clsSpace
		}
	}
	return
}()

// classAt returns the class and byte length of the character at s[i]. An
// invalid UTF-8 byte counts as one "other" character.
func classAt(s string, i int) (uint8, int) {
	if c := s[i]; c < utf8.RuneSelf {
		return asciiClass[c], 1
	}
	r, w := utf8.DecodeRuneInString(s[i:])
	switch {
	case unicode.IsLetter(r):
		return clsLetter, w
	case unicode.IsNumber(r):
		return clsNumber, w
	case unicode.IsSpace(r): // the White_Space property, which is what \s matches
		return clsSpace, w
	}
	return clsOther, w
}

// runEnd is the end of the run of characters of class cls starting at i.
func runEnd(s string, i int, cls uint8) int {
	for i < len(s) {
		c, w := classAt(s, i)
		if c != cls {
			break
		}
		i += w
	}
	return i
}

// newlineRunEnd is the end of the run of \r and \n starting at i.
func newlineRunEnd(s string, i int) int {
	for i < len(s) && (s[i] == '\r' || s[i] == '\n') {
		i++
	}
	return i
}

// contraction returns the length of a contraction ('s 't 're 've 'm 'll 'd)
// after an apostrophe, 0 if none. With fold the match is case-insensitive
// under Unicode simple case folding, where the long s (U+017F) folds to s.
func contraction(s string, fold bool) int {
	lower := func(i int) (byte, int) {
		if i >= len(s) {
			return 0, 0
		}
		c := s[i]
		if fold {
			if 'A' <= c && c <= 'Z' {
				return c + 'a' - 'A', 1
			}
			if strings.HasPrefix(s[i:], "\u017f") {
				return 's', 2
			}
		}
		return c, 1
	}
	c, w := lower(0)
	switch c {
	case 's', 't', 'm', 'd':
		return w
	case 'r', 'v', 'l':
		want := byte('e')
		if c == 'l' {
			want = 'l'
		}
		if c2, w2 := lower(w); c2 == want {
			return w + w2
		}
	}
	return 0
}

// spaceRun handles the white-space alternatives shared by both patterns,
// `\s+(?!\S)|\s+`, for a run of white space starting at i: the whole run at
// the end of the string, otherwise the run minus its last character (which
// then leads the next piece), or a lone character.
func spaceRun(s string, i int) int {
	last, j := i, i
	for j < len(s) {
		c, w := classAt(s, j)
		if c != clsSpace {
			break
		}
		last = j
		j += w
	}
	if j == len(s) || last == i {
		return j
	}
	return last
}

// nextGPT2 returns the end of the match of the GPT-2 pattern at i:
//
//	's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
func nextGPT2(s string, i int) int {
	if s[i] == '\'' {
		if n := contraction(s[i+1:], false); n > 0 {
			return i + 1 + n
		}
	}
	if s[i] == ' ' && i+1 < len(s) {
		if c, w := classAt(s, i+1); c != clsSpace {
			return runEnd(s, i+1+w, c)
		}
	}
	c, w := classAt(s, i)
	if c != clsSpace {
		return runEnd(s, i+w, c)
	}
	return spaceRun(s, i)
}

// nextLlama3 returns the end of the match of the Llama-3 pattern at i (the
// Qwen2 one with maxDigits 1):
//
//	(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//	 ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
func nextLlama3(s string, i int, maxDigits int) int {
	if s[i] == '\'' {
		if n := contraction(s[i+1:], true); n > 0 {
			return i + 1 + n
		}
	}
	c, w := classAt(s, i)
	switch c {
	case clsLetter:
		return runEnd(s, i+w, clsLetter)
	case clsNumber:
		j := i + w
		for k := 1; k < maxDigits && j < len(s); k++ {
			c2, w2 := classAt(s, j)
			if c2 != clsNumber {
				break
			}
			j += w2
		}
		return j
	}
	// An optional character that is not \r, \n, a letter or a number, then
	// letters.
	if s[i] != '\r' && s[i] != '\n' && i+w < len(s) {
		if c2, w2 := classAt(s, i+w); c2 == clsLetter {
			return runEnd(s, i+w+w2, clsLetter)
		}
	}
	// ` ?[^\s\p{L}\p{N}]+[\r\n]*`
	if s[i] == ' ' && i+1 < len(s) {
		if c2, w2 := classAt(s, i+1); c2 == clsOther {
			return newlineRunEnd(s, runEnd(s, i+1+w2, clsOther))
		}
	}
	if c == clsOther {
		return newlineRunEnd(s, runEnd(s, i+w, clsOther))
	}
	// White space. `\s*[\r\n]+` backtracks to the last \r or \n of the run.
	lastNL := -1
	for j := i; j < len(s); {
		c2, w2 := classAt(s, j)
		if c2 != clsSpace {
			break
		}
		if s[j] == '\r' || s[j] == '\n' {
			lastNL = j
		}
		j += w2
	}
	if lastNL >= 0 {
		return lastNL + 1
	}
	return spaceRun(s, i)
}

// ---------------------------------------------------------------------------
// The GPT-2 byte alphabet

var byteToRune, runeToByte = func() (b2r [256]rune, r2b [324]int16) {
	for i := range r2b {
		r2b[i] = -1
	}
	n := rune(0)
	for b := 0; b < 256; b++ {
		if ('!' <= b && b <= '~') || (0xA1 <= b && b <= 0xAC) || (0xAE <= b && b <= 0xFF) {
			b2r[b] = rune(b)
		} else {
			b2r[b] = 256 + n
			n++
		}
		r2b[b2r[b]] = int16(b)
	}
	return
}()

// byteLevelDecode maps a token string from the byte alphabet back to bytes;
// a token with any character outside the alphabet (an added token, say) is
// kept as its UTF-8 text, as the library's ByteLevel decoder does.
func byteLevelDecode(dst []byte, tok string) []byte {
	n := len(dst)
	for _, r := range tok {
		if r < 0 || int(r) >= len(runeToByte) || runeToByte[r] < 0 {
			return append(dst[:n], tok...)
		}
		dst = append(dst, byte(runeToByte[r]))
	}
	return dst
}

// lossyUTF8 converts bytes to a string, replacing each maximal invalid
// subsequence with U+FFFD (what Rust's String::from_utf8_lossy does).
func lossyUTF8(b []byte) string {
	if utf8.Valid(b) {
		return string(b)
	}
	var out strings.Builder
	out.Grow(len(b) + 8)
	for i := 0; i < len(b); {
		if b[i] < utf8.RuneSelf {
			out.WriteByte(b[i])
			i++
			continue
		}
		r, w := utf8.DecodeRune(b[i:])
		if r != utf8.RuneError || w > 1 {
			out.Write(b[i : i+w])
			i += w
			continue
		}
		out.WriteRune(utf8.RuneError)
		i += invalidPrefixLen(b[i:])
	}
	return out.String()
}

// invalidPrefixLen is the length of the maximal prefix of b (which does not
// start with a valid character) that could begin a valid UTF-8 sequence, at
// least 1.
func invalidPrefixLen(b []byte) int {
	lo, hi, need := byte(0x80), byte(0xBF), 0
	switch c := b[0]; {
	case 0xC2 <= c && c <= 0xDF:
		need = 1
	case c == 0xE0:
		lo, need = 0xA0, 2
	case c == 0xED:
		hi, need = 0x9F, 2
	case 0xE1 <= c && c <= 0xEF:
		need = 2
	case c == 0xF0:
		lo, need = 0x90, 3
	case c == 0xF4:
		hi, need = 0x8F, 3
	case 0xF1 <= c && c <= 0xF3:
		need = 3
	default:
		return 1
	}
	n := 1
	for k := 0; k < need && n < len(b); k++ {
		if b[n] < lo || b[n] > hi {
			break
		}
		lo, hi = 0x80, 0xBF
		n++
	}
	return n
}

// ---------------------------------------------------------------------------
// BPE

type bpeModel struct {
	merges       map[uint64]uint64 // pair (a<<32 | b) -> rank<<32 | merged id
	byteIDs      [256]int32        // raw-bytes path: the id of each byte's symbol
	wordVocab    map[string]int32  // ignore_merges lookup (raw bytes on the raw path)
	ignoreMerges bool
	unk          int32 // -1: none
	fuseUnk      bool
	byteFallback bool
	contPrefix   string     // continuing_subword_prefix
	endSuffix    string     // end_of_word_suffix
	byteTokens   [256]int32 // byte_fallback: the ids of <0x00>..<0xFF>, -1 if missing
}

func (m *bpeModel) hasByteTokens(s string) bool {
	for i := 0; i < len(s); i++ {
		if m.byteTokens[s[i]] < 0 {
			return false
		}
	}
	return true
}

func pairKey(a, b int32) uint64 { return uint64(uint32(a))<<32 | uint64(uint32(b)) }

// encodeWord runs the BPE model on one pre-tokenized word.
func (t *Tokenizer) encodeWord(w string, out []int32) []int32 {
	m := &t.bpe
	if m.ignoreMerges {
		if id, ok := m.wordVocab[w]; ok {
			return append(out, id)
		}
	}
	if ids, ok := t.cache.get(w); ok {
		return append(out, ids...)
	}
	var buf [32]int32
	var syms []int32
	if t.rawBytes {
		syms = buf[:0]
		if len(w) > len(buf) {
			syms = make([]int32, 0, len(w))
		}
		for i := 0; i < len(w); i++ {
			syms = append(syms, m.byteIDs[w[i]])
		}
	} else {
		syms = t.initialSymbols(w, buf[:0])
	}
	syms = m.merge(syms)
	t.cache.put(w, syms)
	return append(out, syms...)
}

// initialSymbols splits a word into the ids of its characters, with the
// subword prefix and suffix, byte fallback and unknown token handling of
// the library's BPE model.
func (t *Tokenizer) initialSymbols(w string, syms []int32) []int32 {
	m := &t.bpe
	unkPending := false
	for i := 0; i < len(w); {
		_, size := utf8.DecodeRuneInString(w[i:])
		s := w[i : i+size]
		if i > 0 && m.contPrefix != "" {
			s = m.contPrefix + s
		}
		if i+size == len(w) && m.endSuffix != "" {
			s += m.endSuffix
		}
		i += size
		if id, ok := t.vocab[s]; ok {
			if unkPending {
				syms = append(syms, m.unk)
				unkPending = false
			}
			syms = append(syms, id)
			continue
		}
		if m.byteFallback && m.hasByteTokens(s) {
			// As in the library, a pending unknown token is not flushed here.
			for k := 0; k < len(s); k++ {
				syms = append(syms, m.byteTokens[s[k]])
			}
			continue
		}
		if m.unk >= 0 {
			if unkPending && !m.fuseUnk {
				syms = append(syms, m.unk)
			}
			unkPending = true
		}
	}
	if unkPending {
		syms = append(syms, m.unk)
	}
	return syms
}

// merge applies merges to a symbol sequence, lowest rank first and, among
// equal ranks, leftmost first (the order of the library's priority queue).
func (m *bpeModel) merge(s []int32) []int32 {
	if len(s) < 2 {
		return s
	}
	if len(s) <= 48 {
		return m.mergeSmall(s)
	}
	return m.mergeLarge(s)
}

const noMerge = math.MaxUint64

func (m *bpeModel) lookup(a, b int32) uint64 {
	if v, ok := m.merges[pairKey(a, b)]; ok {
		return v
	}
	return noMerge
}

// mergeSmall keeps the merge of each adjacent pair in an array and scans it
// for the best one: fast for short words.
func (m *bpeModel) mergeSmall(s []int32) []int32 {
	var buf [48]uint64
	pairs := buf[:len(s)-1]
	for i := range pairs {
		pairs[i] = m.lookup(s[i], s[i+1])
	}
	for len(s) > 1 {
		best := 0
		for i := 1; i < len(pairs); i++ {
			if pairs[i]>>32 < pairs[best]>>32 {
				best = i
			}
		}
		if pairs[best] == noMerge {
			break
		}
		s[best] = int32(uint32(pairs[best]))
		s = append(s[:best+1], s[best+2:]...)
		pairs = append(pairs[:best], pairs[best+1:]...)
		if best > 0 {
			pairs[best-1] = m.lookup(s[best-1], s[best])
		}
		if best < len(pairs) {
			pairs[best] = m.lookup(s[best], s[best+1])
		}
	}
	return s
}

type mergeCand struct {
	rank uint32
	pos  int32
	id   int32
}

func (a mergeCand) less(b mergeCand) bool {
	return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos)
}

// mergeLarge is the priority-queue version for long words.
func (m *bpeModel) mergeLarge(s []int32) []int32 {
	n := len(s)
	prev := make([]int32, n)
	next := make([]int32, n)
	alive := make([]bool, n)
	for i := range s {
		prev[i], next[i], alive[i] = int32(i-1), int32(i+1), true
	}
	next[n-1] = -1
	var h []mergeCand
	push := func(c mergeCand) {
		h = append(h, c)
		for k := len(h) - 1; k > 0; {
			p := (k - 1) / 2
			if !h[k].less(h[p]) {
				break
			}
			h[k], h[p] = h[p], h[k]
			k = p
		}
	}
	pop := func() mergeCand {
		top := h[0]
		last := len(h) - 1
		h[0] = h[last]
		h = h[:last]
		for k := 0; ; {
			l, r, small := 2*k+1, 2*k+2, k
			if l < len(h) && h[l].less(h[small]) {
				small = l
			}
			if r < len(h) && h[r].less(h[small]) {
				small = r
			}
			if small == k {
				break
			}
			h[k], h[small] = h[small], h[k]
			k = small
		}
		return top
	}
	for i := 0; i+1 < n; i++ {
		if v := m.lookup(s[i], s[i+1]); v != noMerge {
			push(mergeCand{uint32(v >> 32), int32(i), int32(uint32(v))})
		}
	}
	for len(h) > 0 {
		c := pop()
		p := c.pos
		if !alive[p] || next[p] < 0 {
			continue
		}
		q := next[p]
		// Stale entries: the pair at p has changed since c was queued.
		if v := m.lookup(s[p], s[q]); v == noMerge || int32(uint32(v)) != c.id {
			continue
		}
		s[p] = c.id
		alive[q] = false
		next[p] = next[q]
		if next[q] >= 0 {
			prev[next[q]] = p
		}
		if pp := prev[p]; pp >= 0 {
			if v := m.lookup(s[pp], s[p]); v != noMerge {
				push(mergeCand{uint32(v >> 32), pp, int32(uint32(v))})
			}
		}
		if nx := next[p]; nx >= 0 {
			if v := m.lookup(s[p], s[nx]); v != noMerge {
				push(mergeCand{uint32(v >> 32), p, int32(uint32(v))})
			}
		}
	}
	out := s[:0]
	for i := 0; i < n; i++ {
		if alive[i] {
			out = append(out, s[i])
		}
	}
	return out
}

// bpeCache remembers the ids of words already merged.
type bpeCache struct {
	mu sync.RWMutex
	m  map[string][]int32
}

const (
	cacheMaxEntries = 1 << 16
	cacheMaxWordLen = 256
)

func (c *bpeCache) get(w string) ([]int32, bool) {
	if len(w) > cacheMaxWordLen {
		return nil, false
	}
	c.mu.RLock()
	ids, ok := c.m[w]
	c.mu.RUnlock()
	return ids, ok
}

func (c *bpeCache) put(w string, ids []int32) {
	if len(w) > cacheMaxWordLen {
		return
	}
	c.mu.Lock()
	if c.m == nil || len(c.m) >= cacheMaxEntries {
		c.m = make(map[string][]int32)
	}
	c.m[strings.Clone(w)] = append([]int32(nil), ids...)
	c.mu.Unlock()
}

// ---------------------------------------------------------------------------
// Loading

type tokenizerFile struct {
	Truncation    json.RawMessage  `json:"truncation"`
	Padding       json.RawMessage  `json:"padding"`
	AddedTokens   []addedTokenJSON `json:"added_tokens"`
	Normalizer    json.RawMessage  `json:"normalizer"`
	PreTokenizer  json.RawMessage  `json:"pre_tokenizer"`
	PostProcessor json.RawMessage  `json:"post_processor"`
	Decoder       json.RawMessage  `json:"decoder"`
	Model         json.RawMessage  `json:"model"`
}

type addedTokenJSON struct {
	ID         *int64  `json:"id"`
	Content    *string `json:"content"`
	SingleWord bool    `json:"single_word"`
	LStrip     bool    `json:"lstrip"`
	RStrip     bool    `json:"rstrip"`
	Normalized *bool   `json:"normalized"`
	Special    bool    `json:"special"`
}

type bpeJSON struct {
	Type                    string          `json:"type"`
	Dropout                 *float64        `json:"dropout"`
	UnkToken                *string         `json:"unk_token"`
	ContinuingSubwordPrefix *string         `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string         `json:"end_of_word_suffix"`
	FuseUnk                 bool            `json:"fuse_unk"`
	ByteFallback            bool            `json:"byte_fallback"`
	IgnoreMerges            bool            `json:"ignore_merges"`
	Vocab                   json.RawMessage `json:"vocab"`
	Merges                  json.RawMessage `json:"merges"`
}

type typed struct {
	Type string `json:"type"`
}

// maxTokenID bounds the ids a tokenizer.json may use (the arrays indexed by
// id are allocated densely).
const maxTokenID = 1 << 24

func isNull(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) == 0 || string(raw) == "null"
}

func parseTokenizer(data []byte, name string) (*Tokenizer, error) {
	var f tokenizerFile
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, checkpointError(name, "malformed JSON: %v", err)
	}
	t := &Tokenizer{name: name}
	if isNull(f.Model) {
		return nil, checkpointError(name, "no \"model\" section")
	}
	if err := t.loadModel(f.Model); err != nil {
		return nil, err
	}
	if err := t.loadAdded(f.AddedTokens); err != nil {
		return nil, err
	}
	if err := t.loadNormalizer(f.Normalizer); err != nil {
		return nil, err
	}
	if !isNull(f.PreTokenizer) {
		if err := t.loadPreTokenizer(f.PreTokenizer, "pre_tokenizer"); err != nil {
			return nil, err
		}
	}
	if err := t.loadPostProcessor(f.PostProcessor, "post_processor"); err != nil {
		return nil, err
	}
	if err := t.loadDecoder(f.Decoder); err != nil {
		return nil, err
	}
	if err := t.loadTruncation(f.Truncation, f.Padding); err != nil {
		return nil, err
	}
	t.finish()
	return t, nil
}

func (t *Tokenizer) unsupported(format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrUnsupported, t.name, fmt.Sprintf(format, args...))
}

func (t *Tokenizer) malformed(format string, args ...any) error {
	return checkpointError(t.name, format, args...)
}

func (t *Tokenizer) loadModel(raw json.RawMessage) error {
	var mj bpeJSON
	if err := json.Unmarshal(raw, &mj); err != nil {
		var ty typed
		if json.Unmarshal(raw, &ty) == nil && ty.Type != "" && ty.Type != "BPE" {
			return t.unsupported("model type %q: only BPE is supported", ty.Type)
		}
		return t.malformed("\"model\": %v", err)
	}
	if mj.Type == "" && isNull(mj.Merges) {
		return t.unsupported("model without a type or merges: only BPE is supported")
	}
	if mj.Type != "" && mj.Type != "BPE" {
		return t.unsupported("model type %q: only BPE is supported", mj.Type)
	}
	if mj.Dropout != nil && *mj.Dropout > 0 {
		return t.unsupported("BPE dropout %g: only deterministic BPE is supported", *mj.Dropout)
	}
	if isNull(mj.Vocab) {
		return t.malformed("\"model\" has no \"vocab\"")
	}
	var vocab map[string]int64
	if err := json.Unmarshal(mj.Vocab, &vocab); err != nil {
		return t.malformed("\"model.vocab\": %v", err)
	}
	t.vocab = make(map[string]int32, len(vocab))
	maxID := int64(-1)
	for tok, id := range vocab {
		if id < 0 || id >= maxTokenID {
			return t.malformed("vocab entry %q has id %d, out of range [0, %d)", tok, id, maxTokenID)
		}
		t.vocab[tok] = int32(id)
		maxID = max(maxID, id)
	}
	t.tokens = make([]string, maxID+1)
	t.known = make([]bool, maxID+1)
	for tok, id := range t.vocab {
		if t.known[id] {
			a, b := t.tokens[id], tok
			if b < a {
				a, b = b, a
			}
			return t.malformed("vocab entries %q and %q share id %d", a, b, id)
		}
		t.tokens[id], t.known[id] = tok, true
	}

	m := &t.bpe
	m.ignoreMerges, m.fuseUnk, m.byteFallback = mj.IgnoreMerges, mj.FuseUnk, mj.ByteFallback
	if mj.ContinuingSubwordPrefix != nil {
		m.contPrefix = *mj.ContinuingSubwordPrefix
	}
	if mj.EndOfWordSuffix != nil {
		m.endSuffix = *mj.EndOfWordSuffix
	}
	m.unk = -1
	if mj.UnkToken != nil {
		if id, ok := t.vocab[*mj.UnkToken]; ok {
			m.unk = id
		}
	}
	for b := 0; b < 256; b++ {
		m.byteTokens[b] = -1
		if id, ok := t.vocab[fmt.Sprintf("<0x%02X>", b)]; ok {
			m.byteTokens[b] = id
		}
	}
	return t.loadMerges(mj.Merges)
}

func (t *Tokenizer) loadMerges(raw json.RawMessage) error {
	var pairs [][2]string
	if !isNull(raw) {
		var lines []string
		if err := json.Unmarshal(raw, &lines); err == nil {
			pairs = make([][2]string, len(lines))
			for i, l := range lines {
				parts := strings.Split(l, " ")
				if len(parts) != 2 {
					return t.malformed("merge %d %q is not two tokens separated by a space", i, l)
				}
				pairs[i] = [2]string{parts[0], parts[1]}
			}
		} else {
			var list [][]string
			if err := json.Unmarshal(raw, &list); err != nil {
				return t.malformed("\"model.merges\" is neither a list of \"a b\" strings nor of [a, b] pairs: %v", err)
			}
			pairs = make([][2]string, len(list))
			for i, p := range list {
				if len(p) != 2 {
					return t.malformed("merge %d has %d tokens, want 2", i, len(p))
				}
				pairs[i] = [2]string{p[0], p[1]}
			}
		}
	}
	t.bpe.merges = make(map[uint64]uint64, len(pairs))
	prefix := t.bpe.contPrefix
	for rank, p := range pairs {
		a, okA := t.vocab[p[0]]
		b, okB := t.vocab[p[1]]
		if !okA || !okB {
			return t.malformed("merge %d (%q %q) uses a token that is not in the vocab", rank, p[0], p[1])
		}
		merged := p[0] + strings.TrimPrefix(p[1], prefix)
		id, ok := t.vocab[merged]
		if !ok {
			return t.malformed("merge %d (%q %q) makes %q, which is not in the vocab", rank, p[0], p[1], merged)
		}
		t.bpe.merges[pairKey(a, b)] = uint64(rank)<<32 | uint64(uint32(id))
	}
	return nil
}

func (t *Tokenizer) loadAdded(list []addedTokenJSON) error {
	t.added = make(map[string]int32, len(list))
	var toks []addedToken
	maxID := len(t.tokens) - 1
	for i, a := range list {
		if a.Content == nil || a.ID == nil {
			return t.malformed("added token %d has no \"content\" or \"id\"", i)
		}
		if *a.ID < 0 || *a.ID >= maxTokenID {
			return t.malformed("added token %q has id %d, out of range [0, %d)", *a.Content, *a.ID, maxTokenID)
		}
		tok := addedToken{id: int32(*a.ID), content: *a.Content, singleWord: a.SingleWord, lstrip: a.LStrip,
			rstrip: a.RStrip, special: a.Special, normalized: !a.Special}
		if a.Normalized != nil {
			tok.normalized = *a.Normalized
		}
		if tok.content == "" {
			continue
		}
		// The library gives a token that is already in the model's
		// vocabulary the vocabulary's id.
		if id, ok := t.vocab[tok.content]; ok {
			tok.id = id
		}
		t.added[tok.content] = tok.id
		toks = append(toks, tok)
		maxID = max(maxID, int(tok.id))
	}
	if n := maxID + 1; n > len(t.tokens) {
		t.tokens = append(t.tokens, make([]string, n-len(t.tokens))...)
		t.known = append(t.known, make([]bool, n-len(t.known))...)
	}
	t.special = make([]bool, len(t.tokens))
	var raw, normalized []addedToken
	for _, tok := range toks {
		t.tokens[tok.id], t.known[tok.id] = tok.content, true
		t.special[tok.id] = tok.special
		if tok.normalized {
			normalized = append(normalized, tok)
		} else {
			raw = append(raw, tok)
		}
	}
	t.rawAdded = newAddedMatcher(raw)
	t.normAddedList = normalized
	return nil
}

func (t *Tokenizer) loadNormalizer(raw json.RawMessage) error {
	fns, err := t.normalizers(raw, "normalizer")
	if err != nil {
		return err
	}
	switch len(fns) {
	case 0:
	case 1:
		t.normalize = fns[0]
	default:
		t.normalize = func(s string) string {
			for _, f := range fns {
				s = f(s)
			}
			return s
		}
	}
	// Added tokens matched on normalized text are matched as normalized.
	list := t.normAddedList
	t.normAddedList = nil
	if t.normalize != nil {
		for i := range list {
			list[i].content = t.normalize(list[i].content)
		}
	}
	t.normAdded = newAddedMatcher(list)
	return nil
}

func (t *Tokenizer) normalizers(raw json.RawMessage, where string) ([]func(string) string, error) {
	if isNull(raw) {
		return nil, nil
	}
	var n struct {
		Type        string            `json:"type"`
		Normalizers []json.RawMessage `json:"normalizers"`
	}
	if err := json.Unmarshal(raw, &n); err != nil {
		return nil, t.malformed("%q: %v", where, err)
	}
	switch n.Type {
	case "NFC":
		return []func(string) string{norm.NFC.String}, nil
	case "NFD":
		return []func(string) string{norm.NFD.String}, nil
	case "NFKC":
		return []func(string) string{norm.NFKC.String}, nil
	case "NFKD":
		return []func(string) string{norm.NFKD.String}, nil
	case "Sequence":
		var fns []func(string) string
		for i, sub := range n.Normalizers {
			f, err := t.normalizers(sub, fmt.Sprintf("%s.normalizers[%d]", where, i))
			if err != nil {
				return nil, err
			}
			fns = append(fns, f...)
		}
		return fns, nil
	case "":
		return nil, t.malformed("%q has no \"type\"", where)
	}
	return nil, t.unsupported("%s type %q: only NFC, NFD, NFKC, NFKD and Sequence are supported", where, n.Type)
}

func (t *Tokenizer) loadPreTokenizer(raw json.RawMessage, where string) error {
	var p struct {
		Type           string            `json:"type"`
		Pretokenizers  []json.RawMessage `json:"pretokenizers"`
		Pattern        map[string]string `json:"pattern"`
		Behavior       string            `json:"behavior"`
		Invert         bool              `json:"invert"`
		AddPrefixSpace *bool             `json:"add_prefix_space"`
		UseRegex       *bool             `json:"use_regex"`
	}
	if err := json.Unmarshal(raw, &p); err != nil {
		return t.malformed("%q: %v", where, err)
	}
	if t.byteLevel && p.Type != "Sequence" {
		return t.unsupported("%s %q after ByteLevel: ByteLevel must be the last pre-tokenizer", where, p.Type)
	}
	switch p.Type {
	case "Sequence":
		for i, sub := range p.Pretokenizers {
			if err := t.loadPreTokenizer(sub, fmt.Sprintf("%s.pretokenizers[%d]", where, i)); err != nil {
				return err
			}
		}
		return nil
	case "ByteLevel":
		step := preStep{kind: preByteLevel, addPrefix: true, useRegex: true}
		if p.AddPrefixSpace != nil {
			step.addPrefix = *p.AddPrefixSpace
		}
		if p.UseRegex != nil {
			step.useRegex = *p.UseRegex
		}
		t.pre = append(t.pre, step)
		t.byteLevel = true
		return nil
	case "Split":
		re, ok := p.Pattern["Regex"]
		if !ok {
			if s, isString := p.Pattern["String"]; isString {
				return t.unsupported("%s: Split on the string %q: only the GPT-2 and Llama-3 regexes are supported", where, s)
			}
			return t.malformed("%s: Split without a pattern", where)
		}
		if p.Behavior != "Isolated" || p.Invert {
			return t.unsupported("%s: Split with behavior %q, invert %v: only Isolated without invert is supported",
				where, p.Behavior, p.Invert)
		}
		switch re {
		case gpt2Pattern:
			t.pre = append(t.pre, preStep{kind: preSplitGPT2})
		case llama3Pattern:
			t.pre = append(t.pre, preStep{kind: preSplitLlama3, maxDigits: 3})
		case qwen2Pattern:
			t.pre = append(t.pre, preStep{kind: preSplitLlama3, maxDigits: 1})
		default:
			return t.unsupported("%s: Split regex %q is not supported (only the GPT-2, Llama-3 and Qwen2 patterns are)",
				where, re)
		}
		return nil
	case "":
		return t.malformed("%q has no \"type\"", where)
	}
	return t.unsupported("%s type %q: only ByteLevel, Split and Sequence are supported", where, p.Type)
}

func (t *Tokenizer) loadPostProcessor(raw json.RawMessage, where string) error {
	if isNull(raw) {
		return nil
	}
	var p struct {
		Type          string            `json:"type"`
		Processors    []json.RawMessage `json:"processors"`
		Single        []json.RawMessage `json:"single"`
		SpecialTokens map[string]struct {
			IDs []int64 `json:"ids"`
		} `json:"special_tokens"`
		CLS []json.RawMessage `json:"cls"`
		SEP []json.RawMessage `json:"sep"`
	}
	if err := json.Unmarshal(raw, &p); err != nil {
		return t.malformed("%q: %v", where, err)
	}
	switch p.Type {
	case "ByteLevel":
		return nil // it only trims offsets
	case "Sequence":
		for i, sub := range p.Processors {
			if err := t.loadPostProcessor(sub, fmt.Sprintf("%s.processors[%d]", where, i)); err != nil {
				return err
			}
		}
		return nil
	case "TemplateProcessing":
		var pre, suf []int32
		seen := false
		for i, item := range p.Single {
			var it struct {
				SpecialToken *struct {
					ID string `json:"id"`
				} `json:"SpecialToken"`
				Sequence *struct {
					ID string `json:"id"`
				} `json:"Sequence"`
			}
			if err := json.Unmarshal(item, &it); err != nil {
				return t.malformed("%s.single[%d]: %v", where, i, err)
			}
			switch {
			case it.Sequence != nil:
				if it.Sequence.ID != "A" || seen {
					return t.malformed("%s.single: sequence %q where one $A is expected", where, it.Sequence.ID)
				}
				seen = true
			case it.SpecialToken != nil:
				st, ok := p.SpecialTokens[it.SpecialToken.ID]
				if !ok {
					return t.malformed("%s: template token %q is not in special_tokens", where, it.SpecialToken.ID)
				}
				ids, err := t.checkIDs(st.IDs, where)
				if err != nil {
					return err
				}
				if seen {
					suf = append(suf, ids...)
				} else {
					pre = append(pre, ids...)
				}
			default:
				return t.malformed("%s.single[%d] is neither SpecialToken nor Sequence", where, i)
			}
		}
		if !seen {
			return t.malformed("%s.single has no $A", where)
		}
		t.wrap(pre, suf)
		return nil
	case "RobertaProcessing", "BertProcessing":
		cls, err := t.processorToken(p.CLS, where+".cls")
		if err != nil {
			return err
		}
		sep, err := t.processorToken(p.SEP, where+".sep")
		if err != nil {
			return err
		}
		t.wrap([]int32{cls}, []int32{sep})
		return nil
	case "":
		return t.malformed("%q has no \"type\"", where)
	}
	return t.unsupported("%s type %q: only TemplateProcessing, ByteLevel, Roberta/BertProcessing and Sequence are supported",
		where, p.Type)
}

// wrap adds a post-processing step around what earlier steps produced.
func (t *Tokenizer) wrap(pre, suf []int32) {
	t.prefix = append(append([]int32(nil), pre...), t.prefix...)
	t.suffix = append(t.suffix, suf...)
}

func (t *Tokenizer) checkIDs(ids []int64, where string) ([]int32, error) {
	out := make([]int32, len(ids))
	for i, id := range ids {
		if id < 0 || int(id) >= len(t.known) || !t.known[id] {
			return nil, t.malformed("%s: token id %d is not in the vocabulary", where, id)
		}
		out[i] = int32(id)
	}
	return out, nil
}

// processorToken reads a ["<s>", 0] pair of RobertaProcessing/BertProcessing.
func (t *Tokenizer) processorToken(pair []json.RawMessage, where string) (int32, error) {
	var id int64
	if len(pair) != 2 || json.Unmarshal(pair[1], &id) != nil {
		return 0, t.malformed("%s is not a [token, id] pair", where)
	}
	ids, err := t.checkIDs([]int64{id}, where)
	if err != nil {
		return 0, err
	}
	return ids[0], nil
}

func (t *Tokenizer) loadDecoder(raw json.RawMessage) error {
	if isNull(raw) {
		t.decoder = decoderNone
		return nil
	}
	var ty typed
	if err := json.Unmarshal(raw, &ty); err != nil {
		return t.malformed("\"decoder\": %v", err)
	}
	if ty.Type != "ByteLevel" {
		return t.unsupported("decoder type %q: only ByteLevel is supported", ty.Type)
	}
	t.decoder = decoderByteLevel
	return nil
}

func (t *Tokenizer) loadTruncation(trunc, pad json.RawMessage) error {
	if !isNull(trunc) {
		var tr struct {
			MaxLength *int64 `json:"max_length"`
			Direction string `json:"direction"`
		}
		if err := json.Unmarshal(trunc, &tr); err != nil || tr.MaxLength == nil || *tr.MaxLength < 0 {
			return t.malformed("\"truncation\" has no valid max_length")
		}
		switch tr.Direction {
		case "", "Right":
		case "Left":
			t.truncLeft = true
		default:
			return t.unsupported("truncation direction %q", tr.Direction)
		}
		t.hasTrunc, t.truncate = true, int(min(*tr.MaxLength, math.MaxInt32))
	}
	if !isNull(pad) {
		var p struct {
			Strategy        json.RawMessage `json:"strategy"`
			PadToMultipleOf *int64          `json:"pad_to_multiple_of"`
		}
		if err := json.Unmarshal(pad, &p); err != nil {
			return t.malformed("\"padding\": %v", err)
		}
		// Padding to the longest sequence of a batch of one changes nothing.
		if string(bytes.TrimSpace(p.Strategy)) != `"BatchLongest"` || (p.PadToMultipleOf != nil && *p.PadToMultipleOf > 1) {
			return t.unsupported("padding %s: only BatchLongest padding (a no-op for one sequence) is supported",
				bytes.TrimSpace(p.Strategy))
		}
	}
	return nil
}

// finish builds the lookup tables that depend on several sections.
func (t *Tokenizer) finish() {
	t.vocabSize = len(t.tokens)
	m := &t.bpe
	// The raw-bytes path: a byte-level pre-tokenizer, no subword affixes and
	// every byte in the vocabulary. Words then stay as raw bytes.
	if t.byteLevel && m.contPrefix == "" && m.endSuffix == "" {
		t.rawBytes = true
		for b := 0; b < 256; b++ {
			id, ok := t.vocab[string(byteToRune[b])]
			if !ok {
				t.rawBytes = false
				break
			}
			m.byteIDs[b] = id
		}
	}
	if m.ignoreMerges {
		if t.rawBytes {
			m.wordVocab = make(map[string]int32, len(t.vocab))
			var buf []byte
			for tok, id := range t.vocab {
				buf = buf[:0]
				ok := true
				for _, r := range tok {
					if int(r) >= len(runeToByte) || r < 0 || runeToByte[r] < 0 {
						ok = false
						break
					}
					buf = append(buf, byte(runeToByte[r]))
				}
				if ok {
					m.wordVocab[string(buf)] = id
				}
			}
		} else {
			m.wordVocab = t.vocab
		}
	}
	if t.decoder == decoderByteLevel {
		t.decodedAt = make([]uint32, len(t.tokens)+1)
		for id, tok := range t.tokens {
			t.decodedAt[id] = uint32(len(t.decoded))
			if t.known[id] {
				t.decoded = byteLevelDecode(t.decoded, tok)
			}
		}
		t.decodedAt[len(t.tokens)] = uint32(len(t.decoded))
	}
}
