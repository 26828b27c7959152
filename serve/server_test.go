package serve

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimoo-dev/dimoo/dimoo"
	"github.com/dimoo-dev/dimoo/internal/gpu"
)

var (
	shared     *dimoo.Pipeline
	sharedErr  error
	sharedOnce sync.Once
)

// pipeline opens the shipped small model once for the package's tests.
func pipeline(t *testing.T) *dimoo.Pipeline {
	t.Helper()
	sharedOnce.Do(func() {
		dir := dimoo.ShippedModelDir()
		if dir == "" {
			sharedErr = errors.New("no shipped model under models/")
			return
		}
		lib, err := dimoo.DefaultLibrary()
		if err != nil {
			sharedErr = err
			return
		}
		shared, sharedErr = dimoo.OpenPipeline(context.Background(), dir,
			dimoo.PipelineOptions{LoadOptions: dimoo.LoadOptions{Library: lib, Threads: testThreads}, MaxConcurrent: 64})
	})
	if sharedErr != nil {
		t.Skipf("no engine: %v", sharedErr)
	}
	return shared
}

// testServer serves on an ephemeral loopback port.
type testServer struct {
	*Server
	url    string
	client *http.Client
	done   chan error
}

func start(t *testing.T, batch bool, opts Options) *testServer {
	t.Helper()
	p := pipeline(t)
	e := &Engine{Name: "cpu", Pipeline: p, GPU: -1}
	if batch {
		b, err := p.NewBatcher(dimoo.BatchOptions{Seqs: 8, MaxTokens: 256, KVCache: true})
		require.NoError(t, err)
		e.Batcher = b
		t.Cleanup(func() { b.Close() })
	}
	s, err := New([]*Engine{e}, opts)
	require.NoError(t, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ts := &testServer{Server: s, url: "http://" + l.Addr().String(), client: &http.Client{}, done: make(chan error, 1)}
	go func() { ts.done <- s.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
		<-ts.done
		ts.client.CloseIdleConnections()
	})
	return ts
}

type reply struct {
	status int
	body   []byte
	header http.Header
}

func (r reply) errMessage() string {
	var e struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	_ = json.Unmarshal(r.body, &e)
	return e.Error.Message
}

