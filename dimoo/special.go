package dimoo

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// SpecialTokens are the ids the sequence layouts and samplers use
// (reference section 2). The real model's are fixed by the release's code;
// a checkpoint folder may carry its own in special_tokens.json (the small
// models do), with the same keys as the JSON tags below.
type SpecialTokens struct {
	Mask        int32 `json:"mask"`
	Newline     int32 `json:"newline"`
	BOA         int32 `json:"boa"`
	EOA         int32 `json:"eoa"`
	BOI         int32 `json:"boi"`
	EOI         int32 `json:"eoi"`
	Uncondition int32 `json:"uncondition"`
	EOS         int32 `json:"eos"`
	ImageOffset int32 `json:"image_offset"` // id of image code 0
	Codebook    int32 `json:"codebook_size"`
}

// DefaultSpecialTokens are Lumina-DiMOO's ids.
func DefaultSpecialTokens() SpecialTokens {
	return SpecialTokens{Mask: 126336, Newline: 126084, BOI: 126349, EOI: 126350, Uncondition: 126351,
		BOA: 126354, EOA: 126355, EOS: 126081, ImageOffset: 126356, Codebook: 8192}
}

// LoadSpecialTokens reads dir/special_tokens.json, or returns the real
// model's ids when the file does not exist.
func LoadSpecialTokens(dir string) (SpecialTokens, error) {
	path := filepath.Join(dir, "special_tokens.json")
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return DefaultSpecialTokens(), nil
	}
	if err != nil {
		return SpecialTokens{}, checkpointError(path, "%v", err)
	}
	st := SpecialTokens{Mask: -1, Newline: -1, BOA: -1, EOA: -1, BOI: -1, EOI: -1, Uncondition: -1, EOS: -1,
		ImageOffset: -1, Codebook: -1}
	if err := json.Unmarshal(b, &st); err != nil {
		return SpecialTokens{}, checkpointError(path, "malformed JSON: %v", err)
	}
	if err := st.validate(); err != nil {
		return SpecialTokens{}, checkpointError(path, "%v", err)
	}
	return st, nil
}

func (s SpecialTokens) validate() error {
	for _, f := range []struct {
		name string
		v    int32
	}{{"mask", s.Mask}, {"newline", s.Newline}, {"boa", s.BOA}, {"eoa", s.EOA}, {"boi", s.BOI},
		{"eoi", s.EOI}, {"uncondition", s.Uncondition}, {"eos", s.EOS}, {"image_offset", s.ImageOffset}} {
		if f.v < 0 {
			return fmt.Errorf("%q is missing or negative", f.name)
		}
	}
	if s.Codebook < 1 {
		return fmt.Errorf("%q is missing or not positive", "codebook_size")
	}
	return nil
}

// checkVocab verifies that every id fits the model's vocabulary.
func (s SpecialTokens) checkVocab(vocab int) error {
	if int(s.ImageOffset)+int(s.Codebook) > vocab {
		return fmt.Errorf("%w: image codes [%d, %d) exceed the vocabulary of %d", ErrBadCheckpoint,
			s.ImageOffset, s.ImageOffset+s.Codebook, vocab)
	}
	for _, v := range []int32{s.Mask, s.Newline, s.BOA, s.EOA, s.BOI, s.EOI, s.Uncondition, s.EOS} {
		if int(v) >= vocab {
			return fmt.Errorf("%w: special token id %d exceeds the vocabulary of %d", ErrBadCheckpoint, v, vocab)
		}
	}
	return nil
}
