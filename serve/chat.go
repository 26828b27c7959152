package serve

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/dimoo-dev/dimoo/dimoo"
)

// chatRequest is OpenAI's chat/completions body as far as understanding
// goes: the last user message gives the question (its text parts) and the
// image (one data-URL image_url part); DiMOO's knobs are extensions.
type chatRequest struct {
	Model       string        `json:"model"`
	Messages    []chatMessage `json:"messages"`
	MaxTokens   *int          `json:"max_tokens"`
	Temperature *float64      `json:"temperature"`
	Seed        *uint64       `json:"seed"`
	Stream      bool          `json:"stream"`
	User        string        `json:"user"`
	// OpenAI's newer name for max_tokens, and the stream's usage chunk.
	MaxCompletionTokens *int `json:"max_completion_tokens"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	// Extensions: steps and block_length (with max_tokens as gen_length),
	// and text guidance.
	Steps       int      `json:"steps"`
	BlockLength int      `json:"block_length"`
	CFGScale    *float64 `json:"cfg_scale"`
}

type chatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

type chatPart struct {
	Type     string `json:"type"`
	Text     string `json:"text"`
	ImageURL *struct {
		URL    string `json:"url"`
		Detail string `json:"detail"`
	} `json:"image_url"`
}

// question extracts the text and the image of the last user message.
func (s *Server) question(msgs []chatMessage) (string, []byte, error) {
	var last *chatMessage
	for i := range msgs {
		switch msgs[i].Role {
		case "user":
			last = &msgs[i]
		case "system", "assistant", "developer":
		default:
			return "", nil, bad("messages[%d]: unknown role %q", i, msgs[i].Role)
		}
	}
	if last == nil {
		return "", nil, bad("messages has no user message")
	}
	var text string
	if err := json.Unmarshal(last.Content, &text); err == nil {
		return "", nil, bad("the user message needs an image: give content as parts with an image_url")
	}
	var parts []chatPart
	dec := json.NewDecoder(bytes.NewReader(last.Content))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&parts); err != nil {
		return "", nil, bad("user message content: want a string or a list of text and image_url parts: %v", err)
	}
	var texts []string
	var img []byte
	for i, p := range parts {
		switch p.Type {
		case "text":
			texts = append(texts, p.Text)
		case "image_url":
			if p.ImageURL == nil {
				return "", nil, bad("content[%d]: image_url part without image_url", i)
			}
			if img != nil {
				return "", nil, bad("one image per question")
			}
			u := p.ImageURL.URL
			head, data, ok := strings.Cut(u, ",")
			if !ok || !strings.HasPrefix(head, "data:image/") || !strings.HasSuffix(head, ";base64") {
				return "", nil, bad("content[%d]: image_url must be a data URL (data:image/png;base64,...): the server fetches nothing", i)
			}
			b, err := base64.StdEncoding.DecodeString(data)
			if err != nil {
				return "", nil, bad("content[%d]: the data URL is not valid base64: %v", i, err)
			}
			img = b
		default:
			return "", nil, bad("content[%d]: unknown part type %q (text or image_url)", i, p.Type)
		}
	}
	if img == nil {
		return "", nil, bad("the user message has no image_url part: understanding needs an image")
	}
	q := strings.TrimSpace(strings.Join(texts, "\n"))
	if q == "" {
		return "", nil, bad("the user message has no text")
	}
	return q, img, nil
}

func (s *Server) handleChat(ctx context.Context, w http.ResponseWriter, r *http.Request, e *Engine, release func()) int {
	var req chatRequest
	if err := decodeJSON(r, &req); err != nil {
		return s.fail(ctx, w, err, "")
	}
	if _, err := s.checkCommon(req.Model, "", nil); err != nil {
		return s.fail(ctx, w, err, "")
	}
	q, imgBytes, err := s.question(req.Messages)
	if err != nil {
		return s.fail(ctx, w, err, "")
	}
	img, err := s.readImage(bytes.NewReader(imgBytes), "image_url")
	if err != nil {
		return s.fail(ctx, w, err, "")
	}
	if m := req.MaxCompletionTokens; m != nil {
		if req.MaxTokens != nil && *req.MaxTokens != *m {
			return s.fail(ctx, w, bad("max_tokens %d and max_completion_tokens %d differ: give one", *req.MaxTokens, *m), "")
		}
		req.MaxTokens = m
	}
	if req.StreamOptions != nil && !req.Stream {
		return s.fail(ctx, w, bad("stream_options needs stream: true"), "")
	}
	var o dimoo.TextSampling
	if req.MaxTokens != nil {
		if *req.MaxTokens < 1 || *req.MaxTokens > 4096 {
			return s.fail(ctx, w, bad("max_tokens must be between 1 and 4096"), "")
		}
		o.GenLength = *req.MaxTokens
		o.Steps, o.BlockLength = req.Steps, req.BlockLength
		if o.Steps == 0 {
			o.Steps = o.GenLength
		}
		if o.BlockLength == 0 {
			o.BlockLength = o.GenLength
		}
	} else if req.Steps != 0 || req.BlockLength != 0 {
		return s.fail(ctx, w, bad("steps and block_length need max_tokens"), "")
	}
	if o.Steps > s.opts.MaxSteps {
		return s.fail(ctx, w, bad("steps must be at most %d", s.opts.MaxSteps), "")
	}
	if req.Temperature != nil {
		if *req.Temperature < 0 || math.IsNaN(*req.Temperature) || math.IsInf(*req.Temperature, 0) {
			return s.fail(ctx, w, bad("temperature must be a finite number >= 0"), "")
		}
		o.Temperature = *req.Temperature
	}
	if req.CFGScale != nil {
		if *req.CFGScale < 0 || math.IsNaN(*req.CFGScale) || math.IsInf(*req.CFGScale, 0) {
			return s.fail(ctx, w, bad("cfg_scale must be a finite number >= 0"), "")
		}
		o.CFGScale = *req.CFGScale
	}
	if req.Seed != nil {
		o.Seed = *req.Seed
	}
	t0 := time.Now()
	steps := 0
	understand := e.Pipeline.Understand
	if e.Batcher != nil {
		understand = e.Batcher.Understand
	}
	var use dimoo.TokenUsage
	ureq := dimoo.UnderstandRequest{Question: q, Image: img, InputArea: e.Pipeline.NativeArea(), Sampling: o,
		Progress: func(step, _ int) { steps = step }, Usage: &use}
	id, created := fmt.Sprintf("chatcmpl-%x", randomSeed()), time.Now().Unix()
	if req.Stream {
		withUsage := req.StreamOptions != nil && req.StreamOptions.IncludeUsage
		return s.streamChat(ctx, w, understand, ureq, id, created, withUsage,
			func() { s.m.decoded(time.Since(t0), steps) }, release)
	}
	answer, err := understand(ctx, ureq)
	release()
	if err != nil {
		return s.fail(ctx, w, err, "")
	}
	s.m.decoded(time.Since(t0), steps)
	writeJSON(w, http.StatusOK, map[string]any{
		"id":      id,
		"object":  "chat.completion",
		"created": created,
		"model":   s.opts.ModelName,
		"choices": []map[string]any{{"index": 0, "finish_reason": "stop",
			"message": map[string]string{"role": "assistant", "content": answer}}},
		"usage": usageBody(use),
	})
	return http.StatusOK
}

// usageBody is OpenAI's usage object.
func usageBody(u dimoo.TokenUsage) map[string]int {
	return map[string]int{"prompt_tokens": u.Prompt, "completion_tokens": u.Completion,
		"total_tokens": u.Prompt + u.Completion}
}

// streamChat answers as OpenAI's chat.completion.chunk events (data lines
// only, then "data: [DONE]"): the role, the answer's text as its blocks are
// decoded (a masked diffusion model fills a block in any order, but a
// finished block never changes), the finish reason; with usage, every
// chunk has "usage": null and a last one before [DONE] the counts, with no
// choices (as OpenAI's stream_options.include_usage). The events begin with
// the decode's first step: what fails before it (a bad request, the queue's
// deadline, memory) gets its own status and a JSON error, as unstreamed.
func (s *Server) streamChat(ctx context.Context, w http.ResponseWriter,
	understand func(context.Context, dimoo.UnderstandRequest) (string, error), req dimoo.UnderstandRequest,
	id string, created int64, usage bool, decoded, release func()) int {
	head := func(choices []map[string]any) map[string]any {
		c := map[string]any{"id": id, "object": "chat.completion.chunk", "created": created,
			"model": s.opts.ModelName, "choices": choices}
		if usage {
			c["usage"] = nil
		}
		return c
	}
	chunk := func(delta map[string]string, finish any) map[string]any {
		return head([]map[string]any{{"index": 0, "delta": delta, "finish_reason": finish}})
	}
	if usage && req.Usage == nil {
		req.Usage = &dimoo.TokenUsage{}
	}
	// Progress and Stream run on the decode's thread: they only signal or
	// append, and the loop below writes (a slow reader gets fewer, larger
	// chunks).
	began := make(chan struct{})
	var once sync.Once
	progress := req.Progress
	req.Progress = func(step, total int) {
		if progress != nil {
			progress(step, total)
		}
		once.Do(func() { close(began) })
	}
	var mu sync.Mutex
	var pending strings.Builder
	wake := make(chan struct{}, 1)
	req.Stream = func(piece string) {
		mu.Lock()
		pending.WriteString(piece)
		mu.Unlock()
		select {
		case wake <- struct{}{}:
		default:
		}
	}
	var ev *events
	start := func() {
		if ev == nil {
			ev = startEvents(w)
			ev.data(chunk(map[string]string{"role": "assistant", "content": ""}, nil))
		}
	}
	flush := func() {
		mu.Lock()
		text := pending.String()
		pending.Reset()
		mu.Unlock()
		if text != "" {
			ev.data(chunk(map[string]string{"content": text}, nil))
		}
	}
	done := make(chan error, 1)
	go func() {
		_, err := understand(ctx, req)
		done <- err
	}()
	for {
		select {
		case <-began:
			start()
			began = nil // a nil channel: this case is done
		case <-wake:
			start()
			flush()
		case err := <-done:
			release()
			// select picks among ready cases at random: a decode that
			// stepped and then failed at once may have both ready. Its
			// events had begun.
			select {
			case <-began:
				start()
			default:
			}
			if err != nil && ev == nil {
				return s.fail(ctx, w, err, "")
			}
			if err != nil {
				flush() // what was decoded is final text, before the error
				st, kind, msg := s.classify(ctx, err)
				ev.data(errorBody(kind, msg))
				ev.done()
				return st
			}
			start()
			decoded()
			flush()
			ev.data(chunk(map[string]string{}, "stop"))
			if usage {
				last := head([]map[string]any{})
				last["usage"] = usageBody(*req.Usage)
				ev.data(last)
			}
			ev.done()
			return http.StatusOK
		}
	}
}