func (ts *testServer) do(ctx context.Context, method, path, ctype string, body []byte) (reply, error) {
	req, err := http.NewRequestWithContext(ctx, method, ts.url+path, bytes.NewReader(body))
	if err != nil {
		return reply{}, err
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	resp, err := ts.client.Do(req)
	if err != nil {
		return reply{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return reply{resp.StatusCode, b, resp.Header}, err
}

func (ts *testServer) post(t *testing.T, path string, v any) reply {
	t.Helper()
	b, err := json.Marshal(v)
	require.NoError(t, err)
	r, err := ts.do(context.Background(), "POST", path, "application/json", b)
	require.NoError(t, err)
	return r
}

func pngBytes(t testing.TB, img image.Image) []byte {
	var buf bytes.Buffer
	require.NoError(t, png.Encode(&buf, img))
	return buf.Bytes()
}

func redSquare(w, h int) image.Image {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			c := color.NRGBA{0, 0, 0, 255}
			if x >= w/4 && x < w/2 && y >= h/4 && y < h/2 {
				c = color.NRGBA{255, 0, 0, 255}
			}
			img.SetNRGBA(x, y, c)
		}
	}
	return img
}

// multipartBody builds an images/edits form; files are PNGs.
func multipartBody(t testing.TB, fields map[string]string, files map[string][]byte) ([]byte, string) {
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for k, v := range fields {
		require.NoError(t, mw.WriteField(k, v))
	}
	for k, v := range files {
		fw, err := mw.CreateFormFile(k, k+".png")
		require.NoError(t, err)
		_, err = fw.Write(v)
		require.NoError(t, err)
	}
	require.NoError(t, mw.Close())
	return buf.Bytes(), mw.FormDataContentType()
}

func decodeImages(t *testing.T, r reply) []imageData {
	t.Helper()
	require.Equal(t, http.StatusOK, r.status, string(r.body))
	var resp imagesResponse
	require.NoError(t, json.Unmarshal(r.body, &resp))
	for _, d := range resp.Data {
		b, err := base64.StdEncoding.DecodeString(d.B64JSON)
		require.NoError(t, err)
		img, err := png.Decode(bytes.NewReader(b))
		require.NoError(t, err)
		assert.Equal(t, image.Rect(0, 0, 32, 32), img.Bounds())
	}
	return resp.Data
}

// Every endpoint answers a good request; the same seed gives the same
// bytes batched and alone; n images take consecutive seeds.
func TestEndpoints(t *testing.T) {
	batched := start(t, true, Options{})
	alone := start(t, false, Options{})
	seed := uint64(42)
	gen := map[string]any{"prompt": "a blue square at the center", "n": 2, "seed": seed, "steps": 12,
		"response_format": "b64_json", "size": "32x32"}
	a := decodeImages(t, batched.post(t, "/v1/images/generations", gen))
	b := decodeImages(t, alone.post(t, "/v1/images/generations", gen))
	require.Len(t, a, 2)
	assert.Equal(t, []uint64{42, 43}, []uint64{a[0].Seed, a[1].Seed})
	assert.Equal(t, a, b, "same seeds, batched and alone")
	assert.NotEqual(t, a[0].B64JSON, a[1].B64JSON)
	gen["n"] = 1
	gen["use_cache"] = true
	c := decodeImages(t, batched.post(t, "/v1/images/generations", gen))
	d := decodeImages(t, alone.post(t, "/v1/images/generations", gen))
	assert.Equal(t, c, d, "ML-Cache: same seed, batched and alone")

	in := pngBytes(t, redSquare(32, 32))
	mask := image.NewNRGBA(image.Rect(0, 0, 32, 32)) // transparent left half: repaint it
	for y := 0; y < 32; y++ {
		for x := 16; x < 32; x++ {
			mask.SetNRGBA(x, y, color.NRGBA{0, 0, 0, 255})
		}
	}
	for _, files := range []map[string][]byte{{"image": in}, {"image": in, "mask": pngBytes(t, mask)}} {
		body, ct := multipartBody(t, map[string]string{"prompt": "change the color to green", "seed": "3", "steps": "8"}, files)
		r, err := batched.do(context.Background(), "POST", "/v1/images/edits", ct, body)
		require.NoError(t, err)
		decodeImages(t, r)
		r2, err := alone.do(context.Background(), "POST", "/v1/images/edits", ct, body)
		require.NoError(t, err)
		assert.Equal(t, string(r.body[strings.Index(string(r.body), "\"data\""):]),
			string(r2.body[strings.Index(string(r2.body), "\"data\""):]), "edit: same bytes batched and alone")
	}

	chat := map[string]any{"model": "dimoo", "seed": 1, "messages": []any{map[string]any{"role": "user", "content": []any{
		map[string]any{"type": "text", "text": "What is in the image?"},
		map[string]any{"type": "image_url", "image_url": map[string]string{
			"url": "data:image/png;base64," + base64.StdEncoding.EncodeToString(in)}}}}}}
	r := batched.post(t, "/v1/chat/completions", chat)
	require.Equal(t, http.StatusOK, r.status, string(r.body))
	var cc struct {
		Object  string `json:"object"`
		Choices []struct {
			Message struct{ Role, Content string } `json:"message"`
		} `json:"choices"`
		Usage struct {
			PromptTokens     int `json:"prompt_tokens"`
			CompletionTokens int `json:"completion_tokens"`
			TotalTokens      int `json:"total_tokens"`
		} `json:"usage"`
	}
	require.NoError(t, json.Unmarshal(r.body, &cc))
	assert.Equal(t, "chat.completion", cc.Object)
	assert.Positive(t, cc.Usage.PromptTokens, "the template, question and image")
	assert.Positive(t, cc.Usage.CompletionTokens)
	assert.Equal(t, cc.Usage.PromptTokens+cc.Usage.CompletionTokens, cc.Usage.TotalTokens)
	require.Len(t, cc.Choices, 1)
	assert.Equal(t, "assistant", cc.Choices[0].Message.Role)
	assert.NotEmpty(t, cc.Choices[0].Message.Content)
	t.Logf("answer: %q", cc.Choices[0].Message.Content)

	// The answer streamed block by block (OpenAI's chunks), batched and
	// alone: the deltas add up to the same answer as without streaming.
	chat["max_tokens"], chat["block_length"], chat["steps"] = 16, 2, 16
	want := alone.post(t, "/v1/chat/completions", chat)
	require.Equal(t, http.StatusOK, want.status, string(want.body))
	require.NoError(t, json.Unmarshal(want.body, &cc))
	// max_completion_tokens is max_tokens by OpenAI's newer name.
	delete(chat, "max_tokens")
	chat["max_completion_tokens"] = 16
	same := alone.post(t, "/v1/chat/completions", chat)
	delete(chat, "max_completion_tokens")
	chat["max_tokens"] = 16
	var byMax, byCompletion map[string]any
	require.NoError(t, json.Unmarshal(want.body, &byMax))
	require.NoError(t, json.Unmarshal(same.body, &byCompletion))
	require.NotNil(t, byMax["choices"])
	assert.Equal(t, byMax["choices"], byCompletion["choices"], "max_completion_tokens gives the max_tokens answer")
	assert.Equal(t, byMax["usage"], byCompletion["usage"])
	chat["stream"] = true
	for _, srv := range []*testServer{batched, alone} {
		r = srv.post(t, "/v1/chat/completions", chat)
		require.Equal(t, http.StatusOK, r.status)
		assert.NotContains(t, string(r.body), "usage", "no usage unless asked")
		// With stream_options.include_usage: the same answer, then its usage.
		chat["stream_options"] = map[string]bool{"include_usage": true}
		r = srv.post(t, "/v1/chat/completions", chat)
		delete(chat, "stream_options")
		require.Equal(t, http.StatusOK, r.status)
		body := strings.TrimSpace(string(r.body))
		lastUsage := body[strings.LastIndex(body, "data: {"):strings.LastIndex(body, "\n\ndata: [DONE]")]
		var u struct {
			Choices []any `json:"choices"`
			Usage   struct {
				PromptTokens     int `json:"prompt_tokens"`
				CompletionTokens int `json:"completion_tokens"`
			} `json:"usage"`
		}
		require.NoError(t, json.Unmarshal([]byte(strings.TrimPrefix(lastUsage, "data: ")), &u), lastUsage)
		assert.Empty(t, u.Choices)
		assert.Equal(t, cc.Usage.PromptTokens, u.Usage.PromptTokens)
		assert.Equal(t, cc.Usage.CompletionTokens, u.Usage.CompletionTokens)
		r = srv.post(t, "/v1/chat/completions", chat)
		require.Equal(t, http.StatusOK, r.status)
		assert.Equal(t, "text/event-stream", r.header.Get("Content-Type"))
		events := strings.Split(strings.TrimSpace(string(r.body)), "\n\n")
		require.GreaterOrEqual(t, len(events), 4, string(r.body))
		assert.Equal(t, "data: [DONE]", events[len(events)-1])
		var text strings.Builder
		content := 0
		for i, e := range events[:len(events)-1] {
			require.True(t, strings.HasPrefix(e, "data: {"), e)
			var ch struct {
				Object  string `json:"object"`
				Choices []struct {
					Delta        map[string]string `json:"delta"`
					FinishReason *string           `json:"finish_reason"`
				} `json:"choices"`
			}
			require.NoError(t, json.Unmarshal([]byte(strings.TrimPrefix(e, "data: ")), &ch), e)
			assert.Equal(t, "chat.completion.chunk", ch.Object)
			require.Len(t, ch.Choices, 1)
			c := ch.Choices[0]
			switch i {
			case 0:
				assert.Equal(t, map[string]string{"role": "assistant", "content": ""}, c.Delta)
			case len(events) - 2:
				assert.Empty(t, c.Delta)
				require.NotNil(t, c.FinishReason)
				assert.Equal(t, "stop", *c.FinishReason)
				continue
			default:
				assert.NotEmpty(t, c.Delta["content"], e)
				content++
			}
			assert.Nil(t, c.FinishReason, e)
			text.WriteString(c.Delta["content"])
		}
		assert.Equal(t, cc.Choices[0].Message.Content, text.String())
		assert.GreaterOrEqual(t, content, 2, "the answer came in more than one delta: %s", r.body)
		t.Logf("streamed: %s", r.body)
	}
	// A bad streamed request is refused before any event.
	chat["temperature"] = -1
	r = batched.post(t, "/v1/chat/completions", chat)
	assert.Equal(t, http.StatusBadRequest, r.status)
	assert.Contains(t, string(r.body), "temperature")

	// Progress as server-sent events, then the result.
	gen["stream"] = true
	r = batched.post(t, "/v1/images/generations", gen)
	require.Equal(t, http.StatusOK, r.status)
	assert.Equal(t, "text/event-stream", r.header.Get("Content-Type"))
	events := strings.Split(strings.TrimSpace(string(r.body)), "\n\n")
	require.GreaterOrEqual(t, len(events), 2)
	assert.True(t, strings.HasPrefix(events[0], "event: progress\ndata: {"), events[0])
	assert.Contains(t, events[len(events)-2], `"step":12,"total":12`)
	last := events[len(events)-1]
	require.True(t, strings.HasPrefix(last, "event: result\ndata: "), last)
	var res imagesResponse
	require.NoError(t, json.Unmarshal([]byte(strings.TrimPrefix(last, "event: result\ndata: ")), &res))
	assert.Equal(t, c[0].B64JSON, res.Data[0].B64JSON, "streaming changes nothing")

	r, err := batched.do(context.Background(), "GET", "/healthz", "", nil)
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, r.status)
	r, err = batched.do(context.Background(), "GET", "/metrics", "", nil)
	require.NoError(t, err)
	m := string(r.body)
	for _, want := range []string{"# TYPE dimoo_queue_depth gauge\ndimoo_queue_depth 0\n",
		`dimoo_requests_total{endpoint="images_generations",outcome="ok"} 3`,
		`dimoo_requests_total{endpoint="images_edits",outcome="ok"} 2`,
		`dimoo_requests_total{endpoint="chat_completions",outcome="ok"} 4`, // three of them streamed
		`dimoo_requests_total{endpoint="chat_completions",outcome="bad_request"} 1`,
		"# TYPE dimoo_decode_seconds histogram", "dimoo_decode_seconds_count 10\n",
		"dimoo_decode_steps_total ", "dimoo_steps_per_second ", `dimoo_batch_forwards_total{engine="cpu"}`} {
		assert.Contains(t, m, want)
	}
}

