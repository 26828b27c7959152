package dimoo

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
)

// Edit types. The official image-to-image script takes an --edit_type name
// and picks the system prompt and the user text by testing substrings of
// it, in a fixed order (dense, control, subject, edit, ref_transfer,
// multi_view, else a generic prompt); editPrompt repeats that dispatch, so
// any official name gets exactly the official prompt. dimoo's older short
// names are aliases for official names.

// System prompts of the image-to-image dispatch that are not task prompts
// of their own.
const (
	SystemMultiView = "Generate a view-image based on the given image."
	SystemI2IOther  = "Generate an image according to the prompt and image." // e.g. canny_pred: no branch matches
)

// styleTransferText is the user text of style transfer, whatever the prompt.
const styleTransferText = "Transform the current image into the style of the provided image."

// officialEditTypes are the names the official scripts and README use.
var officialEditTypes = []string{
	"edit", "edit_add", "edit_remove", "edit_replace", "edit_background", "edit_text_transfer",
	"canny_control", "hed_control", "depth_control", "openpose_control", "subject_driven",
	"image_ref_transfer", "ref_transfer",
	"canny_pred", "hed_pred", "depth_pred", "openpose_pred",
	"dense", "multi_view",
}

// editAliases map dimoo's short names to official ones.
var editAliases = map[string]string{
	"control":  "control", // the control branch itself (canny, hed, depth, openpose pick a kind)
	"canny":    "canny_control",
	"hed":      "hed_control",
	"depth":    "depth_control",
	"openpose": "openpose_control",
	"subject":  "subject_driven",
	"style":    "image_ref_transfer",
}

// Families the dispatch handles by pattern: X_dense (a dense map of kind X)
// and multi_view_V (view V).
var editPatterns = regexp.MustCompile(`^([a-z0-9]+_dense|multi_view_[a-z0-9]+)$`)

// denseKinds names the dense-prediction maps, keyed by the name's first word.
var denseKinds = map[string]string{
	"canny": "canny edge map", "hed": "hed edge map", "normal": "normal map", "sam2mask": "sam2 mask",
	"depth": "depth map", "openpose": "pose estimation map",
}

// EditTypes lists the accepted EditRequest.EditType values: the official
// names, dimoo's aliases, and the patterns X_dense and multi_view_V.
func EditTypes() []string {
	out := append([]string(nil), officialEditTypes...)
	for k := range editAliases {
		out = append(out, k)
	}
	slices.Sort(out[len(officialEditTypes):])
	return append(out, "X_dense", "multi_view_V")
}

// ResolveEditType maps an accepted name to the official name it stands for
// ("" is an error: the caller supplies the default).
func ResolveEditType(name string) (string, error) {
	if a, ok := editAliases[name]; ok {
		return a, nil
	}
	if slices.Contains(officialEditTypes, name) || editPatterns.MatchString(name) {
		return name, nil
	}
	return "", fmt.Errorf("%w: unknown edit type %q (want one of %s)", ErrInvalidArgument, name,
		strings.Join(EditTypes(), ", "))
}

// editPrompt is the official dispatch: the system prompt and the user text
// for an official edit type name and the user's prompt.
func editPrompt(editType, prompt string) (system, user string) {
	words := strings.Split(editType, "_")
	switch {
	case strings.Contains(editType, "dense"):
		kind, ok := denseKinds[words[0]]
		if !ok {
			kind = "dense map"
		}
		return SystemDense, "Generate a " + kind + " according to the image."
	case strings.Contains(editType, "control"):
		return SystemControl, prompt
	case strings.Contains(editType, "subject"):
		return SystemSubject, prompt
	case strings.Contains(editType, "edit"):
		return SystemEdit, prompt
	case strings.Contains(editType, "ref_transfer"):
		return SystemStyle, styleTransferText
	case strings.Contains(editType, "multi_view"):
		return SystemMultiView, "Generate the " + words[len(words)-1] + " view based on the provided front view."
	}
	return SystemI2IOther, prompt
}

// twoImages reports whether an edit type splices a content image and a
// style reference (the official script tests this substring, not the
// style prompt's ref_transfer).
func twoImages(editType string) bool { return strings.Contains(editType, "image_ref_transfer") }
