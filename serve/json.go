package serve

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
)

// decodeJSON reads one JSON object, refusing unknown fields and trailing
// data, and names what was wrong.
func decodeJSON(r *http.Request, v any) error {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		return bad("Content-Type must be application/json, got %q", ct)
	}
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var mb *http.MaxBytesError
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &mb):
			return tooLarge{mb.Limit}
		case errors.Is(err, io.EOF):
			return bad("empty request body: want a JSON object")
		case errors.As(err, &se):
			return bad("malformed JSON at byte %d: %v", se.Offset, err)
		case errors.As(err, &te):
			return bad("field %q: want %s, got JSON %s", te.Field, te.Type, te.Value)
		case strings.HasPrefix(err.Error(), "json: unknown field"):
			return bad("unknown field %s", strings.TrimPrefix(err.Error(), "json: unknown field "))
		}
		return bad("malformed JSON: %v", err)
	}
	if dec.More() {
		return bad("malformed JSON: data after the object")
	}
	if _, err := dec.Token(); err != io.EOF {
		var mb *http.MaxBytesError
		if errors.As(err, &mb) {
			return tooLarge{mb.Limit}
		}
		return bad("malformed JSON: data after the object")
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// errorBody is OpenAI's error shape.
func errorBody(kind, msg string) any {
	return map[string]any{"error": map[string]any{"message": msg, "type": kind}}
}

func writeError(w http.ResponseWriter, status int, kind, msg string) {
	writeJSON(w, status, errorBody(kind, msg))
}