// Bad requests get a 4xx status and a message naming the problem.
func TestBadRequests(t *testing.T) {
	ts := start(t, true, Options{MaxBodyBytes: 64 << 10, MaxImagePixels: 64 * 64, MaxN: 2})
	in := pngBytes(t, redSquare(32, 32))
	big := pngBytes(t, redSquare(100, 100))
	noise := make([]byte, 100<<10)
	for i := range noise {
		noise[i] = byte(i * 7)
	}
	type tc struct {
		name, path, ctype string
		body              []byte
		status            int
		msg               string
	}
	js := func(s string) []byte { return []byte(s) }
	edit := func(fields map[string]string, files map[string][]byte) ([]byte, string) {
		return multipartBody(t, fields, files)
	}
	cases := []tc{
		{"malformed", "/v1/images/generations", "application/json", js(`{"prompt": "a red`), 400, "malformed JSON"},
		{"not an object", "/v1/images/generations", "application/json", js(`[1,2]`), 400, "want"},
		{"empty body", "/v1/images/generations", "application/json", nil, 400, "empty request body"},
		{"trailing", "/v1/images/generations", "application/json", js(`{"prompt":"a"} {}`), 400, "after the object"},
		{"unknown field", "/v1/images/generations", "application/json", js(`{"prompt":"a red circle","colour":1}`), 400, `unknown field "colour"`},
		{"wrong type", "/v1/images/generations", "application/json", js(`{"prompt":5}`), 400, `field "prompt"`},
		{"no prompt", "/v1/images/generations", "application/json", js(`{"size":"32x32"}`), 400, "prompt is required"},
		{"bad size", "/v1/images/generations", "application/json", js(`{"prompt":"a","size":"big"}`), 400, "WIDTHxHEIGHT"},
		// Other sizes are floored to the factor, as the official script does.
		{"size below the factor", "/v1/images/generations", "application/json", js(`{"prompt":"a","size":"2x2"}`), 400, "at least"},
		{"huge size", "/v1/images/generations", "application/json", js(`{"prompt":"a","size":"4096x4096"}`), 400, "pixels"},
		{"n", "/v1/images/generations", "application/json", js(`{"prompt":"a","n":3}`), 400, "n must be"},
		{"url format", "/v1/images/generations", "application/json", js(`{"prompt":"a","response_format":"url"}`), 400, "b64_json"},
		{"model", "/v1/images/generations", "application/json", js(`{"prompt":"a","model":"dall-e-3"}`), 400, "unknown model"},
		{"temperature", "/v1/images/generations", "application/json", js(`{"prompt":"a","temperature":-1}`), 400, "temperature"},
		{"steps", "/v1/images/generations", "application/json", js(`{"prompt":"a","steps":100000}`), 400, "steps"},
		{"cache ratio", "/v1/images/generations", "application/json", js(`{"prompt":"a","use_cache":true,"cache_ratio":2}`), 400, "cache_ratio"},
		{"content type", "/v1/images/generations", "text/plain", js(`{"prompt":"a"}`), 400, "Content-Type"},
		{"too large", "/v1/images/generations", "application/json", append(js(`{"prompt":"`), bytes.Repeat(js("a"), 100<<10)...), 413, "limit"},
		{"not multipart", "/v1/images/edits", "application/json", js(`{}`), 400, "multipart"},
		{"chat no image", "/v1/chat/completions", "application/json",
			js(`{"messages":[{"role":"user","content":"hello"}]}`), 400, "needs an image"},
		{"chat url", "/v1/chat/completions", "application/json",
			js(`{"messages":[{"role":"user","content":[{"type":"text","text":"q"},{"type":"image_url","image_url":{"url":"http://x/y.png"}}]}]}`), 400, "data URL"},
		{"chat role", "/v1/chat/completions", "application/json", js(`{"messages":[{"role":"robot","content":"x"}]}`), 400, "unknown role"},
		{"chat bad image", "/v1/chat/completions", "application/json",
			js(`{"messages":[{"role":"user","content":[{"type":"text","text":"q"},{"type":"image_url","image_url":{"url":"data:image/png;base64,aGVsbG8="}}]}]}`), 400, "not a PNG"},
	}
	body, ct := edit(map[string]string{"prompt": "make it a square"}, map[string][]byte{"image": big})
	cases = append(cases, tc{"oversized image", "/v1/images/edits", ct, body, 400, "more than the server's 4096 pixels"})
	body, ct = edit(map[string]string{"prompt": "x"}, nil)
	cases = append(cases, tc{"no image", "/v1/images/edits", ct, body, 400, "no image"})
	body, ct = edit(map[string]string{"prompt": "x", "strength": "1"}, map[string][]byte{"image": in})
	cases = append(cases, tc{"edit unknown field", "/v1/images/edits", ct, body, 400, `unknown field "strength"`})
	body, ct = edit(map[string]string{"prompt": "x", "edit_type": "paint"}, map[string][]byte{"image": in})
	cases = append(cases, tc{"edit type", "/v1/images/edits", ct, body, 400, "unknown edit type"})
	body, ct = edit(map[string]string{"prompt": "x"}, map[string][]byte{"image": in, "mask": pngBytes(t, redSquare(16, 16))})
	cases = append(cases, tc{"mask size", "/v1/images/edits", ct, body, 400, "the mask is 16x16"})
	body, ct = edit(map[string]string{"prompt": "x"}, map[string][]byte{"image": js("not an image")})
	cases = append(cases, tc{"edit garbage", "/v1/images/edits", ct, body, 400, "not a PNG or JPEG"})
	body, ct = edit(map[string]string{"prompt": "x"}, map[string][]byte{"image": noise})
	cases = append(cases, tc{"edit too large", "/v1/images/edits", ct, body, 413, "limit"})
	for _, c := range cases {
		r, err := ts.do(context.Background(), "POST", c.path, c.ctype, c.body)
		require.NoError(t, err, c.name)
		assert.Equal(t, c.status, r.status, "%s: %s", c.name, r.body)
		assert.Contains(t, r.errMessage(), c.msg, c.name)
	}
	r, err := ts.do(context.Background(), "GET", "/v1/images/generations", "", nil)
	require.NoError(t, err)
	assert.Equal(t, http.StatusMethodNotAllowed, r.status)
	assert.Contains(t, r.errMessage(), "takes POST")
	r, err = ts.do(context.Background(), "POST", "/v1/nothing", "", nil)
	require.NoError(t, err)
	assert.Equal(t, http.StatusNotFound, r.status)
	assert.Contains(t, r.errMessage(), "no endpoint")
	// A deadline shorter than the decode.
	r, err = ts.do(context.Background(), "POST", "/v1/images/generations?timeout=0.001", "application/json",
		js(`{"prompt":"a red circle at the center","steps":400}`))
	require.NoError(t, err)
	assert.Equal(t, http.StatusGatewayTimeout, r.status, string(r.body))
	// OpenAI's options that need another: stream_options without stream,
	// max_tokens and max_completion_tokens that disagree.
	for _, c := range []struct{ extra, msg string }{
		{`"stream_options":{"include_usage":true}`, "stream_options needs stream: true"},
		{`"max_tokens":16,"max_completion_tokens":32`, "differ"},
	} {
		body := `{` + c.extra + `,"messages":[{"role":"user","content":[{"type":"text","text":"hi"},` +
			`{"type":"image_url","image_url":{"url":"data:image/png;base64,` + base64.StdEncoding.EncodeToString(in) + `"}}]}]}`
		r, err := ts.do(context.Background(), "POST", "/v1/chat/completions", "application/json", []byte(body))
		require.NoError(t, err)
		assert.Equal(t, http.StatusBadRequest, r.status, c.extra)
		assert.Contains(t, r.errMessage(), c.msg)
	}
	// A streamed answer refused before its decode begins: a status and a
	// JSON error, as unstreamed (what fails later: TestStreamChatErrors).
	chat, _ := json.Marshal(map[string]any{"stream": true, "max_tokens": 16, "block_length": 3,
		"messages": []any{map[string]any{"role": "user", "content": []any{
			map[string]any{"type": "text", "text": "What is in the image?"},
			map[string]any{"type": "image_url", "image_url": map[string]string{
				"url": "data:image/png;base64," + base64.StdEncoding.EncodeToString(in)}}}}}})
	r, err = ts.do(context.Background(), "POST", "/v1/chat/completions", "application/json", chat)
	require.NoError(t, err)
	assert.Equal(t, http.StatusBadRequest, r.status, string(r.body))
	assert.Contains(t, r.errMessage(), "block_length")
	r, err = ts.do(context.Background(), "POST", "/v1/images/generations?timeout=x", "application/json", js(`{}`))
	require.NoError(t, err)
	assert.Equal(t, http.StatusBadRequest, r.status)
}

