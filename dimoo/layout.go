package dimoo

// Sequence layouts of every task (reference section 2).

// System prompts of the reference, by task.
const (
	SystemTextToImage = "Generate an image according to the text prompt."
	SystemEdit        = "Generate an image applying the following editing instruction based on the original image."
	SystemDense       = "Perform dense prediction on the given images."
	SystemControl     = "Generate an image according to the text prompt and the given control image."
	SystemSubject     = "Generate an image according to the text prompt and the given object image."
	SystemStyle       = "Transform the current image into the style of the provided image."
	SystemUnderstand  = "You are a multimodal model that can process both text and images. Answer the following question based on the provided images. Analyze each image and combine relevant details to answer."
)

// promptText is the chat template around a system prompt and a user turn.
func promptText(system, user string) string {
	return "<system>" + system + "</system>" + "<user>" + user + "</user>"
}

// uncondText is the unconditional prompt of classifier-free guidance.
func uncondText(system string) string { return promptText(system, "<uncondition>") }

// imageGrid writes an h x w grid of codes (ids, already offset) row by row
// with a newline after each row, between begin- and end-of-image.
func (s SpecialTokens) imageGrid(codes []int32, h, w int) []int32 {
	out := make([]int32, 0, h*(w+1)+2)
	out = append(out, s.BOI)
	for r := 0; r < h; r++ {
		out = append(out, codes[r*w:(r+1)*w]...)
		out = append(out, s.Newline)
	}
	return append(out, s.EOI)
}

// answerImage is BOA, the grid, EOA.
func (s SpecialTokens) answerImage(codes []int32, h, w int) []int32 {
	out := append([]int32{s.BOA}, s.imageGrid(codes, h, w)...)
	return append(out, s.EOA)
}

// gridCodes extracts the h*w codes from an answer image (dropping BOA, BOI,
// newlines, EOI, EOA), as code indices (not ids).
func (s SpecialTokens) gridCodes(answer []int32, h, w int) []int32 {
	codes := make([]int32, 0, h*w)
	for _, t := range answer[2 : len(answer)-2] {
		if t != s.Newline {
			codes = append(codes, t-s.ImageOffset)
		}
	}
	return codes
}

// maskedCodes is a grid of h*w MASK ids.
func (s SpecialTokens) maskedCodes(n int) []int32 {
	out := make([]int32, n)
	for i := range out {
		out[i] = s.Mask
	}
	return out
}

// withImages splices image grids before the last token of a tokenized
// prompt (its closing </user>), as the reference does for image inputs.
func withImages(prompt []int32, images ...[]int32) []int32 {
	if len(prompt) == 0 {
		var out []int32
		for _, im := range images {
			out = append(out, im...)
		}
		return out
	}
	out := append([]int32(nil), prompt[:len(prompt)-1]...)
	for _, im := range images {
		out = append(out, im...)
	}
	return append(out, prompt[len(prompt)-1])
}