// Concurrent mixed requests on a small queue, some cancelled by their
// clients, and a shutdown midway: every request is answered (or, cancelled
// by its client, gets nothing); answers are results or clear errors (429,
// 503, 504); nothing is left running afterwards.
func TestLoad(t *testing.T) {
	p := pipeline(t)
	// Warm: the library's compute thread starts with the first call.
	_, err := p.GenerateImage(context.Background(), dimoo.ImageRequest{Prompt: "a red circle at the center",
		Sampling: dimoo.ImageSampling{Steps: 2}})
	require.NoError(t, err)
	runtime.GC()
	before := runtime.NumGoroutine()
	func() {
		b, err := p.NewBatcher(dimoo.BatchOptions{Seqs: 8, MaxTokens: 256})
		require.NoError(t, err)
		defer b.Close()
		s, err := New([]*Engine{{Name: "a", Pipeline: p, Batcher: b}, {Name: "b", Pipeline: p}},
			Options{MaxInflight: 4, MaxQueue: 6, GPUs: &gpu.Fake{Devices: []gpu.Device{{Name: "NVIDIA H200", MemoryTotal: 141 << 30}}}})
		require.NoError(t, err)
		l, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		ts := &testServer{Server: s, url: "http://" + l.Addr().String(), client: &http.Client{}, done: make(chan error, 1)}
		go func() { ts.done <- s.Serve(l) }()
		defer ts.client.CloseIdleConnections()

		in := pngBytes(t, redSquare(32, 32))
		editBody, editCT := multipartBody(t, map[string]string{"prompt": "move it to the center", "steps": "16"},
			map[string][]byte{"image": in})
		chatBody, _ := json.Marshal(map[string]any{"messages": []any{map[string]any{"role": "user", "content": []any{
			map[string]any{"type": "text", "text": "What is in the image?"},
			map[string]any{"type": "image_url", "image_url": map[string]string{
				"url": "data:image/png;base64," + base64.StdEncoding.EncodeToString(in)}}}}}})
		const N = 40
		type result struct {
			i         int
			r         reply
			err       error
			cancelled bool
		}
		var sent atomic.Int64
		results := make(chan result, N)
		var wg sync.WaitGroup
		var shutdownErr error
		shut := make(chan struct{})
		oks := make(chan struct{}, N) // one per success
		var shutAt atomic.Int64
		startShutdown := make(chan struct{})
		go func() {
			// Midway (half the requests sent): stop accepting; the grace ends
			// once two requests have succeeded, failing those still running.
			<-startShutdown
			shutAt.Store(sent.Load())
			ctx, cancel := context.WithCancel(context.Background())
			go func() {
				defer cancel()
				for k := 0; k < 2; k++ {
					select {
					case <-oks:
					case <-time.After(90 * time.Second): // a watchdog: sanitizer builds on 2 slow cores need more than 20 s
						t.Error("fewer than 2 requests succeeded in time")
						return
					}
				}
			}()
			shutdownErr = s.Shutdown(ctx)
			cancel()
			close(shut)
		}()
		for i := 0; i < N; i++ {
			if i == N/2 {
				close(startShutdown)
			}
			wg.Add(1)
			sent.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				cancelled := i%7 == 3
				if cancelled {
					time.AfterFunc(time.Duration(5+i)*time.Millisecond, cancel)
				}
				var r reply
				var err error
				switch i % 4 {
				case 0, 1:
					r, err = ts.do(ctx, "POST", "/v1/images/generations", "application/json",
						[]byte(fmt.Sprintf(`{"prompt":"a red circle at the top left","seed":%d,"n":%d,"steps":%d}`, i, 1+i%2, 16+8*(i%3))))
				case 2:
					r, err = ts.do(ctx, "POST", "/v1/images/edits", editCT, editBody)
				case 3:
					r, err = ts.do(ctx, "POST", "/v1/chat/completions", "application/json", chatBody)
				}
				if err == nil && r.status == http.StatusOK {
					oks <- struct{}{}
				}
				results <- result{i, r, err, cancelled}
			}()
			time.Sleep(10 * time.Millisecond)
		}
		wg.Wait()
		close(results)
		<-shut
		<-ts.done
		counts := map[int]int{}
		for res := range results {
			if res.err != nil {
				// Only a client that cancelled, or one that connected after
				// the listener closed, may go without an answer.
				if !res.cancelled {
					assert.True(t, int64(res.i) >= shutAt.Load()-1 && isConnError(res.err), "request %d: %v", res.i, res.err)
				}
				continue
			}
			counts[res.r.status]++
			switch res.r.status {
			case http.StatusOK:
				assert.NotEmpty(t, res.r.body)
			case http.StatusTooManyRequests, http.StatusServiceUnavailable:
				assert.NotEmpty(t, res.r.header.Get("Retry-After"), "request %d", res.i)
				assert.NotEmpty(t, res.r.errMessage(), "request %d", res.i)
			default:
				t.Errorf("request %d: status %d: %s", res.i, res.r.status, res.r.body)
			}
		}
		t.Logf("statuses: %v; shutdown after request %d: %v", counts, shutAt.Load(), shutdownErr)
		assert.GreaterOrEqual(t, counts[http.StatusOK], 2)
		var sb strings.Builder
		s.writeMetrics(&sb)
		assert.Contains(t, sb.String(), `dimoo_gpu_memory_total_bytes{gpu="0",name="NVIDIA H200"} 1.51397597184e+11`)
	}()
	// Every goroutine the server, its connections and the batcher started
	// has ended.
	deadline := time.Now().Add(5 * time.Second)
	after := runtime.NumGoroutine()
	for after > before && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		after = runtime.NumGoroutine()
	}
	if after > before {
		buf := make([]byte, 1<<20)
		t.Errorf("goroutines: %d before, %d after:\n%s", before, after, buf[:runtime.Stack(buf, true)])
	}
}

// isConnError: the request never reached a live server (the listener was
// closed, or the idle connection it was sent on was closed by shutdown).
func isConnError(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) || errors.Is(err, io.EOF) || strings.Contains(err.Error(), "server closed idle connection")
}

// testThreads keeps the tests to one compute thread: on a shared machine
// OpenMP's barriers across busy cores cost more than they give.
const testThreads = 1

// A streamed chat answer whose decode fails: before its first step, a
// status and a JSON error; after it, the error as the last chunk.
func TestStreamChatErrors(t *testing.T) {
	s := &Server{opts: Options{ModelName: "dimoo"}, hard: context.Background()}
	fail := errors.New("the device fell over")
	for _, c := range []struct {
		name     string
		run      func(context.Context, dimoo.UnderstandRequest) (string, error)
		status   int
		body     []string
		notEvent bool
		usage    bool
	}{
		{"before the first step", func(context.Context, dimoo.UnderstandRequest) (string, error) {
			return "", fmt.Errorf("%w: steps 5 is not a positive multiple of the 4 blocks", dimoo.ErrInvalidArgument)
		}, http.StatusBadRequest, []string{`"type":"invalid_request_error"`, "multiple of the 4 blocks"}, true, false},
		{"after a step and a piece", func(_ context.Context, r dimoo.UnderstandRequest) (string, error) {
			r.Progress(1, 8)
			r.Stream("a red")
			return "", fail
		}, http.StatusInternalServerError, []string{`"role":"assistant"`, `"content":"a red"`,
			`"type":"server_error"`, "the device fell over", "data: [DONE]"}, false, false},
		{"a whole answer", func(_ context.Context, r dimoo.UnderstandRequest) (string, error) {
			r.Progress(1, 2)
			r.Stream("a red")
			r.Progress(2, 2)
			r.Stream(" circle")
			return "a red circle", nil
		}, http.StatusOK, []string{`"role":"assistant"`, `"finish_reason":"stop"`, "data: [DONE]"}, false, false},
		{"a whole answer with its usage", func(_ context.Context, r dimoo.UnderstandRequest) (string, error) {
			r.Progress(1, 1)
			r.Stream("a red")
			r.Stream(" circle")
			*r.Usage = dimoo.TokenUsage{Prompt: 100, Completion: 3}
			return "a red circle", nil
		}, http.StatusOK, []string{`"usage":null`, `"choices":[],`,
			`"usage":{"completion_tokens":3,"prompt_tokens":100,"total_tokens":103}}` + "\n\ndata: [DONE]"}, false, true},
	} {
		rec := httptest.NewRecorder()
		decoded, released := false, 0
		st := s.streamChat(context.Background(), rec, c.run, dimoo.UnderstandRequest{}, "chatcmpl-1", 1, c.usage,
			func() { decoded = true }, func() { released++ })
		assert.Equal(t, c.status, st, c.name)
		assert.Equal(t, 1, released, "%s: the slot is released once the decode ends", c.name)
		body := rec.Body.String()
		for _, want := range c.body {
			assert.Contains(t, body, want, c.name)
		}
		if c.notEvent {
			assert.Equal(t, c.status, rec.Code, c.name)
			assert.Equal(t, "application/json", rec.Header().Get("Content-Type"), c.name)
		} else {
			assert.Equal(t, http.StatusOK, rec.Code, "%s: the events had begun", c.name)
			assert.Equal(t, "text/event-stream", rec.Header().Get("Content-Type"), c.name)
		}
		assert.Equal(t, c.status == http.StatusOK, decoded, c.name)
		if c.status == http.StatusOK { // the pieces, in order, make the answer
			var text strings.Builder
			for _, e := range strings.Split(strings.TrimSpace(body), "\n\n") {
				var ch struct {
					Choices []struct{ Delta map[string]string } `json:"choices"`
				}
				if json.Unmarshal([]byte(strings.TrimPrefix(e, "data: ")), &ch) == nil && len(ch.Choices) == 1 {
					text.WriteString(ch.Choices[0].Delta["content"])
				}
			}
			assert.Equal(t, "a red circle", text.String())
		}
	}
}

// rawRequest writes a request's head and the first cut bytes of its body on
// a connection of its own, and returns it with the rest of the body.
func rawRequest(t *testing.T, ts *testServer, path string, body []byte, cut int) (net.Conn, []byte) {
	t.Helper()
	c, err := net.Dial("tcp", strings.TrimPrefix(ts.url, "http://"))
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	_, err = fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: dimoo\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
		path, len(body), body[:cut])
	require.NoError(t, err)
	return c, body[cut:]
}

func readStatus(t *testing.T, c net.Conn) int {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(60*time.Second)))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	require.NoError(t, err)
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

// A slow upload waits in the queue, not in a run slot: with one slot, a
// request whose body stalls halfway lets another run meanwhile, and then
// runs itself once the rest arrives. A body that misses the request's
// deadline gets 504, and leaves the queue.
func TestSlowUpload(t *testing.T) {
	ts := start(t, false, Options{MaxInflight: 1, MaxQueue: 4})
	body, err := json.Marshal(map[string]any{"prompt": "a red circle at the center", "steps": 2, "seed": 1})
	require.NoError(t, err)

	slow, rest := rawRequest(t, ts, "/v1/images/generations", body, len(body)/2)
	waiting := func() int64 {
		var h struct {
			Waiting int64 `json:"waiting"`
		}
		r, err := ts.do(context.Background(), "GET", "/healthz", "", nil)
		require.NoError(t, err)
		require.NoError(t, json.Unmarshal(r.body, &h))
		return h.Waiting
	}
	require.Eventually(t, func() bool { return waiting() == 1 }, 10*time.Second, 10*time.Millisecond,
		"the stalled upload counts as waiting")

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r, err := ts.do(ctx, "POST", "/v1/images/generations", "application/json", body)
	require.NoError(t, err, "a request behind a stalled upload must not wait for it")
	decodeImages(t, r)

	_, err = slow.Write(rest)
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, readStatus(t, slow))

	late, _ := rawRequest(t, ts, "/v1/images/generations?timeout=0.2", body, 5)
	assert.Equal(t, http.StatusGatewayTimeout, readStatus(t, late))
	assert.Equal(t, int64(0), waiting())
}

// stuckWriter is a client that stops reading: its first Write blocks until
// unblock closes.
type stuckWriter struct {
	header  http.Header
	writing chan struct{}
	unblock chan struct{}
	once    sync.Once
}

func (w *stuckWriter) Header() http.Header { return w.header }
func (w *stuckWriter) WriteHeader(int)     {}
func (w *stuckWriter) Write(b []byte) (int, error) {
	w.once.Do(func() { close(w.writing) })
	<-w.unblock
	return len(b), nil
}

// The run slot is for decoding: a request whose answer cannot be written
// (its client stopped reading) gives its slot back once its decode ends,
// so with one slot the next request runs meanwhile.
func TestSlotReleasedBeforeTheAnswer(t *testing.T) {
	ts := start(t, false, Options{MaxInflight: 1, MaxQueue: 4})
	body := `{"prompt": "a red circle at the center", "steps": 2, "seed": 1}`
	request := func() *http.Request {
		r := httptest.NewRequest("POST", "/v1/images/generations", strings.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		return r
	}
	stuck := &stuckWriter{header: http.Header{}, writing: make(chan struct{}), unblock: make(chan struct{})}
	first := make(chan struct{})
	go func() {
		defer close(first)
		ts.Handler().ServeHTTP(stuck, request())
	}()
	select {
	case <-stuck.writing:
	case <-time.After(60 * time.Second):
		t.Fatal("the first request never wrote its answer")
	}
	second := make(chan *httptest.ResponseRecorder)
	go func() {
		rec := httptest.NewRecorder()
		ts.Handler().ServeHTTP(rec, request())
		second <- rec
	}()
	select {
	case rec := <-second:
		assert.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	case <-time.After(60 * time.Second):
		t.Error("the second request waited for the first one's answer to be read")
	}
	close(stuck.unblock)
	<-first
}

// deadlineAtEnd sets the deadline when the context ends first, never after
// end, and end says which happened.
func TestDeadlineAtEnd(t *testing.T) {
	at := time.Unix(42, 0)
	var got []time.Time
	var mu sync.Mutex
	set := func(d time.Time) error {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, d)
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	d := deadlineAtEnd(ctx, set, func() time.Time { return at })
	cancel()
	require.Eventually(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(got) == 1 }, 5*time.Second, time.Millisecond)
	assert.True(t, d.end())
	assert.Equal(t, []time.Time{at}, got)

	got = nil
	ctx, cancel = context.WithCancel(context.Background())
	d = deadlineAtEnd(ctx, set, func() time.Time { return at })
	assert.False(t, d.end())
	cancel()
	time.Sleep(10 * time.Millisecond) // an AfterFunc would run by now
	mu.Lock()
	assert.Empty(t, got)
	mu.Unlock()
}
