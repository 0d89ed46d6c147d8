package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"modernc.org/sqlite"
)

// ---- Fake providers and helpers ----

// completionJSON is a chat.completion body as OpenAI sends it.
func completionJSON(content string, in, out int) string {
	return fmt.Sprintf(`{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"m",`+
		`"choices":[{"index":0,"message":{"role":"assistant","content":%q},"finish_reason":"stop"}],`+
		`"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}`, content, in, out, in+out)
}

// chunkJSON is one chat.completion.chunk carrying content.
func chunkJSON(content string) string {
	return fmt.Sprintf(`{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m",`+
		`"choices":[{"index":0,"delta":{"content":%q},"finish_reason":null}]}`, content)
}

const finishChunk = `{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}`

func usageChunk(in, out int) string {
	return fmt.Sprintf(`{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m","choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}`, in, out, in+out)
}

// sse writes SSE events, one flush each, as a provider does.
func sse(w http.ResponseWriter, payloads ...string) {
	w.Header().Set("Content-Type", "text/event-stream")
	for _, p := range payloads {
		fmt.Fprintf(w, "data: %s\n\n", p)
		w.(http.Flusher).Flush()
	}
}

// streamOK is a provider stream: a few chunks, the usage chunk when the
// request asked for it, [DONE].
func streamOK(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	events := []string{chunkJSON("Hello"), chunkJSON(" world"), finishChunk}
	if bytes.Contains(body, []byte(`"include_usage":true`)) {
		events = append(events, usageChunk(12, 3))
	}
	sse(w, append(events, "[DONE]")...)
}

func jsonOK(w http.ResponseWriter, r *http.Request) {
	io.Copy(io.Discard, r.Body)
	w.Header().Set("Content-Type", "application/json")
	io.WriteString(w, completionJSON("Hello world", 12, 3))
}

// statusHandler answers with an error status and an OpenAI-shaped body.
func statusHandler(status int) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		fmt.Fprintf(w, `{"error":{"message":"status %d","type":"test","code":null}}`, status)
	}
}

// dropConn closes the connection without an answer.
func dropConn(w http.ResponseWriter, r *http.Request) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err == nil {
		conn.Close()
	}
}

// newUpstream serves h as a provider. Like a real provider, it reads the
// whole request before answering; this also lets the server notice a caller
// that hangs up, which it cannot while a body is unread.
// openCircuitUntil opens a provider's circuit until t, as failures would.
func openCircuitUntil(p *provider, t time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.openUntil = t
	p.tripped.Store(!t.IsZero())
}

func newUpstream(t testing.TB, h http.HandlerFunc) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		h(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func prov(name, url string, in, out float64) ProviderConfig {
	return ProviderConfig{Name: name, URL: url + "/v1", InputRate: in, OutputRate: out}
}

func testConfig(providers ...ProviderConfig) *Config {
	cfg := defaultConfig()
	cfg.Providers = providers
	cfg.Server.UpstreamTimeoutSecs = 2
	return cfg
}

// testArbstr is arbstr serving cfg on a real socket, with its ledger in a
// file of t.TempDir().
type testArbstr struct {
	*httptest.Server
	srv    *server
	dbPath string
	logs   *syncBuffer
}

// testClient is the tests' HTTP client: no test waits for an answer for
// ever.
var testClient = &http.Client{Timeout: time.Minute}

// syncBuffer is a log buffer that the server's goroutines may write while
// the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func newArbstr(t testing.TB, cfg *Config) *testArbstr {
	t.Helper()
	ta := &testArbstr{dbPath: filepath.Join(t.TempDir(), "ledger.db"), logs: &syncBuffer{}}
	logger := slog.New(slog.NewTextHandler(ta.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	store, err := openStore(ta.dbPath, logger)
	if err != nil {
		t.Fatal(err)
	}
	ta.srv = newServer(cfg, newRouter(cfg, store.Ratio), store, logger)
	ta.srv.backoff = []time.Duration{time.Millisecond, 2 * time.Millisecond}
	ta.Server = httptest.NewServer(ta.srv)
	t.Cleanup(func() {
		ta.Server.Close()
		store.Close()
	})
	return ta
}

// logged returns the logs once every request in flight has ended: a
// request's log line is written after its answer has gone out.
func (ta *testArbstr) logged(t testing.TB) string {
	t.Helper()
	done := make(chan struct{})
	go func() { ta.srv.inflight.Wait(); close(done) }()
	receiveWithin(t, done, "end of the requests in flight")
	return ta.logs.String()
}

func (ta *testArbstr) post(t testing.TB, path, body string, header ...string) *http.Response {
	t.Helper()
	return postTo(t, testClient, ta.URL+path, body, header...)
}

// postTo posts a JSON body to url through c, with extra headers given as
// name, value pairs.
func postTo(t testing.TB, c *http.Client, url, body string, header ...string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func (ta *testArbstr) get(t testing.TB, path string) (*http.Response, []byte) {
	t.Helper()
	resp, err := testClient.Get(ta.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// rows returns the ledger, newest first, once every pending row is written.
func (ta *testArbstr) rows(t testing.TB) []ledgerRow {
	t.Helper()
	ctx := context.Background()
	if err := ta.srv.store.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	rows, err := ta.srv.store.Requests(ctx, requestsQuery{Limit: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	return rows
}

func readBody(t testing.TB, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// apiErr decodes an OpenAI-shaped error body, failing the test on any other
// shape.
func apiErr(t testing.TB, body string) (typ, code, msg string) {
	t.Helper()
	var e struct {
		Error *struct {
			Message string  `json:"message"`
			Type    string  `json:"type"`
			Param   *string `json:"param"`
			Code    string  `json:"code"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(body), &e); err != nil {
		t.Fatalf("not an OpenAI error, not JSON (%v): %s", err, body)
	}
	if e.Error == nil {
		t.Fatalf("not an OpenAI error, no error object: %s", body)
	}
	if e.Error.Message == "" {
		t.Errorf("OpenAI error without a message: %s", body)
	}
	if e.Error.Type == "" {
		t.Errorf("OpenAI error without a type: %s", body)
	}
	if !strings.Contains(body, `"param":null`) {
		t.Errorf("error without param:null: %s", body)
	}
	return e.Error.Type, e.Error.Code, e.Error.Message
}

const chatBody = `{"model":"m","messages":[{"role":"user","content":"Hello there, how are you?"}]}`
const streamBody = `{"model":"m","stream":true,"messages":[{"role":"user","content":"Hello there, how are you?"}]}`

// ---- Proxying ----

func TestChatForwardsBodyAndHeaders(t *testing.T) {
	type seen struct {
		body   []byte
		header http.Header
		path   string
	}
	got := make(chan seen, 1)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- seen{b, r.Header.Clone(), r.URL.Path}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Request-Id", "up-123")
		w.Header().Set("Connection", "X-Hop")
		w.Header().Set("X-Hop", "secret-hop")
		w.Header().Set("Keep-Alive", "timeout=5")
		io.WriteString(w, "  "+completionJSON("hi", 10, 20))
	})
	p := prov("p1", up.URL, 3, 7)
	p.APIKey = "sk-provider-key"
	ta := newArbstr(t, testConfig(p))

	// Odd spacing, unicode and unknown fields must reach the provider as sent.
	body := "{\"model\" : \"m\",\"messages\":[{\"role\":\"user\",\"content\":\"héllo \\u00e9\"}],\n\"x_unknown\":{\"a\":[1,2.50]} }"
	resp := ta.post(t, "/v1/chat/completions", body,
		"Authorization", "Bearer client-secret", "Cookie", "c=1", "X-Custom", "v",
		"Connection", "X-Client-Hop", "X-Client-Hop", "1", "OpenAI-Organization", "org")
	out := readBody(t, resp)
	if resp.StatusCode != 200 {
		t.Fatalf("status = %d; want 200: %s", resp.StatusCode, out)
	}
	s := receiveWithin(t, got, "request at the provider")
	if string(s.body) != body {
		t.Errorf("upstream body = %q; want %q", s.body, body)
	}
	if s.path != "/v1/chat/completions" {
		t.Errorf("upstream path = %q", s.path)
	}
	if a := s.header.Get("Authorization"); a != "Bearer sk-provider-key" {
		t.Errorf("upstream Authorization = %q; want the provider's key", a)
	}
	for _, h := range []string{"Cookie", "X-Custom", "X-Client-Hop", "Openai-Organization"} {
		if v := s.header.Get(h); v != "" {
			t.Errorf("client header %s reached the provider: %q", h, v)
		}
	}
	if ct := s.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("upstream Content-Type = %q", ct)
	}

	want := `  {"arbstr_provider":"p1",` + completionJSON("hi", 10, 20)[1:]
	if out != want {
		t.Errorf("body = %s\nwant  %s", out, want)
	}
	for h, want := range map[string]string{
		"X-Arbstr-Provider": "p1", "X-Arbstr-Attempts": "1", "X-Arbstr-Cost-Sats": "0.17",
		"X-Request-Id": "up-123", "X-Hop": "", "Keep-Alive": "",
	} {
		if got := resp.Header.Get(h); got != want {
			t.Errorf("response header %s = %q; want %q", h, got, want)
		}
	}
	for _, h := range []string{"X-Arbstr-Request-Id", "X-Arbstr-Latency-Ms"} {
		if resp.Header.Get(h) == "" {
			t.Errorf("response header %s is missing: %v", h, resp.Header)
		}
	}
	r := onlyRow(t, ta)
	expect(t, "row.RequestID", r.RequestID, resp.Header.Get("X-Arbstr-Request-Id"))
	expect(t, "row.Provider", r.Provider, "p1")
	expect(t, "row.Success", r.Success, true)
	expect(t, "row.InputTokens", deref(r.InputTokens), 10)
	expect(t, "row.OutputTokens", deref(r.OutputTokens), 20)
	expect(t, "row.Cost", deref(r.Cost), 170)
	expect(t, "row.UsageEstimated", r.UsageEstimated, false)
	expect(t, "row.Status", r.Status, 200)
}

// gatedWriter holds back every write that contains line until open is
// closed, a log on a full pipe or a stalled disk, then writes to out.
type gatedWriter struct {
	line string
	open chan struct{}
	out  *syncBuffer
}

func (g gatedWriter) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte(g.line)) {
		<-g.open
	}
	return g.out.Write(p)
}

// TestAnswerBeforeLogLine: a completion's log line is written once its
// answer has gone out, so a log that cannot be written does not hold the
// answer back; the row is in the ledger by then.
func TestAnswerBeforeLogLine(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, completionJSON("hi", 10, 20))
	})
	ta := newArbstr(t, testConfig(prov("p1", up.URL, 3, 7)))
	gate := gatedWriter{line: "msg=request", open: make(chan struct{}), out: &syncBuffer{}}
	ta.srv.log = slog.New(slog.NewTextHandler(gate, nil))
	answered := make(chan string, 1)
	go func() {
		resp, err := testClient.Post(ta.URL+"/v1/chat/completions", "application/json", strings.NewReader(chatBody))
		if err != nil {
			answered <- err.Error()
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		answered <- fmt.Sprint(resp.StatusCode, " ", err == nil && bytes.Contains(b, []byte(`"hi"`)))
	}()
	select {
	case got := <-answered:
		expect(t, "status and whole answer while the log line is held", got, "200 true")
	case <-time.After(10 * time.Second):
		t.Error("no answer within 10 s while the log line is held")
	}
	rows := ta.rows(t)
	expect(t, "ledger rows while the log line is held", len(rows), 1)
	close(gate.open)
	ta.logged(t) // the request has ended
	line := gate.out.String()
	expect(t, "log lines once released", strings.Count(line, "msg=request "), 1)
	// The line says what the row says.
	for _, field := range []string{"id=" + rows[0].RequestID, "model=" + rows[0].Model, "provider=p1", "status=200",
		"input_tokens=10", "output_tokens=20", "cost_sats=0.17", "attempts=1"} {
		expectContains(t, "the log line", line, field+" ")
	}
}

// TestNewRequestID: ids are unique, of one form, and sort in the order
// they were made once a millisecond lies between them.
func TestNewRequestID(t *testing.T) {
	seen := map[string]bool{}
	for range 10000 {
		id := newRequestID()
		if len(id) != len("arb_")+28 || !strings.HasPrefix(id, "arb_") || strings.Trim(id[4:], "0123456789abcdef") != "" {
			t.Fatalf("id %q; want arb_ and 28 lower-case hex digits", id)
		}
		if seen[id] {
			t.Fatalf("id %q made twice", id)
		}
		seen[id] = true
	}
	before := newRequestID()
	time.Sleep(2 * time.Millisecond)
	if after := newRequestID(); after <= before {
		t.Errorf("id made 2 ms later %q sorts before %q", after, before)
	}
	ms, err := strconv.ParseInt(before[4:16], 16, 64)
	if err != nil || time.Since(time.UnixMilli(ms)).Abs() > time.Minute {
		t.Errorf("id %q starts with %s ms, %v; want now in milliseconds", before, before[4:16], err)
	}
}

func TestUpstreamURL(t *testing.T) {
	for _, tc := range []struct{ base, want string }{
		{"https://p.example/v1", "https://p.example/v1/chat/completions"},
		{"https://p.example/v1/", "https://p.example/v1/chat/completions"},
		{"https://p.example", "https://p.example/v1/chat/completions"},
		{"https://p.example/", "https://p.example/v1/chat/completions"},
		{"https://p.example/api", "https://p.example/api/v1/chat/completions"},
		{"http://127.0.0.1:9000/openai/v1", "http://127.0.0.1:9000/openai/v1/chat/completions"},
	} {
		if got := chatURL(tc.base); got != tc.want {
			t.Errorf("chatURL(%q) = %q; want %q", tc.base, got, tc.want)
		}
	}
}

func TestWithIncludeUsage(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		added    bool
	}{
		{`{"model":"m","stream":true}`, `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`, true},
		{"{\"model\":\"m\" ,\"stream\":true }\n", "{\"model\":\"m\" ,\"stream\":true ,\"stream_options\":{\"include_usage\":true}}\n", true},
		{`{"stream_options":{},"model":"m"}`, `{"stream_options":{"include_usage":true},"model":"m"}`, true},
		{`{"stream_options": {"x_vendor":1},"model":"m"}`, `{"stream_options": {"include_usage":true,"x_vendor":1},"model":"m"}`, true},
		{`{"stream_options":null,"model":"m"}`, `{"stream_options":{"include_usage":true},"model":"m"}`, true},
		{`{"model":"m","stream_options":{"include_usage":false}}`, `{"model":"m","stream_options":{"include_usage":false}}`, false},
		{`{"model":"m","stream_options":{"include_usage":true}}`, `{"model":"m","stream_options":{"include_usage":true}}`, false},
		{`{"model":"m","nested":{"stream_options":{}}}`, `{"model":"m","nested":{"stream_options":{}},"stream_options":{"include_usage":true}}`, true},
		{`{"model":"m","s":"}","stream":true}`, `{"model":"m","s":"}","stream":true,"stream_options":{"include_usage":true}}`, true},
		// Keys are exact, as providers read them; a duplicate's last value counts.
		{`{"model":"m","Stream_Options":{"include_usage":false}}`, `{"model":"m","Stream_Options":{"include_usage":false},"stream_options":{"include_usage":true}}`, true},
		{`{"model":"m","stream_options":{"include_usage":false},"stream_options":null}`, `{"model":"m","stream_options":{"include_usage":false},"stream_options":{"include_usage":true}}`, true},
		{`{"model":"m","stream_options":"yes"}`, `{"model":"m","stream_options":"yes"}`, false},
	} {
		req, aerr := parseChat([]byte(strings.Replace(tc.in, "{", `{"messages":[{}],`, 1)))
		if aerr != nil {
			t.Fatalf("parseChat(%q) = %v", tc.in, aerr)
		}
		got, added := withIncludeUsage([]byte(tc.in), req.StreamOptions)
		if string(got) != tc.want {
			t.Errorf("withIncludeUsage(%q) = %q; want %q", tc.in, got, tc.want)
		}
		if added != tc.added {
			t.Errorf("withIncludeUsage(%q) added = %v; want %v", tc.in, added, tc.added)
		}
		if !json.Valid(got) {
			t.Errorf("withIncludeUsage(%q) is not JSON: %q", tc.in, got)
		}
	}
}

// ---- Streaming ----

// TestStreamFlushedPerEvent proves there is no buffering: the client reads
// each event, headers first, while the provider still holds the next one.
func TestStreamFlushedPerEvent(t *testing.T) {
	next := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 3 {
			fmt.Fprintf(w, "data: %s\n\n", chunkJSON(fmt.Sprint("tok", i)))
			w.(http.Flusher).Flush()
			select {
			case <-next:
			case <-r.Context().Done():
				return
			}
		}
		sse(w, finishChunk, usageChunk(5, 3), "[DONE]")
	})
	ta := newArbstr(t, testConfig(prov("p1", up.URL, 1, 1)))
	resp := ta.post(t, "/v1/chat/completions", streamBody)
	defer resp.Body.Close()
	// The headers are here while the provider waits on next.
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("Content-Type = %q", ct)
	}
	expect(t, "Cache-Control", resp.Header.Get("Cache-Control"), "no-cache")
	expect(t, "X-Arbstr-Provider", resp.Header.Get("X-Arbstr-Provider"), "p1")
	br := bufio.NewReader(resp.Body)
	for i := range 3 {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if want := "data: " + chunkJSON(fmt.Sprint("tok", i)) + "\n"; line != want {
			t.Fatalf("event %d = %q; want %q", i, line, want)
		}
		br.ReadString('\n') // the blank line
		sendWithin(t, next) // only now may the provider send the next event
	}
	rest, _ := io.ReadAll(br)
	lines := strings.Split(strings.TrimSpace(string(rest)), "\n\n")
	if len(lines) != 3 {
		t.Fatalf("end of stream = %q; want 3 events: finish chunk, arbstr comment, [DONE] (usage chunk withheld)", rest)
	}
	expect(t, "first event after the content", lines[0], "data: "+finishChunk)
	if !strings.HasPrefix(lines[1], ": arbstr {") {
		t.Errorf("second event = %q; want the ': arbstr' summary", lines[1])
	}
	expect(t, "last event", lines[2], "data: [DONE]")
	var summary struct {
		RequestID    string  `json:"request_id"`
		Provider     string  `json:"provider"`
		InputTokens  int64   `json:"input_tokens"`
		OutputTokens int64   `json:"output_tokens"`
		CostSats     float64 `json:"cost_sats"`
	}
	if err := json.Unmarshal([]byte(strings.TrimPrefix(lines[1], ": arbstr ")), &summary); err != nil {
		t.Fatal(err)
	}
	expect(t, "summary.RequestID", summary.RequestID, resp.Header.Get("X-Arbstr-Request-Id"))
	expect(t, "summary.Provider", summary.Provider, "p1")
	expect(t, "summary.InputTokens", summary.InputTokens, 5)
	expect(t, "summary.OutputTokens", summary.OutputTokens, 3)
	expect(t, "summary.CostSats", summary.CostSats, 0.008)
	r := onlyRow(t, ta)
	expect(t, "row.Success", r.Success, true)
	expect(t, "row.Streaming", r.Streaming, true)
	expect(t, "row.InputTokens", deref(r.InputTokens), 5)
	expect(t, "row.OutputTokens", deref(r.OutputTokens), 3)
	expect(t, "row.UsageEstimated", r.UsageEstimated, false)
}

// TestStreamUsageChunk: the usage chunk that arbstr asked for is withheld
// from the client, one the client asked for is passed on, and either way
// its counts are recorded. A usage chunk whose choices are null is
// usage-only too; one whose choices are not a list is passed on, for it
// may hold what the client wants.
func TestStreamUsageChunk(t *testing.T) {
	for _, tc := range []struct {
		name, body    string
		choices       string // of the usage chunk, when not []
		wantUsage     bool   // the client sees the usage chunk
		wantEstimated bool
	}{
		{"arbstr asked", streamBody, "", false, false},
		{"client asked", `{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}`, "", true, false},
		{"client refused", `{"model":"m","stream":true,"stream_options":{"include_usage":false},"messages":[{"role":"user","content":"hi"}]}`, "", false, true},
		{"arbstr asked, choices null", streamBody, "null", false, false},
		{"arbstr asked, choices not a list", streamBody, `{"index":0}`, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				if tc.choices == "" {
					streamOK(w, r)
					return
				}
				io.Copy(io.Discard, r.Body)
				usage := strings.Replace(usageChunk(12, 3), `"choices":[]`, `"choices":`+tc.choices, 1)
				sse(w, chunkJSON("Hello"), chunkJSON(" world"), finishChunk, usage, "[DONE]")
			})
			ta := newArbstr(t, testConfig(prov("p1", up.URL, 1, 1)))
			out := readBody(t, ta.post(t, "/v1/chat/completions", tc.body))
			if got := strings.Contains(out, `"usage":{"prompt_tokens":12`); got != tc.wantUsage {
				t.Errorf("usage chunk passed = %v; want %v\n%s", got, tc.wantUsage, out)
			}
			if n := strings.Count(out, "data: [DONE]"); n != 1 {
				t.Errorf("[DONE] appears %d times; want once:\n%s", n, out)
			}
			if !strings.HasSuffix(out, "data: [DONE]\n\n") {
				t.Errorf("[DONE] is not last:\n%s", out)
			}
			r := onlyRow(t, ta)
			expect(t, "row.UsageEstimated", r.UsageEstimated, tc.wantEstimated)
			expect(t, "row.Success", r.Success, true)
			if !tc.wantEstimated {
				expect(t, "row.InputTokens", deref(r.InputTokens), 12)
			}
			// Reported, or estimated from "Hello world", 11 bytes.
			expect(t, "row.OutputTokens", deref(r.OutputTokens), 3)
		})
	}
}

// TestStreamShapes feeds the stream reader what real providers send:
// CRLF line ends, events split across writes, "data:" without a space,
// comments and other fields, and no [DONE] at all.
func TestStreamShapes(t *testing.T) {
	for _, tc := range []struct {
		name   string
		writes []string
		ok     bool
	}{
		{"crlf", []string{"data: " + chunkJSON("a") + "\r\n\r\n", "data: " + finishChunk + "\r\n\r\ndata: " + usageChunk(4, 2) + "\r\n\r\ndata: [DONE]\r\n\r\n"}, true},
		{"split", []string{"da", "ta: " + chunkJSON("a")[:10], chunkJSON("a")[10:] + "\n", "\ndata: " + usageChunk(4, 2) + "\n\ndata: [DO", "NE]\n\n"}, true},
		{"no space", []string{"data:" + chunkJSON("a") + "\n\ndata:" + usageChunk(4, 2) + "\n\ndata:[DONE]\n\n"}, true},
		{"comments and fields", []string{": OPENROUTER PROCESSING\n\n", "event: message\nid: 1\nretry: 10\ndata: " + chunkJSON("a") + "\n\n", ": keep-alive\n\ndata: " + usageChunk(4, 2) + "\n\ndata: [DONE]\n\n"}, true},
		{"cr only", []string{"data: " + chunkJSON("a") + "\r\rdata: " + usageChunk(4, 2) + "\r", "\rdata: [DONE]\r\r"}, true},
		{"no done", []string{"data: " + chunkJSON("a") + "\n\ndata: " + finishChunk + "\n\ndata: " + usageChunk(4, 2) + "\n\n"}, true},
		{"cut short", []string{"data: " + chunkJSON("a") + "\n\n"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				io.Copy(io.Discard, r.Body)
				w.Header().Set("Content-Type", "text/event-stream")
				for _, s := range tc.writes {
					io.WriteString(w, s)
					w.(http.Flusher).Flush()
					time.Sleep(2 * time.Millisecond)
				}
			})
			ta := newArbstr(t, testConfig(prov("p1", up.URL, 1, 1)))
			out := readBody(t, ta.post(t, "/v1/chat/completions", streamBody))
			r := onlyRow(t, ta)
			if r.Success != tc.ok {
				t.Fatalf("row.Success = %v; want %v (%q)\n%s", r.Success, tc.ok, deref(r.Error), out)
			}
			if !strings.Contains(out, `"a"`) {
				t.Errorf("content chunk missing:\n%s", out)
			}
			if tc.ok {
				expect(t, "row.InputTokens", deref(r.InputTokens), 4)
				expect(t, "row.OutputTokens", deref(r.OutputTokens), 2)
				if strings.Contains(out, `"prompt_tokens":4`) {
					t.Errorf("the usage chunk arbstr asked for reached the client:\n%s", out)
				}
				if n := strings.Count(out, "[DONE]"); n != 1 {
					t.Errorf("[DONE] appears %d times; want once:\n%q", n, out)
				}
				if !strings.HasSuffix(strings.TrimRight(out, "\r\n"), "[DONE]") {
					t.Errorf("[DONE] is not last:\n%q", out)
				}
			} else {
				assertInterrupted(t, out)
			}
		})
	}
}

// assertInterrupted checks that a stream ended with the stream_interrupted
// error as its last data line and no [DONE].
func assertInterrupted(t *testing.T, out string) {
	t.Helper()
	events := strings.Split(strings.TrimSpace(out), "\n\n")
	last := events[len(events)-1]
	if !strings.HasPrefix(last, "data: {\"error\"") {
		t.Fatalf("last event = %q; want an error data line", last)
	}
	typ, code, _ := apiErr(t, strings.TrimPrefix(last, "data: "))
	expect(t, "last event's error type", typ, "upstream_error")
	expect(t, "last event's error code", code, "stream_interrupted")
	if strings.Contains(out, "[DONE]") {
		t.Errorf("[DONE] after an interrupted stream:\n%s", out)
	}
}

func TestStreamInterrupted(t *testing.T) {
	for _, tc := range []struct {
		name string
		h    http.HandlerFunc
	}{
		{"connection dropped", func(w http.ResponseWriter, r *http.Request) {
			sse(w, chunkJSON("partial"), chunkJSON(" answer"))
			conn, bw, _ := http.NewResponseController(w).Hijack()
			bw.Flush()
			conn.Close()
		}},
		{"stalled", func(w http.ResponseWriter, r *http.Request) {
			sse(w, chunkJSON("partial"), chunkJSON(" answer"))
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newUpstream(t, tc.h)
			cfg := testConfig(prov("p1", up.URL, 1, 1), prov("p2", up.URL, 2, 2))
			cfg.Server.UpstreamTimeoutSecs = 1
			ta := newArbstr(t, cfg)
			resp := ta.post(t, "/v1/chat/completions", streamBody)
			out := readBody(t, resp)
			if resp.StatusCode != 200 {
				t.Fatalf("status = %d; want 200: %q", resp.StatusCode, out)
			}
			if !strings.Contains(out, "partial") {
				t.Fatalf("the chunks sent before the break are missing: %q", out)
			}
			assertInterrupted(t, out)
			r := onlyRow(t, ta)
			expect(t, "row.Success", r.Success, false)
			expect(t, "row.Attempts", r.Attempts, 1)
			expect(t, "row.UsageEstimated", r.UsageEstimated, true)
			expect(t, "deref(row.OutputTokens) (14 bytes seen)", deref(r.OutputTokens), 4)
		})
	}
}

// TestClientDisconnect: a client that leaves cancels the upstream call at
// once, and the request still gets its row.
func TestClientDisconnect(t *testing.T) {
	for _, stream := range []bool{false, true} {
		t.Run(fmt.Sprint("stream=", stream), func(t *testing.T) {
			arrived, cancelled := make(chan struct{}), make(chan struct{})
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				if stream {
					sse(w, chunkJSON("first"))
				}
				close(arrived)
				select {
				case <-r.Context().Done():
					close(cancelled)
				case <-time.After(10 * time.Second):
				}
			})
			ta := newArbstr(t, testConfig(prov("p1", up.URL, 1, 1)))
			body := chatBody
			if stream {
				body = streamBody
			}
			ctx, cancel := context.WithCancel(context.Background())
			req, _ := http.NewRequestWithContext(ctx, "POST", ta.URL+"/v1/chat/completions", strings.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			done := make(chan struct{})
			go func() {
				defer close(done)
				if resp, err := testClient.Do(req); err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}()
			receiveWithin(t, arrived, "request at the provider")
			cancel()
			receiveWithin(t, cancelled, "cancellation seen by the provider")
			receiveWithin(t, done, "end of the client's request")
			// The handler records the row once it sees the client gone.
			waitFor(t, "a ledger row", func() bool { return len(ta.rows(t)) == 1 })
			r := onlyRow(t, ta)
			expect(t, "row.Success", r.Success, false)
			expectContains(t, "row.Error", deref(r.Error), "client disconnected")
		})
	}
}

// ---- Fallback and the breaker ----

func TestFallback(t *testing.T) {
	slow := func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
	}
	closed := newUpstream(t, jsonOK)
	closed.Close() // a port that refuses connections
	for _, tc := range []struct {
		name   string
		first  http.HandlerFunc
		url    string
		stream bool
	}{
		{"500", statusHandler(500), "", false},
		{"503 stream", statusHandler(503), "", true},
		{"429", statusHandler(429), "", false},
		{"401", statusHandler(401), "", false},
		{"402", statusHandler(402), "", true},
		{"403", statusHandler(403), "", false},
		{"404", statusHandler(404), "", false},
		{"timeout", slow, "", false},
		{"timeout before headers, stream", slow, "", true},
		{"stalls before first event", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			w.WriteHeader(200)
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
		}, "", true},
		{"connection refused", nil, closed.URL, false},
		{"connection refused stream", nil, closed.URL, true},
		{"dropped", dropConn, "", false},
		{"dropped stream", dropConn, "", true},
		{"error event first", func(w http.ResponseWriter, r *http.Request) {
			sse(w, `{"error":{"message":"overloaded","type":"server_error"}}`)
		}, "", true},
		{"stream ends before first event", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			io.WriteString(w, ": just a comment\n\n")
		}, "", true},
		{"invalid json 200", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "<html>oops") }, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			url := tc.url
			if tc.first != nil {
				url = newUpstream(t, tc.first).URL
			}
			good := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				if tc.stream {
					streamOK(w, r)
				} else {
					jsonOK(w, r)
				}
			})
			cfg := testConfig(prov("bad", url, 1, 1), prov("good", good.URL, 5, 5))
			cfg.Server.UpstreamTimeoutSecs = 1
			ta := newArbstr(t, cfg)
			body := chatBody
			if tc.stream {
				body = streamBody
			}
			resp := ta.post(t, "/v1/chat/completions", body)
			out := readBody(t, resp)
			if resp.StatusCode != 200 {
				t.Fatalf("status = %d; want 200: %s", resp.StatusCode, out)
			}
			expect(t, "X-Arbstr-Provider", resp.Header.Get("X-Arbstr-Provider"), "good")
			expect(t, "X-Arbstr-Attempts", resp.Header.Get("X-Arbstr-Attempts"), "2")
			for _, failed := range []string{"overloaded", "just a comment"} {
				if strings.Contains(out, failed) {
					t.Errorf("the failed provider's %q reached the client: %s", failed, out)
				}
			}
			r := onlyRow(t, ta)
			expect(t, "row.Provider", r.Provider, "good")
			expect(t, "row.Attempts", r.Attempts, 2)
			expect(t, "row.Success", r.Success, true)
		})
	}
}

func TestClientErrorsPassThrough(t *testing.T) {
	for _, status := range []int{400, 413, 422} {
		t.Run(fmt.Sprint(status), func(t *testing.T) {
			var secondCalls atomic.Int32
			bad := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(status)
				io.WriteString(w, `{"error":{"message":"context too long","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}`)
			})
			second := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { secondCalls.Add(1); jsonOK(w, r) })
			ta := newArbstr(t, testConfig(prov("a", bad.URL, 1, 1), prov("b", second.URL, 2, 2)))
			resp := ta.post(t, "/v1/chat/completions", chatBody)
			out := readBody(t, resp)
			expect(t, "status", resp.StatusCode, status)
			expectContains(t, "body", out, "context_length_exceeded")
			expect(t, "calls to the second provider", secondCalls.Load(), 0)
			r := onlyRow(t, ta)
			expect(t, "row.Status", r.Status, status)
			expect(t, "row.Success", r.Success, false)
		})
	}
}

func TestAllProvidersFail(t *testing.T) {
	slow := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(10 * time.Second):
		}
	})
	for _, tc := range []struct {
		name     string
		urls     []string
		status   int
		code     string
		attempts int
	}{
		{"502", []string{newUpstream(t, statusHandler(500)).URL, newUpstream(t, statusHandler(429)).URL}, 502, "all_providers_failed", 3},
		{"504 when the last failure is a timeout", []string{newUpstream(t, statusHandler(500)).URL, slow.URL}, 504, "upstream_timeout", 2},
		{"502 when the last failure is not", []string{slow.URL, newUpstream(t, statusHandler(500)).URL}, 502, "all_providers_failed", 2},
		{"one provider walked thrice", []string{newUpstream(t, statusHandler(503)).URL}, 502, "all_providers_failed", 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ps []ProviderConfig
			for i, u := range tc.urls {
				ps = append(ps, prov(fmt.Sprint("p", i), u, float64(i+1), 1))
			}
			cfg := testConfig(ps...)
			cfg.Server.UpstreamTimeoutSecs = 1
			cfg.Server.MaxAttempts = tc.attempts
			ta := newArbstr(t, cfg)
			resp := ta.post(t, "/v1/chat/completions", chatBody)
			out := readBody(t, resp)
			typ, code, msg := apiErr(t, out)
			expect(t, "status", resp.StatusCode, tc.status)
			expect(t, "error type", typ, "upstream_error")
			expect(t, "error code", code, tc.code)
			expect(t, "X-Arbstr-Attempts", resp.Header.Get("X-Arbstr-Attempts"), fmt.Sprint(tc.attempts))
			for i := range tc.urls {
				if !strings.Contains(msg, fmt.Sprintf("p%d: ", i)) {
					t.Errorf("message %q does not name p%d", msg, i)
				}
			}
			r := onlyRow(t, ta)
			expect(t, "row.Attempts", r.Attempts, tc.attempts)
			expect(t, "row.Success", r.Success, false)
			expect(t, "row.Status", r.Status, tc.status)
		})
	}
}

func TestCircuitBreaker(t *testing.T) {
	var badCalls atomic.Int32
	var badStatus atomic.Int32
	badStatus.Store(500)
	bad := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		badCalls.Add(1)
		if s := int(badStatus.Load()); s != 200 {
			statusHandler(s)(w, r)
			return
		}
		jsonOK(w, r)
	})
	good := newUpstream(t, jsonOK)
	ta := newArbstr(t, testConfig(prov("bad", bad.URL, 1, 1), prov("good", good.URL, 9, 9)))
	p := ta.srv.current().router.byName["bad"]
	for range 3 {
		readBody(t, ta.post(t, "/v1/chat/completions", chatBody))
	}
	if st := p.state(time.Now()); st != stateOpen {
		t.Fatalf("after 3 failures state = %s; want open", st)
	}
	_, health := ta.get(t, "/health")
	expectContains(t, "GET /health", string(health), `"status":"degraded"`)
	expectContains(t, "GET /health", string(health), `"bad":{"state":"open"}`)
	calls := badCalls.Load()
	resp := ta.post(t, "/v1/chat/completions", chatBody)
	readBody(t, resp)
	expect(t, "calls to the provider with an open circuit", badCalls.Load(), calls)
	expect(t, "X-Arbstr-Attempts with one circuit open", resp.Header.Get("X-Arbstr-Attempts"), "1")

	// The open time passes: one probe goes through and fails; the circuit
	// reopens for twice as long.
	openCircuitUntil(p, time.Now().Add(-time.Millisecond))
	if st := p.state(time.Now()); st != stateHalfOpen {
		t.Fatalf("state = %s; want half_open", st)
	}
	readBody(t, ta.post(t, "/v1/chat/completions", chatBody))
	p.mu.Lock()
	openFor, until := p.openFor, p.openUntil
	p.mu.Unlock()
	expect(t, "openFor after a failed probe", openFor, 60*time.Second)
	if left := time.Until(until); left < 59*time.Second {
		t.Errorf("after a failed probe the circuit is open for %v more; want about 60s", left)
	}

	// Then a successful probe closes it.
	badStatus.Store(200)
	openCircuitUntil(p, time.Now().Add(-time.Millisecond))
	resp = ta.post(t, "/v1/chat/completions", chatBody)
	readBody(t, resp)
	expect(t, "provider of the probe", resp.Header.Get("X-Arbstr-Provider"), "bad")
	expect(t, "state after a successful probe", p.state(time.Now()), stateClosed)
}

func TestBreakerRules(t *testing.T) {
	now := time.Now()
	p := newProvider(ProviderConfig{Name: "p", URL: "http://x"})
	fail := func(retry time.Duration) {
		ok, probe := p.acquire(now)
		if !ok {
			t.Fatal("acquire refused")
		}
		p.release(now, probe, outcomeFailure, retry)
	}
	fail(0)
	fail(0)
	if p.state(now) != stateClosed {
		t.Fatal("opened after 2 failures")
	}
	fail(2 * time.Minute) // a 429 asking for two minutes
	if got := p.openUntil.Sub(now); got != 2*time.Minute {
		t.Errorf("open for %v; want Retry-After's 2m", got)
	}
	// Half-open: one probe at a time, others skip without waiting.
	now = now.Add(3 * time.Minute)
	ok, probe := p.acquire(now)
	if !ok {
		t.Fatal("acquire refused the half-open circuit's probe")
	}
	if !probe {
		t.Fatal("acquire let a request through a half-open circuit, not as its probe")
	}
	if ok2, _ := p.acquire(now); ok2 {
		t.Error("a second request got through while the probe is in flight")
	}
	if p.available(now) {
		t.Error("available while the probe is in flight")
	}
	// A probe whose client left gives its slot back.
	p.release(now, probe, outcomeNeutral, 0)
	if ok, probe := p.acquire(now); !ok {
		t.Error("the probe slot was not released: acquire refused")
	} else if !probe {
		t.Error("the request after a released probe is not a probe")
	}
	// Failed probes double the open time, up to five minutes.
	p.release(now, true, outcomeFailure, 0)
	for range 6 {
		now = now.Add(10 * time.Minute)
		fail(0)
	}
	if p.openFor != breakerMaxOpen {
		t.Errorf("openFor = %v; want %v", p.openFor, breakerMaxOpen)
	}
}

// TestProbeReleasedOnClientGone: the probe's client disconnects; the next
// request may probe again at once.
func TestProbeReleasedOnClientGone(t *testing.T) {
	arrived := make(chan struct{}, 1)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		select {
		case <-r.Context().Done():
		case <-time.After(10 * time.Second):
		}
	})
	ta := newArbstr(t, testConfig(prov("p1", up.URL, 1, 1)))
	p := ta.srv.current().router.byName["p1"]
	p.mu.Lock()
	p.openFor, p.failures = breakerOpenFor, 3
	p.mu.Unlock()
	openCircuitUntil(p, time.Now().Add(-time.Second))

	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "POST", ta.URL+"/v1/chat/completions", strings.NewReader(chatBody))
	req.Header.Set("Content-Type", "application/json")
	done := make(chan struct{})
	go func() {
		defer close(done)
		if resp, err := testClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	receiveWithin(t, arrived, "probe at the provider")
	if p.available(time.Now()) {
		t.Fatal("probe slot free while the probe is in flight")
	}
	cancel()
	receiveWithin(t, done, "end of the client's request")
	waitFor(t, "the probe slot released", func() bool { return p.available(time.Now()) })
}

// ---- Endpoints and errors ----

func TestBadInput(t *testing.T) {
	up := newUpstream(t, jsonOK)
	cfg := testConfig(prov("p1", up.URL, 1, 1))
	cfg.Server.MaxBodyBytes = 1024
	ta := newArbstr(t, cfg)
	big := `{"model":"m","messages":[{"role":"user","content":"` + strings.Repeat("x", 2000) + `"}]}`
	for _, tc := range []struct {
		name, method, path, ctype, body string
		status                          int
		code                            string
	}{
		{"invalid json", "POST", "/v1/chat/completions", "application/json", `{"model":`, 400, "invalid_json"},
		{"not json", "POST", "/v1/chat/completions", "application/json", `hello`, 400, "invalid_json"},
		{"array", "POST", "/v1/chat/completions", "application/json", `[1,2]`, 400, "invalid_json"},
		{"string", "POST", "/v1/chat/completions", "application/json", `"x"`, 400, "invalid_json"},
		{"empty", "POST", "/v1/chat/completions", "application/json", ``, 400, "invalid_json"},
		{"no model", "POST", "/v1/chat/completions", "application/json", `{"messages":[{"role":"user","content":"x"}]}`, 400, "missing_model"},
		{"empty model", "POST", "/v1/chat/completions", "application/json", `{"model":"","messages":[{"role":"user","content":"x"}]}`, 400, "missing_model"},
		{"model number", "POST", "/v1/chat/completions", "application/json", `{"model":5,"messages":[{"role":"user","content":"x"}]}`, 400, "invalid_model"},
		{"no messages", "POST", "/v1/chat/completions", "application/json", `{"model":"m"}`, 400, "invalid_messages"},
		{"empty messages", "POST", "/v1/chat/completions", "application/json", `{"model":"m","messages":[]}`, 400, "invalid_messages"},
		{"messages object", "POST", "/v1/chat/completions", "application/json", `{"model":"m","messages":{"a":1}}`, 400, "invalid_messages"},
		{"message not object", "POST", "/v1/chat/completions", "application/json", `{"model":"m","messages":[1]}`, 400, "invalid_messages"},
		{"stream string", "POST", "/v1/chat/completions", "application/json", `{"model":"m","stream":"yes","messages":[{"role":"user","content":"x"}]}`, 400, "invalid_stream"},
		{"keys are case-sensitive", "POST", "/v1/chat/completions", "application/json", `{"Model":"m","messages":[{"role":"user","content":"x"}]}`, 400, "missing_model"},
		{"escaped miscased key", "POST", "/v1/chat/completions", "application/json", `{"\u004dodel":"m","messages":[{"role":"user","content":"x"}]}`, 400, "missing_model"},
		{"miscased messages", "POST", "/v1/chat/completions", "application/json", `{"model":"m","MESSAGES":[{"role":"user","content":"x"}]}`, 400, "invalid_messages"},
		{"form content type", "POST", "/v1/chat/completions", "application/x-www-form-urlencoded", chatBody, 400, "invalid_content_type"},
		{"text content type", "POST", "/v1/chat/completions", "text/plain", chatBody, 400, "invalid_content_type"},
		{"too large", "POST", "/v1/chat/completions", "application/json", big, 413, "body_too_large"},
		{"unknown route", "GET", "/v1/nope", "", "", 404, "not_found"},
		{"wrong method", "GET", "/v1/chat/completions", "", "", 405, "method_not_allowed"},
		{"wrong method health", "POST", "/health", "application/json", "{}", 405, "method_not_allowed"},
		{"cost bad json", "POST", "/v1/cost", "application/json", `{`, 400, "invalid_json"},
		{"unknown request id", "GET", "/v1/requests/arb_nope", "", "", 404, "request_not_found"},
		{"stats bad range", "GET", "/v1/stats?range=2h", "", "", 400, "invalid_range"},
		{"stats bad since", "GET", "/v1/stats?since=yesterday", "", "", 400, "invalid_since"},
		{"stats bad group", "GET", "/v1/stats?group_by=color", "", "", 400, "invalid_group_by"},
		{"requests bad limit", "GET", "/v1/requests?limit=5000", "", "", 400, "invalid_limit"},
		{"requests bad success", "GET", "/v1/requests?success=maybe", "", "", 400, "invalid_success"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, ta.URL+tc.path, strings.NewReader(tc.body))
			if tc.ctype != "" {
				req.Header.Set("Content-Type", tc.ctype)
			}
			resp, err := testClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			out := readBody(t, resp)
			if resp.StatusCode != tc.status {
				t.Errorf("status = %d; want %d: %s", resp.StatusCode, tc.status, out)
			}
			if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type = %q", ct)
			}
			typ, code, _ := apiErr(t, out)
			expect(t, "error code", code, tc.code)
			expect(t, "error type", typ, "invalid_request_error")
			if tc.path == "/v1/chat/completions" && resp.Header.Get("X-Arbstr-Request-Id") == "" {
				t.Errorf("no x-arbstr-request-id on a refused chat request")
			}
		})
	}
	if rows := ta.rows(t); len(rows) != 0 {
		t.Errorf("rejected requests wrote %d rows", len(rows))
	}
}

func TestAuth(t *testing.T) {
	up := newUpstream(t, jsonOK)
	cfg := testConfig(prov("p1", up.URL, 1, 1))
	cfg.Server.AuthToken = "s3cret-token"
	ta := newArbstr(t, cfg)
	for _, tc := range []struct {
		method, path, auth string
		status             int
	}{
		{"GET", "/health", "", 200},
		{"GET", "/v1/models", "", 401},
		{"GET", "/v1/models", "Bearer wrong", 401},
		{"GET", "/v1/models", "Bearer s3cret-token", 200},
		{"GET", "/v1/models", "bearer s3cret-token", 200},
		{"GET", "/v1/models", "BEARER s3cret-token", 200},
		{"GET", "/v1/models", "Basic s3cret-token", 401},
		{"GET", "/v1/models", "s3cret-token", 401},
		{"GET", "/v1/models", "Bearer s3cret-token-and-more", 401},
		{"GET", "/providers", "", 401},
		{"GET", "/v1/stats", "", 401},
		{"GET", "/v1/requests", "", 401},
		{"POST", "/v1/chat/completions", "", 401},
		{"POST", "/v1/cost", "", 401},
		{"GET", "/nope", "", 401},
		{"POST", "/v1/chat/completions", "Bearer s3cret-token", 200},
	} {
		req, _ := http.NewRequest(tc.method, ta.URL+tc.path, strings.NewReader(chatBody))
		req.Header.Set("Content-Type", "application/json")
		if tc.auth != "" {
			req.Header.Set("Authorization", tc.auth)
		}
		resp, err := testClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		out := readBody(t, resp)
		if resp.StatusCode != tc.status {
			t.Errorf("%s %s with %q = %d; want %d", tc.method, tc.path, tc.auth, resp.StatusCode, tc.status)
		}
		if tc.status == 401 {
			typ, code, _ := apiErr(t, out)
			expect(t, tc.method+" "+tc.path+" error type", typ, "authentication_error")
			expect(t, tc.method+" "+tc.path+" error code", code, "invalid_api_key")
		}
		if hasID := resp.Header.Get("X-Arbstr-Request-Id") != ""; hasID != (tc.path == "/v1/chat/completions") {
			t.Errorf("%s %s: x-arbstr-request-id present = %v", tc.method, tc.path, hasID)
		}
	}
	if rows := ta.rows(t); len(rows) != 1 {
		t.Errorf("rows = %d; want 1 (unauthorized requests write none)", len(rows))
	}
}

func TestModelsHealthProviders(t *testing.T) {
	up := newUpstream(t, jsonOK)
	a := prov("a", up.URL, 1, 2)
	a.Models = []string{"gpt-4o", "llama"}
	a.APIKey = "sk-a-key"
	b := prov("b", up.URL, 3, 4)
	b.Models = []string{"llama", "claude"}
	c := prov("c", up.URL, 3, 4) // any model
	ta := newArbstr(t, testConfig(a, b, c))

	_, out := ta.get(t, "/v1/models")
	var models struct {
		Object string
		Data   []struct {
			ID      string `json:"id"`
			Object  string `json:"object"`
			OwnedBy string `json:"owned_by"`
		}
	}
	json.Unmarshal(out, &models)
	var ids []string
	for _, m := range models.Data {
		ids = append(ids, m.ID)
		if m.Object != "model" {
			t.Errorf("model %s object = %q", m.ID, m.Object)
		}
	}
	expect(t, "GET /v1/models object", models.Object, "list")
	expect(t, "GET /v1/models ids", strings.Join(ids, ","), "claude,gpt-4o,llama")

	resp, out := ta.get(t, "/health")
	expect(t, "GET /health status", resp.StatusCode, 200)
	expect(t, "GET /health body", string(out), `{"providers":{"a":{"state":"closed"},"b":{"state":"closed"},"c":{"state":"closed"}},"status":"ok"}`+"\n")
	for _, name := range []string{"a", "b", "c"} {
		p := ta.srv.current().router.byName[name]
		openCircuitUntil(p, time.Now().Add(time.Minute))
	}
	resp, out = ta.get(t, "/health")
	expect(t, "GET /health status, all circuits open", resp.StatusCode, 503)
	expectContains(t, "GET /health, all circuits open", string(out), `"status":"unhealthy"`)
	resp = ta.post(t, "/v1/chat/completions", `{"model":"llama","messages":[{"role":"user","content":"x"}]}`)
	typ, _, _ := apiErr(t, readBody(t, resp))
	expect(t, "chat status, all circuits open", resp.StatusCode, 503)
	expect(t, "chat error type, all circuits open", typ, "service_unavailable")

	_, out = ta.get(t, "/providers")
	var ps struct {
		Providers []struct {
			Name      string  `json:"name"`
			HasAPIKey bool    `json:"has_api_key"`
			Circuit   string  `json:"circuit"`
			InputRate float64 `json:"input_rate"`
		}
	}
	json.Unmarshal(out, &ps)
	if len(ps.Providers) != 3 {
		t.Fatalf("GET /providers lists %d providers; want 3: %s", len(ps.Providers), out)
	}
	expect(t, "providers[0].has_api_key", ps.Providers[0].HasAPIKey, true)
	expect(t, "providers[1].has_api_key", ps.Providers[1].HasAPIKey, false)
	expect(t, "providers[0].circuit", ps.Providers[0].Circuit, "open")
	expect(t, "providers[1].input_rate", ps.Providers[1].InputRate, 3)
	if strings.Contains(string(out), "sk-a-key") {
		t.Error("/providers shows a key")
	}
}

func TestCostDryRun(t *testing.T) {
	var calls atomic.Int32
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { calls.Add(1); jsonOK(w, r) })
	max := 10.0
	cfg := testConfig(prov("cheap", up.URL, 1, 2), prov("mid", up.URL, 2, 4), prov("dear", up.URL, 5, 20))
	cfg.Policies.Rules = []PolicyRule{{Name: "budget", MaxSatsPer1kOutput: &max, Keywords: []string{"budget"}}}
	ta := newArbstr(t, cfg)
	// 40 bytes of text → 10 input tokens; max_tokens 100.
	resp := ta.post(t, "/v1/cost", `{"model":"m","max_tokens":100,"messages":[{"role":"user","content":"on a budget, please: xxxxxxxxxxxxxxxxxx"}]}`)
	out := readBody(t, resp)
	var got struct {
		Policy     string `json:"policy"`
		Strategy   string `json:"strategy"`
		Candidates []struct {
			Provider        string  `json:"provider"`
			EstimatedCost   float64 `json:"estimated_cost_sats"`
			EstInputTokens  int64   `json:"estimated_input_tokens"`
			EstOutputTokens int64   `json:"estimated_output_tokens"`
		}
		Excluded []exclusion
	}
	if resp.StatusCode != 200 {
		t.Fatalf("POST /v1/cost = %d; want 200: %s", resp.StatusCode, out)
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("POST /v1/cost answered no JSON (%v): %s", err, out)
	}
	expect(t, "policy", got.Policy, "budget")
	expect(t, "strategy", got.Strategy, "cheapest")
	if len(got.Candidates) != 2 {
		t.Fatalf("%d candidates; want 2: %s", len(got.Candidates), out)
	}
	expect(t, "candidates[0].provider", got.Candidates[0].Provider, "cheap")
	expect(t, "candidates[0].estimated_cost_sats", got.Candidates[0].EstimatedCost, 0.21)
	expect(t, "candidates[1].provider", got.Candidates[1].Provider, "mid")
	expect(t, "candidates[1].estimated_cost_sats", got.Candidates[1].EstimatedCost, 0.42)
	expect(t, "candidates[0].estimated_input_tokens", got.Candidates[0].EstInputTokens, 10)
	expect(t, "candidates[0].estimated_output_tokens", got.Candidates[0].EstOutputTokens, 100)
	if len(got.Excluded) != 1 {
		t.Fatalf("%d excluded; want 1: %s", len(got.Excluded), out)
	}
	expect(t, "excluded[0].provider", got.Excluded[0].Provider, "dear")
	resp = ta.post(t, "/v1/cost", chatBody, "X-Arbstr-Policy", "nope")
	_, code, _ := apiErr(t, readBody(t, resp))
	expect(t, "status with an unknown policy", resp.StatusCode, 400)
	expect(t, "error code with an unknown policy", code, "unknown_policy")
	if calls.Load() != 0 {
		t.Errorf("the dry run called a provider %d times", calls.Load())
	}
	if rows := ta.rows(t); len(rows) != 0 {
		t.Errorf("the dry run wrote %d rows", len(rows))
	}
}

// TestRoutingRefusalsAreRecorded: a valid chat request refused by routing
// still gets its ledger row.
func TestRoutingRefusalsAreRecorded(t *testing.T) {
	up := newUpstream(t, jsonOK)
	p := prov("p1", up.URL, 1, 1)
	p.Models = []string{"m"}
	cfg := testConfig(p)
	cfg.Policies.Rules = []PolicyRule{{Name: "strict", AllowedModels: []string{"other"}}}
	ta := newArbstr(t, cfg)
	for _, tc := range []struct {
		body, policy, code string
	}{
		{chatBody, "nope", "unknown_policy"},
		{`{"model":"x","messages":[{"role":"user","content":"x"}]}`, "", "no_provider"},
		{chatBody, "strict", "model_not_allowed"},
	} {
		resp := ta.post(t, "/v1/chat/completions", tc.body, "X-Arbstr-Policy", tc.policy)
		out := readBody(t, resp)
		_, code, msg := apiErr(t, out)
		expect(t, tc.code+": status", resp.StatusCode, 400)
		if code != tc.code {
			t.Errorf("error code = %q; want %q (%s)", code, tc.code, msg)
		}
		if resp.Header.Get("X-Arbstr-Request-Id") == "" {
			t.Errorf("%s: no request id", tc.code)
		}
	}
	rows := ta.rows(t)
	if len(rows) != 3 {
		t.Fatalf("rows = %d; want 3", len(rows))
	}
	for i, r := range rows {
		expect(t, fmt.Sprintf("rows[%d].Success", i), r.Success, false)
		expect(t, fmt.Sprintf("rows[%d].Status", i), r.Status, 400)
		expect(t, fmt.Sprintf("rows[%d].Attempts", i), r.Attempts, 0)
		expect(t, fmt.Sprintf("rows[%d].Provider", i), r.Provider, "")
		if deref(r.Error) == "" {
			t.Errorf("rows[%d].Error is empty; want the refusal", i)
		}
	}
	// Each refusal has its log line, as every recorded request does.
	expect(t, "request log lines", strings.Count(ta.logged(t), "msg=request "), 3)
}

// ---- Security ----

// TestKeysNeverLeak puts marker keys in the config, drives every endpoint and
// error path, and searches every response, the log and the database file.
func TestKeysNeverLeak(t *testing.T) {
	const keyA, keyB = "sk-MARKER-aaaa-1111", "sk-MARKER-bbbb-2222"
	echo := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		// A hostile provider that echoes the key it got, in an error.
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(500)
		fmt.Fprintf(w, `{"error":{"message":"bad key %s"}}`, r.Header.Get("Authorization"))
	})
	good := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		if bytes.Contains(b, []byte(`"stream":true`)) {
			sse(w, chunkJSON("x"), finishChunk, usageChunk(1, 1), "[DONE]")
			return
		}
		jsonOK(w, r)
	})
	a := prov("a", echo.URL, 1, 1)
	a.APIKey = keyA
	b := prov("b", good.URL, 2, 2)
	b.APIKey = keyB
	cfg := testConfig(a, b)
	ta := newArbstr(t, cfg)

	var all bytes.Buffer
	record := func(resp *http.Response) {
		all.WriteString(fmt.Sprint(resp.Header))
		all.WriteString(readBody(t, resp))
	}
	record(ta.post(t, "/v1/chat/completions", chatBody))
	record(ta.post(t, "/v1/chat/completions", streamBody))
	record(ta.post(t, "/v1/chat/completions", chatBody, "X-Arbstr-Policy", "nope"))
	record(ta.post(t, "/v1/chat/completions", `{"model":1}`))
	record(ta.post(t, "/v1/cost", chatBody))
	for _, path := range []string{"/v1/models", "/health", "/providers", "/v1/stats", "/v1/requests", "/v1/requests/x", "/nope"} {
		resp, body := ta.get(t, path)
		all.WriteString(fmt.Sprint(resp.Header))
		all.Write(body)
	}
	// The breaker opens on the echoing provider; fail everything for 502s.
	openCircuitUntil(ta.srv.current().router.byName["b"], time.Now().Add(time.Minute))
	record(ta.post(t, "/v1/chat/completions", chatBody))
	ta.rows(t)
	ta.srv.store.Close()

	db, err := os.ReadFile(ta.dbPath)
	if err != nil {
		t.Fatal(err)
	}
	wal, _ := os.ReadFile(ta.dbPath + "-wal")
	for name, text := range map[string][]byte{"responses": all.Bytes(), "log": []byte(ta.logged(t)), "database": db, "wal": wal} {
		for _, key := range []string{keyA, keyB, "MARKER"} {
			if bytes.Contains(text, []byte(key)) {
				t.Errorf("%s contains %q", name, key)
			}
		}
	}
	if all.Len() < 1000 {
		t.Errorf("too little output to prove anything: %d bytes of responses", all.Len())
	}
	if len(db) == 0 {
		t.Error("the database file is empty: nothing to search")
	}
}

// ---- The ledger through the proxy ----

// TestLoad sends thousands of requests at concurrency 64 through the real
// server; every one succeeds and has exactly one row.
func TestLoad(t *testing.T) {
	n := 3000
	if testing.Short() {
		n = 500
	}
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		if bytes.Contains(b, []byte(`"stream":true`)) {
			sse(w, chunkJSON("x"), finishChunk, usageChunk(7, 1), "[DONE]")
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, completionJSON("x", 7, 1))
	})
	ta := newArbstr(t, testConfig(prov("p1", up.URL, 1, 1), prov("p2", up.URL, 2, 2)))
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	ids := sync.Map{}
	var (
		failures     atomic.Int32
		mu           sync.Mutex
		firstFailure string // guarded by mu
	)
	failed := func(format string, args ...any) {
		if failures.Add(1) == 1 {
			mu.Lock()
			firstFailure = fmt.Sprintf(format, args...)
			mu.Unlock()
		}
	}
	var wg sync.WaitGroup
	work := make(chan int)
	for range 64 {
		wg.Go(func() {
			for i := range work {
				body := chatBody
				if i%4 == 0 {
					body = streamBody
				}
				resp, err := client.Post(ta.URL+"/v1/chat/completions", "application/json", strings.NewReader(body))
				if err != nil {
					failed("request %d: %v", i, err)
					continue
				}
				out, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				switch {
				case err != nil:
					failed("request %d: reading the answer: %v", i, err)
				case resp.StatusCode != 200:
					failed("request %d: status = %d; want 200: %s", i, resp.StatusCode, out)
				case i%4 == 0 && !strings.HasSuffix(string(out), "data: [DONE]\n\n"):
					failed("request %d: a stream without [DONE] at its end: %q", i, out)
				default:
					ids.Store(resp.Header.Get("X-Arbstr-Request-Id"), true)
				}
			}
		})
	}
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
	if f := failures.Load(); f != 0 {
		t.Fatalf("%d of %d requests failed; the first: %s", f, n, firstFailure)
	}
	rows := ta.rows(t)
	if len(rows) != n {
		t.Fatalf("ledger rows = %d; want %d", len(rows), n)
	}
	for _, r := range rows {
		if _, ok := ids.LoadAndDelete(r.RequestID); !ok {
			t.Fatalf("row %s is doubled or unknown", r.RequestID)
		}
	}
}

// TestStatsThroughProxy: a request a moment old is counted, the cost header
// and the ledger agree to the millisat, and saved_sats is the spread.
func TestStatsThroughProxy(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, completionJSON("x", 1234, 567))
	})
	ta := newArbstr(t, testConfig(prov("cheap", up.URL, 1.5, 2.25), prov("dear", up.URL, 4, 9)))
	resp := ta.post(t, "/v1/chat/completions", chatBody)
	readBody(t, resp)
	id := resp.Header.Get("X-Arbstr-Request-Id")
	// 1234·1.5/1000 + 567·2.25/1000 = 1.851 + 1.27575 → 3.12675 sats → 3.127 at the millisat.
	if got := resp.Header.Get("X-Arbstr-Cost-Sats"); got != "3.127" {
		t.Errorf("x-arbstr-cost-sats = %q; want 3.127", got)
	}
	_, out := ta.get(t, "/v1/stats")
	var st statsResult
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatal(err)
	}
	// baseline at dear: 1234·4 + 567·9 = 4936 + 5103 msat = 10.039 sats.
	expect(t, "stats total.requests", st.Total.Requests, 1)
	expect(t, "stats total.cost_sats", st.Total.CostSats, 3.127)
	expect(t, "stats total.baseline_cost_sats", st.Total.BaselineCostSats, 10.039)
	expect(t, "stats total.saved_sats", st.Total.SavedSats, 6.912)
	_, out = ta.get(t, "/v1/requests/"+id)
	var row map[string]any
	json.Unmarshal(out, &row)
	expect[any](t, "request_id of GET /v1/requests/{id}", row["request_id"], id)
	expect[any](t, "cost_sats of GET /v1/requests/{id}", row["cost_sats"], 3.127)
	_, out = ta.get(t, "/v1/requests?provider=cheap&success=true&limit=1")
	expectContains(t, "GET /v1/requests?provider=cheap&success=true&limit=1", string(out), id)
}

// TestLearningPrefersCheapOutput: a policy whose answers are long learns a
// high output/input ratio, and then prefers the provider cheap on output.
func TestLearningPrefersCheapOutput(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, completionJSON("a long essay", 10, 1000))
	})
	// With a ratio of 1, cheap-in wins (1+9 < 5+6); with a ratio of 100,
	// cheap-out wins (1+900 > 5+600).
	cfg := testConfig(prov("cheap-in", up.URL, 1, 9), prov("cheap-out", up.URL, 5, 6))
	cfg.Policies.Rules = []PolicyRule{{Name: "essays", Keywords: []string{"essay"}}}
	ta := newArbstr(t, cfg)
	body := `{"model":"m","messages":[{"role":"user","content":"write an essay about sats"}]}`
	var order []string
	for range 7 {
		resp := ta.post(t, "/v1/chat/completions", body)
		readBody(t, resp)
		order = append(order, resp.Header.Get("X-Arbstr-Provider"))
		ta.rows(t) // let the writer learn from this row
	}
	want := "cheap-in,cheap-in,cheap-in,cheap-in,cheap-in,cheap-out,cheap-out"
	if got := strings.Join(order, ","); got != want {
		t.Errorf("providers = %s; want %s", got, want)
	}
	avg, n := ta.srv.store.Ratio("essays")
	expect(t, "requests the ratio is learned from", n, 7)
	expect(t, "learned ratio", avg, 100)
}

// ---- Lifecycle ----

// TestGracefulShutdown starts arbstr through run, begins a stream, and
// cancels run's context (SIGTERM) while the stream is in flight: new
// connections are refused, the stream finishes, its row is written, run
// returns nil.
func TestGracefulShutdown(t *testing.T) {
	release := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		sse(w, chunkJSON("before"))
		select {
		case <-release:
		case <-time.After(10 * time.Second):
		}
		sse(w, chunkJSON(" after"), finishChunk, usageChunk(3, 2), "[DONE]")
	})
	dir := t.TempDir()
	dbPath := filepath.Join(dir, "arbstr.db")
	cfgPath := filepath.Join(dir, "config.json")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`{"server":{"listen":"127.0.0.1:0","shutdown_timeout_secs":10},
		"database":{"path":%q},"providers":[{"name":"p1","url":%q,"api_key":"k"}]}`, dbPath, up.URL)), 0o600)

	ctx, cancel := context.WithCancel(context.Background())
	logs := &syncBuffer{}
	runErr := make(chan error, 1)
	go func() { runErr <- run(ctx, []string{"-config", cfgPath}, io.Discard, logs) }()
	addr := waitListening(t, logs)

	resp, err := testClient.Post("http://"+addr+"/v1/chat/completions", "application/json", strings.NewReader(streamBody))
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(resp.Body)
	if line, _ := br.ReadString('\n'); !strings.Contains(line, "before") {
		t.Fatalf("first line = %q", line)
	}
	cancel() // SIGTERM
	waitFor(t, "the shutdown log line", func() bool { return strings.Contains(logs.String(), "shutting down") })
	time.Sleep(20 * time.Millisecond)
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Error("a new connection was accepted during shutdown")
	}
	close(release)
	rest, _ := io.ReadAll(br)
	resp.Body.Close()
	expectContains(t, "the rest of the stream", string(rest), "after")
	if !strings.HasSuffix(string(rest), "data: [DONE]\n\n") {
		t.Errorf("the stream did not end with [DONE]: %q", rest)
	}
	select {
	case err := <-runErr:
		if err != nil {
			t.Fatalf("run = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return")
	}
	store, err := openStore(dbPath, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	rows, err := store.Requests(context.Background(), requestsQuery{Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 {
		t.Fatalf("ledger has %d rows after shutdown; want 1: %+v", len(rows), rows)
	}
	expect(t, "row.Success after shutdown", rows[0].Success, true)
	expect(t, "deref(row.OutputTokens) after shutdown", deref(rows[0].OutputTokens), 2)
}

// TestSlowHeadersAndLongStreams: a client that trickles its headers is cut
// off after ReadHeaderTimeout, while a stream that outlasts that time is not
// cut (the server has no WriteTimeout).
func TestSlowHeadersAndLongStreams(t *testing.T) {
	defer func(d time.Duration) { readHeaderTimeout = d }(readHeaderTimeout)
	readHeaderTimeout = 200 * time.Millisecond
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		sse(w, chunkJSON("slow"))
		time.Sleep(600 * time.Millisecond) // three header timeouts
		sse(w, finishChunk, usageChunk(1, 1), "[DONE]")
	})
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.json")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`{"server":{"listen":"127.0.0.1:0"},"database":{"path":":memory:"},"providers":[{"name":"p","url":%q}]}`, up.URL)), 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	logs := &syncBuffer{}
	go run(ctx, []string{"-config", cfgPath}, io.Discard, logs)
	addr := waitListening(t, logs)

	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "GET /health HTTP/1.1\r\nHost: x\r\n") // and never the blank line
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	io.Copy(io.Discard, conn) // returns when the server closes the connection
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("a connection with unfinished headers was held %v", d)
	}

	resp, err := testClient.Post("http://"+addr+"/v1/chat/completions", "application/json", strings.NewReader(streamBody))
	if err != nil {
		t.Fatal(err)
	}
	if out := readBody(t, resp); !strings.HasSuffix(out, "data: [DONE]\n\n") {
		t.Errorf("a stream longer than the header timeout was cut:\n%s", out)
	}
}

// waitListening reads run's start log line for the address it listens on.
func waitListening(t *testing.T, logs *syncBuffer) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		s := logs.String()
		if i := strings.Index(s, "listen="); i >= 0 {
			rest := s[i+len("listen="):]
			if j := strings.IndexAny(rest, " \n"); j > 0 {
				return rest[:j]
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("arbstr did not start:\n%s", logs.String())
	return ""
}

// TestMockMode runs `arbstr` with no config at all, as `go run .` in a fresh
// clone does, and uses it as a user would.
func TestMockMode(t *testing.T) {
	t.Chdir(t.TempDir())
	t.Setenv("ARBSTR_CONFIG", "")
	ctx, cancel := context.WithCancel(context.Background())
	logs := &syncBuffer{}
	runErr := make(chan error, 1)
	go func() { runErr <- run(ctx, []string{"-listen", "127.0.0.1:0"}, io.Discard, logs) }()
	addr := waitListening(t, logs)
	base := "http://" + addr

	resp, err := testClient.Post(base+"/v1/chat/completions", "application/json", strings.NewReader(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	out := readBody(t, resp)
	expect(t, "mock completion status", resp.StatusCode, 200)
	expect(t, "mock completion provider", resp.Header.Get("X-Arbstr-Provider"), "mock-cheap")
	expectContains(t, "mock completion", out, `"usage"`)
	resp, err = testClient.Post(base+"/v1/chat/completions", "application/json", strings.NewReader(`{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	out = readBody(t, resp)
	expect(t, "mock stream provider", resp.Header.Get("X-Arbstr-Provider"), "mock-pricey")
	expectContains(t, "mock stream", out, ": arbstr {")
	if !strings.HasSuffix(out, "data: [DONE]\n\n") {
		t.Errorf("mock stream does not end with [DONE]:\n%s", out)
	}
	resp, err = testClient.Get(base + "/v1/stats")
	if err != nil {
		t.Fatal(err)
	}
	if out := readBody(t, resp); !strings.Contains(out, `"requests":2`) {
		t.Errorf("stats in mock mode: %s", out)
	}
	expectContains(t, "the logs", logs.String(), "mode=mock")
	expectContains(t, "the logs", logs.String(), "no config found")
	cancel()
	if err := receiveWithin(t, runErr, "return from run"); err != nil {
		t.Fatal(err)
	}
}

// ---- The SSE reader ----

func TestNextEvent(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int
	}{
		{"data: x\n\n", 9},
		{"data: x\n\ndata: y\n\n", 9},
		{"data: x\r\n\r\nrest", 11},
		{"data: x\r\r", 9},
		{"data: x\r", 0},
		{"data: x\r\n\r", 10},
		{"data: x\r\n", 0},
		{"data: x\n", 0},
		{"data: x", 0},
		{"\n", 1},
		{": c\nevent: e\ndata: x\n\n", 22},
	} {
		if got := nextEvent([]byte(tc.in)); got != tc.want {
			t.Errorf("nextEvent(%q) = %d; want %d", tc.in, got, tc.want)
		}
	}
}

func TestEventData(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"data: x\n\n", "x", true},
		{"data:x\n\n", "x", true},
		{"data:  x\n\n", " x", true},
		{"data: a\ndata: b\r\ndata: c\n\n", "a\nb\nc", true},
		{": comment\n\n", "", false},
		{"event: ping\n\n", "", false},
		{"datum: x\n\n", "", false},
		{"data\n\n", "", true},
		{"id: 1\r\ndata: [DONE]\r\n\r\n", "[DONE]", true},
	} {
		got, ok := eventData([]byte(tc.in))
		if string(got) != tc.want {
			t.Errorf("eventData(%q) = %q; want %q", tc.in, got, tc.want)
		}
		if ok != tc.ok {
			t.Errorf("eventData(%q) found data = %v; want %v", tc.in, ok, tc.ok)
		}
	}
}

// FuzzSSE splits a provider stream at random points and checks that the
// reader finds the same events, with the same data, as in one piece.
func FuzzSSE(f *testing.F) {
	f.Add([]byte("data: "+chunkJSON("a")+"\n\ndata: "+usageChunk(1, 2)+"\n\ndata: [DONE]\n\n"), uint8(7))
	f.Add([]byte(": OPENROUTER PROCESSING\r\n\r\nevent: x\r\ndata: {}\r\n\r\n"), uint8(3))
	f.Add([]byte("data:a\rdata:b\r\rdata: c\n\n"), uint8(1))
	f.Add([]byte("data: x\n\n\n\n\ndata: y\r\n\r\n"), uint8(2))
	f.Fuzz(func(t *testing.T, stream []byte, step uint8) {
		whole := splitEvents(stream, len(stream))
		parts := splitEvents(stream, int(step%16)+1)
		if len(whole) != len(parts) {
			t.Fatalf("%d events whole, %d in parts", len(whole), len(parts))
		}
		for i := range whole {
			if whole[i] != parts[i] {
				t.Fatalf("event %d: %q whole, %q in parts", i, whole[i], parts[i])
			}
		}
	})
}

// splitEvents feeds stream to nextEvent and eventData step bytes at a time,
// as reads from a socket would, and returns each event's data.
func splitEvents(stream []byte, step int) []string {
	sr := newSSEReader(&stepReader{b: stream, step: step})
	defer sr.close()
	var events []string
	for {
		ev, err := sr.next()
		if err != nil {
			return events
		}
		// Only events with data count: a CR LF split between reads may
		// add an empty event, which SSE ignores.
		if d, ok := eventData(ev); ok {
			events = append(events, string(d))
		}
	}
}

// stepReader returns at most step bytes a read, as a network does.
type stepReader struct {
	b    []byte
	step int
}

func (r *stepReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), r.step)], r.b)
	r.b = r.b[n:]
	return n, nil
}

func TestScanChunk(t *testing.T) {
	for _, tc := range []struct {
		data                       string
		content                    int64
		finished, hasUsage, hasErr bool
	}{
		{chunkJSON("Hello"), 5, false, false, false},
		{finishChunk, 0, true, false, false},
		{usageChunk(3, 4), 0, false, true, false},
		{`{"choices":[{"delta":{"content":"a"},"finish_reason":null}],"usage":null}`, 1, false, false, false},
		{`{"choices":[{"delta":{"content" : "say \"content\": x"}}]}`, 18, false, false, false},
		{`{"choices":[{"delta":{"content":"ab"}},{"delta":{"content":"cd"}}]}`, 4, false, false, false},
		{`{"choices":[{"delta":{"reasoning_content":"think","content":null}}]}`, 5, false, false, false}, // reasoning counts as output,
		{`{"choices":[{"delta":{"content":"x"},"logprobs":{"content":[{"token":"x"}]}}]}`, 1, false, false, false},
		{`{"error":{"message":"overloaded"}}`, 0, false, false, true},
		{`{"choices":[{"delta":{"content":"the \"error\": word"}}]}`, 19, false, false, false},
		{`{"choices":[{"delta":{"content":"`, 0, false, false, false},
		{`"content":`, 0, false, false, false},
	} {
		c, f, u, e := scanChunk([]byte(tc.data))
		expect(t, fmt.Sprintf("scanChunk(%q) content", tc.data), c, tc.content)
		expect(t, fmt.Sprintf("scanChunk(%q) finished", tc.data), f, tc.finished)
		expect(t, fmt.Sprintf("scanChunk(%q) hasUsage", tc.data), u, tc.hasUsage)
		expect(t, fmt.Sprintf("scanChunk(%q) hasError", tc.data), e, tc.hasErr)
	}
}

// FuzzScanChunk checks the byte scanner against encoding/json on chunks
// built from fuzzed content, and that it survives any bytes.
func FuzzScanChunk(f *testing.F) {
	f.Add("Hello", true, false, []byte(chunkJSON("x")))
	f.Add(`quote " and \ and "content":"x"`, false, true, []byte(`{"content":"\"`))
	f.Add("\u00e9\n\t", false, false, []byte(`{"usage":{`))
	f.Fuzz(func(t *testing.T, content string, finish, withUsage bool, raw []byte) {
		scanChunk(raw) // must not panic on anything
		type delta struct {
			Content string `json:"content"`
		}
		type choice struct {
			Delta        delta   `json:"delta"`
			FinishReason *string `json:"finish_reason"`
		}
		type counts struct {
			PromptTokens     int64 `json:"prompt_tokens"`
			CompletionTokens int64 `json:"completion_tokens"`
		}
		chunk := struct {
			Choices []choice `json:"choices"`
			Usage   *counts  `json:"usage"`
		}{Choices: []choice{{Delta: delta{content}}}}
		if finish {
			stop := "stop"
			chunk.Choices[0].FinishReason = &stop
		}
		if withUsage {
			chunk.Usage = &counts{1, 2}
		}
		data, _ := json.Marshal(chunk)
		quoted, _ := json.Marshal(content)
		c, fin, u, e := scanChunk(data)
		expect(t, fmt.Sprintf("scanChunk(%s) content", data), c, int64(len(quoted)-2))
		expect(t, fmt.Sprintf("scanChunk(%s) finished", data), fin, finish)
		expect(t, fmt.Sprintf("scanChunk(%s) hasUsage", data), u, withUsage)
		expect(t, fmt.Sprintf("scanChunk(%s) hasError", data), e, false)
	})
}

// FuzzParseChat throws arbitrary bodies at the request decoder: it must
// never panic, it must read what encoding/json reads (parseChatByDecoder),
// and what it accepts must be a JSON object with a model and messages,
// whose include_usage rewrite is still valid JSON.
func FuzzParseChat(f *testing.F) {
	for _, s := range []string{chatBody, streamBody, `{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url"}]}]}`,
		`{"model":1}`, `[]`, `{"model":"m","messages":{}}`, `{"model":"m","messages":[null]}`, `{"model":"m","messages":[{}],"stream":true,"stream_options":null}`,
		`{"model":"m","messages":[{"role":"user","role":null,"content":"a","tool_calls":[null,{"function":{"arguments":"xy"},"function":null}]}]}`,
		`{"model":"m","messages":[{"role":"assistant","tool_calls":[{"function":{"arguments":1}}]}],"max_tokens":5,"max_completion_tokens":7}`,
		`{"mod\u0065l":"m","messages":[{"ROLE":"user","content":"\u00e9"}],"tools":[{"type":"function"}]}`,
		`{"model":"m","messages":[{"role":1,"role":"user","content":"hi"}]}`,
		`{"model":"m","messages":[{"role":"assistant","tool_calls":[{"function":1,"function":{"arguments":1,"arguments":"ab"}}]}]}`,
		`{"model":"m","messages":"x","messages":[{"role":"user","content":"x"}]}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, aerr := parseChat(body)
		ref, refErr := parseChatByDecoder(body)
		if fmt.Sprint(aerr) != fmt.Sprint(refErr) || !reflect.DeepEqual(req, ref) {
			t.Fatalf("parseChat(%q) = %+v, %v; encoding/json reads %+v, %v", body, req, aerr, ref, refErr)
		}
		if aerr != nil {
			if aerr.Status != 400 {
				t.Fatalf("parseChat(%q) refused it with status %d; want 400", body, aerr.Status)
			}
			if aerr.Code == "" {
				t.Fatalf("parseChat(%q) refused it without an error code: %+v", body, aerr)
			}
			return
		}
		if req.Model == "" {
			t.Fatalf("parseChat(%q) accepted a body without a model", body)
		}
		if !json.Valid(body) {
			t.Fatalf("parseChat(%q) accepted a body that is not JSON", body)
		}
		// The model is the one a provider reads: the exact "model" key.
		var top map[string]json.RawMessage
		json.Unmarshal(body, &top)
		if model, _ := jsonString(top["model"]); model != req.Model {
			t.Fatalf("parseChat(%q) model = %q; a provider reads %q", body, req.Model, model)
		}
		if stream := string(top["stream"]) == "true"; stream != req.Stream {
			t.Fatalf("parseChat(%q) stream = %v; a provider reads %s", body, req.Stream, top["stream"])
		}
		out, _ := withIncludeUsage(body, req.StreamOptions)
		if !json.Valid(out) {
			t.Fatalf("withIncludeUsage(%q) = %q, not JSON", body, out)
		}
	})
}

// TestJSONMembers: the scanner takes what encoding/json takes, byte for
// byte, and gives each member as written.
func TestJSONMembers(t *testing.T) {
	deep := func(n int) string { return `{"a":` + strings.Repeat("[", n-1) + strings.Repeat("]", n-1) + "}" }
	deepObjects := func(n int) string { return strings.Repeat(`{"a":`, n) + "1" + strings.Repeat("}", n) }
	tests := []struct {
		name, body string
		valid      bool
		members    string // key=value pairs, in order, separated by spaces
	}{
		{"empty object", ` {} `, true, ""},
		{"members", `{"model":"m","n":-1.5e+3,"ok":true,"no":false,"x":null}`, true, `model="m" n=-1.5e+3 ok=true no=false x=null`},
		{"whitespace everywhere", "\t{\r\n \"a\" :\n[ 1 , {\"b\" : [ ] } ] }\n", true, `a=[ 1 , {"b" : [ ] } ]`},
		{"escaped key decoded", `{"mod\u0065l":"m","\"q\"":1}`, true, `model="m" "q"=1`},
		{"escapes in strings", `{"s":"\" \\ \/ \b \f \n \r \t \u00e9 \uD83D\uDE00"}`, true, `s="\" \\ \/ \b \f \n \r \t \u00e9 \uD83D\uDE00"`},
		{"key written twice", `{"a":1,"a":2}`, true, `a=1 a=2`},
		{"non-ASCII and invalid UTF-8 pass", "{\"é\":\"\xff\"}", true, "é=\"\xff\""},
		{"numbers", `{"a":0,"b":-0,"c":10.25,"d":1E9,"e":2e-3}`, true, `a=0 b=-0 c=10.25 d=1E9 e=2e-3`},
		{"deepest allowed", deep(10000), true, "a=" + strings.Repeat("[", 9999) + strings.Repeat("]", 9999)},
		{"too deep", deep(10001), false, ""},
		{"deepest allowed, objects", deepObjects(10000), true, "a=" + deepObjects(9999)},
		{"too deep, objects", deepObjects(10001), false, ""},
		{"arrays and objects", `{"a":[{"b":[[],{}]},[{"c":{"d":[1]}}]],"e":{}}`, true, `a=[{"b":[[],{}]},[{"c":{"d":[1]}}]] e={}`},
		{"object closed by a bracket", `{"a":{"b":1]}`, false, ""},
		{"array closed by a brace", `{"a":[1}}`, false, ""},
		{"nested trailing comma", `{"a":{"b":1,}}`, false, ""},
		{"nested key not a string", `{"a":{1:2}}`, false, ""},
		{"not an object", `["a"]`, false, ""},
		{"a string", `"{}"`, false, ""},
		{"empty", ``, false, ""},
		{"two objects", `{}{}`, false, ""},
		{"trailing bytes", `{"a":1} x`, false, ""},
		{"trailing comma", `{"a":1,}`, false, ""},
		{"trailing comma in array", `{"a":[1,]}`, false, ""},
		{"missing colon", `{"a" 1}`, false, ""},
		{"missing comma", `{"a":1 "b":2}`, false, ""},
		{"unquoted key", `{a:1}`, false, ""},
		{"single quotes", `{'a':1}`, false, ""},
		{"unclosed", `{"a":[1,2}`, false, ""},
		{"unclosed string", `{"a":"b}`, false, ""},
		{"leading zero", `{"a":01}`, false, ""},
		{"bare minus", `{"a":-}`, false, ""},
		{"plus sign", `{"a":+1}`, false, ""},
		{"dot without digits", `{"a":1.}`, false, ""},
		{"leading dot", `{"a":.5}`, false, ""},
		{"exponent without digits", `{"a":1e+}`, false, ""},
		{"hex", `{"a":0x10}`, false, ""},
		{"truncated literal", `{"a":tru}`, false, ""},
		{"capital literal", `{"a":True}`, false, ""},
		{"NaN", `{"a":NaN}`, false, ""},
		{"bad escape", `{"a":"\x41"}`, false, ""},
		{"short unicode escape", `{"a":"\u00e"}`, false, ""},
		{"raw control character", "{\"a\":\"tab\there\"}", false, ""},
		{"raw newline", "{\"a\":\"line\nbreak\"}", false, ""},
		{"comment", `{"a":1 /* no */}`, false, ""},
	}
	for _, tc := range tests {
		var got []string
		valid := jsonMembers([]byte(tc.body), func(key, value []byte) { got = append(got, string(key)+"="+string(value)) })
		if valid != tc.valid {
			t.Errorf("%s: jsonMembers(%.60q) = %v; want %v", tc.name, tc.body, valid, tc.valid)
		}
		if want := json.Valid([]byte(tc.body)) && strings.HasPrefix(strings.TrimLeft(tc.body, " \t\r\n"), "{"); valid != want {
			t.Errorf("%s: jsonMembers(%.60q) = %v; encoding/json says %v", tc.name, tc.body, valid, want)
		}
		if valid && strings.Join(got, " ") != tc.members {
			t.Errorf("%s: members %.80q; want %.80q", tc.name, strings.Join(got, " "), tc.members)
		}
	}
}

// FuzzJSONMembers holds the scanner to encoding/json on any bytes: the same
// verdict on validity, and, for an object or an array, the same members
// (the last of a key written twice) and elements, byte for byte.
func FuzzJSONMembers(f *testing.F) {
	for _, s := range []string{`{}`, `[]`, chatBody, streamBody, `{"a":[1,{"b":"\u00e9"}],"a":null}`, "{\"\xff\":1}",
		`{"\ud800":1}`, `[1,"x",{"y":[]},-2.5e-3,true,null]`, `{"a":01}`, `{"a":"\x"}`, ` [ ] `} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var first byte // of the JSON value, after whitespace
		if trimmed := bytes.TrimLeft(b, " \t\r\n"); len(trimmed) > 0 {
			first = trimmed[0]
		}
		members := map[string]string{}
		valid := jsonMembers(b, func(key, value []byte) { members[string([]rune(string(key)))] = string(value) })
		if want := json.Valid(b) && first == '{'; valid != want {
			t.Fatalf("jsonMembers(%q) = %v; encoding/json says %v", b, valid, want)
		}
		if valid {
			var ref map[string]json.RawMessage
			if err := json.Unmarshal(b, &ref); err != nil {
				t.Fatal(err)
			}
			if len(ref) != len(members) {
				t.Fatalf("jsonMembers(%q): %d members; encoding/json finds %d", b, len(members), len(ref))
			}
			for k, v := range ref {
				if members[k] != string(v) {
					t.Fatalf("jsonMembers(%q)[%q] = %q; encoding/json reads %q", b, k, members[k], v)
				}
			}
		}
		var elements []string
		valid = jsonElements(b, func(v []byte) { elements = append(elements, string(v)) })
		if want := json.Valid(b) && first == '['; valid != want {
			t.Fatalf("jsonElements(%q) = %v; encoding/json says %v", b, valid, want)
		}
		if valid {
			var raw []json.RawMessage
			if err := json.Unmarshal(b, &raw); err != nil {
				t.Fatal(err)
			}
			var ref []string
			for _, v := range raw {
				ref = append(ref, string(v))
			}
			if !slices.Equal(elements, ref) {
				t.Fatalf("jsonElements(%q) = %q; encoding/json reads %q", b, elements, ref)
			}
		}
	})
}

// FuzzUsageOf holds usageOf to encoding/json's decoding of a usage object
// whose keys are written exactly as arbstr reads them.
func FuzzUsageOf(f *testing.F) {
	for _, s := range []string{`{"prompt_tokens":12,"completion_tokens":"300"}`, `{"input_tokens":1.6,"output_tokens":null,"cost":{"total_msats":5}}`,
		`{"prompt_tokens":1,"prompt_tokens":"x","cost_sats":0.5}`, `{"completion_tokens":[1],"total_tokens":3}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var keys map[string]json.RawMessage
		if json.Unmarshal(b, &keys) != nil || keys == nil {
			return
		}
		for k := range keys {
			for _, exact := range []string{"prompt_tokens", "completion_tokens", "input_tokens", "output_tokens", "cost", "cost_sats"} {
				if k != exact && strings.EqualFold(k, exact) {
					return // encoding/json would take it; a provider's client would not
				}
			}
		}
		var want usage
		json.Unmarshal(b, &want)
		if got := usageOf(b); got == nil || !reflect.DeepEqual(*got, want) {
			t.Fatalf("usageOf(%q) = %+v; encoding/json reads %+v", b, got, want)
		}
	})
}

// parseChatByDecoder is parseChat written with encoding/json alone, keys
// exact and the last of a key written twice counting: the reference that
// FuzzParseChat holds parseChat to, and that BenchmarkReadBodies compares
// it with.
func parseChatByDecoder(body []byte) (*chatRequest, *apiError) {
	var top map[string]json.RawMessage
	if json.Unmarshal(body, &top) != nil || top == nil {
		return nil, notAnObject(body)
	}
	badMessages := badRequest("invalid_messages", "messages must be a non-empty array of objects with a string role")
	req := &chatRequest{StreamOptions: top["stream_options"]}
	var messages []json.RawMessage
	if m := top["messages"]; m != nil && json.Unmarshal(m, &messages) != nil {
		return nil, badMessages
	}
	var lastUser json.RawMessage
	for _, m := range messages {
		var fields map[string]json.RawMessage
		if json.Unmarshal(m, &fields) != nil {
			return nil, badMessages
		}
		var role string
		if r := fields["role"]; r != nil && json.Unmarshal(r, &role) != nil {
			return nil, badMessages
		}
		if n, ok := jsonStringLen(fields["content"]); ok {
			req.TextBytes += n
		} else {
			req.TextBytes += int64(len(messageText(fields["content"])))
		}
		var calls []map[string]json.RawMessage
		if c := fields["tool_calls"]; c != nil && json.Unmarshal(c, &calls) != nil {
			return nil, badMessages
		}
		for _, call := range calls {
			var fn map[string]json.RawMessage
			if f := call["function"]; f != nil && json.Unmarshal(f, &fn) != nil {
				return nil, badMessages
			}
			var args string
			if a := fn["arguments"]; a != nil && json.Unmarshal(a, &args) != nil {
				return nil, badMessages
			}
			req.TextBytes += int64(len(args))
		}
		if role == "user" {
			lastUser = fields["content"]
		}
	}
	var aerr *apiError
	if req.Model, aerr = parseModel(top["model"]); aerr != nil {
		return nil, aerr
	}
	if len(messages) == 0 {
		return nil, badRequest("invalid_messages", "messages must be a non-empty array")
	}
	switch string(top["stream"]) {
	case "", "null", "false":
	case "true":
		req.Stream = true
	default:
		return nil, badRequest("invalid_stream", "stream must be a boolean")
	}
	for _, key := range []string{"max_tokens", "max_completion_tokens"} {
		var n int64
		if json.Unmarshal(top[key], &n) == nil && n > 0 {
			req.MaxTokens = n
		}
	}
	req.TextBytes += int64(len(top["tools"]))
	if lastUser != nil {
		req.LastUser = messageText(lastUser)
	}
	return req, nil
}

// ---- The ledger itself (store.go) ----
// storeTestLogger discards the ledger's log lines; tests that read them build
// their own.
var storeTestLogger = slog.New(slog.NewTextHandler(io.Discard, nil))

// newTestStore opens a ledger at path (a file under t.TempDir() or
// ":memory:") and closes it when the test ends.
func newTestStore(tb testing.TB, path string) *Store {
	tb.Helper()
	s, err := openStore(path, storeTestLogger)
	if err != nil {
		tb.Fatalf("openStore(%q): %v", path, err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

func newTestStoreFile(tb testing.TB) (*Store, string) {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "arbstr.db")
	return newTestStore(tb, path), path
}

// storeTestRow is a successful non-streaming request with usage, priced
// from the configured rates.
func storeTestRow(id string, at time.Time) ledgerRow {
	return ledgerRow{
		RequestID:    id,
		Time:         ledgerStamp{at},
		Model:        "gpt-4o-mini",
		Provider:     "alpha",
		InputTokens:  new(int64(120)),
		OutputTokens: new(int64(80)),
		Cost:         new(msats(1234)),
		BaselineCost: new(msats(2345)),
		QuotedCost:   new(msats(1234)),
		CostSource:   new("rates"),
		LatencyMs:    new(int64(321)),
		Attempts:     1,
		Success:      true,
		Status:       200,
		Endpoint:     "chat",
	}
}

// deref is *p, or the zero value for a NULL column.
func deref[T any](p *T) T {
	if p == nil {
		var zero T
		return zero
	}
	return *p
}

// rowJSON shows a row in a failure message, its pointers followed.
func rowJSON(r ledgerRow) string {
	b, _ := json.Marshal(r)
	return string(b)
}

func syncTestStore(tb testing.TB, s *Store) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Sync(ctx); err != nil {
		tb.Fatalf("Sync: %v", err)
	}
}

func queryTestInt(tb testing.TB, db *sql.DB, query string, args ...any) int64 {
	tb.Helper()
	var n int64
	if err := db.QueryRow(query, args...).Scan(&n); err != nil {
		tb.Fatalf("%s: %v", query, err)
	}
	return n
}

func TestStorePragmas(t *testing.T) {
	s, _ := newTestStoreFile(t)
	tests := []struct {
		pragma string
		want   string
	}{
		{"journal_mode", "wal"},
		{"busy_timeout", "5000"},
		{"synchronous", "1"},   // NORMAL
		{"cache_size", "-500"}, // KiB
		{"user_version", strconv.Itoa(len(ledgerMigrations))},
	}
	for _, tt := range tests {
		var got string
		if err := s.db.QueryRow("PRAGMA " + tt.pragma).Scan(&got); err != nil {
			t.Fatalf("PRAGMA %s: %v", tt.pragma, err)
		}
		if got != tt.want {
			t.Errorf("PRAGMA %s = %q; want %q", tt.pragma, got, tt.want)
		}
	}
}

func TestStoreSchema(t *testing.T) {
	s, _ := newTestStoreFile(t)
	tests := []struct {
		table string
		want  []string
	}{
		{"requests", []string{"id", "request_id", "timestamp", "policy", "model", "provider", "streaming",
			"input_tokens", "output_tokens", "usage_estimated", "cost_sats", "baseline_cost_sats",
			"latency_ms", "ttft_ms", "attempts", "success", "status", "error",
			"client", "quoted_cost_sats", "cost_source", "endpoint"}},
		{"token_ratios", []string{"policy", "avg_ratio", "sample_count"}},
	}
	for _, tt := range tests {
		rows, err := s.db.Query("SELECT name FROM pragma_table_info(?) ORDER BY cid", tt.table)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for rows.Next() {
			var name string
			if err := rows.Scan(&name); err != nil {
				t.Fatal(err)
			}
			got = append(got, name)
		}
		rows.Close()
		if !reflect.DeepEqual(got, tt.want) {
			t.Errorf("columns(%q) = %q; want %q", tt.table, got, tt.want)
		}
	}
	for _, index := range []string{"requests_timestamp"} {
		if n := queryTestInt(t, s.db, "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = ?", index); n != 1 {
			t.Errorf("index(%q) = %d; want 1", index, n)
		}
	}
}

func TestStoreDSN(t *testing.T) {
	tests := []struct {
		path string
		want string // the DSN up to its parameters
	}{
		{":memory:", ":memory:"},
		{"arbstr.db", "file:arbstr.db"},
		{"./data/arbstr.db", "file:data/arbstr.db"},
		{"/var/lib/arbstr/arbstr.db", "file:/var/lib/arbstr/arbstr.db"},
		{"//srv/arbstr.db", "file:/srv/arbstr.db"},
		{"/tmp/a?b#c d%.db", "file:/tmp/a%3Fb%23c%20d%25.db"},
	}
	for _, tt := range tests {
		got, _, _ := strings.Cut(ledgerDSN(tt.path), "?")
		if got != tt.want {
			t.Errorf("ledgerDSN(%q) = %q; want %q", tt.path, got, tt.want)
		}
	}
	// A path with URI characters really opens, and is the file named.
	dir := t.TempDir()
	path := filepath.Join(dir, "odd ?#% name.db")
	s := newTestStore(t, path)
	s.Record(storeTestRow("odd", time.Now()))
	syncTestStore(t, s)
	var file string
	if err := s.db.QueryRow("SELECT file FROM pragma_database_list WHERE name = 'main'").Scan(&file); err != nil {
		t.Fatal(err)
	}
	if file != path {
		t.Errorf("database file = %q; want %q", file, path)
	}
}

func TestStoreMemory(t *testing.T) {
	s := newTestStore(t, ":memory:")
	const n = 500
	var wg sync.WaitGroup
	// Readers share the single connection with the writer; they must
	// neither deadlock nor see another database.
	for range 4 {
		wg.Go(func() {
			for range 20 {
				if _, err := s.Stats(context.Background(), statsQuery{}); err != nil {
					t.Errorf("Stats: %v", err)
					return
				}
			}
		})
	}
	for i := range n {
		s.Record(storeTestRow(fmt.Sprintf("mem-%d", i), time.Now()))
	}
	wg.Wait()
	syncTestStore(t, s)
	st, err := s.Stats(context.Background(), statsQuery{})
	if err != nil {
		t.Fatal(err)
	}
	if st.Total.Requests != n {
		t.Errorf("Stats(:memory:).Total.Requests = %d; want %d", st.Total.Requests, n)
	}
	list, err := s.Requests(context.Background(), requestsQuery{Limit: 1})
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].RequestID != fmt.Sprintf("mem-%d", n-1) {
		t.Errorf("Requests(:memory:, limit 1) = %+v; want mem-%d", list, n-1)
	}
}

func TestStoreRoundTrip(t *testing.T) {
	s, _ := newTestStoreFile(t)
	at := time.Date(2026, 3, 1, 9, 30, 15, 123456789, time.FixedZone("CET", 3600))
	full := storeTestRow("full", at)
	full.Policy = new("code")
	full.Streaming = true
	full.TTFTMs = new(int64(42))
	full.UsageEstimated = true
	full.Client = "alice"
	full.Endpoint = "responses"
	full.QuotedCost = new(msats(1000))
	full.CostSource = new("provider")

	failed := ledgerRow{
		RequestID: "failed", Time: ledgerStamp{at}, Model: "m", Provider: "beta",
		LatencyMs: new(int64(900)), Attempts: 3, Status: 502, Error: new("all providers failed"),
	}
	refused := ledgerRow{RequestID: "refused", Time: ledgerStamp{at}, Model: "m", Status: 400, Error: new("no provider")}
	// Stored: UTC, to the millisecond, and "chat" for an empty endpoint.
	stored := func(r ledgerRow) ledgerRow {
		r.Time = ledgerStamp{time.Date(2026, 3, 1, 8, 30, 15, 123000000, time.UTC)}
		if r.Endpoint == "" {
			r.Endpoint = "chat"
		}
		return r
	}
	tests := []struct {
		in   ledgerRow
		want ledgerRow
	}{
		{full, stored(full)},
		{failed, stored(failed)},
		{refused, stored(refused)},
	}
	for _, tt := range tests {
		s.Record(tt.in)
	}
	syncTestStore(t, s)
	for _, tt := range tests {
		got, ok, err := s.Request(context.Background(), tt.in.RequestID)
		if err != nil || !ok {
			t.Fatalf("Request(%q) = %v, %v", tt.in.RequestID, ok, err)
		}
		if !reflect.DeepEqual(got, tt.want) {
			t.Errorf("Request(%q) = %s; want %s", tt.in.RequestID, rowJSON(got), rowJSON(tt.want))
		}
	}
	if _, ok, err := s.Request(context.Background(), "absent"); ok || err != nil {
		t.Errorf("Request(%q) = %v, %v; want false, nil", "absent", ok, err)
	}
	// The columns hold NULL where nothing is known.
	nulls := []struct {
		id, column string
		want       int64
	}{
		{"failed", "input_tokens IS NULL", 1},
		{"failed", "cost_sats IS NULL", 1},
		{"failed", "ttft_ms IS NULL", 1},
		{"failed", "policy IS NULL", 1},
		{"refused", "error IS NULL", 0},
		{"full", "ttft_ms", 42},
		{"full", "cost_sats = 1.234", 1},
		{"full", "timestamp = '2026-03-01T08:30:15.123Z'", 1},
		{"full", "quoted_cost_sats = 1.0", 1},
		{"full", "cost_source = 'provider'", 1},
		{"full", "client = 'alice'", 1},
		{"full", "endpoint = 'responses'", 1},
		{"failed", "quoted_cost_sats IS NULL", 1},
		{"failed", "cost_source IS NULL", 1},
		{"failed", "client = ''", 1},
		{"failed", "endpoint = 'chat'", 1},
	}
	for _, tt := range nulls {
		if got := queryTestInt(t, s.db, "SELECT "+tt.column+" FROM requests WHERE request_id = ?", tt.id); got != tt.want {
			t.Errorf("%s(%q) = %d; want %d", tt.column, tt.id, got, tt.want)
		}
	}
}

func TestStoreConcurrentRecord(t *testing.T) {
	s, _ := newTestStoreFile(t)
	const goroutines, each = 64, 100
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range each {
				s.Record(storeTestRow(fmt.Sprintf("g%d-%d", g, i), time.Now()))
			}
		})
	}
	wg.Wait()
	syncTestStore(t, s)
	for _, query := range []string{
		"SELECT COUNT(*) FROM requests",
		"SELECT COUNT(DISTINCT request_id) FROM requests",
	} {
		if got := queryTestInt(t, s.db, query); got != goroutines*each {
			t.Errorf("%s = %d; want %d", query, got, goroutines*each)
		}
	}
}

func TestStoreCloseFlushes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "arbstr.db")
	s, err := openStore(path, storeTestLogger)
	if err != nil {
		t.Fatal(err)
	}
	const n = 10000
	for i := range n {
		s.Record(storeTestRow(strconv.Itoa(i), time.Now()))
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	s = newTestStore(t, path)
	if got := queryTestInt(t, s.db, "SELECT COUNT(*) FROM requests"); got != n {
		t.Errorf("rows after Close(%q) = %d; want %d", path, got, n)
	}
}

func TestStoreRecordAfterClose(t *testing.T) {
	var logs bytes.Buffer
	s, err := openStore(filepath.Join(t.TempDir(), "arbstr.db"), slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s.Record(storeTestRow("late", time.Now())) // must not panic
	if err := s.Sync(context.Background()); err != nil {
		t.Errorf("Sync after Close = %v; want nil", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close = %v; want nil", err)
	}
	if !strings.Contains(logs.String(), "request_id=late") {
		t.Errorf("log = %q; want the dropped request_id", logs.String())
	}
}

// TestStoreSyncWaitsForCommit holds the write lock from another connection,
// as a backup would, so that the writer waits in busy_timeout: Sync must not
// return at once, must not wait for ever, and must return once the row is
// committed.
func TestStoreSyncWaitsForCommit(t *testing.T) {
	s, path := newTestStoreFile(t)
	other, err := sql.Open("sqlite", ledgerDSN(path))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	tx, err := other.Begin() // BEGIN IMMEDIATE: takes the write lock
	if err != nil {
		t.Fatal(err)
	}
	s.Record(storeTestRow("held", time.Now()))
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := s.Sync(ctx); err != context.DeadlineExceeded {
		t.Errorf("Sync while the lock is held = %v; want %v", err, context.DeadlineExceeded)
	}
	// Without a deadline of its own, Sync gives up on a writer stuck on
	// the lock, and the reader sees what is committed.
	syncTestStore(t, s)
	if _, ok, err := s.Request(context.Background(), "held"); ok || err != nil {
		t.Errorf("Request(%q) while the lock is held = %v, %v; want false, nil", "held", ok, err)
	}
	tx.Rollback()
	syncTestStore(t, s)
	if _, ok, err := s.Request(context.Background(), "held"); !ok || err != nil {
		t.Errorf("Request(%q) after Sync = %v, %v; want true, nil", "held", ok, err)
	}
}

// TestStoreDuplicateRequestID: a batch is written in INSERTs of 32, 16, ...
// 1 rows; a request_id already in the ledger, in a part of any size, loses
// that row only, which is logged, and every other row is written once.
func TestStoreDuplicateRequestID(t *testing.T) {
	for _, tt := range []struct {
		name string
		n    int   // rows in the batch, with ids "0" to n-1
		dup  []int // positions whose id is "0" instead
	}{
		{"four rows", 4, []int{2}},
		{"in a part of 32", 45, []int{7}},
		{"in a part of 8", 45, []int{35}},
		{"the last row, a part of 1", 45, []int{44}},
		{"two in different parts", 63, []int{31, 62}},
		{"none, 64 rows", 64, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var logs syncBuffer
			s, err := openStore(filepath.Join(t.TempDir(), "arbstr.db"), slog.New(slog.NewTextHandler(&logs, nil)))
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			// Called directly, so that the rows are one batch.
			var batch []ledgerRow
			for i := range tt.n {
				id := strconv.Itoa(i)
				if slices.Contains(tt.dup, i) {
					id = "0"
				}
				batch = append(batch, storeTestRow(id, time.Now()))
			}
			s.writeBatch(batch)
			want := int64(tt.n - len(tt.dup))
			expect(t, "rows", queryTestInt(t, s.db, "SELECT COUNT(*) FROM requests"), want)
			expect(t, "distinct request ids", queryTestInt(t, s.db, "SELECT COUNT(DISTINCT request_id) FROM requests"), want)
			expect(t, "lost-row log lines", strings.Count(logs.String(), "ledger row not written"), len(tt.dup))
			if len(tt.dup) > 0 {
				expectContains(t, "the log", logs.String(), "request_id=0 ")
			}
		})
	}
}

// storeTestFailures is how many more calls of the SQL function
// store_test_fail() fail. A trigger calls it on each insert, so that a test
// can make the writer's commits fail, deterministically, with an error that
// is not a constraint.
var (
	storeTestFailures     atomic.Int64
	storeTestRegisterFail = sync.OnceFunc(func() {
		sqlite.MustRegisterScalarFunction("store_test_fail", 0, func(*sqlite.FunctionContext, []driver.Value) (driver.Value, error) {
			if storeTestFailures.Add(-1) >= 0 {
				return nil, errors.New("injected failure")
			}
			return nil, nil
		})
	})
)

// TestStoreWriteRetry checks that a batch whose commit keeps failing is
// neither dropped nor lets the ledger hang its readers: it waits, Health
// says why, Sync returns, and once commits work again every row is written.
// The log says once that writing fails and once that it recovered.
func TestStoreWriteRetry(t *testing.T) {
	storeTestRegisterFail()
	var logs syncBuffer
	s, err := openStore(filepath.Join(t.TempDir(), "arbstr.db"), slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.retryFirst, s.retryMax = time.Millisecond, 5*time.Millisecond
	if _, err := s.db.Exec(`CREATE TRIGGER test_fail BEFORE INSERT ON requests BEGIN SELECT store_test_fail(); END`); err != nil {
		t.Fatal(err)
	}
	storeTestFailures.Store(1 << 30)
	for _, id := range []string{"r1", "r2", "r3"} {
		s.Record(storeTestRow(id, time.Now()))
	}
	waitForStore(t, "Health() != nil", func() bool { return s.Health() != nil })
	if err := s.Health(); !strings.Contains(err.Error(), "injected failure") {
		t.Errorf("Health() = %q; want the commit's error", err)
	}
	syncTestStore(t, s) // returns although nothing can be committed
	if got := queryTestInt(t, s.db, "SELECT COUNT(*) FROM requests"); got != 0 {
		t.Errorf("rows while failing = %d; want 0", got)
	}
	storeTestFailures.Store(0)
	waitForStore(t, "Health() == nil", func() bool { return s.Health() == nil })
	syncTestStore(t, s)
	if got := queryTestInt(t, s.db, "SELECT COUNT(*) FROM requests"); got != 3 {
		t.Errorf("rows after recovery = %d; want 3", got)
	}
	for _, tt := range []struct {
		line string
		want int
	}{
		{"ledger write failing", 1},
		{"ledger write recovered", 1},
		{"ledger row not written", 0},
	} {
		if got := strings.Count(logs.String(), tt.line); got != tt.want {
			t.Errorf("log lines %q = %d; want %d in %s", tt.line, got, tt.want, logs.String())
		}
	}
}

// waitForStore polls cond until it holds, failing the test after 30 s.
func waitForStore(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("waited 30s for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// storeFixtureT0 is "now" for the stats and requests fixture.
var storeFixtureT0 = time.Date(2026, 1, 10, 12, 0, 0, 0, time.UTC)

// storeFixture records five requests around storeFixtureT0:
//
//	id  time      provider model policy ok  stream in  out cost base  latency
//	r1  T0-2h     alpha    m1    code   yes no     100 200 0.1  0.3   100
//	r2  T0-1h     beta     m1    -      yes yes    10  20  0.2  0.2   300
//	r3  T0-30m    alpha    m2    code   no  no     -   -   -    -     50
//	r4  T0-48h    beta     m2    chat   yes no     1   1   1.234 2    10
//	r5  T0        -        m1    -      no  no     -   -   -    -     0
func storeFixture(t *testing.T) *Store {
	s, _ := newTestStoreFile(t)
	t0 := storeFixtureT0
	at := func(d time.Duration) ledgerStamp { return ledgerStamp{t0.Add(d)} }
	rows := []ledgerRow{
		{RequestID: "r1", Time: at(-2 * time.Hour), Provider: "alpha", Model: "m1", Policy: new("code"), Success: true, Status: 200,
			InputTokens: new(int64(100)), OutputTokens: new(int64(200)), Cost: new(msats(100)), BaselineCost: new(msats(300)),
			LatencyMs: new(int64(100)), Attempts: 1},
		{RequestID: "r2", Time: at(-time.Hour), Provider: "beta", Model: "m1", Success: true, Status: 200, Streaming: true, TTFTMs: new(int64(30)),
			InputTokens: new(int64(10)), OutputTokens: new(int64(20)), Cost: new(msats(200)), BaselineCost: new(msats(200)),
			LatencyMs: new(int64(300)), Attempts: 2},
		{RequestID: "r3", Time: at(-30 * time.Minute), Provider: "alpha", Model: "m2", Policy: new("code"), Status: 502,
			LatencyMs: new(int64(50)), Attempts: 3, Error: new("upstream failed")},
		{RequestID: "r4", Time: at(-48 * time.Hour), Provider: "beta", Model: "m2", Policy: new("chat"), Success: true, Status: 200,
			InputTokens: new(int64(1)), OutputTokens: new(int64(1)), Cost: new(msats(1234)), BaselineCost: new(msats(2000)),
			LatencyMs: new(int64(10)), Attempts: 1},
		{RequestID: "r5", Time: at(0), Model: "m1", Status: 400, Error: new("no provider"), LatencyMs: new(int64(0))},
	}
	for _, r := range rows {
		s.Record(r)
	}
	syncTestStore(t, s)
	return s
}

func TestStoreStats(t *testing.T) {
	s := storeFixture(t)
	t0 := storeFixtureT0
	type group struct {
		key      string
		requests int64
		cost     float64
	}
	tests := []struct {
		name   string
		q      statsQuery
		total  statsTotals
		groups []group
	}{
		{"all time by provider", statsQuery{Until: t0},
			statsTotals{Requests: 5, Success: 3, Errors: 2, Streaming: 1, InputTokens: 111, OutputTokens: 221,
				CostSats: 1.534, BaselineCostSats: 2.5, SavedSats: 0.966, AvgLatencyMs: 92},
			[]group{{"", 1, 0}, {"alpha", 2, 0.1}, {"beta", 2, 1.434}}},
		{"24h by policy", statsQuery{Since: t0.Add(-24 * time.Hour), Until: t0, GroupBy: "policy"},
			statsTotals{Requests: 4, Success: 2, Errors: 2, Streaming: 1, InputTokens: 110, OutputTokens: 220,
				CostSats: 0.3, BaselineCostSats: 0.5, SavedSats: 0.2, AvgLatencyMs: 112.5},
			[]group{{"", 2, 0.2}, {"code", 2, 0.1}}},
		{"until is inclusive", statsQuery{Since: t0.Add(-24 * time.Hour), Until: t0.Add(-time.Hour), GroupBy: "model"},
			statsTotals{Requests: 2, Success: 2, Streaming: 1, InputTokens: 110, OutputTokens: 220,
				CostSats: 0.3, BaselineCostSats: 0.5, SavedSats: 0.2, AvgLatencyMs: 200},
			[]group{{"m1", 2, 0.3}}},
		{"since is inclusive", statsQuery{Since: t0.Add(-30 * time.Minute), Until: t0},
			statsTotals{Requests: 2, Errors: 2, AvgLatencyMs: 25},
			[]group{{"", 1, 0}, {"alpha", 1, 0}}},
		{"provider filter by model", statsQuery{GroupBy: "model", Until: t0, ledgerMatch: ledgerMatch{Provider: "alpha"}},
			statsTotals{Requests: 2, Success: 1, Errors: 1, InputTokens: 100, OutputTokens: 200,
				CostSats: 0.1, BaselineCostSats: 0.3, SavedSats: 0.2, AvgLatencyMs: 75},
			[]group{{"m1", 1, 0.1}, {"m2", 1, 0}}},
		{"policy and model filter", statsQuery{Until: t0, ledgerMatch: ledgerMatch{Policy: "code", Model: "m1"}},
			statsTotals{Requests: 1, Success: 1, InputTokens: 100, OutputTokens: 200,
				CostSats: 0.1, BaselineCostSats: 0.3, SavedSats: 0.2, AvgLatencyMs: 100},
			[]group{{"alpha", 1, 0.1}}},
		{"empty window", statsQuery{Since: t0.Add(time.Hour), Until: t0.Add(2 * time.Hour)},
			statsTotals{}, []group{}},
		{"zero until is now", statsQuery{Since: t0.Add(-time.Minute)},
			statsTotals{Requests: 1, Errors: 1}, []group{{"", 1, 0}}},
	}
	for _, tt := range tests {
		res, err := s.Stats(context.Background(), tt.q)
		if err != nil {
			t.Fatalf("%s: Stats: %v", tt.name, err)
		}
		if res.Total != tt.total {
			t.Errorf("%s: Stats(%+v).Total = %+v; want %+v", tt.name, tt.q, res.Total, tt.total)
		}
		var got []group
		for _, g := range res.Groups {
			got = append(got, group{g.Key, g.Requests, g.CostSats})
		}
		if len(got) != len(tt.groups) || (len(got) > 0 && !reflect.DeepEqual(got, tt.groups)) {
			t.Errorf("%s: Stats(%+v).Groups = %+v; want %+v", tt.name, tt.q, got, tt.groups)
		}
		if res.Groups == nil {
			t.Errorf("%s: Stats(%+v).Groups = nil; want []", tt.name, tt.q)
		}
	}
	if _, err := s.Stats(context.Background(), statsQuery{GroupBy: "color"}); err == nil {
		t.Errorf("Stats(group_by %q) = nil error; want an error", "color")
	}
}

func TestStoreStatsJSON(t *testing.T) {
	s := storeFixture(t)
	tests := []struct {
		q    statsQuery
		want string
	}{
		{statsQuery{Since: storeFixtureT0.Add(time.Hour), Until: storeFixtureT0.Add(2 * time.Hour)},
			`{"since":"2026-01-10T13:00:00.000Z","until":"2026-01-10T14:00:00.000Z","total":{"requests":0,"success":0,"errors":0,"streaming":0,"input_tokens":0,"output_tokens":0,"cost_sats":0,"baseline_cost_sats":0,"saved_sats":0,"avg_latency_ms":0,"quoted_cost_sats":0,"overcharge_sats":0},"groups":[]}`},
		{statsQuery{Until: storeFixtureT0, ledgerMatch: ledgerMatch{Policy: "chat"}},
			`{"until":"2026-01-10T12:00:00.000Z","total":{"requests":1,"success":1,"errors":0,"streaming":0,"input_tokens":1,"output_tokens":1,"cost_sats":1.234,"baseline_cost_sats":2,"saved_sats":0.766,"avg_latency_ms":10,"quoted_cost_sats":0,"overcharge_sats":0},"groups":[{"key":"beta","requests":1,"success":1,"errors":0,"streaming":0,"input_tokens":1,"output_tokens":1,"cost_sats":1.234,"baseline_cost_sats":2,"saved_sats":0.766,"avg_latency_ms":10,"quoted_cost_sats":0,"overcharge_sats":0}]}`},
	}
	for _, tt := range tests {
		res, err := s.Stats(context.Background(), tt.q)
		if err != nil {
			t.Fatal(err)
		}
		b, err := json.Marshal(res)
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != tt.want {
			t.Errorf("json(Stats(%+v)) = %s; want %s", tt.q, b, tt.want)
		}
	}
}

func TestStoreRequests(t *testing.T) {
	s := storeFixture(t)
	yes, no := true, false
	tests := []struct {
		q    requestsQuery
		want string
	}{
		{requestsQuery{}, "r5 r3 r2 r1 r4"},
		{requestsQuery{Limit: 2}, "r5 r3"},
		{requestsQuery{Limit: 2, Offset: 2}, "r2 r1"},
		{requestsQuery{Offset: 10}, ""},
		{requestsQuery{Offset: 3}, "r1 r4"},
		{requestsQuery{Limit: 1 << 20}, "r5 r3 r2 r1 r4"},
		{requestsQuery{ledgerMatch: ledgerMatch{Provider: "alpha"}}, "r3 r1"},
		{requestsQuery{ledgerMatch: ledgerMatch{Model: "m2"}}, "r3 r4"},
		{requestsQuery{ledgerMatch: ledgerMatch{Policy: "code"}}, "r3 r1"},
		{requestsQuery{ledgerMatch: ledgerMatch{Success: &yes}}, "r2 r1 r4"},
		{requestsQuery{ledgerMatch: ledgerMatch{Success: &no}}, "r5 r3"},
		{requestsQuery{ledgerMatch: ledgerMatch{Model: "m1", Success: &no}}, "r5"},
		{requestsQuery{ledgerMatch: ledgerMatch{Provider: "nobody"}}, ""},
	}
	for _, tt := range tests {
		list, err := s.Requests(context.Background(), tt.q)
		if err != nil {
			t.Fatalf("Requests(%+v): %v", tt.q, err)
		}
		if list == nil {
			t.Errorf("Requests(%+v) = nil; want []", tt.q)
		}
		var ids []string
		for _, r := range list {
			ids = append(ids, r.RequestID)
		}
		if got := strings.Join(ids, " "); got != tt.want {
			t.Errorf("Requests(%+v) = %q; want %q", tt.q, got, tt.want)
		}
	}

	// Rows of the same millisecond come newest-written first.
	s2 := newTestStore(t, ":memory:")
	for _, id := range []string{"x", "y", "z"} {
		s2.Record(storeTestRow(id, storeFixtureT0))
	}
	syncTestStore(t, s2)
	list, err := s2.Requests(context.Background(), requestsQuery{})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, r := range list {
		ids = append(ids, r.RequestID)
	}
	if got := strings.Join(ids, " "); got != "z y x" {
		t.Errorf("Requests(same millisecond) = %q; want %q", got, "z y x")
	}
}

func TestLedgerRowJSON(t *testing.T) {
	at := time.Date(2026, 1, 2, 3, 4, 5, 6000000, time.UTC)
	full := storeTestRow("req-1", at)
	full.Policy, full.Streaming, full.TTFTMs = new("code"), true, new(int64(15))
	tests := []struct {
		row  ledgerRow
		want string
	}{
		{full, `{"request_id":"req-1","timestamp":"2026-01-02T03:04:05.006Z","policy":"code","model":"gpt-4o-mini","provider":"alpha","streaming":true,"input_tokens":120,"output_tokens":80,"usage_estimated":false,"cost_sats":1.234,"baseline_cost_sats":2.345,"latency_ms":321,"ttft_ms":15,"attempts":1,"success":true,"status":200,"error":null,"client":"","quoted_cost_sats":1.234,"cost_source":"rates","endpoint":"chat"}`},
		{ledgerRow{RequestID: "req-2", Time: ledgerStamp{at}, Model: "m", Status: 502, Attempts: 3, LatencyMs: new(int64(7)), Error: new("boom"),
			Client: "bob", Endpoint: "embeddings"},
			`{"request_id":"req-2","timestamp":"2026-01-02T03:04:05.006Z","policy":null,"model":"m","provider":"","streaming":false,"input_tokens":null,"output_tokens":null,"usage_estimated":false,"cost_sats":null,"baseline_cost_sats":null,"latency_ms":7,"ttft_ms":null,"attempts":3,"success":false,"status":502,"error":"boom","client":"bob","quoted_cost_sats":null,"cost_source":null,"endpoint":"embeddings"}`},
	}
	for _, tt := range tests {
		b, err := json.Marshal(tt.row)
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != tt.want {
			t.Errorf("json(%q) = %s; want %s", tt.row.RequestID, b, tt.want)
		}
		var back ledgerRow
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(back, tt.row) {
			t.Errorf("unjson(json(%q)) = %s; want %s", tt.row.RequestID, rowJSON(back), rowJSON(tt.row))
		}
	}
	// A slice of rows, as /v1/requests writes it, uses the same form.
	b, _ := json.Marshal([]ledgerRow{full})
	if !strings.HasPrefix(string(b), `[{"request_id":"req-1",`) {
		t.Errorf("json([]ledgerRow) = %s", b)
	}
}

func TestStoreRatio(t *testing.T) {
	s, path := newTestStoreFile(t)
	row := func(id, policy string, in, out int64, mod func(*ledgerRow)) ledgerRow {
		r := storeTestRow(id, time.Now())
		r.InputTokens, r.OutputTokens = new(in), new(out)
		if policy != "" {
			r.Policy = new(policy)
		}
		if mod != nil {
			mod(&r)
		}
		return r
	}
	// Two batches, so that the second starts from the first's cache.
	s.Record(row("c1", "code", 100, 50, nil))                                                               // 0.5
	s.Record(row("c2", "code", 100, 150, nil))                                                              // 1.5
	s.Record(row("x1", "code", 100, 1000, func(r *ledgerRow) { r.UsageEstimated = true }))                  // estimated: ignored
	s.Record(row("x2", "code", 100, 1000, func(r *ledgerRow) { r.Success = false }))                        // failed: ignored
	s.Record(row("x3", "code", 100, 1000, func(r *ledgerRow) { r.InputTokens, r.OutputTokens = nil, nil })) // no usage: ignored
	s.Record(row("x4", "code", 0, 1000, nil))                                                               // no input: ignored
	syncTestStore(t, s)
	s.Record(row("c3", "code", 200, 100, nil)) // 0.5
	s.Record(row("n1", "", 10, 30, nil))       // 3.0
	syncTestStore(t, s)

	tests := []struct {
		policy string
		avg    float64
		n      int64
	}{
		{"code", 2.5 / 3, 3},
		{"", 3, 1},
		{"unseen", 0, 0},
	}
	for _, tt := range tests {
		avg, n := s.Ratio(tt.policy)
		if n != tt.n || math.Abs(avg-tt.avg) > 1e-12 {
			t.Errorf("Ratio(%q) = %v, %d; want %v, %d", tt.policy, avg, n, tt.avg, tt.n)
		}
	}
	// The table holds exactly what the cache holds.
	want := map[string][2]float64{}
	for _, policy := range []string{"code", ""} {
		avg, n := s.Ratio(policy)
		want[policy] = [2]float64{avg, float64(n)}
		var dbAvg float64
		var dbN int64
		if err := s.db.QueryRow("SELECT avg_ratio, sample_count FROM token_ratios WHERE policy = ?", policy).Scan(&dbAvg, &dbN); err != nil {
			t.Fatal(err)
		}
		if dbAvg != avg || dbN != n {
			t.Errorf("token_ratios(%q) = %v, %d; want %v, %d", policy, dbAvg, dbN, avg, n)
		}
	}
	// And it survives a restart.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = newTestStore(t, path)
	for policy, w := range want {
		avg, n := s.Ratio(policy)
		if avg != w[0] || float64(n) != w[1] {
			t.Errorf("Ratio(%q) after reopen = %v, %d; want %v, %v", policy, avg, n, w[0], w[1])
		}
	}
}

// storeV1Schema is the schema as a first release wrote it, kept here
// verbatim rather than taken from ledgerMigrations, so that the fixture stays
// what old files hold even if the code changes.
const storeV1Schema = `CREATE TABLE requests (
  id INTEGER PRIMARY KEY,
  request_id TEXT NOT NULL UNIQUE,
  timestamp TEXT NOT NULL,
  policy TEXT,
  model TEXT NOT NULL,
  provider TEXT NOT NULL,
  streaming BOOLEAN NOT NULL,
  input_tokens INTEGER,
  output_tokens INTEGER,
  usage_estimated BOOLEAN NOT NULL,
  cost_sats REAL,
  baseline_cost_sats REAL,
  latency_ms INTEGER,
  ttft_ms INTEGER,
  attempts INTEGER NOT NULL,
  success BOOLEAN NOT NULL,
  status INTEGER NOT NULL,
  error TEXT
);
CREATE TABLE token_ratios (
  policy TEXT PRIMARY KEY,
  avg_ratio REAL,
  sample_count INTEGER
);`

func TestStoreMigrate(t *testing.T) {
	tests := []struct {
		name        string
		userVersion int // 0: an original-arbstr file; 1: before indexes; 2: before the client, cost and endpoint columns
	}{
		{"original arbstr, user_version 0", 0},
		{"version 1", 1},
		{"version 2", 2},
	}
	for _, tt := range tests {
		path := filepath.Join(t.TempDir(), "old.db")
		old, err := sql.Open("sqlite", path)
		if err != nil {
			t.Fatal(err)
		}
		for _, stmt := range []string{
			storeV1Schema,
			fmt.Sprintf("PRAGMA user_version = %d", tt.userVersion),
			`INSERT INTO requests (request_id, timestamp, policy, model, provider, streaming, input_tokens, output_tokens,
				usage_estimated, cost_sats, baseline_cost_sats, latency_ms, ttft_ms, attempts, success, status, error) VALUES
				('old-1', '2025-12-01T10:00:00.000Z', 'code', 'm1', 'alpha', 0, 100, 50, 0, 0.5, 0.75, 120, NULL, 1, 1, 200, NULL),
				('old-2', '2025-12-01T10:00:01.250000+00:00', NULL, 'm1', 'beta', 1, 10, 5, 1, 0.01, 0.02, 80, 20, 2, 1, 200, NULL),
				('old-3', '2025-12-01T10:00:02.000Z', NULL, 'm2', '', 0, NULL, NULL, 0, NULL, NULL, 1, NULL, 0, 0, 400, 'no provider')`,
			`INSERT INTO token_ratios VALUES ('code', 0.75, 12)`,
			`CREATE INDEX requests_timestamp ON requests (timestamp)`,
		} {
			if tt.userVersion < 2 && strings.HasPrefix(stmt, "CREATE INDEX") {
				continue
			}
			if _, err := old.Exec(stmt); err != nil {
				t.Fatalf("%s: fixture: %v", tt.name, err)
			}
		}
		old.Close()

		s := newTestStore(t, path)
		if got := queryTestInt(t, s.db, "PRAGMA user_version"); got != int64(len(ledgerMigrations)) {
			t.Errorf("%s: user_version = %d; want %d", tt.name, got, len(ledgerMigrations))
		}
		if got := queryTestInt(t, s.db, "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'requests_timestamp'"); got != 1 {
			t.Errorf("%s: index(%q) = %d; want 1", tt.name, "requests_timestamp", got)
		}
		list, err := s.Requests(context.Background(), requestsQuery{})
		if err != nil {
			t.Fatalf("%s: Requests: %v", tt.name, err)
		}
		var ids []string
		for _, r := range list {
			ids = append(ids, r.RequestID)
		}
		if got := strings.Join(ids, " "); got != "old-3 old-2 old-1" {
			t.Errorf("%s: Requests() = %q; want %q", tt.name, got, "old-3 old-2 old-1")
		}
		r, ok, err := s.Request(context.Background(), "old-2")
		if err != nil || !ok {
			t.Fatalf("%s: Request(old-2) = %v, %v", tt.name, ok, err)
		}
		if want := time.Date(2025, 12, 1, 10, 0, 1, 250000000, time.UTC); !r.Time.Equal(want) || deref(r.Cost) != 10 || !r.UsageEstimated {
			t.Errorf("%s: Request(%q) = %s; want time %v, 10 msat, estimated", tt.name, "old-2", rowJSON(r), want)
		}
		// The columns added in place read as what a row of before meant.
		if r.Client != "" || r.Endpoint != "chat" || r.QuotedCost != nil || r.CostSource != nil {
			t.Errorf("%s: Request(%q) new columns = %q, %q, %v, %v; want \"\", chat, nil, nil",
				tt.name, "old-2", r.Client, r.Endpoint, r.QuotedCost, r.CostSource)
		}
		if avg, n := s.Ratio("code"); avg != 0.75 || n != 12 {
			t.Errorf("%s: Ratio(%q) = %v, %d; want 0.75, 12", tt.name, "code", avg, n)
		}
		// The migrated file takes new rows.
		s.Record(storeTestRow("new-1", time.Now()))
		syncTestStore(t, s)
		if got := queryTestInt(t, s.db, "SELECT COUNT(*) FROM requests"); got != 4 {
			t.Errorf("%s: rows = %d; want 4", tt.name, got)
		}
	}
}

func TestStoreNewerSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "future.db")
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec("PRAGMA user_version = 99"); err != nil {
		t.Fatal(err)
	}
	db.Close()
	s, err := openStore(path, storeTestLogger)
	if err == nil {
		s.Close()
		t.Fatalf("openStore(%q) with user_version 99 = nil error; want an error", path)
	}
	if !strings.HasPrefix(err.Error(), "open ledger: ") {
		t.Errorf("openStore error = %q; want it to start %q", err, "open ledger: ")
	}
}

func TestStoreOpenError(t *testing.T) {
	path := filepath.Join(t.TempDir(), "no", "such", "dir", "arbstr.db")
	if s, err := openStore(path, storeTestLogger); err == nil {
		s.Close()
		t.Errorf("openStore(%q) = nil error; want an error", path)
	}
}

// BenchmarkLedgerWriter measures the rows per second the writer commits to a
// file: each iteration admits and records one row, with an id made as a
// request's is, and the clock stops once the last is committed. (Ids that
// follow each other, as this benchmark once used, hid what random ids cost
// the unique index.)
func BenchmarkLedgerWriter(b *testing.B) {
	s, _ := newTestStoreFile(b)
	row := storeTestRow("", time.Now())
	row.Policy = new("code")
	ctx := context.Background()
	b.ReportAllocs()
	start := time.Now()
	n := 0
	for b.Loop() {
		row.RequestID = newRequestID()
		if err := s.Admit(ctx); err != nil {
			b.Fatal(err)
		}
		s.Record(row)
		n++
	}
	syncTestStore(b, s)
	b.ReportMetric(float64(n)/time.Since(start).Seconds(), "rows/s")
}

// BenchmarkStoreRatio is the routing path's read of the learned ratio.
func BenchmarkStoreRatio(b *testing.B) {
	s := newTestStore(b, ":memory:")
	b.ReportAllocs()
	for b.Loop() {
		s.Ratio("code")
	}
}

// storeMoneyFixture records rows that differ in client, endpoint and in how
// their cost was known. Costs are chosen so that float sums would not be
// exact (0.1 + 0.2).
func storeMoneyFixture(t *testing.T) *Store {
	t.Helper()
	s := newTestStore(t, ":memory:")
	row := func(id, client, endpoint, source string, cost, quoted msats, stream bool, latency int64, at time.Duration) ledgerRow {
		r := storeTestRow(id, storeFixtureT0.Add(at))
		r.Client, r.Endpoint, r.Streaming = client, endpoint, stream
		r.Cost, r.QuotedCost, r.CostSource = new(cost), new(quoted), new(source)
		r.LatencyMs = new(latency)
		return r
	}
	for _, r := range []ledgerRow{
		row("m1", "alice", "chat", "provider", 300, 100, false, 40, -4*time.Minute),     // overcharged by 0.2
		row("m2", "alice", "responses", "provider", 100, 200, true, 10, -3*time.Minute), // undercharged by 0.1
		row("m3", "bob", "chat", "rates", 700, 700, true, 30, -2*time.Minute),
		row("m4", "", "embeddings", "estimate", 5, 5, false, 20, -time.Minute),
	} {
		s.Record(r)
	}
	syncTestStore(t, s)
	return s
}

func TestStoreStatsMoney(t *testing.T) {
	s := storeMoneyFixture(t)
	type group struct {
		key                      string
		requests                 int64
		cost, quoted, overcharge float64
	}
	tests := []struct {
		name   string
		q      statsQuery
		groups []group
	}{
		{"by client", statsQuery{GroupBy: "client", Until: storeFixtureT0},
			[]group{{"", 1, 0.005, 0.005, 0}, {"alice", 2, 0.4, 0.3, 0.1}, {"bob", 1, 0.7, 0.7, 0}}},
		{"by endpoint", statsQuery{GroupBy: "endpoint", Until: storeFixtureT0},
			[]group{{"chat", 2, 1, 0.8, 0.2}, {"embeddings", 1, 0.005, 0.005, 0}, {"responses", 1, 0.1, 0.2, -0.1}}},
		{"client filter", statsQuery{GroupBy: "endpoint", Until: storeFixtureT0, ledgerMatch: ledgerMatch{Client: "alice"}},
			[]group{{"chat", 1, 0.3, 0.1, 0.2}, {"responses", 1, 0.1, 0.2, -0.1}}},
		{"endpoint filter", statsQuery{GroupBy: "client", Until: storeFixtureT0, ledgerMatch: ledgerMatch{Endpoint: "chat"}},
			[]group{{"alice", 1, 0.3, 0.1, 0.2}, {"bob", 1, 0.7, 0.7, 0}}},
		{"streaming filter", statsQuery{GroupBy: "client", Until: storeFixtureT0, ledgerMatch: ledgerMatch{Streaming: new(true)}},
			[]group{{"alice", 1, 0.1, 0.2, -0.1}, {"bob", 1, 0.7, 0.7, 0}}},
	}
	for _, tt := range tests {
		res, err := s.Stats(context.Background(), tt.q)
		if err != nil {
			t.Fatalf("%s: Stats: %v", tt.name, err)
		}
		var got []group
		for _, g := range res.Groups {
			got = append(got, group{g.Key, g.Requests, g.CostSats, g.QuotedCostSats, g.OverchargeSats})
		}
		if !reflect.DeepEqual(got, tt.groups) {
			t.Errorf("%s: Stats groups = %+v; want %+v", tt.name, got, tt.groups)
		}
	}
	res, err := s.Stats(context.Background(), statsQuery{Until: storeFixtureT0})
	if err != nil {
		t.Fatal(err)
	}
	// Exact to the millisat: 0.3 + 0.1 + 0.7 + 0.005 in float64 is not 1.105.
	if res.Total.CostSats != 1.105 {
		t.Errorf("Total.CostSats = %v; want 1.105", res.Total.CostSats)
	}
	if res.Total.QuotedCostSats != 1.005 {
		t.Errorf("Total.QuotedCostSats = %v; want 1.005", res.Total.QuotedCostSats)
	}
	if res.Total.OverchargeSats != 0.1 {
		t.Errorf("Total.OverchargeSats = %v; want 0.1", res.Total.OverchargeSats)
	}
}

func TestStoreRequestsSortAndWindow(t *testing.T) {
	s := storeMoneyFixture(t)
	t0 := storeFixtureT0
	tests := []struct {
		q    requestsQuery
		want string
	}{
		{requestsQuery{}, "m4 m3 m2 m1"},
		{requestsQuery{Order: "asc"}, "m1 m2 m3 m4"},
		{requestsQuery{Sort: "cost_sats"}, "m3 m1 m2 m4"},
		{requestsQuery{Sort: "cost_sats", Order: "asc", Limit: 2}, "m4 m2"},
		{requestsQuery{Sort: "latency_ms", Order: "asc"}, "m2 m4 m3 m1"},
		{requestsQuery{Since: t0.Add(-3 * time.Minute), Until: t0.Add(-2 * time.Minute)}, "m3 m2"},
		{requestsQuery{Since: t0.Add(-time.Minute)}, "m4"},
		{requestsQuery{ledgerMatch: ledgerMatch{Client: "alice"}}, "m2 m1"},
		{requestsQuery{ledgerMatch: ledgerMatch{Endpoint: "embeddings"}}, "m4"},
		{requestsQuery{ledgerMatch: ledgerMatch{Streaming: new(false)}}, "m4 m1"},
	}
	for _, tt := range tests {
		list, err := s.Requests(context.Background(), tt.q)
		if err != nil {
			t.Fatalf("Requests(%+v): %v", tt.q, err)
		}
		var ids []string
		for _, r := range list {
			ids = append(ids, r.RequestID)
		}
		if got := strings.Join(ids, " "); got != tt.want {
			t.Errorf("Requests(%+v) = %q; want %q", tt.q, got, tt.want)
		}
	}
	for _, q := range []requestsQuery{{Sort: "id; DROP TABLE requests"}, {Order: "sideways"}} {
		if _, err := s.Requests(context.Background(), q); err == nil {
			t.Errorf("Requests(%+v) = nil error; want an error", q)
		}
	}
}

// TestLedgerReadParameters checks the query strings of /v1/requests and
// /v1/stats: every value that cannot be read is a 400 in OpenAI's shape,
// never a silent default.
func TestLedgerReadParameters(t *testing.T) {
	up := newUpstream(t, jsonOK)
	ta := newArbstr(t, testConfig(prov("a", up.URL, 1, 1)))
	for range 3 {
		readBody(t, ta.post(t, "/v1/chat/completions", chatBody))
	}
	now := time.Now().UTC()
	tests := []struct {
		path   string
		status int
		code   string // for a 400
		rows   int    // for a 200 of /v1/requests
	}{
		{"/v1/requests?limit=%zz", 400, "invalid_query", 0},
		{"/v1/requests?limit=5;x", 400, "invalid_query", 0},
		{"/v1/requests?limit=", 400, "invalid_limit", 0},
		{"/v1/requests?streaming=maybe", 400, "invalid_streaming", 0},
		{"/v1/requests?since=" + now.Format(time.RFC3339) + "&until=" + now.Add(-time.Hour).Format(time.RFC3339), 400, "invalid_since", 0},
		{"/v1/requests?range=2h", 400, "invalid_range", 0},
		{"/v1/requests?page=1&limit=2", 400, "invalid_page", 0},
		{"/v1/requests?per_page=2&offset=1", 400, "invalid_page", 0},
		{"/v1/requests?per_page=101", 400, "invalid_per_page", 0},
		{"/v1/requests?page=0", 400, "invalid_page", 0},
		{"/v1/requests?sort=id", 400, "invalid_sort", 0},
		{"/v1/requests?order=up", 400, "invalid_order", 0},
		{"/v1/stats?group_by=color", 400, "invalid_group_by", 0},
		{"/v1/stats?provider=%zz", 400, "invalid_query", 0},
		{"/v1/stats?streaming=maybe", 400, "invalid_streaming", 0},
		{"/v1/requests", 200, "", 3},
		{"/v1/requests?page=2&per_page=2", 200, "", 1},
		{"/v1/requests?per_page=2", 200, "", 2},
		{"/v1/requests?range=1h&sort=latency_ms&order=asc", 200, "", 3},
		{"/v1/requests?streaming=true", 200, "", 0},
		{"/v1/requests?endpoint=chat&client=", 200, "", 3},
		{"/v1/stats?group_by=client", 200, "", 0},
		{"/v1/stats?group_by=endpoint&endpoint=chat", 200, "", 0},
	}
	for _, tt := range tests {
		resp, out := ta.get(t, tt.path)
		if resp.StatusCode != tt.status {
			t.Errorf("GET %s = %d; want %d (%s)", tt.path, resp.StatusCode, tt.status, out)
			continue
		}
		if tt.status == 400 {
			if typ, code, _ := apiErr(t, string(out)); typ != "invalid_request_error" || code != tt.code {
				t.Errorf("GET %s error = %q, %q; want invalid_request_error, %q", tt.path, typ, code, tt.code)
			}
			continue
		}
		if !strings.HasPrefix(tt.path, "/v1/requests") {
			continue
		}
		var list struct{ Data []ledgerRow }
		if err := json.Unmarshal(out, &list); err != nil {
			t.Fatalf("GET %s: %v", tt.path, err)
		}
		if len(list.Data) != tt.rows {
			t.Errorf("GET %s = %d rows; want %d", tt.path, len(list.Data), tt.rows)
		}
	}
}

// lockLedger holds the write lock of the ledger at path from a connection
// of its own, as a long backup would, until unlock is called or the test
// ends.
func lockLedger(t *testing.T, path string) (unlock func()) {
	t.Helper()
	other, err := sql.Open("sqlite", ledgerDSN(path))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })
	conn, err := other.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := conn.ExecContext(context.Background(), "BEGIN EXCLUSIVE"); err != nil {
		t.Fatal(err)
	}
	return func() {
		if _, err := conn.ExecContext(context.Background(), "ROLLBACK"); err != nil {
			t.Fatal(err)
		}
	}
}

// TestStoreLockedLedgerKeepsRows holds the write lock from another
// connection past busy_timeout, as a long backup would: the rows wait,
// Health says why, reads and new requests are not held up behind it, and
// once the lock is released every row is written.
func TestStoreLockedLedgerKeepsRows(t *testing.T) {
	var logs syncBuffer
	path := filepath.Join(t.TempDir(), "arbstr.db")
	s, err := openStore(path, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.queueSize = 2
	s.retryFirst, s.retryMax = 10*time.Millisecond, 50*time.Millisecond
	unlock := lockLedger(t, path)
	for _, id := range []string{"l1", "l2"} {
		s.Record(storeTestRow(id, time.Now()))
	}
	waitForStore(t, "Health() != nil", func() bool { return s.Health() != nil })
	if err := s.Health(); !strings.Contains(err.Error(), "2 rows waiting") {
		t.Errorf("Health() = %q; want it to count the 2 rows waiting", err)
	}
	syncTestStore(t, s) // returns while the lock is held
	if err := s.Admit(context.Background()); !errors.Is(err, ErrLedgerUnavailable) {
		t.Errorf("Admit with a full queue that cannot be written = %v; want ErrLedgerUnavailable", err)
	}
	s.Record(storeTestRow("l3", time.Now())) // an admitted request's row is still taken
	unlock()
	waitForStore(t, "Health() == nil", func() bool { return s.Health() == nil })
	syncTestStore(t, s)
	if got := queryTestInt(t, s.db, "SELECT COUNT(*) FROM requests"); got != 3 {
		t.Errorf("rows after the lock is released = %d; want 3", got)
	}
	if err := s.Admit(context.Background()); err != nil {
		t.Errorf("Admit after recovery = %v; want nil", err)
	}
	if got := strings.Count(logs.String(), "ledger write failing"); got != 1 {
		t.Errorf("failing log lines = %d; want 1 in %s", got, logs.String())
	}
}

// TestStoreAdmitWaitsWhenSlow: a full queue whose rows are being written
// holds a new request back (backpressure) rather than refuse it.
func TestStoreAdmitWaitsWhenSlow(t *testing.T) {
	s, path := newTestStoreFile(t)
	s.queueSize = 1
	other, err := sql.Open("sqlite", ledgerDSN(path))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	tx, err := other.Begin() // the writer waits in busy_timeout: slow, not failing
	if err != nil {
		t.Fatal(err)
	}
	s.Record(storeTestRow("slow", time.Now()))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := s.Admit(ctx); err != context.DeadlineExceeded {
		t.Errorf("Admit while the queue is full and slow = %v; want %v", err, context.DeadlineExceeded)
	}
	tx.Rollback()
	ctx2, cancel2 := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel2()
	if err := s.Admit(ctx2); err != nil {
		t.Errorf("Admit once the row is written = %v; want nil", err)
	}
}

// TestStoreCloseGivesUp: Close on a ledger that cannot write returns after
// closeTimeout, logs each unwritten row, and leaves them in the journal,
// which the next open writes.
func TestStoreCloseGivesUp(t *testing.T) {
	storeTestRegisterFail()
	var logs syncBuffer
	path := filepath.Join(t.TempDir(), "arbstr.db")
	s, err := openStore(path, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	s.retryFirst, s.retryMax, s.closeTimeout = time.Millisecond, 5*time.Millisecond, 50*time.Millisecond
	if _, err := s.db.Exec(`CREATE TRIGGER test_fail BEFORE INSERT ON requests BEGIN SELECT store_test_fail(); END`); err != nil {
		t.Fatal(err)
	}
	storeTestFailures.Store(1 << 30)
	defer storeTestFailures.Store(0)
	for _, id := range []string{"c1", "c2"} {
		s.Record(storeTestRow(id, time.Now()))
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for _, id := range []string{"c1", "c2"} {
		if !strings.Contains(logs.String(), "request_id="+id) {
			t.Errorf("log after Close = %s; want request_id=%s", logs.String(), id)
		}
	}
	storeTestFailures.Store(0)
	s = newTestStore(t, path)
	if got := queryTestInt(t, s.db, "SELECT COUNT(*) FROM requests"); got != 2 {
		t.Errorf("rows after reopen = %d; want 2 from the journal", got)
	}
}

// TestStoreJournalReplay opens a ledger beside a journal left by a crash:
// rows already committed are not written twice nor learned from twice, a
// line cut short is skipped, and the journal is emptied.
func TestStoreJournalReplay(t *testing.T) {
	s, path := newTestStoreFile(t)
	done := storeTestRow("done", storeFixtureT0)
	s.Record(done)
	syncTestStore(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	var journal bytes.Buffer
	for _, r := range []ledgerRow{done, storeTestRow("lost-1", storeFixtureT0), storeTestRow("lost-2", storeFixtureT0)} {
		b, _ := json.Marshal(r)
		journal.Write(append(b, '\n'))
	}
	journal.WriteString(`{"request_id":"cut","timest`)
	if err := os.WriteFile(path+".pending", journal.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	s = newTestStore(t, path)
	for _, tt := range []struct {
		query string
		want  int64
	}{
		{"SELECT COUNT(*) FROM requests", 3},
		{"SELECT COUNT(*) FROM requests WHERE request_id IN ('done', 'lost-1', 'lost-2')", 3},
		{"SELECT sample_count FROM token_ratios WHERE policy = ''", 3},
	} {
		if got := queryTestInt(t, s.db, tt.query); got != tt.want {
			t.Errorf("%s = %d; want %d", tt.query, got, tt.want)
		}
	}
	if fi, err := os.Stat(path + ".pending"); err != nil || fi.Size() != 0 {
		t.Errorf("journal after open = %v, %v; want empty", fi, err)
	}
}

// TestStoreJournalEmptied: once every journaled row is committed, the
// journal is empty again, so that it does not grow with the ledger.
func TestStoreJournalEmptied(t *testing.T) {
	s, path := newTestStoreFile(t)
	for i := range 100 {
		s.Record(storeTestRow(fmt.Sprintf("j%d", i), time.Now()))
	}
	syncTestStore(t, s)
	waitForStore(t, "an empty journal", func() bool {
		fi, err := os.Stat(path + ".pending")
		return err == nil && fi.Size() == 0
	})
	if _, err := os.Stat(":memory:.pending"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stat(%q) = %v; want no journal for an in-memory ledger", ":memory:.pending", err)
	}
}

// TestStoreCrashKeepsRecordedRows kills a process that records rows, with
// SIGKILL, and checks that every row whose Record had returned is in the
// ledger once it is opened again. The test binary is its own child: with
// storeCrashEnv set, the test records rows until it is killed, printing each
// request_id once Record has returned.
const storeCrashEnv = "ARBSTR_TEST_STORE_CRASH_DB"

func TestStoreCrashKeepsRecordedRows(t *testing.T) {
	if path := os.Getenv(storeCrashEnv); path != "" {
		storeCrashChild(path)
		return
	}
	path := filepath.Join(t.TempDir(), "arbstr.db")
	cmd := exec.Command(os.Args[0], "-test.run=^TestStoreCrashKeepsRecordedRows$")
	cmd.Env = append(os.Environ(), storeCrashEnv+"="+path)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	var ids []string
	for len(ids) < 2000 && sc.Scan() {
		if id, ok := strings.CutPrefix(sc.Text(), "recorded "); ok {
			ids = append(ids, id)
		}
	}
	if err := cmd.Process.Kill(); err != nil { // SIGKILL
		t.Fatal(err)
	}
	for sc.Scan() { // what it printed before it died counts too
		if id, ok := strings.CutPrefix(sc.Text(), "recorded "); ok {
			ids = append(ids, id)
		}
	}
	cmd.Wait()
	if len(ids) < 2000 {
		t.Fatalf("the child printed %d ids before it ended; want 2000 (did it fail?)", len(ids))
	}
	s := newTestStore(t, path)
	var missing []string
	for _, id := range ids {
		if queryTestInt(t, s.db, "SELECT COUNT(*) FROM requests WHERE request_id = ?", id) != 1 {
			missing = append(missing, id)
		}
	}
	if len(missing) > 0 {
		t.Errorf("after kill -9, %d of %d recorded rows are not in the ledger once, such as %q",
			len(missing), len(ids), missing[:min(len(missing), 5)])
	}
}

// storeCrashChild records rows from several goroutines until it is killed.
func storeCrashChild(path string) {
	s, err := openStore(path, storeTestLogger)
	if err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	var mu sync.Mutex
	for g := range 4 {
		go func() {
			for i := 0; ; i++ {
				id := fmt.Sprintf("g%d-%d", g, i)
				s.Record(storeTestRow(id, time.Now()))
				mu.Lock()
				fmt.Println("recorded " + id)
				mu.Unlock()
			}
		}()
	}
	select {}
}

// TestStoreFileReplaced: a database file deleted or replaced under a
// running ledger is reported, once, in the log and by Health.
func TestStoreFileReplaced(t *testing.T) {
	tests := []struct {
		name   string
		change func(path string) error
		want   string
	}{
		{"deleted", os.Remove, "is gone"},
		{"replaced", func(path string) error {
			if err := os.WriteFile(path+".new", nil, 0o600); err != nil {
				return err
			}
			return os.Rename(path+".new", path)
		}, "was replaced"},
	}
	old := ledgerFileCheckInterval
	ledgerFileCheckInterval = 5 * time.Millisecond
	defer func() { ledgerFileCheckInterval = old }()
	for _, tt := range tests {
		var logs syncBuffer
		path := filepath.Join(t.TempDir(), "arbstr.db")
		s, err := openStore(path, slog.New(slog.NewTextHandler(&logs, nil)))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Health(); err != nil {
			t.Errorf("%s: Health() before = %v; want nil", tt.name, err)
		}
		if err := tt.change(path); err != nil {
			t.Fatal(err)
		}
		waitForStore(t, "Health() != nil", func() bool { return s.Health() != nil })
		if err := s.Health(); !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: Health() = %q; want %q", tt.name, err, tt.want)
		}
		time.Sleep(20 * time.Millisecond) // a few more checks, which must not log again
		if got := strings.Count(logs.String(), "ledger file changed"); got != 1 {
			t.Errorf("%s: log lines = %d; want 1 in %s", tt.name, got, logs.String())
		}
		s.Close()
	}
}

// TestStoreForeignDatabase: a file whose tables another program wrote is
// refused at open, and left exactly as it was.
func TestStoreForeignDatabase(t *testing.T) {
	tests := []struct {
		name    string
		schema  string
		version int
		want    string
	}{
		{"other requests table", `CREATE TABLE requests (id INTEGER PRIMARY KEY, url TEXT, method TEXT)`, 0, "missing (request_id"},
		{"a column renamed", strings.Replace(storeV1Schema, "  error TEXT\n", "  error_text TEXT\n", 1), 1, "unknown (error_text)"},
		{"version 3 without its columns", storeV1Schema, 3, "missing (client, quoted_cost_sats, cost_source, endpoint)"},
		{"other token_ratios", `CREATE TABLE token_ratios (policy TEXT, ratio REAL)`, 2, "token_ratios"},
		{"newer arbstr", storeV1Schema, 99, "newer than this arbstr"},
	}
	for _, tt := range tests {
		path := filepath.Join(t.TempDir(), "foreign.db")
		db, err := sql.Open("sqlite", path)
		if err != nil {
			t.Fatal(err)
		}
		for _, stmt := range []string{tt.schema, fmt.Sprintf("PRAGMA user_version = %d", tt.version)} {
			if _, err := db.Exec(stmt); err != nil {
				t.Fatalf("%s: %v", tt.name, err)
			}
		}
		db.Close()
		before, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		s, err := openStore(path, storeTestLogger)
		if err == nil {
			s.Close()
			t.Fatalf("%s: openStore = nil error; want a refusal", tt.name)
		}
		if !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: openStore error = %q; want %q", tt.name, err, tt.want)
		}
		after, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(before, after) {
			t.Errorf("%s: the refused file changed", tt.name)
		}
		if _, err := os.Stat(path + ".pending"); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: a journal was created beside the refused file: %v", tt.name, err)
		}
	}
}

// TestStoreJournalRewrite: a journal that grew large while rows kept coming
// is rewritten with only the rows not yet committed.
func TestStoreJournalRewrite(t *testing.T) {
	s, path := newTestStoreFile(t)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.queue = append(s.queue, storeTestRow("q1", time.Now()), storeTestRow("q2", time.Now()))
	s.recorded += 2
	s.journalSize = ledgerJournalRewrite
	s.trimJournal()
	b, err := os.ReadFile(path + ".pending")
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for line := range strings.Lines(string(b)) {
		var r ledgerRow
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("journal line %q: %v", line, err)
		}
		ids = append(ids, r.RequestID)
	}
	if got := strings.Join(ids, " "); got != "q1 q2" {
		t.Errorf("journal after rewrite = %q; want %q", got, "q1 q2")
	}
	if s.journalSize != int64(len(b)) {
		t.Errorf("journalSize = %d; want %d", s.journalSize, len(b))
	}
}

// ---- Benchmarks ----
//
// Each arbstr benchmark stands beside the same work done by a bare
// httputil.ReverseProxy, so the ratio is the figure to read:
//
//	go test -run '^$' -bench . -benchmem

// benchBody is a ~1 KB chat request.
var benchBody = `{"model":"m","max_tokens":200,"messages":[{"role":"system","content":"You are a helpful assistant that answers briefly."},` +
	`{"role":"user","content":"` + strings.Repeat("Tell me about sats and routing. ", 28) + `"}]}`

// BenchmarkReadBodies: what arbstr reads of every request and answer,
// with its scanner beside encoding/json (the decoding arbstr did before):
// a ~1 KB chat request, and a ~1 KB answer with usage.
func BenchmarkReadBodies(b *testing.B) {
	body := []byte(benchBody)
	answer := []byte(completionJSON(strings.Repeat("Sats are the smallest unit. ", 26), 250, 200))
	req, _ := parseChat(body)
	for _, bc := range []struct {
		name string
		read func()
	}{
		{"request/scanner", func() { parseChat(body) }},
		{"request/encoding-json", func() { parseChatByDecoder(body) }},
		{"answer/scanner", func() { answerTokens(answer, req) }},
		{"answer/encoding-json", func() { answerTokensByDecoder(answer, req) }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				bc.read()
			}
		})
	}
}

// staticTransport answers every request with the same body, without a
// socket, as in net/http/httputil's BenchmarkServeHTTP.
type staticTransport struct {
	body  []byte
	ctype string
}

func (s staticTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Body != nil {
		io.Copy(io.Discard, r.Body)
		r.Body.Close()
	}
	return &http.Response{
		StatusCode:    200,
		Header:        http.Header{"Content-Type": {s.ctype}},
		Body:          io.NopCloser(bytes.NewReader(s.body)),
		ContentLength: int64(len(s.body)),
		Request:       r,
	}, nil
}

// discardWriter is a ResponseWriter that keeps nothing but the status, so
// that benchmarks measure the handler and not a recorder.
type discardWriter struct {
	h      http.Header
	status int
}

func (d *discardWriter) Header() http.Header { return d.h }
func (d *discardWriter) Write(b []byte) (int, error) {
	if d.status == 0 {
		d.status = http.StatusOK
	}
	return len(b), nil
}
func (d *discardWriter) WriteHeader(status int) {
	if d.status == 0 {
		d.status = status
	}
}
func (d *discardWriter) Flush() {}

// streamPayload is a provider stream of n content events, a finish chunk,
// a usage chunk and [DONE].
func streamPayload(n int) []byte {
	var b bytes.Buffer
	for i := range n {
		fmt.Fprintf(&b, "data: %s\n\n", chunkJSON(fmt.Sprint(" token", i)))
	}
	fmt.Fprintf(&b, "data: %s\n\ndata: %s\n\ndata: [DONE]\n\n", finishChunk, usageChunk(250, n))
	return b.Bytes()
}

// benchListing and benchBalance are what a Routstr node publishes at
// GET /v1/models and GET /v1/balance/info: model m's prices in sats per
// token, and a balance in msat that no benchmark spends.
const (
	benchListing = `{"object":"list","data":[{"id":"m","name":"m","sats_pricing":{"prompt":0.001,"completion":0.002,"request":0,"max_cost":50},"enabled":true}]}`
	benchBalance = `{"api_key":"sk-bench","balance":900000000000,"reserved":0}`
)

// benchToken is the bearer token of the client that secondVersion adds.
const benchToken = "bench-token"

// secondVersion turns cfg into the second version's configuration: every
// provider discovers its models and prices from its listing and reads its
// balance, and a client sends the requests, with day and month budgets and
// a rate limit that never refuse one. Metrics are always on.
func secondVersion(cfg *Config) *Config {
	for i := range cfg.Providers {
		cfg.Providers[i].Discover = true
		cfg.Providers[i].APIKey = "sk-bench"
		cfg.Providers[i].Models = nil
	}
	cfg.Clients = []ClientConfig{{Name: "bench", Token: benchToken,
		BudgetSatsPerDay: 1e11, BudgetSatsPerMonth: 1e12, RateLimitRPM: 1 << 30}}
	return cfg
}

// startSecondVersion reads the providers' first listings and balances, as
// arbstr does at start, and keeps reading them until the benchmark ends.
func startSecondVersion(b *testing.B, ta *testArbstr) {
	ta.srv.startMarket(context.Background())
	b.Cleanup(ta.srv.shutdownMarket)
	if len(ta.srv.current().router.Market(time.Now()).Models) == 0 {
		b.Fatal("no model listed after the first market read")
	}
}

// routstrNode serves a Routstr node's listing and balance, and passes every
// other request to h.
func routstrNode(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/models":
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, benchListing)
		case "/v1/balance/info":
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, benchBalance)
		default:
			h(w, r)
		}
	}
}

// marketTransport is routstrNode without a socket: it answers the listing
// and the balance from memory and passes every other request to next.
type marketTransport struct{ next http.RoundTripper }

func (m marketTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	var body string
	switch {
	case strings.HasSuffix(r.URL.Path, "/models"):
		body = benchListing
	case strings.HasSuffix(r.URL.Path, "/balance/info"):
		body = benchBalance
	default:
		return m.next.RoundTrip(r)
	}
	return &http.Response{
		StatusCode:    200,
		Header:        http.Header{"Content-Type": {"application/json"}},
		Body:          io.NopCloser(strings.NewReader(body)),
		ContentLength: int64(len(body)),
		Request:       r,
	}, nil
}

// benchHandlerV2 returns arbstr's handler in the second version's
// configuration, calling rt, with its ledger in a file.
func benchHandlerV2(b *testing.B, rt http.RoundTripper) http.Handler {
	cfg := secondVersion(testConfig(prov("p1", "http://provider.invalid", 1, 2), prov("p2", "http://provider.invalid", 2, 3)))
	ta := newArbstr(b, cfg)
	ta.srv.transport = marketTransport{rt}
	ta.srv.log = slog.New(slog.DiscardHandler)
	startSecondVersion(b, ta)
	return ta.srv
}

// benchHandlers returns arbstr's handler and a bare reverse proxy, both
// calling rt, with arbstr's ledger on (or off) in a file.
func benchHandlers(b *testing.B, rt http.RoundTripper, logRequests bool) (arbstr, bare http.Handler) {
	cfg := testConfig(prov("p1", "http://provider.invalid", 1, 2), prov("p2", "http://provider.invalid", 2, 3))
	cfg.Logging.LogRequests = logRequests
	ta := newArbstr(b, cfg)
	ta.srv.transport = rt
	ta.srv.log = slog.New(slog.DiscardHandler)
	target := &url.URL{Scheme: "http", Host: "provider.invalid"}
	rp := &httputil.ReverseProxy{
		Rewrite:       func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
		Transport:     rt,
		FlushInterval: -1,
	}
	return ta.srv, rp
}

func runHandler(b *testing.B, h http.Handler, body string) {
	runHandlerAs(b, h, body, "")
}

// runHandlerAs sends body to h with token as its bearer token, if any.
func runHandlerAs(b *testing.B, h http.Handler, body, token string) {
	b.ReportAllocs()
	defer reportCPU(b, processCPU())
	w := &discardWriter{h: make(http.Header)}
	for b.Loop() {
		clear(w.h)
		w.status = 0
		r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(body))
		r.Host = "localhost" // served without a token only under a loopback name
		r.Header.Set("Content-Type", "application/json")
		if token != "" {
			r.Header.Set("Authorization", "Bearer "+token)
		}
		h.ServeHTTP(w, r)
		if w.status != http.StatusOK {
			b.Fatalf("status %d; want 200", w.status)
		}
	}
}

// BenchmarkHandler is the handler's own cost for a ~1 KB non-streaming
// completion with usage, against a stub provider: routing, body handling,
// splicing, headers and the ledger, with no network noise.
func BenchmarkHandler(b *testing.B) {
	rt := staticTransport{[]byte(completionJSON("Sats are the smallest unit of bitcoin.", 250, 12)), "application/json"}
	b.Run("reverseproxy", func(b *testing.B) {
		_, bare := benchHandlers(b, rt, true)
		runHandler(b, bare, benchBody)
	})
	b.Run("arbstr", func(b *testing.B) {
		h, _ := benchHandlers(b, rt, true)
		runHandler(b, h, benchBody)
	})
	b.Run("arbstr-nolog", func(b *testing.B) {
		h, _ := benchHandlers(b, rt, false)
		runHandler(b, h, benchBody)
	})
	b.Run("arbstr-v2", func(b *testing.B) {
		runHandlerAs(b, benchHandlerV2(b, rt), benchBody, benchToken)
	})
}

// BenchmarkStreamHandler is a 20-event stream through the handler, and a
// 1,000-event one for the SSE reader over a long stream.
func BenchmarkStreamHandler(b *testing.B) {
	body := strings.Replace(benchBody, `"max_tokens"`, `"stream":true,"max_tokens"`, 1)
	for _, events := range []int{20, 1000} {
		rt := staticTransport{streamPayload(events), "text/event-stream"}
		b.Run(fmt.Sprintf("events=%d/reverseproxy", events), func(b *testing.B) {
			_, bare := benchHandlers(b, rt, true)
			b.SetBytes(int64(len(rt.body)))
			runHandler(b, bare, body)
		})
		b.Run(fmt.Sprintf("events=%d/arbstr", events), func(b *testing.B) {
			h, _ := benchHandlers(b, rt, true)
			b.SetBytes(int64(len(rt.body)))
			runHandler(b, h, body)
		})
		b.Run(fmt.Sprintf("events=%d/arbstr-v2", events), func(b *testing.B) {
			h := benchHandlerV2(b, rt)
			b.SetBytes(int64(len(rt.body)))
			runHandlerAs(b, h, body, benchToken)
		})
	}
}

// BenchmarkProxy measures over real loopback sockets: the client calls the
// provider directly, through a bare reverse proxy, or through arbstr. The
// latency a proxy adds is its time minus direct's.
func BenchmarkProxy(b *testing.B) {
	for _, tc := range []struct {
		name string
		body string
		h    http.HandlerFunc
	}{
		{"completion", benchBody, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, completionJSON("Sats are the smallest unit of bitcoin.", 250, 12))
		}},
		{"stream20", strings.Replace(benchBody, `"max_tokens"`, `"stream":true,"max_tokens"`, 1), func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			payload := streamPayload(20)
			for len(payload) > 0 { // one write and flush per event
				k := nextEvent(payload)
				w.Write(payload[:k])
				w.(http.Flusher).Flush()
				payload = payload[k:]
			}
		}},
	} {
		up := newUpstream(b, routstrNode(tc.h))
		target, _ := url.Parse(up.URL)
		upTransport := &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true}
		rp := httptest.NewServer(&httputil.ReverseProxy{
			Rewrite:       func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
			Transport:     upTransport,
			FlushInterval: -1,
		})
		b.Cleanup(rp.Close)
		ta := newArbstr(b, testConfig(prov("p1", up.URL, 1, 2)))
		ta.srv.log = slog.New(slog.DiscardHandler)
		noLog := testConfig(prov("p1", up.URL, 1, 2))
		noLog.Logging.LogRequests = false
		tn := newArbstr(b, noLog)
		tn.srv.log = slog.New(slog.DiscardHandler)
		tv := newArbstr(b, secondVersion(testConfig(prov("p1", up.URL, 1, 2))))
		tv.srv.log = slog.New(slog.DiscardHandler)
		startSecondVersion(b, tv)
		client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true}}
		for _, target := range []struct{ name, url, token string }{
			{"direct", up.URL + "/v1/chat/completions", ""},
			{"reverseproxy", rp.URL + "/v1/chat/completions", ""},
			{"arbstr", ta.URL + "/v1/chat/completions", ""},
			{"arbstr-nolog", tn.URL + "/v1/chat/completions", ""},
			{"arbstr-v2", tv.URL + "/v1/chat/completions", benchToken},
		} {
			b.Run(tc.name+"/"+target.name, func(b *testing.B) {
				b.ReportAllocs()
				defer reportCPU(b, processCPU())
				for b.Loop() {
					resp, err := client.Do(benchRequest(target.url, tc.body, target.token))
					if err != nil {
						b.Fatal(err)
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						b.Fatalf("status %d", resp.StatusCode)
					}
				}
			})
		}
	}
}

// processCPU is the CPU time this process has used, user and system.
func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU reports the CPU time per operation since start, of every
// goroutine of the process (the ledger's writer, and over sockets the
// client and the provider too). Unlike ns/op, other programs on the
// machine do not inflate it, so it is the figure to compare on a busy one.
func reportCPU(b *testing.B, start time.Duration) {
	if b.N > 0 {
		b.ReportMetric(float64(processCPU()-start)/float64(b.N), "cpu-ns/op")
	}
}

// benchRequest is a POST of a chat request to url, with token as its
// bearer token, if any.
func benchRequest(url, body, token string) *http.Request {
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		panic(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	return req
}

// BenchmarkResidentMemory runs 10,000 requests through arbstr over sockets
// and reports resident memory before and after (VmRSS of this process,
// which includes the test binary and the fake provider), in the first
// version's configuration and in the second's.
func BenchmarkResidentMemory(b *testing.B) {
	if _, err := os.Stat("/proc/self/status"); err != nil {
		b.Skip("no /proc/self/status")
	}
	up := newUpstream(b, routstrNode(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, completionJSON("ok", 250, 12))
	}))
	b.Run("arbstr", func(b *testing.B) {
		ta := newArbstr(b, testConfig(prov("p1", up.URL, 1, 2)))
		ta.srv.log = slog.New(slog.DiscardHandler)
		runResident(b, ta, "")
	})
	b.Run("arbstr-v2", func(b *testing.B) {
		ta := newArbstr(b, secondVersion(testConfig(prov("p1", up.URL, 1, 2))))
		ta.srv.log = slog.New(slog.DiscardHandler)
		startSecondVersion(b, ta)
		runResident(b, ta, benchToken)
	})
}

// runResident sends 10,000 requests to ta from 8 goroutines, and reports
// this process's resident memory before and after.
func runResident(b *testing.B, ta *testArbstr, token string) {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 8}}
	for b.Loop() {
		before := procStatusMB(b, os.Getpid(), "VmRSS:")
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				for range 10000 / 8 {
					resp, err := client.Do(benchRequest(ta.URL+"/v1/chat/completions", benchBody, token))
					if err != nil {
						b.Error(err)
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			})
		}
		wg.Wait()
		ta.rows(b)
		b.ReportMetric(before, "rss-before-MB")
		b.ReportMetric(procStatusMB(b, os.Getpid(), "VmRSS:"), "rss-after-MB")
	}
}

// TestJournalLine: the journal's hand-written encoder writes a row exactly
// as json.Marshal does, so that the journal reads back as before.
func TestJournalLine(t *testing.T) {
	str := func(s string) *string { return &s }
	num := func(n int64) *int64 { return &n }
	cost := func(m msats) *msats { return &m }
	full := ledgerRow{RequestID: "req-1", Time: ledgerStamp{time.Date(2026, 11, 29, 21, 0, 0, 123e6, time.UTC)},
		Policy: str("code"), Model: "openai/gpt-4o-mini", Provider: "p1", Streaming: true,
		InputTokens: num(250), OutputTokens: num(12), UsageEstimated: true, Cost: cost(1234), BaselineCost: cost(0),
		LatencyMs: num(42), TTFTMs: num(7), Attempts: 2, Success: true, Status: 200, Error: str("upstream_error"),
		Client: "bench", QuotedCost: cost(1), CostSource: str("provider"), Endpoint: "chat"}
	odd := full
	odd.Model, odd.Client, odd.Error = "<m&\"é\u2028\x7f>", "tab\tnew\nline", str("bad \xff byte")
	odd.Cost, odd.BaselineCost, odd.QuotedCost = cost(-5), cost(1e18), cost(123456789012345)
	for _, row := range []ledgerRow{{}, {RequestID: "r", Endpoint: "chat"}, full, odd} {
		want, err := json.Marshal(&row)
		if err != nil {
			t.Fatal(err)
		}
		if got := row.appendJSON(nil); string(got) != string(want) {
			t.Errorf("appendJSON(%+v) =\n%s\nwant\n%s", row, got, want)
		}
	}
}

// BenchmarkJournalLine is the journal line that Record writes for each
// request, through json.Marshal and through the hand-written encoder.
func BenchmarkJournalLine(b *testing.B) {
	in, out, latency := int64(250), int64(12), int64(42)
	policy, source := "default", "rates"
	c := msats(1234)
	row := ledgerRow{RequestID: "6f1c2a4e-93d7-4b1e-8f0a-2c5d7e9b1a3f", Time: ledgerStamp{time.Now()}, Policy: &policy,
		Model: "m", Provider: "p1", InputTokens: &in, OutputTokens: &out, Cost: &c, BaselineCost: &c,
		LatencyMs: &latency, Attempts: 1, Success: true, Status: 200, Client: "bench", QuotedCost: &c,
		CostSource: &source, Endpoint: "chat"}
	b.Run("json.Marshal", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			json.Marshal(&row)
		}
	})
	b.Run("appendJSON", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			row.appendJSON(make([]byte, 0, 512))
		}
	})
}

// TestLoadRun is the load run: arbstr's binary, in the second version's
// configuration, beside a bare httputil.ReverseProxy built as its own
// binary, both in front of the same loopback provider in this process. It
// takes a few minutes, so it runs only when asked:
//
//	ARBSTR_LOAD=1 go test -run '^TestLoadRun$' -v -timeout 15m
//
// ARBSTR_LOAD_N sets the requests of the run at concurrency 64 (100,000).
// It reports, for each proxy: the latency it adds at p50, one request at a
// time; requests per second at concurrency 64; the p99 delay of a streamed
// event between the provider sending it and the client reading it, over
// 4,000 events (with fewer, one stall of the scheduler moves it); and
// resident memory after start, after the run, and at its peak; and the
// resident memory after start of startLoadFloor's program, the least a
// program of arbstr's shape takes here. It fails only on errors and on a
// ledger without exactly one row per request: the figures are for the
// README, not assertions.
func TestLoadRun(t *testing.T) {
	if os.Getenv("ARBSTR_LOAD") == "" {
		t.Skip("a load run of a few minutes; set ARBSTR_LOAD=1 to run it")
	}
	n := 100_000
	if v, err := strconv.Atoi(os.Getenv("ARBSTR_LOAD_N")); err == nil && v > 0 {
		n = v
	}
	up := newUpstream(t, routstrNode(loadProvider))
	dir := t.TempDir()
	db := filepath.Join(dir, "ledger.db")
	arbstr := startLoadArbstr(t, dir, db, up.URL)
	rp := startLoadReverseProxy(t, dir, up.URL)
	floor := startLoadFloor(t, dir, up.URL)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 128, DisableCompression: true}}
	targets := []loadTarget{
		{name: "direct", url: up.URL},
		{name: "reverseproxy", url: rp.url, proc: rp.cmd},
		{name: "arbstr", url: arbstr.url, token: benchToken, proc: arbstr.cmd},
	}
	time.Sleep(time.Second) // idle: let start-up settle
	idle := map[string]string{}
	for _, tg := range targets[1:] {
		idle[tg.name] = rssBreakdown(t, tg.proc.Process.Pid)
	}
	t.Logf("floor (net/http and SQLite, nothing of arbstr): rss after start %s", rssBreakdown(t, floor.cmd.Process.Pid))
	sent := 0
	p50 := loadLatency(t, client, targets, 2000)
	sent += 2000
	delay := loadStreams(t, client, targets, 100, 40)
	sent += 100
	rps := loadThroughput(t, client, targets[1:], n, 64)
	sent += n
	time.Sleep(time.Second)
	for _, tg := range targets[1:] {
		t.Logf("%s: rss after start %s; after %d requests %s; peak %.1f MB", tg.name, idle[tg.name], n,
			rssBreakdown(t, tg.proc.Process.Pid), procStatusMB(t, tg.proc.Process.Pid, "VmHWM:"))
	}
	for _, tg := range targets[1:] {
		t.Logf("%s: added latency p50 %.1f µs (ratio %.2f); %.0f requests/s at concurrency 64 (ratio %.2f); streamed event delay p99 %.3f ms (direct %.3f ms)",
			tg.name, (p50[tg.name]-p50["direct"])*1e6, (p50[tg.name]-p50["direct"])/(p50["reverseproxy"]-p50["direct"]),
			rps[tg.name], rps[tg.name]/rps["reverseproxy"], delay[tg.name]*1e3, delay["direct"]*1e3)
	}
	arbstr.cmd.Process.Signal(os.Interrupt)
	arbstr.cmd.Wait()
	expect(t, "ledger rows, one per request to arbstr", ledgerCount(t, db), sent)
}

// loadTarget is where the load run sends requests: the provider itself,
// the reverse proxy or arbstr.
type loadTarget struct {
	name, url, token string
	proc             *exec.Cmd // nil for the provider, in this process
}

// loadProvider answers a ~1 KB completion, or, for a stream, 40 events
// 5 ms apart, each carrying the time it was sent in nanoseconds as its
// content, then the finish and usage chunks and [DONE].
func loadProvider(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	if !bytes.Contains(body, []byte(`"stream":true`)) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, completionJSON(strings.Repeat("Sats are the smallest unit. ", 26), 250, 200))
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	for range 40 {
		time.Sleep(5 * time.Millisecond)
		fmt.Fprintf(w, "data: %s\n\n", chunkJSON(strconv.FormatInt(time.Now().UnixNano(), 10)))
		w.(http.Flusher).Flush()
	}
	sse(w, finishChunk, usageChunk(250, 40), "[DONE]")
}

// loadProcess is a proxy running as its own process.
type loadProcess struct {
	cmd *exec.Cmd
	url string
}

// startLoadArbstr builds arbstr and runs it with a second-version config:
// one discovering provider with a key, a client with budgets and a rate
// limit that never refuse, the ledger in db.
func startLoadArbstr(t *testing.T, dir, db, upURL string) loadProcess {
	bin := filepath.Join(dir, "arbstr")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	cfg := fmt.Sprintf(`{"server": {"listen": "127.0.0.1:0", "upstream_timeout_secs": 30},
  "database": {"path": %q},
  "providers": [{"name": "node", "url": %q, "api_key": "${LOAD_PROVIDER_KEY}", "discover": true}],
  "clients": [{"name": "bench", "token": "${LOAD_CLIENT_TOKEN}", "budget_sats_per_day": 1e11, "budget_sats_per_month": 1e12, "rate_limit_rpm": 1000000000}]}`,
		db, upURL+"/v1")
	path := filepath.Join(dir, "config.json")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-config", path)
	cmd.Env = append(os.Environ(), "LOAD_PROVIDER_KEY=sk-bench", "LOAD_CLIENT_TOKEN="+benchToken)
	return startLoadProcess(t, cmd)
}

// startLoadReverseProxy builds and runs a bare httputil.ReverseProxy in
// front of upURL, flushing at once, with the same keep-alive pool as
// arbstr's (128 idle connections per host; the default of 2 would open a
// connection per request at concurrency 64).
func startLoadReverseProxy(t *testing.T, dir, upURL string) loadProcess {
	src := filepath.Join(dir, "reverseproxy")
	os.MkdirAll(src, 0o755)
	os.WriteFile(filepath.Join(src, "go.mod"), []byte("module reverseproxy\n\ngo 1.24\n"), 0o644)
	os.WriteFile(filepath.Join(src, "main.go"), []byte(`package main

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
)

func main() {
	target, _ := url.Parse(os.Args[1])
	rp := &httputil.ReverseProxy{
		Rewrite:       func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
		Transport:     &http.Transport{MaxIdleConns: 512, MaxIdleConnsPerHost: 128, DisableCompression: true},
		FlushInterval: -1,
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	fmt.Fprintf(os.Stderr, "listen=%s\n", ln.Addr())
	panic(http.Serve(ln, rp))
}
`), 0o644)
	bin := filepath.Join(dir, "reverseproxy-bin")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Dir = src
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build reverse proxy: %v\n%s", err, out)
	}
	return startLoadProcess(t, exec.Command(bin, upURL))
}

// startLoadFloor builds and runs the least that any arbstr does at start,
// with nothing of arbstr in it: it opens a SQLite file with WAL, creates a
// table, writes and reads a row, fetches and decodes the provider's
// listing, logs a line and serves HTTP. Its resident memory after start is
// the floor that the standard library and modernc.org/sqlite set, on the
// machine of the run, for a program of arbstr's shape.
func startLoadFloor(t *testing.T, dir, upURL string) loadProcess {
	src := filepath.Join(dir, "floor")
	os.MkdirAll(src, 0o755)
	// The module requires what arbstr's does, so the build finds
	// modernc.org/sqlite in the module cache, at the version arbstr uses.
	mod, err := os.ReadFile("go.mod")
	if err != nil {
		t.Fatal(err)
	}
	sum, err := os.ReadFile("go.sum")
	if err != nil {
		t.Fatal(err)
	}
	mod = bytes.Replace(mod, []byte("module arbstr"), []byte("module floor"), 1)
	os.WriteFile(filepath.Join(src, "go.mod"), mod, 0o644)
	os.WriteFile(filepath.Join(src, "go.sum"), sum, 0o644)
	os.WriteFile(filepath.Join(src, "main.go"), []byte(`package main

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	_ "modernc.org/sqlite"
)

func main() {
	db, err := sql.Open("sqlite", "file:"+filepath.Join(os.Args[2], "floor.db")+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(5000)")
	if err != nil {
		panic(err)
	}
	if _, err := db.Exec("CREATE TABLE IF NOT EXISTS requests (id INTEGER PRIMARY KEY, request_id TEXT UNIQUE, ts INTEGER, cost_msat INTEGER)"); err != nil {
		panic(err)
	}
	if _, err := db.Exec("INSERT INTO requests (request_id, ts, cost_msat) VALUES (?, ?, ?)", "floor", time.Now().UnixMilli(), 1000); err != nil {
		panic(err)
	}
	var n int
	if err := db.QueryRow("SELECT count(*) FROM requests WHERE ts > ?", 0).Scan(&n); err != nil {
		panic(err)
	}
	resp, err := http.Get(os.Args[1] + "/v1/models")
	if err != nil {
		panic(err)
	}
	var listing any
	if err := json.NewDecoder(resp.Body).Decode(&listing); err != nil {
		panic(err)
	}
	resp.Body.Close()
	slog.Info("floor started", "rows", n)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	fmt.Fprintf(os.Stderr, "listen=%s\n", ln.Addr())
	panic(http.Serve(ln, http.NotFoundHandler()))
}
`), 0o644)
	bin := filepath.Join(dir, "floor-bin")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Dir = src
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build floor: %v\n%s", err, out)
	}
	return startLoadProcess(t, exec.Command(bin, upURL, dir))
}

// startLoadProcess starts cmd, which logs listen=ADDR, with its log in a
// file (arbstr logs a line per request, as it does in service), and stops
// it at the end of the test.
func startLoadProcess(t *testing.T, cmd *exec.Cmd) loadProcess {
	logPath := filepath.Join(t.TempDir(), "log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		logs, _ := os.ReadFile(logPath)
		if _, rest, ok := strings.Cut(string(logs), "listen="); ok {
			if addr, _, ok := strings.Cut(rest, "\n"); ok {
				addr, _, _ = strings.Cut(addr, " ")
				return loadProcess{cmd: cmd, url: "http://" + addr}
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	logs, _ := os.ReadFile(logPath)
	t.Fatalf("%s did not start:\n%s", cmd.Path, logs)
	return loadProcess{}
}

// loadCall sends one request to tg and reads the whole answer.
func loadCall(client *http.Client, tg loadTarget, body string) error {
	resp, err := client.Do(benchRequest(tg.url+"/v1/chat/completions", body, tg.token))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: status %d", tg.name, resp.StatusCode)
	}
	return nil
}

// loadLatency sends n requests to each target, one at a time, taking the
// targets in turn so that they share the machine's moments, and returns
// each target's median time in seconds.
func loadLatency(t *testing.T, client *http.Client, targets []loadTarget, n int) map[string]float64 {
	times := map[string][]float64{}
	for range n {
		for _, tg := range targets {
			start := time.Now()
			if err := loadCall(client, tg, benchBody); err != nil {
				t.Fatal(err)
			}
			times[tg.name] = append(times[tg.name], time.Since(start).Seconds())
		}
	}
	p50 := map[string]float64{}
	for name, ts := range times {
		p50[name] = percentile(ts, 0.50)
		t.Logf("%s: one at a time, p50 %.1f µs, p99 %.1f µs", name, p50[name]*1e6, percentile(ts, 0.99)*1e6)
	}
	return p50
}

// loadStreams reads streams streams of events events from each target, in
// turn, and returns each target's p99 delay in seconds between the
// provider writing an event and the client reading it.
func loadStreams(t *testing.T, client *http.Client, targets []loadTarget, streams, events int) map[string]float64 {
	body := strings.Replace(benchBody, `"max_tokens"`, `"stream":true,"max_tokens"`, 1)
	delays := map[string][]float64{}
	for range streams {
		for _, tg := range targets {
			resp, err := client.Do(benchRequest(tg.url+"/v1/chat/completions", body, tg.token))
			if err != nil {
				t.Fatal(err)
			}
			got := 0
			sc := bufio.NewScanner(resp.Body)
			for sc.Scan() {
				_, stamp, ok := strings.Cut(sc.Text(), `"content":"`)
				if !ok {
					continue
				}
				stamp, _, _ = strings.Cut(stamp, `"`)
				sent, err := strconv.ParseInt(stamp, 10, 64)
				if err != nil {
					continue
				}
				delays[tg.name] = append(delays[tg.name], float64(time.Now().UnixNano()-sent)/1e9)
				got++
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || got != events {
				t.Fatalf("%s: stream status %d with %d stamped events; want 200 with %d", tg.name, resp.StatusCode, got, events)
			}
		}
	}
	p99 := map[string]float64{}
	for name, ds := range delays {
		p99[name] = percentile(ds, 0.99)
		t.Logf("%s: streamed event delay p50 %.3f ms, p99 %.3f ms over %d events", name, percentile(ds, 0.5)*1e3, p99[name]*1e3, len(ds))
	}
	return p99
}

// loadThroughput sends n requests to each target from conc goroutines, in
// four rounds that alternate between the targets, and returns each
// target's requests per second. It logs each target's resident memory
// after each round. Any error fails the test.
func loadThroughput(t *testing.T, client *http.Client, targets []loadTarget, n, conc int) map[string]float64 {
	elapsed := map[string]time.Duration{}
	sent, rss := map[string]int{}, map[string][]string{} // resident memory after each round
	for round := range 4 {
		count := n / 4 // the rounds split n
		if round == 3 {
			count = n - 3*(n/4)
		}
		for _, tg := range targets {
			var next atomic.Int64
			var errs atomic.Int64
			var wg sync.WaitGroup
			start := time.Now()
			for range conc {
				wg.Go(func() {
					for next.Add(1) <= int64(count) {
						if err := loadCall(client, tg, benchBody); err != nil {
							if errs.Add(1) == 1 {
								t.Error(err)
							}
						}
					}
				})
			}
			wg.Wait()
			elapsed[tg.name] += time.Since(start)
			if e := errs.Load(); e != 0 {
				t.Fatalf("%s: %d errors in %d requests at concurrency %d", tg.name, e, count, conc)
			}
			sent[tg.name] += count
			rss[tg.name] = append(rss[tg.name], fmt.Sprintf("%d: %.1f MB", sent[tg.name], procStatusMB(t, tg.proc.Process.Pid, "VmRSS:")))
		}
	}
	for _, tg := range targets {
		t.Logf("%s: rss after each round of requests at concurrency %d: %s", tg.name, conc, strings.Join(rss[tg.name], ", "))
	}
	rps := map[string]float64{}
	for name, d := range elapsed {
		rps[name] = float64(n) / d.Seconds()
	}
	return rps
}

// percentile returns the p-th quantile of xs (nearest rank); it sorts xs.
func percentile(xs []float64, p float64) float64 {
	slices.Sort(xs)
	return xs[min(len(xs)-1, int(math.Ceil(p*float64(len(xs))))-1)]
}

// procStatusMB reads a figure in kB, such as VmRSS: or VmHWM:, from a
// process's /proc status, in MB.
func procStatusMB(t testing.TB, pid int, key string) float64 {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, key); ok {
			kb, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb / 1024
		}
	}
	t.Fatalf("no %s in /proc/%d/status", key, pid)
	return 0
}

// rssBreakdown is a process's resident memory, and how much of it is
// anonymous (heap, stacks) and how much is files mapped (the executable's
// pages, shared with the page cache).
func rssBreakdown(t *testing.T, pid int) string {
	return fmt.Sprintf("%.1f MB (anonymous %.1f, files %.1f)", procStatusMB(t, pid, "VmRSS:"),
		procStatusMB(t, pid, "RssAnon:"), procStatusMB(t, pid, "RssFile:"))
}

// ledgerCount counts the rows of the ledger file at path.
func ledgerCount(t *testing.T, path string) int {
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRow("SELECT count(*) FROM requests").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// ---- Regressions and corners ----

// TestStreamErrorEventMidway: an error event after the first chunk reaches
// the client, then the stream ends as interrupted, never with [DONE], and
// the provider's breaker counts a failure.
func TestStreamErrorEventMidway(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		sse(w, chunkJSON("partial"), `{"error":{"message":"overloaded","type":"server_error"}}`, finishChunk, "[DONE]")
	})
	ta := newArbstr(t, testConfig(prov("p1", up.URL, 1, 1)))
	out := readBody(t, ta.post(t, "/v1/chat/completions", streamBody))
	if !strings.Contains(out, "overloaded") {
		t.Errorf("the provider's error event did not reach the client:\n%s", out)
	}
	assertInterrupted(t, out)
	expect(t, "row.Success of an interrupted stream", onlyRow(t, ta).Success, false)
	if p := ta.srv.current().router.byName["p1"]; p.failures != 1 {
		t.Errorf("breaker failures = %d; want 1", p.failures)
	}
}

// TestFailedAttemptUsageNotCharged: usage seen in a stream that then failed
// before its first data event is not charged to the request.
func TestFailedAttemptUsageNotCharged(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		// A usage-only chunk (withheld from the client), then nothing.
		sse(w, usageChunk(1000, 1000))
	})
	ta := newArbstr(t, testConfig(prov("a", up.URL, 10, 10), prov("b", up.URL, 20, 20)))
	resp := ta.post(t, "/v1/chat/completions", streamBody)
	out := readBody(t, resp)
	if resp.StatusCode != 502 {
		t.Fatalf("status = %d: %s", resp.StatusCode, out)
	}
	r := onlyRow(t, ta)
	expect(t, "(row.InputTokens != nil) of a failed request", (r.InputTokens != nil), false)
	expect(t, "deref(row.Cost) of a failed request", deref(r.Cost), 0)
	expect(t, "deref(row.InputTokens) of a failed request", deref(r.InputTokens), 0)
}

// TestProviderCannotForgeHeaders: x-arbstr-* headers are arbstr's alone,
// on both paths, and hop-by-hop headers from a stream do not cross.
func TestProviderCannotForgeHeaders(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("X-Arbstr-Cost-Sats", "0.000001")
		h.Set("X-Arbstr-Policy", "forged")
		h.Set("Connection", "X-Hop")
		h.Set("X-Hop", "1")
		h.Set("X-Request-Id", "up-1")
		if bytes.Contains(mustRead(r), []byte(`"stream":true`)) {
			sse(w, chunkJSON("x"), finishChunk, "[DONE]")
			return
		}
		io.WriteString(w, completionJSON("x", 1000, 1000))
	})
	ta := newArbstr(t, testConfig(prov("p1", up.URL, 1, 1)))
	for _, body := range []string{chatBody, streamBody} {
		resp := ta.post(t, "/v1/chat/completions", body)
		readBody(t, resp)
		if got := resp.Header.Get("X-Arbstr-Policy"); got != "" {
			t.Errorf("x-arbstr-policy = %q; want none", got)
		}
		if got := resp.Header.Get("X-Arbstr-Cost-Sats"); got == "0.000001" {
			t.Errorf("the provider set x-arbstr-cost-sats")
		}
		expect(t, "X-Hop, named in the provider's Connection header", resp.Header.Get("X-Hop"), "")
		expect(t, "X-Request-Id, an end-to-end header", resp.Header.Get("X-Request-Id"), "up-1")
	}
}

func mustRead(r *http.Request) []byte {
	b, _ := io.ReadAll(r.Body)
	return b
}

// TestHostileProviders: answers too large to hold fail over instead of
// eating memory; a redirect is a failure, not an answer.
func TestHostileProviders(t *testing.T) {
	// A slow failure must not send the waiting client its headers: this
	// test reads the answering provider from them.
	after := waitHeadersAfter
	waitHeadersAfter = time.Minute
	t.Cleanup(func() { waitHeadersAfter = after })
	huge := strings.Repeat("x", maxAnswerBytes+1)
	for _, tc := range []struct {
		name   string
		stream bool
		h      http.HandlerFunc
	}{
		{"huge body", false, func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, `{"choices":[],"pad":"`+huge+`"}`)
		}},
		{"huge event", true, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			io.WriteString(w, "data: "+huge)
		}},
		{"endless comments", true, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			for i := 0; i < (maxAnswerBytes/1000)+10; i++ {
				if _, err := io.WriteString(w, ": "+strings.Repeat("c", 996)+"\n\n"); err != nil {
					return
				}
			}
		}},
		{"redirect", false, func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, "http://127.0.0.1:1/elsewhere", http.StatusFound)
		}},
		{"array body", false, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, `[{"a":1}]`) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := newUpstream(t, tc.h)
			good := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				if tc.stream {
					streamOK(w, r)
				} else {
					jsonOK(w, r)
				}
			})
			ta := newArbstr(t, testConfig(prov("bad", bad.URL, 1, 1), prov("good", good.URL, 2, 2)))
			body := chatBody
			if tc.stream {
				body = streamBody
			}
			resp := ta.post(t, "/v1/chat/completions", body)
			out := readBody(t, resp)
			expect(t, "status", resp.StatusCode, 200)
			expect(t, "X-Arbstr-Provider", resp.Header.Get("X-Arbstr-Provider"), "good")
			if len(out) > 10000 {
				t.Errorf("the answer is %d bytes; want the good provider's few", len(out))
			}
		})
	}
}

// TestRetryAfter: a 429's Retry-After, in seconds or as a date, keeps the
// circuit open for longer than 30 s; other statuses' is ignored.
func TestRetryAfter(t *testing.T) {
	for _, tc := range []struct {
		status int
		value  string
		want   time.Duration
	}{
		{429, "120", 2 * time.Minute},
		{429, "", 0},
		{429, "-5", 0},
		{429, "soon", 0},
		{429, "31536000", maxRetryAfter},
		{503, "120", 0},
		{429, time.Now().Add(10 * time.Minute).UTC().Format(http.TimeFormat), 10 * time.Minute},
	} {
		resp := &http.Response{StatusCode: tc.status, Header: http.Header{"Retry-After": {tc.value}}}
		got := retryAfter(resp)
		// A date is read against the clock, a moment after it was made.
		if got < tc.want-2*time.Second {
			t.Errorf("retryAfter(%d, %q) = %v; want %v (less by at most 2s)", tc.status, tc.value, got, tc.want)
		}
		if got > tc.want {
			t.Errorf("retryAfter(%d, %q) = %v; want at most %v", tc.status, tc.value, got, tc.want)
		}
	}

	// Through the proxy: three 429s asking for 2 minutes open the circuit
	// for 2 minutes.
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "120")
		statusHandler(429)(w, r)
	})
	cfg := testConfig(prov("p1", up.URL, 1, 1))
	cfg.Server.MaxAttempts = 1
	ta := newArbstr(t, cfg)
	for range 3 {
		readBody(t, ta.post(t, "/v1/chat/completions", chatBody))
	}
	p := ta.srv.current().router.byName["p1"]
	p.mu.Lock()
	until := time.Until(p.openUntil)
	p.mu.Unlock()
	if until < 110*time.Second {
		t.Errorf("circuit open for %v; want Retry-After's 2m, less the test's own time", until)
	}
	if until > 120*time.Second {
		t.Errorf("circuit open for %v; want at most Retry-After's 2m", until)
	}
}

// TestBreakerProbeAfterSuccess: a request admitted before the circuit
// opened succeeds while the probe is out; the probe then fails, and the
// circuit must still reopen for at least the base time.
func TestBreakerProbeAfterSuccess(t *testing.T) {
	now := time.Now()
	p := newProvider(ProviderConfig{Name: "p", URL: "http://x"})
	_, early := p.acquire(now) // admitted while closed
	for range 3 {
		ok, probe := p.acquire(now)
		if !ok {
			t.Fatal("refused while closed")
		}
		p.release(now, probe, outcomeFailure, 0)
	}
	now = now.Add(time.Minute)
	ok, probe := p.acquire(now)
	if !ok {
		t.Fatal("acquire refused the half-open circuit's probe")
	}
	if !probe {
		t.Fatal("the request through a half-open circuit is not its probe")
	}
	p.release(now, early, outcomeSuccess, 0) // the early request succeeds
	p.release(now, probe, outcomeFailure, 0) // the probe fails
	if st := p.state(now.Add(time.Second)); st != stateOpen {
		t.Errorf("state = %s; want open", st)
	}
}

// TestLatencyCountsAnswersOnly: an instant 503 does not make a provider the
// fastest for lowest_latency.
func TestLatencyCountsAnswersOnly(t *testing.T) {
	fails := newUpstream(t, statusHandler(503))
	ta := newArbstr(t, testConfig(prov("fails", fails.URL, 1, 1)))
	readBody(t, ta.post(t, "/v1/chat/completions", chatBody))
	if _, seen := ta.srv.current().router.byName["fails"].observedLatency(); seen {
		t.Error("a failure was observed as latency")
	}
}

// TestChunkedBodyTooLarge: a body without Content-Length is cut at
// max_body_bytes and refused with 413.
func TestChunkedBodyTooLarge(t *testing.T) {
	up := newUpstream(t, jsonOK)
	cfg := testConfig(prov("p1", up.URL, 1, 1))
	cfg.Server.MaxBodyBytes = 1000
	ta := newArbstr(t, cfg)
	pr, pw := io.Pipe()
	go func() {
		pw.Write([]byte(`{"model":"m","messages":[{"role":"user","content":"`))
		for range 100 {
			if _, err := pw.Write(bytes.Repeat([]byte("x"), 100)); err != nil {
				return
			}
		}
		pw.Close()
	}()
	req, _ := http.NewRequest("POST", ta.URL+"/v1/chat/completions", pr)
	req.Header.Set("Content-Type", "application/json")
	resp, err := testClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	out := readBody(t, resp)
	_, code, _ := apiErr(t, out)
	expect(t, "status", resp.StatusCode, 413)
	expect(t, "error code", code, "body_too_large")
	pr.Close()
}

func TestStatsParameters(t *testing.T) {
	up := newUpstream(t, jsonOK)
	cfg := testConfig(prov("a", up.URL, 1, 1), prov("b", up.URL, 2, 2))
	cfg.Policies.Rules = []PolicyRule{{Name: "greet", Keywords: []string{"hello"}}}
	ta := newArbstr(t, cfg)
	readBody(t, ta.post(t, "/v1/chat/completions", chatBody))
	readBody(t, ta.post(t, "/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"x"}]}`))
	future := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	past := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
	for _, tc := range []struct {
		query    string
		requests int64
		groups   string
	}{
		{"", 2, "a"},
		{"?range=1h", 2, "a"},
		{"?range=last_7d", 2, "a"},
		{"?range=all&group_by=policy", 2, ",greet"},
		{"?group_by=model", 2, "m"},
		{"?policy=greet", 1, "a"},
		{"?provider=b", 0, ""},
		{"?until=" + past, 0, ""},
		{"?since=" + past + "&until=" + future, 2, "a"},
		{"?since=" + future, 0, ""},
	} {
		resp, out := ta.get(t, "/v1/stats"+tc.query)
		var st statsResult
		if resp.StatusCode != 200 {
			t.Fatalf("GET /v1/stats%s = %d; want 200: %s", tc.query, resp.StatusCode, out)
		}
		if err := json.Unmarshal(out, &st); err != nil {
			t.Fatalf("GET /v1/stats%s answered no JSON (%v): %s", tc.query, err, out)
		}
		var keys []string
		for _, g := range st.Groups {
			keys = append(keys, g.Key)
		}
		expect(t, "GET /v1/stats"+tc.query+" total.requests", st.Total.Requests, tc.requests)
		expect(t, "GET /v1/stats"+tc.query+" groups", strings.Join(keys, ","), tc.groups)
	}
}

func TestCostWithCircuitsOpen(t *testing.T) {
	up := newUpstream(t, jsonOK)
	ta := newArbstr(t, testConfig(prov("a", up.URL, 1, 1)))
	openCircuitUntil(ta.srv.current().router.byName["a"], time.Now().Add(time.Minute))
	resp := ta.post(t, "/v1/cost", chatBody)
	out := readBody(t, resp)
	expect(t, "POST /v1/cost status with every circuit open", resp.StatusCode, 200)
	expectContains(t, "POST /v1/cost with every circuit open", out, `"candidates":[]`)
	expectContains(t, "POST /v1/cost with every circuit open", out, `{"provider":"a","reason":"circuit open"}`)
	_, health := ta.get(t, "/health")
	openCircuitUntil(ta.srv.current().router.byName["a"], time.Now().Add(-time.Second)) // half-open
	_, health2 := ta.get(t, "/health")
	expectContains(t, "GET /health with the circuit open", string(health), "unhealthy")
	expectContains(t, "GET /health with the circuit half-open", string(health2), `"degraded"`)
}

func TestMaxCompletionTokensWins(t *testing.T) {
	for _, tc := range []struct {
		body string
		want int64
	}{
		{`{"model":"m","max_tokens":10,"messages":[{}]}`, 10},
		{`{"model":"m","max_completion_tokens":20,"messages":[{}]}`, 20},
		{`{"model":"m","max_tokens":10,"max_completion_tokens":20,"messages":[{}]}`, 20},
		{`{"model":"m","max_tokens":"many","messages":[{}]}`, 0},
	} {
		req, aerr := parseChat([]byte(tc.body))
		if aerr != nil {
			t.Errorf("parseChat(%s) = %v; want no error", tc.body, aerr)
			continue
		}
		if req.MaxTokens != tc.want {
			t.Errorf("parseChat(%s).MaxTokens = %d; want %d", tc.body, req.MaxTokens, tc.want)
		}
	}
}

// TestSubcommands runs check and providers as a user would, with a key in
// the environment that must never be printed.
func TestSubcommands(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "config.toml")
	os.WriteFile(path, []byte(`
[[providers]]
name = "alpha"
url = "https://user:pass@alpha.example/v1?key=q"
api_key = "${ALPHA_TEST_KEY}"
input_rate = 1.5
output_rate = 3

[[providers]]
name = "beta"
url = "https://beta.example"
`), 0o600)
	t.Setenv("ALPHA_TEST_KEY", "sk-SUBCOMMAND-SECRET")
	t.Setenv("ARBSTR_BETA_API_KEY", "sk-BETA-SECRET")
	var out bytes.Buffer
	if err := run(context.Background(), []string{"check", "-config", path}, &out, io.Discard); err != nil {
		t.Fatalf("check: %v", err)
	}
	if err := run(context.Background(), []string{"providers", "-c", path}, &out, io.Discard); err != nil {
		t.Fatalf("providers: %v", err)
	}
	text := out.String()
	for _, want := range []string{"config.toml: ok", "providers  2", "alpha", "set (config)", "set (env ARBSTR_BETA_API_KEY)", "1.5",
		"rates in   sats per 1k tokens (rate_unit sats_per_1k)", "rates in sats per 1k tokens", "IN/1k", "OUT/1k"} {
		if !strings.Contains(text, want) {
			t.Errorf("output lacks %q:\n%s", want, text)
		}
	}
	for _, secret := range []string{"SECRET", "pass@", "key=q"} {
		if strings.Contains(text, secret) {
			t.Errorf("output shows %q:\n%s", secret, text)
		}
	}
	os.WriteFile(path, []byte("[[providers]]\nname = \"x\"\nurl = \"ftp://x\"\n"), 0o600)
	err := run(context.Background(), []string{"check", "-config", path}, io.Discard, io.Discard)
	if err == nil {
		t.Fatal("check of a bad config = nil; want an error at config.toml:3")
	}
	expectContains(t, "the error of check", err.Error(), "config.toml:3")

	// Rates per 1M tokens are printed as written, under the unit's name.
	os.WriteFile(path, []byte("rate_unit = \"sats_per_1m\"\n[[providers]]\nname = \"m\"\nurl = \"https://m.example\"\ninput_rate = 10000\n"), 0o600)
	out.Reset()
	for _, cmd := range []string{"check", "providers"} {
		if err := run(context.Background(), []string{cmd, "-c", path}, &out, io.Discard); err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
	}
	for _, want := range []string{"rates in   sats per 1M tokens (rate_unit sats_per_1m)", "rates in sats per 1M tokens", "IN/1M", "OUT/1M", "10000"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output per 1M lacks %q:\n%s", want, out.String())
		}
	}
}

func TestDatabasePath(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"./arbstr.db", "./arbstr.db"},
		{"sqlite:./x.db", "./x.db"},
		{"sqlite:///var/lib/arbstr.db", "/var/lib/arbstr.db"},
		{"sqlite://rel.db", "rel.db"},
		{"file:/tmp/a.db", "/tmp/a.db"},
		{":memory:", ":memory:"},
	} {
		if got := databasePath(tc.in); got != tc.want {
			t.Errorf("databasePath(%q) = %q; want %q", tc.in, got, tc.want)
		}
	}
}

// TestRunEnvironment: DATABASE_URL and ARBSTR_LOG_LEVEL apply, and -listen
// off loopback without auth_token warns.
func TestRunEnvironment(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	t.Setenv("ARBSTR_CONFIG", "")
	db := filepath.Join(dir, "env.db")
	t.Setenv("DATABASE_URL", "sqlite://"+db)
	t.Setenv("ARBSTR_LOG_LEVEL", "debug")
	up := newUpstream(t, jsonOK)
	bad := newUpstream(t, statusHandler(503))
	os.WriteFile("config.json", []byte(fmt.Sprintf(`{"providers":[{"name":"bad","url":%q,"input_rate":1},{"name":"p","url":%q,"input_rate":2}]}`, bad.URL, up.URL)), 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	logs := &syncBuffer{}
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"-listen", "0.0.0.0:0"}, io.Discard, logs) }()
	addr := waitListening(t, logs)
	_, port, _ := net.SplitHostPort(addr)
	resp, err := testClient.Post("http://127.0.0.1:"+port+"/v1/chat/completions", "application/json", strings.NewReader(chatBody))
	if err != nil {
		t.Fatal(err)
	}
	readBody(t, resp)
	cancel()
	if err := receiveWithin(t, done, "return from run"); err != nil {
		t.Fatal(err)
	}
	text := logs.String()
	expectContains(t, "the logs", text, "database="+db)
	expectContains(t, "the logs", text, `level=DEBUG msg="attempt failed"`)
	expectContains(t, "the logs", text, "not a loopback address")
	if _, err := os.Stat(db); err != nil {
		t.Errorf("DATABASE_URL's file: %v", err)
	}
}

// ---- More of the OpenAI API: responses, embeddings, one model ----

// responsesJSON is a Responses API answer as OpenAI sends it.
func responsesJSON(text string, in, out int) string {
	return fmt.Sprintf(`{"id":"resp_1","object":"response","status":"completed","model":"m",`+
		`"output":[{"type":"message","id":"msg_1","role":"assistant","content":[{"type":"output_text","text":%q,"annotations":[]}]}],`+
		`"usage":{"input_tokens":%d,"output_tokens":%d,"total_tokens":%d}}`, text, in, out, in+out)
}

// responsesStream writes a Responses API stream: typed events, each with
// its event line, response.completed last with the usage.
func responsesStream(w http.ResponseWriter, deltas []string, in, out int, completed bool) {
	w.Header().Set("Content-Type", "text/event-stream")
	send := func(typ, data string) {
		fmt.Fprintf(w, "event: %s\ndata: %s\n\n", typ, data)
		w.(http.Flusher).Flush()
	}
	send("response.created", `{"type":"response.created","response":{"id":"resp_1","object":"response","status":"in_progress"}}`)
	for _, d := range deltas {
		send("response.output_text.delta", fmt.Sprintf(`{"type":"response.output_text.delta","item_id":"msg_1","output_index":0,"content_index":0,"delta":%q}`, d))
	}
	if completed {
		send("response.completed", fmt.Sprintf(`{"type":"response.completed","response":{"id":"resp_1","object":"response","status":"completed","usage":{"input_tokens":%d,"output_tokens":%d,"total_tokens":%d}}}`, in, out, in+out))
	}
}

func TestResponses(t *testing.T) {
	var paths sync.Map
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		paths.Store(r.URL.Path, true)
		body, _ := io.ReadAll(r.Body)
		if bytes.Contains(body, []byte(`"stream":true`)) {
			responsesStream(w, []string{"Hel", "lo"}, 20, 7, !bytes.Contains(body, []byte("break")))
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, responsesJSON("Hello", 20, 7))
	})
	ta := newArbstr(t, testConfig(prov("p", up.URL, 1000, 2000)))

	resp := ta.post(t, "/v1/responses", `{"model":"m","input":"Say hello"}`)
	body := readBody(t, resp)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status = %d; want 200: %s", resp.StatusCode, body)
	}
	if !strings.Contains(body, `"arbstr_provider":"p"`) {
		t.Errorf("body lacks arbstr_provider: %s", body)
	}
	// 20 input tokens at 1000 sats per 1k and 7 output at 2000: 34 sats.
	if got := resp.Header.Get("X-Arbstr-Cost-Sats"); got != "34" {
		t.Errorf("x-arbstr-cost-sats = %q; want 34", got)
	}
	if _, ok := paths.Load("/v1/responses"); !ok {
		t.Errorf("the provider was not called at /v1/responses")
	}

	resp = ta.post(t, "/v1/responses", `{"model":"m","stream":true,"input":[{"role":"user","content":[{"type":"input_text","text":"Say hello"}]}]}`)
	stream := readBody(t, resp)
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("stream content type = %q", ct)
	}
	summary := strings.Index(stream, ": arbstr {")
	completed := strings.Index(stream, "event: response.completed")
	if summary < 0 {
		t.Fatalf("stream lacks the : arbstr comment:\n%s", stream)
	}
	if completed < 0 {
		t.Fatalf("stream lacks response.completed:\n%s", stream)
	}
	if summary > completed {
		t.Errorf("the : arbstr comment comes after response.completed:\n%s", stream)
	}
	if strings.Contains(stream, "[DONE]") {
		t.Errorf("a Responses stream got a [DONE]:\n%s", stream)
	}

	resp = ta.post(t, "/v1/responses", `{"model":"m","stream":true,"input":"break please"}`)
	broken := readBody(t, resp)
	if last := broken[strings.LastIndex(broken, "event: "):]; !strings.HasPrefix(last, "event: error\ndata: {") {
		t.Errorf("a broken Responses stream ends with %q; want an error event", last)
	}
	if !strings.Contains(broken, `"code":"stream_interrupted"`) {
		t.Errorf("the error event lacks code stream_interrupted:\n%s", broken)
	}

	rows := ta.rows(t)
	if len(rows) != 3 {
		t.Fatalf("%d rows; want 3", len(rows))
	}
	wants := []struct {
		success bool
		in, out int64
	}{{false, 0, 1}, {true, 20, 7}, {true, 20, 7}} // newest first; the broken one estimated
	for i, w := range wants {
		r := rows[i]
		if r.Success != w.success {
			t.Errorf("row %d: success = %v; want %v", i, r.Success, w.success)
		}
		if !w.success {
			continue
		}
		if deref(r.InputTokens) != w.in {
			t.Errorf("row %d: input tokens = %d; want %d", i, deref(r.InputTokens), w.in)
		}
		if deref(r.OutputTokens) != w.out {
			t.Errorf("row %d: output tokens = %d; want %d", i, deref(r.OutputTokens), w.out)
		}
	}
}

func TestResponsesFallback(t *testing.T) {
	bad := newUpstream(t, statusHandler(http.StatusServiceUnavailable))
	good := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		responsesStream(w, []string{"Hi"}, 5, 1, true)
	})
	ta := newArbstr(t, testConfig(prov("a-cheap", bad.URL, 1, 1), prov("b-pricey", good.URL, 5, 5)))
	resp := ta.post(t, "/v1/responses", `{"model":"m","stream":true,"input":"hello"}`)
	body := readBody(t, resp)
	if got := resp.Header.Get("X-Arbstr-Provider"); got != "b-pricey" {
		t.Errorf("provider = %q; want b-pricey", got)
	}
	if got := resp.Header.Get("X-Arbstr-Attempts"); got != "2" {
		t.Errorf("attempts = %q; want 2", got)
	}
	if !strings.Contains(body, "response.completed") {
		t.Errorf("no response.completed:\n%s", body)
	}
}

func TestEmbeddings(t *testing.T) {
	var got []byte
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		got, _ = io.ReadAll(r.Body)
		if r.URL.Path != "/v1/embeddings" {
			statusHandler(http.StatusNotFound)(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2]}],"model":"e","usage":{"prompt_tokens":8,"total_tokens":8}}`)
	})
	ta := newArbstr(t, testConfig(prov("p", up.URL, 500, 99999)))
	in := `{"model":"e","input":["hello world","again"]}`
	resp := ta.post(t, "/v1/embeddings", in)
	body := readBody(t, resp)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status = %d: %s", resp.StatusCode, body)
	}
	if string(got) != in {
		t.Errorf("upstream body = %s; want %s", got, in)
	}
	// 8 tokens at 500 sats per 1k; the output rate does not apply.
	if c := resp.Header.Get("X-Arbstr-Cost-Sats"); c != "4" {
		t.Errorf("cost = %q; want 4", c)
	}
	rows := ta.rows(t)
	if len(rows) != 1 {
		t.Fatalf("%d rows; want 1", len(rows))
	}
	if deref(rows[0].InputTokens) != 8 {
		t.Errorf("input tokens = %d; want 8", deref(rows[0].InputTokens))
	}
	if deref(rows[0].OutputTokens) != 0 {
		t.Errorf("output tokens = %d; want 0", deref(rows[0].OutputTokens))
	}
}

func TestParseRoutedBodies(t *testing.T) {
	tests := []struct {
		name      string
		parse     func([]byte) (*chatRequest, *apiError)
		body      string
		code      string // "" when valid
		textBytes int64
		lastUser  string
	}{
		{"responses string", parseResponses, `{"model":"m","input":"hello"}`, "", 5, "hello"},
		{"responses items", parseResponses, `{"model":"m","instructions":"be brief","input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]}]}`, "", 10, "hi"},
		{"responses tools", parseResponses, `{"model":"m","input":"x","tools":[{"type":"function"}]}`, "", 1 + int64(len(`[{"type":"function"}]`)), "x"},
		{"responses no input", parseResponses, `{"model":"m"}`, "invalid_input", 0, ""},
		{"responses no model", parseResponses, `{"input":"x"}`, "missing_model", 0, ""},
		{"responses bad stream", parseResponses, `{"model":"m","input":"x","stream":"yes"}`, "invalid_stream", 0, ""},
		{"responses array body", parseResponses, `[1]`, "invalid_json", 0, ""},
		{"embeddings string", parseEmbeddings, `{"model":"e","input":"abcd"}`, "", 4, "abcd"},
		{"embeddings strings", parseEmbeddings, `{"model":"e","input":["ab","cd"]}`, "", 4, "cd"},
		{"embeddings tokens", parseEmbeddings, `{"model":"e","input":[[1,2,3]]}`, "", 12, ""},
		{"embeddings one token array", parseEmbeddings, `{"model":"e","input":[1,2]}`, "", 8, ""},
		{"embeddings empty", parseEmbeddings, `{"model":"e","input":""}`, "invalid_input", 0, ""},
		{"embeddings object", parseEmbeddings, `{"model":"e","input":{}}`, "invalid_input", 0, ""},
		{"chat tools count", parseChat, `{"model":"m","tools":[1],"messages":[{"role":"assistant","content":null,"tool_calls":[{"function":{"arguments":"{\"a\":1}"}}]},{"role":"user","content":"go"}]}`, "", 3 + 7 + 2, "go"},
	}
	for _, tc := range tests {
		req, aerr := tc.parse([]byte(tc.body))
		if tc.code != "" {
			if aerr == nil || aerr.Code != tc.code {
				t.Errorf("%s: error = %v; want code %s", tc.name, aerr, tc.code)
			}
			continue
		}
		if aerr != nil {
			t.Errorf("%s: unexpected error %v", tc.name, aerr)
			continue
		}
		if req.TextBytes != tc.textBytes {
			t.Errorf("%s: TextBytes = %d; want %d", tc.name, req.TextBytes, tc.textBytes)
		}
		if req.LastUser != tc.lastUser {
			t.Errorf("%s: LastUser = %q; want %q", tc.name, req.LastUser, tc.lastUser)
		}
	}
}

// TestEstimatesSeeEverything: with no usage from the provider, tool calls
// and reasoning count as output, so an answer made only of tool calls is
// not recorded as free.
func TestEstimatesSeeEverything(t *testing.T) {
	toolOnly := `{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":null,` +
		`"tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{\"city\":\"Paris, France\"}"}}]},"finish_reason":"tool_calls"}]}`
	reasoning := `{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok","reasoning":"let me think about it"},"finish_reason":"stop"}]}`
	streamTool := []string{
		`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{\"city\":"}}]},"finish_reason":null}]}`,
		`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Paris, France\"}"}}]},"finish_reason":null}]}`,
		`{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}`,
		"[DONE]",
	}
	tests := []struct {
		name    string
		handler http.HandlerFunc
		body    string
		wantOut int64
	}{
		{"tool call only", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, toolOnly) }, chatBody,
			estimateTokens(int64(len(`{\"city\":\"Paris, France\"}`) - 4))},
		{"reasoning", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, reasoning) }, chatBody,
			estimateTokens(int64(len("ok") + len("let me think about it")))},
		{"streamed tool call", func(w http.ResponseWriter, r *http.Request) { sse(w, streamTool...) }, streamBody,
			estimateTokens(int64(len(`{\"city\":`) + len(`\"Paris, France\"}`)))},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := newUpstream(t, tc.handler)
			ta := newArbstr(t, testConfig(prov("p", up.URL, 1, 1)))
			readBody(t, ta.post(t, "/v1/chat/completions", tc.body))
			rows := ta.rows(t)
			if len(rows) != 1 {
				t.Fatalf("%d rows; want 1", len(rows))
			}
			if !rows[0].UsageEstimated {
				t.Errorf("usage_estimated = false; want true")
			}
			if deref(rows[0].OutputTokens) != tc.wantOut {
				t.Errorf("output tokens = %d; want %d", deref(rows[0].OutputTokens), tc.wantOut)
			}
		})
	}
}

func TestModelRetrieve(t *testing.T) {
	cfg := testConfig(ProviderConfig{Name: "p", URL: "http://127.0.0.1:1/v1", Models: []string{"google/gemini-2.5-flash", "gpt-4o"}})
	ta := newArbstr(t, cfg)
	for _, tc := range []struct {
		path   string
		status int
		id     string
	}{
		{"/v1/models/gpt-4o", 200, "gpt-4o"},
		{"/v1/models/google/gemini-2.5-flash", 200, "google/gemini-2.5-flash"},
		{"/v1/models/google%2Fgemini-2.5-flash", 200, "google/gemini-2.5-flash"},
		{"/v1/models/nope", 404, ""},
	} {
		resp, body := ta.get(t, tc.path)
		if resp.StatusCode != tc.status {
			t.Errorf("GET %s = %d; want %d: %s", tc.path, resp.StatusCode, tc.status, body)
			continue
		}
		if tc.status == 404 {
			if _, code, _ := apiErr(t, string(body)); code != "model_not_found" {
				t.Errorf("GET %s: code = %q; want model_not_found", tc.path, code)
			}
			continue
		}
		var m model
		if err := json.Unmarshal(body, &m); err != nil {
			t.Fatal(err)
		}
		if m.ID != tc.id {
			t.Errorf("GET %s: id = %q; want %q", tc.path, m.ID, tc.id)
		}
		if m.Object != "model" {
			t.Errorf("GET %s: object = %q; want model", tc.path, m.Object)
		}
	}
}

// ---- Spend control ----

func TestRateLimiter(t *testing.T) {
	now := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	l := newRateLimiter(6, now) // 6 a minute: one every 10 s
	for i := range 6 {
		if ok, _ := l.allow(now); !ok {
			t.Fatalf("request %d of a full bucket refused", i+1)
		}
	}
	ok, wait := l.allow(now)
	if ok {
		t.Fatalf("7th request in the same instant allowed")
	}
	if wait != 10*time.Second {
		t.Errorf("wait = %v; want 10s", wait)
	}
	if ok, _ := l.allow(now.Add(10 * time.Second)); !ok {
		t.Errorf("request after the refill refused")
	}
}

func TestPeriodBounds(t *testing.T) {
	at := time.Date(2026, 12, 31, 23, 59, 0, 0, time.FixedZone("x", 3600)) // 22:59 UTC
	tests := []struct {
		period     string
		start, end string
	}{
		{periodDay, "2026-12-31T00:00:00Z", "2027-01-01T00:00:00Z"},
		{periodMonth, "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"},
	}
	for _, tc := range tests {
		start, end := periodBounds(tc.period, at)
		if got := start.Format(time.RFC3339); got != tc.start {
			t.Errorf("periodBounds(%s) start = %s; want %s", tc.period, got, tc.start)
		}
		if got := end.Format(time.RFC3339); got != tc.end {
			t.Errorf("periodBounds(%s) end = %s; want %s", tc.period, got, tc.end)
		}
	}
}

// TestBudgetReservesConcurrently: 50 requests at once against a budget that
// covers 10 worst cases get 10 reservations, never more.
func TestBudgetReservesConcurrently(t *testing.T) {
	cfg := defaultConfig()
	cfg.Clients = []ClientConfig{{Name: "app", Token: "t", BudgetSatsPerDay: 100}}
	now := time.Now()
	sc := newSpendControl(cfg, now, nil)
	c := sc.clientFor(sha256.Sum256([]byte("t")))
	if c == nil {
		t.Fatal("clientFor(the token's hash) = nil")
	}
	var (
		wg      sync.WaitGroup
		granted atomic.Int64
		refused atomic.Int64
	)
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, aerr := sc.reserve(sc.budgetsFor(c, ""), 10_000, now) // 10 sats each
			if aerr != nil {
				refused.Add(1)
				if aerr.Code != "budget_exceeded" {
					t.Errorf("code = %q; want budget_exceeded", aerr.Code)
				}
				return
			}
			granted.Add(1)
			_ = res
		}()
	}
	wg.Wait()
	if got := granted.Load(); got != 10 {
		t.Errorf("granted %d reservations; want 10", got)
	}
	if got := refused.Load(); got != 40 {
		t.Errorf("refused %d; want 40", got)
	}
	v := sc.view(now, func(*budget) bool { return true })
	if len(v) != 1 {
		t.Fatalf("%d budgets; want 1", len(v))
	}
	if v[0].Reserved != 100 {
		t.Errorf("reserved = %g; want 100", v[0].Reserved)
	}
	if v[0].Remaining != 0 {
		t.Errorf("remaining = %g; want 0", v[0].Remaining)
	}
}

func TestBudgetSettle(t *testing.T) {
	cfg := defaultConfig()
	cfg.Policies.Rules = []PolicyRule{{Name: "code", BudgetSatsPerMonth: 50}}
	now := time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)
	sc := newSpendControl(cfg, now, nil)
	list := sc.budgetsFor(nil, "code")
	res, aerr := sc.reserve(list, 30_000, now)
	if aerr != nil {
		t.Fatal(aerr)
	}
	res.settle(12_500) // cost 12.5 sats, reservation released
	v := sc.view(now, func(*budget) bool { return true })[0]
	if v.Spent != 12.5 {
		t.Errorf("spent = %g; want 12.5", v.Spent)
	}
	if v.Reserved != 0 {
		t.Errorf("reserved = %g; want 0", v.Reserved)
	}
	_, aerr = sc.reserve(list, 40_000, now) // 12.5 + 40 > 50
	if aerr == nil {
		t.Fatal("reservation over the limit granted")
	}
	if want := 2*24*time.Hour - 12*time.Hour; aerr.retryAfter != want {
		t.Errorf("retryAfter = %v; want %v (to December 1st)", aerr.retryAfter, want)
	}
	for _, part := range []string{`"code"`, "monthly", "12.5 of 50 sats"} {
		if !strings.Contains(aerr.Message, part) {
			t.Errorf("message %q lacks %q", aerr.Message, part)
		}
	}
	// A new month starts afresh.
	if _, aerr := sc.reserve(list, 40_000, now.AddDate(0, 1, 0)); aerr != nil {
		t.Errorf("next month: %v", aerr)
	}
}

// ---- Metrics ----

// lookTool finds a command the tests run, such as promtool or chromium. In
// CI, where .ci/run installs them, a missing one fails the test; elsewhere
// the test is skipped, saying so.
func lookTool(t *testing.T, names ...string) string {
	t.Helper()
	for _, n := range names {
		if p, err := exec.LookPath(n); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("none of %v is installed; .ci/run installs them", names)
	}
	t.Skipf("none of %v is installed (apt-get install prometheus chromium); skipping", names)
	return ""
}

func TestMetrics(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		body := mustRead(r)
		r.Body = io.NopCloser(bytes.NewReader(body))
		if bytes.Contains(body, []byte(`"stream":true`)) {
			streamOK(w, r)
			return
		}
		jsonOK(w, r)
	})
	bad := newUpstream(t, statusHandler(http.StatusInternalServerError))
	cfg := testConfig(prov("bad", bad.URL, 1, 1), prov("good \"quoted\"", up.URL, 2, 2))
	cfg.Policies.Rules = []PolicyRule{{Name: "b", BudgetSatsPerDay: 100}}
	cfg.Providers[0].Models = []string{"m"}
	cfg.Providers[1].Models = []string{"m"}
	ta := newArbstr(t, cfg)
	readBody(t, ta.post(t, "/v1/chat/completions", chatBody))
	readBody(t, ta.post(t, "/v1/chat/completions", streamBody))
	readBody(t, ta.post(t, "/v1/chat/completions", `{"model":"invented-by-a-client","messages":[{"role":"user","content":"x"}]}`))

	resp, body := ta.get(t, "/metrics")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics = %d", resp.StatusCode)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Errorf("content type = %q", ct)
	}
	text := string(body)
	for _, want := range []string{
		`arbstr_requests_total{provider="good \"quoted\"",model="m",policy="",client="",code="2xx"} 2`,
		`arbstr_requests_total{provider="",model="other",policy="",client="",code="4xx"} 1`,
		`arbstr_upstream_attempts_total{provider="bad",outcome="failure"} 2`,
		`arbstr_tokens_total{provider="good \"quoted\"",model="m",policy="",client="",code="2xx",direction="input"} 24`,
		`arbstr_request_duration_seconds_count{provider="good \"quoted\""} 2`,
		`arbstr_stream_time_to_first_token_seconds_count{provider="good \"quoted\""} 1`,
		`arbstr_circuit_state{provider="bad"} 0`,
		`arbstr_token_price_sats{provider="bad",model="m",direction="input"} 0.001`,
		`arbstr_budget_remaining_sats{scope="policy",name="b",period="day"} 100`,
		"# TYPE arbstr_ledger_queue_rows gauge",
		"# TYPE arbstr_goroutines gauge",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if t.Failed() {
		t.Logf("metrics:\n%s", text)
	}

	promtool := lookTool(t, "promtool")
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(body)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

// ---- The page ----

// chromiumArgs start Debian's chromium headless in a sandbox-free
// container, without the background traffic that a closed network refuses.
func chromiumArgs(t *testing.T) []string {
	return []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
		"--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir=" + t.TempDir()}
}

// TestPageInBrowser renders the page in a real headless browser and checks
// what a person sees: the totals, the providers, the chart, the requests.
func TestPageInBrowser(t *testing.T) {
	up := newUpstream(t, jsonOK)
	cfg := testConfig(prov("cheap-<b>one</b>", up.URL, 10, 20), prov("pricey", up.URL, 50, 100))
	cfg.Clients = []ClientConfig{{Name: "app", Token: "tok", BudgetSatsPerDay: 1000}}
	ta := newArbstr(t, cfg)
	for range 3 {
		resp := ta.post(t, "/v1/chat/completions", chatBody, "Authorization", "Bearer tok")
		if body := readBody(t, resp); resp.StatusCode != http.StatusOK {
			t.Fatalf("chat as client app = %d: %s", resp.StatusCode, body)
		}
	}
	resp, body := ta.get(t, "/")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET / = %d: %s", resp.StatusCode, body)
	}
	if len(body) > 100<<10 {
		t.Errorf("page is %d bytes; want under 100 KB", len(body))
	}
	expectContains(t, "the page", string(body), `<meta http-equiv="refresh" content="10">`)
	for _, forbidden := range []string{"<b>one</b>", "http://", "https://", "src="} {
		if strings.Contains(string(body), forbidden) {
			t.Errorf("page holds %q (an unescaped value or an external asset)", forbidden)
		}
	}

	browser := lookTool(t, "chromium", "chromium-browser", "google-chrome")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, browser, append(chromiumArgs(t), "--dump-dom", ta.URL+"/")...).Output()
	if err != nil {
		t.Fatalf("chromium --dump-dom: %v", err)
	}
	dom := string(out)
	// 3 requests of 12 input and 3 output tokens at 10 and 20 sats per 1k:
	// 0.18 sats each, 0.54 in all; the baseline at 50 and 100 is 0.9 each.
	for _, want := range []string{
		"Spent today", "0.54 sats", "saved 2.16 sats",
		"cheap-&lt;b&gt;one&lt;/b&gt;", "pricey", // escaped, as text
		"<svg", "Daily cost (solid bars)",
		"client app", "Last 20 requests", "200",
	} {
		if !strings.Contains(dom, want) {
			t.Errorf("the rendered page lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("DOM:\n%s", dom)
	}
	if os.Getenv("ARBSTR_SCREENSHOT") != "" {
		shot := exec.CommandContext(ctx, browser, append(chromiumArgs(t), "--window-size=1200,1400",
			"--screenshot="+os.Getenv("ARBSTR_SCREENSHOT"), ta.URL+"/")...)
		if out, err := shot.CombinedOutput(); err != nil {
			t.Errorf("screenshot: %v\n%s", err, out)
		}
	}
}

func TestPageBasicAuth(t *testing.T) {
	cfg := testConfig()
	cfg.Server.AuthToken = "sekret"
	ta := newArbstr(t, cfg)
	resp, _ := ta.get(t, "/")
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("GET / without auth = %d; want 401", resp.StatusCode)
	}
	if got := resp.Header.Get("WWW-Authenticate"); got != `Basic realm="arbstr"` {
		t.Errorf("WWW-Authenticate = %q", got)
	}
	for _, tc := range []struct {
		name string
		set  func(*http.Request)
		want int
	}{
		{"basic, any user", func(r *http.Request) { r.SetBasicAuth("anyone", "sekret") }, 200},
		{"basic, wrong password", func(r *http.Request) { r.SetBasicAuth("anyone", "nope") }, 401},
		{"bearer", func(r *http.Request) { r.Header.Set("Authorization", "Bearer sekret") }, 200},
	} {
		req, _ := http.NewRequest(http.MethodGet, ta.URL+"/", nil)
		tc.set(req)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("%s: GET / = %d; want %d", tc.name, resp.StatusCode, tc.want)
		}
	}
	// Basic is for the page; the API still wants a bearer token.
	req, _ := http.NewRequest(http.MethodGet, ta.URL+"/v1/stats", nil)
	req.SetBasicAuth("anyone", "sekret")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("GET /v1/stats with Basic = %d; want 401", resp.StatusCode)
	}
}

// The command line: serve as a subcommand, -c for -config everywhere, and a
// usage error (exit 2, usage printed) for anything arbstr does not
// understand, never a start in mock mode.
func TestCommandLine(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	t.Setenv("ARBSTR_CONFIG", "")
	os.WriteFile("c.toml", []byte("[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\n"), 0o600)
	for _, tc := range []struct {
		args []string
		want string // the error
	}{
		{[]string{"srve"}, `unknown command "srve"`},
		{[]string{"c.toml"}, `unknown command "c.toml"`},
		{[]string{"-config", "c.toml", "extra"}, `serve: unexpected argument "extra"`},
		{[]string{"serve", "-c", "c.toml", "extra"}, `serve: unexpected argument "extra"`},
		{[]string{"check", "c.toml"}, `check: unexpected argument "c.toml"`},
		{[]string{"providers", "-c", "c.toml", "x"}, `providers: unexpected argument "x"`},
		{[]string{"-cofig", "c.toml"}, "serve: flag provided but not defined: -cofig"},
		{[]string{"check", "-listen", ":1"}, "check: flag provided but not defined: -listen"},
		{[]string{"serve", "-config"}, "serve: flag needs an argument: -config"},
	} {
		var stdout, stderr bytes.Buffer
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // a serve that starts by mistake stops at once
		err := run(ctx, tc.args, &stdout, &stderr)
		if _, ok := errors.AsType[*usageError](err); !ok || err.Error() != tc.want {
			t.Errorf("run(%q) = %v; want the usage error %q", tc.args, err, tc.want)
		}
		if !strings.Contains(stderr.String(), "usage:") || stdout.Len() != 0 {
			t.Errorf("run(%q) printed stdout %q, stderr %q; want the usage on stderr", tc.args, stdout.String(), stderr.String())
		}
	}

	// -h prints the usage on stdout and is no error.
	for _, args := range [][]string{{"-h"}, {"serve", "-h"}, {"check", "-help"}, {"providers", "-h"}} {
		var stdout bytes.Buffer
		if err := run(context.Background(), args, &stdout, io.Discard); err != nil || !strings.Contains(stdout.String(), "usage:") {
			t.Errorf("run(%q) = %v, stdout %q; want the usage and no error", args, err, stdout.String())
		}
	}

	// check and providers share their prologue, and its wording.
	for _, cmd := range []string{"check", "providers"} {
		err := run(context.Background(), []string{cmd}, io.Discard, io.Discard)
		const want = "no config found: pass -config FILE (or -c FILE), set ARBSTR_CONFIG, or create ./config.json or ./config.toml"
		if err == nil || err.Error() != want {
			t.Errorf("run(%q) with no config = %v; want %q", cmd, err, want)
		}
		var out bytes.Buffer
		if err := run(context.Background(), []string{cmd, "-c", "c.toml"}, &out, io.Discard); err != nil || !strings.Contains(out.String(), "p") {
			t.Errorf("run(%q, -c c.toml) = %v, %q; want the provider p", cmd, err, out.String())
		}
	}

	// serve -c FILE serves that file.
	up := newUpstream(t, jsonOK)
	os.WriteFile("c.toml", []byte(fmt.Sprintf("[[providers]]\nname = \"served\"\nurl = %q\n", up.URL)), 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	logs := &syncBuffer{}
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"serve", "-c", "c.toml", "-listen", "127.0.0.1:0"}, io.Discard, logs)
	}()
	waitListening(t, logs)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if text := logs.String(); !strings.Contains(text, "providers=served") || !strings.Contains(text, "mode=config") {
		t.Errorf("serve -c c.toml logs:\n%s", text)
	}
}

// waitLog waits until the logs hold want.
func waitLog(t *testing.T, logs *syncBuffer, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if strings.Contains(logs.String(), want) {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("logs lack %q:\n%s", want, logs.String())
}

// SIGHUP re-reads the config and never ends arbstr: a good config is read
// (and, for now, said to need a restart), a bad one is logged and changes
// nothing, and a changed database.path is said to need a restart.
func TestSIGHUPReload(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	t.Setenv("ARBSTR_CONFIG", "")
	t.Setenv("DATABASE_URL", "")
	up := newUpstream(t, jsonOK)
	config := func(db string) string {
		return fmt.Sprintf("[database]\npath = %q\n[[providers]]\nname = \"p\"\nurl = %q\n", db, up.URL)
	}
	os.WriteFile("c.toml", []byte(config("first.db")), 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	logs := &syncBuffer{}
	done := make(chan error, 1)
	go func() { done <- run(ctx, []string{"-c", "c.toml", "-listen", "127.0.0.1:0"}, io.Discard, logs) }()
	addr := waitListening(t, logs)
	self, err := os.FindProcess(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	health := func(when string) {
		t.Helper()
		resp, err := http.Get("http://" + addr + "/health")
		if err != nil {
			t.Fatalf("GET /health %s: %v", when, err)
		}
		readBody(t, resp)
		if resp.StatusCode != 200 {
			t.Errorf("GET /health %s = %d; want 200", when, resp.StatusCode)
		}
	}

	if err := self.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitLog(t, logs, `msg="reload: new config in service"`)
	health("after a reload")

	os.WriteFile("c.toml", []byte("[[providers]]\nname = \"p\"\nurl = \"ftp://x\"\n"), 0o600)
	self.Signal(syscall.SIGHUP)
	waitLog(t, logs, `level=ERROR msg="reload failed" err="c.toml:3: providers[0].url`)
	health("after a failed reload")

	os.WriteFile("c.toml", []byte(config("second.db")), 0o600)
	self.Signal(syscall.SIGHUP)
	waitLog(t, logs, `msg="reload: database.path changed; it takes effect at a restart" database=first.db new=second.db`)
	health("after a reload that needs a restart")

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run = %v; want a clean stop", err)
	}
}

// ---- Keys, memory, time and browsers ----

// clientFor returns a client that shows the response as arbstr sent it:
// no transparent decompression, and a deadline for the whole exchange.
func clientFor(timeout time.Duration) *http.Client {
	return &http.Client{Timeout: timeout, Transport: &http.Transport{DisableCompression: true}}
}

// postWith sends a chat body with extra headers through c.
func postWith(t testing.TB, c *http.Client, url, body string, header ...string) *http.Response {
	t.Helper()
	return postTo(t, c, url+"/v1/chat/completions", body, header...)
}

// onlyRow returns the ledger's single row, failing the test when there is
// not exactly one.
func onlyRow(t testing.TB, ta *testArbstr) ledgerRow {
	t.Helper()
	rows := ta.rows(t)
	if len(rows) != 1 {
		t.Fatalf("ledger has %d rows; want 1: %+v", len(rows), rows)
	}
	return rows[0]
}

// checkRow compares the fields of a ledger row that a test cares about,
// one check each. errPart is a substring the row's error must hold; ""
// means the row has no error.
func checkRow(t testing.TB, row ledgerRow, status int, success bool, provider, errPart string) {
	t.Helper()
	if row.Status != status {
		t.Errorf("row.Status = %d; want %d (row %+v)", row.Status, status, row)
	}
	if row.Success != success {
		t.Errorf("row.Success = %v; want %v (row %+v)", row.Success, success, row)
	}
	if row.Provider != provider {
		t.Errorf("row.Provider = %q; want %q", row.Provider, provider)
	}
	if errPart == "" && deref(row.Error) != "" {
		t.Errorf("deref(row.Error) = %q; want none", deref(row.Error))
	}
	if !strings.Contains(deref(row.Error), errPart) {
		t.Errorf("deref(row.Error) = %q; want it to contain %q", deref(row.Error), errPart)
	}
}

// TestEchoedKeyRedacted: a provider that echoes the key it was sent, in a
// header, an error body, an answer or a stream event, cannot hand it to the
// client; the client sees [redacted] where it stood.
func TestEchoedKeyRedacted(t *testing.T) {
	const key = "sk-echoed-secret-7f3a9"
	echoHeader := func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Request-Echo", r.Header.Get("Authorization"))
	}
	tests := []struct {
		name   string
		body   string
		status int
		h      http.HandlerFunc
	}{
		{"answer header", chatBody, 200, func(w http.ResponseWriter, r *http.Request) {
			echoHeader(w, r)
			jsonOK(w, r)
		}},
		{"400 body quoting Authorization", chatBody, 400, func(w http.ResponseWriter, r *http.Request) {
			echoHeader(w, r)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusBadRequest)
			fmt.Fprintf(w, `{"error":{"message":"unexpected header Authorization: %s","type":"invalid_request_error","code":null}}`,
				r.Header.Get("Authorization"))
		}},
		{"answer body", chatBody, 200, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, completionJSON("you sent "+r.Header.Get("Authorization"), 12, 3))
		}},
		{"stream event and header", streamBody, 200, func(w http.ResponseWriter, r *http.Request) {
			echoHeader(w, r)
			sse(w, chunkJSON("you sent "+r.Header.Get("Authorization")), finishChunk, usageChunk(1, 1), "[DONE]")
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up := newUpstream(t, tt.h)
			p := prov("p", up.URL, 1, 1)
			p.APIKey = key
			ta := newArbstr(t, testConfig(p))
			resp := postWith(t, clientFor(10*time.Second), ta.URL, tt.body)
			out := readBody(t, resp)
			if resp.StatusCode != tt.status {
				t.Fatalf("status = %d; want %d: %s", resp.StatusCode, tt.status, out)
			}
			if strings.Contains(out, key) {
				t.Errorf("the key reached the client in the body: %s", out)
			}
			if !strings.Contains(out+fmt.Sprint(resp.Header), redacted) {
				t.Errorf("no %s in the response: %v %s", redacted, resp.Header, out)
			}
			for name, vv := range resp.Header {
				for _, v := range vv {
					if strings.Contains(v, key) {
						t.Errorf("the key reached the client in header %s: %q", name, v)
					}
				}
			}
			row := onlyRow(t, ta)
			if strings.Contains(deref(row.Error), key) {
				t.Errorf("the key is in the ledger: %q", deref(row.Error))
			}
			if logs := ta.logged(t); strings.Contains(logs, key) {
				t.Errorf("the key is in the logs:\n%s", logs)
			}
		})
	}
}

// TestRewrittenAnswerHeaders: an answer that arbstr spliced is not the
// bytes the provider's Content-Encoding and Content-Length described, so
// neither header goes out as the provider sent it.
func TestRewrittenAnswerHeaders(t *testing.T) {
	for _, enc := range []string{"identity", "gzip"} {
		t.Run(enc, func(t *testing.T) {
			answer := completionJSON("Hello world", 12, 3)
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				// A provider that labels its plain body, rightly or not.
				w.Header().Set("Content-Encoding", enc)
				w.Header().Set("Content-Length", strconv.Itoa(len(answer)))
				io.WriteString(w, answer)
			})
			ta := newArbstr(t, testConfig(prov("p", up.URL, 1, 1)))
			resp := postWith(t, clientFor(10*time.Second), ta.URL, chatBody)
			out := readBody(t, resp)
			if resp.StatusCode != 200 {
				t.Fatalf("status = %d; want 200: %s", resp.StatusCode, out)
			}
			if ce, ok := resp.Header["Content-Encoding"]; ok {
				t.Errorf("Content-Encoding = %q; want none for a rewritten body", ce)
			}
			if resp.ContentLength != int64(len(out)) {
				t.Errorf("Content-Length = %d; want %d, the length of the body sent", resp.ContentLength, len(out))
			}
			if !strings.Contains(out, `"arbstr_provider":"p"`) {
				t.Errorf("body without arbstr_provider: %s", out)
			}
		})
	}
}

// writeLarge writes prefix and then n bytes of 'a' in 32 KiB writes, the
// way a provider streams a huge answer, until the reader goes away.
func writeLarge(w http.ResponseWriter, prefix string, n int64) {
	chunk := bytes.Repeat([]byte("a"), 32<<10)
	if _, err := io.WriteString(w, prefix); err != nil {
		return
	}
	for sent := int64(0); sent < n; sent += int64(len(chunk)) {
		if _, err := w.Write(chunk); err != nil {
			return
		}
	}
}

// largeAnswer is a provider whose answer is n bytes, as one JSON body or as
// one SSE event, as the request asks.
func largeAnswer(n int64, withLength bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if bytes.Contains(mustRead(r), []byte(`"stream":true`)) {
			w.Header().Set("Content-Type", "text/event-stream")
			writeLarge(w, `data: {"choices":[{"delta":{"content":"`, n)
			return
		}
		prefix := `{"choices":[{"message":{"content":"`
		w.Header().Set("Content-Type", "application/json")
		if withLength {
			w.Header().Set("Content-Length", strconv.FormatInt(int64(len(prefix))+n+4, 10))
		}
		writeLarge(w, prefix, n)
	}
}

// TestAnswerTooLarge: an answer or an event over the bound is a failure of
// the provider, named "too large" in the 502, and arbstr goes on serving.
func TestAnswerTooLarge(t *testing.T) {
	// The answer is a plain 502 only if the client has not had its
	// waiting headers yet; reading 16 MiB may take a while under -race.
	after := waitHeadersAfter
	waitHeadersAfter = time.Minute
	t.Cleanup(func() { waitHeadersAfter = after })
	tests := []struct {
		name       string
		body       string
		withLength bool
		bug        string
	}{
		{"answer without length", chatBody, false, ""},
		{"answer with length", chatBody, true, ""},
		{"stream event", streamBody, false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.bug != "" {
				t.Skip(tt.bug)
			}
			up := newUpstream(t, largeAnswer(20<<20, tt.withLength))
			cfg := testConfig(prov("p", up.URL, 1, 1))
			cfg.Server.MaxAttempts = 1
			cfg.Server.UpstreamTimeoutSecs = 30
			ta := newArbstr(t, cfg)
			resp := postWith(t, clientFor(60*time.Second), ta.URL, tt.body)
			out := readBody(t, resp)
			if resp.StatusCode != http.StatusBadGateway {
				t.Fatalf("status = %d; want 502: %.300s", resp.StatusCode, out)
			}
			_, code, msg := apiErr(t, out)
			if code != "all_providers_failed" {
				t.Errorf("code = %q; want all_providers_failed", code)
			}
			if !strings.Contains(msg, "too large") {
				t.Errorf("message = %q; want it to say too large", msg)
			}
			checkRow(t, onlyRow(t, ta), http.StatusBadGateway, false, "p", "too large")
			if resp, _ := ta.get(t, "/v1/models"); resp.StatusCode != 200 {
				t.Errorf("GET /v1/models after a large answer = %d; want 200", resp.StatusCode)
			}
			if free := answerMemory.free.Load(); free != answerMemoryCap {
				t.Errorf("answer memory free after the request = %d; want %d (all given back)", free, answerMemoryCap)
			}
		})
	}
}

// TestManyLargeAnswers: sixteen requests at once, each answered with
// 100 MB, all get an error answer, arbstr goes on serving, and the memory
// for answers is all given back afterwards.
func TestManyLargeAnswers(t *testing.T) {
	up := newUpstream(t, largeAnswer(100<<20, false))
	cfg := testConfig(prov("p", up.URL, 1, 1))
	cfg.Server.MaxAttempts = 1
	cfg.Server.UpstreamTimeoutSecs = 60
	ta := newArbstr(t, cfg)
	const n = 16
	type result struct {
		status int
		body   string
		err    error
	}
	results := make([]result, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			resp, err := clientFor(2*time.Minute).Post(ta.URL+"/v1/chat/completions", "application/json", strings.NewReader(chatBody))
			if err != nil {
				results[i].err = err
				return
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			results[i] = result{resp.StatusCode, string(b), err}
		})
	}
	wg.Wait()
	for i, r := range results {
		if r.err != nil {
			t.Errorf("request %d: %v", i, r.err)
			continue
		}
		if r.status != http.StatusBadGateway {
			t.Errorf("request %d: status = %d; want 502: %.300s", i, r.status, r.body)
			continue
		}
		apiErr(t, r.body)
	}
	t.Run("named too large", func(t *testing.T) {
		for i, r := range results {
			if _, _, msg := apiErr(t, r.body); !strings.Contains(msg, "too large") {
				t.Errorf("request %d: message = %q; want it to say too large", i, msg)
			}
		}
	})
	if rows := ta.rows(t); len(rows) != n {
		t.Errorf("ledger has %d rows; want %d", len(rows), n)
	}
	if resp, _ := ta.get(t, "/v1/models"); resp.StatusCode != 200 {
		t.Errorf("GET /v1/models after the large answers = %d; want 200", resp.StatusCode)
	}
	if free := answerMemory.free.Load(); free != answerMemoryCap {
		t.Errorf("answer memory free afterwards = %d; want %d (all given back)", free, answerMemoryCap)
	}
}

// trickle is a provider that sends its stream's headers and then only
// comments, one every 100 ms, until the caller leaves.
func trickle(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	stop := time.After(30 * time.Second)
	for {
		io.WriteString(w, ": x\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-r.Context().Done():
			return
		case <-stop:
			return
		case <-tick.C:
		}
	}
}

// stallAfterFirst is a provider that sends one chunk and then nothing until
// the caller leaves.
func stallAfterFirst(w http.ResponseWriter, r *http.Request) {
	sse(w, chunkJSON("Hello"))
	select {
	case <-r.Context().Done():
	case <-time.After(30 * time.Second):
	}
}

// TestStreamDeadlines: a stream's first data event must come within the
// upstream timeout of the attempt's start, comments or not; after it, the
// gap between data events is bounded by the same timeout.
func TestStreamDeadlines(t *testing.T) {
	tests := []struct {
		name        string
		handlers    []http.HandlerFunc
		status      int
		code        string // of the error answer, or of the stream's last data line
		done        bool   // the stream ends with [DONE]
		rowStatus   int
		rowSuccess  bool
		rowProvider string
		rowErr      string
	}{
		{"comments only, alone", []http.HandlerFunc{trickle}, 504, "upstream_timeout", false, 504, false, "p0", "timeout"},
		{"comments only, then another provider", []http.HandlerFunc{trickle, streamOK}, 200, "", true, 200, true, "p1", ""},
		{"silence after the first event", []http.HandlerFunc{stallAfterFirst}, 200, "stream_interrupted", false, 200, false, "p0", "no data"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var provs []ProviderConfig
			for i, h := range tt.handlers {
				up := newUpstream(t, h)
				provs = append(provs, prov(fmt.Sprintf("p%d", i), up.URL, float64(i+1), float64(i+1)))
			}
			cfg := testConfig(provs...)
			cfg.Server.UpstreamTimeoutSecs = 1
			cfg.Server.MaxAttempts = len(provs)
			ta := newArbstr(t, cfg)
			resp := postWith(t, clientFor(20*time.Second), ta.URL, streamBody)
			out := readBody(t, resp)
			if resp.StatusCode != tt.status {
				t.Fatalf("status = %d; want %d: %s", resp.StatusCode, tt.status, out)
			}
			if got := strings.HasSuffix(out, "data: [DONE]\n\n"); got != tt.done {
				t.Errorf("stream ends with [DONE] = %v; want %v:\n%s", got, tt.done, out)
			}
			if tt.code != "" {
				if _, code, _ := apiErr(t, lastData(out)); code != tt.code {
					t.Errorf("error code = %q; want %q:\n%s", code, tt.code, out)
				}
			}
			checkRow(t, onlyRow(t, ta), tt.rowStatus, tt.rowSuccess, tt.rowProvider, tt.rowErr)
		})
	}
}

// lastData returns the data of the last data line of an event stream, or
// the whole text when it is not one (a plain JSON error).
func lastData(out string) string {
	i := strings.LastIndex(out, "\ndata: ")
	if i < 0 {
		if rest, ok := strings.CutPrefix(out, "data: "); ok {
			return strings.TrimSpace(rest)
		}
		return out
	}
	return strings.TrimSpace(out[i+len("\ndata: "):])
}

// waitFast makes a streaming request wait only 100 ms for its first event
// before it gets its headers, with a keep-alive every 100 ms, for the rest
// of the test. A test that calls it must not run in parallel.
func waitFast(t *testing.T) {
	after, every := waitHeadersAfter, keepAliveEvery
	waitHeadersAfter, keepAliveEvery = 100*time.Millisecond, 100*time.Millisecond
	t.Cleanup(func() { waitHeadersAfter, keepAliveEvery = after, every })
}

// heldThen is a provider that reads the request, waits until release is
// closed (or the caller leaves), then answers with h.
func heldThen(release <-chan struct{}, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
			return
		case <-time.After(30 * time.Second):
			return
		}
		h(w, r)
	}
}

// TestStreamsThatWait: a streaming client whose first event is slow gets its
// headers and keep-alive comments; a provider that fails meanwhile is still
// replaced by the next, and an error after the headers is the stream's last
// data line, recorded with the status it would have had.
func TestStreamsThatWait(t *testing.T) {
	waitFast(t)
	badRequestBody := `{"error":{"message":"max_tokens is too large","type":"invalid_request_error","code":null}}`
	tests := []struct {
		name        string
		first       http.HandlerFunc // after the test releases it
		second      http.HandlerFunc // nil: a single provider
		timeout     int              // upstream_timeout_secs; 0 for 10
		wantDone    bool
		wantCode    string // of the last data line when the stream fails
		wantMessage string // part of the last data line when the stream fails
		rowStatus   int
		rowSuccess  bool
		rowProvider string
		rowErr      string
	}{
		{name: "500, then another provider", first: statusHandler(500), second: streamOK,
			wantDone: true, rowStatus: 200, rowSuccess: true, rowProvider: "b"},
		{name: "dropped connection, then another provider", first: dropConn, second: streamOK,
			wantDone: true, rowStatus: 200, rowSuccess: true, rowProvider: "b"},
		{name: "every provider fails", first: statusHandler(500), second: statusHandler(503),
			wantCode: "all_providers_failed", rowStatus: 502, rowProvider: "b", rowErr: "HTTP 503"},
		{name: "timeout", first: trickle, timeout: 1,
			wantCode: "upstream_timeout", rowStatus: 504, rowProvider: "a", rowErr: "timeout"},
		{name: "400 passed on", first: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusBadRequest)
			io.WriteString(w, badRequestBody)
		}, second: streamOK, wantMessage: "max_tokens is too large", rowStatus: 400, rowProvider: "a", rowErr: "HTTP 400"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			release := make(chan struct{})
			provs := []ProviderConfig{prov("a", newUpstream(t, heldThen(release, tt.first)).URL, 1, 1)}
			if tt.second != nil {
				provs = append(provs, prov("b", newUpstream(t, tt.second).URL, 2, 2))
			}
			cfg := testConfig(provs...)
			cfg.Server.MaxAttempts = len(provs)
			cfg.Server.UpstreamTimeoutSecs = 10
			if tt.timeout > 0 {
				cfg.Server.UpstreamTimeoutSecs = tt.timeout
			}
			ta := newArbstr(t, cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, ta.URL+"/v1/chat/completions", strings.NewReader(streamBody))
			req.Header.Set("Content-Type", "application/json")
			// The first provider is held: the headers can only be the wait's.
			resp, err := testClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			checkWaitHeaders(t, resp)
			br := bufio.NewReader(resp.Body)
			for seen := 0; seen < 2; {
				line, err := br.ReadString('\n')
				if err != nil {
					t.Fatalf("reading the keep-alives: %v", err)
				}
				if line == ": arbstr waiting\n" {
					seen++
				} else if line != "\n" && !strings.HasPrefix(line, ":") {
					t.Fatalf("before the release: %q; want only keep-alive comments", line)
				}
			}
			close(release)
			restBytes, err := io.ReadAll(br)
			if err != nil {
				t.Fatalf("reading the stream: %v", err)
			}
			checkWaitedStream(t, string(restBytes), tt.wantDone, tt.wantCode, tt.wantMessage, tt.rowProvider)
			checkRow(t, onlyRow(t, ta), tt.rowStatus, tt.rowSuccess, tt.rowProvider, tt.rowErr)
		})
	}
}

// checkWaitHeaders checks the headers a waiting stream gets.
func checkWaitHeaders(t *testing.T, resp *http.Response) {
	t.Helper()
	if resp.StatusCode != 200 {
		t.Errorf("status = %d; want 200", resp.StatusCode)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("Content-Type = %q; want text/event-stream", ct)
	}
	if id := resp.Header.Get("X-Arbstr-Request-Id"); !strings.HasPrefix(id, "arb_") {
		t.Errorf("X-Arbstr-Request-Id = %q; want an arb_ id", id)
	}
}

// checkWaitedStream checks what a waiting client read after the provider
// was released: comments only until a provider's stream, then either the
// whole stream with its summary, or an error as the last data line.
func checkWaitedStream(t *testing.T, rest string, wantDone bool, wantCode, wantMessage, provider string) {
	t.Helper()
	first := strings.Index(rest, "data: ")
	if first < 0 {
		t.Fatalf("no data line after the wait:\n%s", rest)
	}
	for _, line := range strings.Split(rest[:first], "\n") {
		// Keep-alives: arbstr's, or the provider's comments passed on.
		if line != "" && !strings.HasPrefix(line, ":") {
			t.Errorf("before the first data line: %q; want only keep-alive comments", line)
		}
	}
	if got := strings.HasSuffix(rest, "data: [DONE]\n\n"); got != wantDone {
		t.Errorf("stream ends with [DONE] = %v; want %v:\n%s", got, wantDone, rest)
	}
	if wantDone {
		if !strings.Contains(rest, `: arbstr {`) {
			t.Errorf("no ': arbstr' summary:\n%s", rest)
		}
		if !strings.Contains(rest, `"provider":"`+provider+`"`) {
			t.Errorf("the summary does not name provider %q:\n%s", provider, rest)
		}
		if !strings.Contains(rest, "Hello") {
			t.Errorf("the provider's chunks are missing:\n%s", rest)
		}
		return
	}
	last := lastData(rest)
	if wantCode != "" {
		if _, code, _ := apiErr(t, last); code != wantCode {
			t.Errorf("last data line code = %q; want %q", code, wantCode)
		}
	}
	if !strings.Contains(last, wantMessage) {
		t.Errorf("last data line = %s; want it to contain %q", last, wantMessage)
	}
}

// raceEnabled reports whether the test binary was built with -race.
func raceEnabled() bool {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range info.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// rawExchange sends request as written on a new TCP connection to addr,
// half-closing the connection's write side after it when halfClose is set,
// and reads one response, all within 15 seconds.
func rawExchange(t *testing.T, addr, request string, halfClose bool) (*http.Response, string) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.WriteString(conn, request); err != nil {
		t.Fatal(err)
	}
	if halfClose {
		if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the response body: %v", err)
	}
	return resp, string(b)
}

// chatRequestText is a whole HTTP/1.1 chat request with its Content-Length.
func chatRequestText(body string) string {
	return "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" +
		"Content-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body
}

// TestHalfClosedClient: a client that sends a whole request and then closes
// its side of the connection is still reading, and gets a real answer or an
// error in OpenAI's shape, never an empty 200.
func TestHalfClosedClient(t *testing.T) {
	slow := func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
			return
		case <-time.After(300 * time.Millisecond):
		}
		jsonOK(w, r)
	}
	tests := []struct {
		name string
		body string
		h    http.HandlerFunc
	}{
		{"answer", chatBody, jsonOK},
		{"slow answer", chatBody, slow},
		{"stream", streamBody, streamOK},
		{"slow stream", streamBody, func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-r.Context().Done():
				return
			case <-time.After(300 * time.Millisecond):
			}
			streamOK(w, r)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up := newUpstream(t, tt.h)
			ta := newArbstr(t, testConfig(prov("p", up.URL, 1, 1)))
			resp, out := rawExchange(t, ta.Listener.Addr().String(), chatRequestText(tt.body), true)
			t.Logf("status %d, %d bytes", resp.StatusCode, len(out))
			if out == "" {
				t.Fatalf("status %d with an empty body", resp.StatusCode)
			}
			switch {
			case resp.StatusCode == 200 && strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream"):
				if !strings.HasSuffix(out, "data: [DONE]\n\n") {
					t.Errorf("a 200 stream that did not end with [DONE]:\n%s", out)
				}
			case resp.StatusCode == 200:
				var c struct {
					Choices []json.RawMessage `json:"choices"`
				}
				if err := json.Unmarshal([]byte(out), &c); err != nil {
					t.Errorf("a 200 that is not JSON: %v: %s", err, out)
				}
				if len(c.Choices) == 0 {
					t.Errorf("a 200 that is not a completion: %s", out)
				}
			default:
				_, code, _ := apiErr(t, out)
				if resp.StatusCode == statusClientClosed {
					expect(t, "error code of the 499", code, "client_closed_request")
					checkRow(t, onlyRow(t, ta), statusClientClosed, false, "p", "client disconnected")
				}
			}
		})
	}
}

// TestBodyTimeout: a request body that never finishes is answered 408
// after server.body_timeout_secs.
func TestBodyTimeout(t *testing.T) {
	var calls atomic.Int32
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		jsonOK(w, r)
	})
	cfg := testConfig(prov("p", up.URL, 1, 1))
	cfg.Server.BodyTimeoutSecs = 1
	ta := newArbstr(t, cfg)
	request := "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" +
		"Content-Length: 1000\r\n\r\n" + `{"model":"`
	resp, out := rawExchange(t, ta.Listener.Addr().String(), request, false)
	if resp.StatusCode != http.StatusRequestTimeout {
		t.Fatalf("status = %d; want 408: %s", resp.StatusCode, out)
	}
	typ, code, _ := apiErr(t, out)
	if typ != "invalid_request_error" {
		t.Errorf("type = %q; want invalid_request_error", typ)
	}
	if code != "request_timeout" {
		t.Errorf("code = %q; want request_timeout", code)
	}
	if n := calls.Load(); n != 0 {
		t.Errorf("upstream calls = %d; want 0", n)
	}
}

// TestOrigin: web pages are refused unless their origin is listed; a listed
// origin gets CORS headers and its preflight answered; requests without an
// Origin are not concerned.
func TestOrigin(t *testing.T) {
	const listed, unlisted = "http://localhost:3000", "https://evil.example"
	tests := []struct {
		name        string
		method      string
		path        string
		header      []string
		status      int
		code        string // of a refusal
		allowOrigin string
		calls       int32 // upstream calls
		rows        int
	}{
		{"unlisted POST", "POST", "/v1/chat/completions", []string{"Origin", unlisted, "Content-Type", "application/json"}, 403, "origin_not_allowed", "", 0, 0},
		{"unlisted POST without Content-Type", "POST", "/v1/chat/completions", []string{"Origin", unlisted}, 403, "origin_not_allowed", "", 0, 0},
		{"unlisted POST as text/plain", "POST", "/v1/chat/completions", []string{"Origin", unlisted, "Content-Type", "text/plain"}, 403, "origin_not_allowed", "", 0, 0},
		{"unlisted GET", "GET", "/v1/requests", []string{"Origin", unlisted}, 403, "origin_not_allowed", "", 0, 0},
		{"unlisted preflight", "OPTIONS", "/v1/chat/completions", []string{"Origin", unlisted,
			"Access-Control-Request-Method", "POST", "Access-Control-Request-Headers", "authorization, content-type"}, 403, "origin_not_allowed", "", 0, 0},
		{"listed POST", "POST", "/v1/chat/completions", []string{"Origin", listed, "Content-Type", "application/json"}, 200, "", listed, 1, 1},
		{"listed preflight", "OPTIONS", "/v1/chat/completions", []string{"Origin", listed,
			"Access-Control-Request-Method", "POST", "Access-Control-Request-Headers", "authorization, content-type"}, 204, "", listed, 0, 0},
		{"listed GET", "GET", "/v1/requests", []string{"Origin", listed}, 200, "", listed, 0, 0},
		{"no Origin", "POST", "/v1/chat/completions", []string{"Content-Type", "application/json"}, 200, "", "", 1, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int32
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				calls.Add(1)
				jsonOK(w, r)
			})
			cfg := testConfig(prov("p", up.URL, 1, 1))
			cfg.Server.AllowedOrigins = []string{listed}
			ta := newArbstr(t, cfg)
			var body io.Reader
			if tt.method == "POST" {
				body = strings.NewReader(chatBody)
			}
			req, err := http.NewRequest(tt.method, ta.URL+tt.path, body)
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i+1 < len(tt.header); i += 2 {
				req.Header.Set(tt.header[i], tt.header[i+1])
			}
			resp, err := clientFor(10 * time.Second).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			out := readBody(t, resp)
			if resp.StatusCode != tt.status {
				t.Fatalf("status = %d; want %d: %s", resp.StatusCode, tt.status, out)
			}
			if tt.code != "" {
				typ, code, _ := apiErr(t, out)
				if typ != "permission_error" {
					t.Errorf("type = %q; want permission_error", typ)
				}
				if code != tt.code {
					t.Errorf("code = %q; want %q", code, tt.code)
				}
			}
			checkCORS(t, resp, tt.method, tt.allowOrigin)
			if n := calls.Load(); n != tt.calls {
				t.Errorf("upstream calls = %d; want %d", n, tt.calls)
			}
			if rows := ta.rows(t); len(rows) != tt.rows {
				t.Errorf("ledger has %d rows; want %d: %+v", len(rows), tt.rows, rows)
			}
		})
	}
}

// checkCORS checks the CORS headers of a response: none when allowOrigin
// is empty, else that origin allowed, and for a preflight the methods and
// headers a browser asked for.
func checkCORS(t *testing.T, resp *http.Response, method, allowOrigin string) {
	t.Helper()
	if got := resp.Header.Get("Access-Control-Allow-Origin"); got != allowOrigin {
		t.Errorf("Access-Control-Allow-Origin = %q; want %q", got, allowOrigin)
	}
	if allowOrigin == "" {
		return
	}
	if vary := resp.Header.Values("Vary"); !slices.Contains(vary, "Origin") {
		t.Errorf("Vary = %q; want it to include Origin", vary)
	}
	if method != "OPTIONS" {
		return
	}
	if m := resp.Header.Get("Access-Control-Allow-Methods"); !strings.Contains(m, "POST") {
		t.Errorf("Access-Control-Allow-Methods = %q; want it to include POST", m)
	}
	allowHeaders := strings.ToLower(resp.Header.Get("Access-Control-Allow-Headers"))
	for _, h := range []string{"authorization", "content-type"} {
		if !strings.Contains(allowHeaders, h) {
			t.Errorf("Access-Control-Allow-Headers = %q; want it to include %s", allowHeaders, h)
		}
	}
}

// TestHost: without server.auth_token, only loopback names and
// server.allowed_hosts are served, so that a page that rebinds its own name
// to 127.0.0.1 cannot read arbstr; with a token, any Host is served.
func TestHost(t *testing.T) {
	const token = "local-token-1"
	tests := []struct {
		name    string
		host    string
		token   string // server.auth_token, also sent by the client
		allowed []string
		status  int
	}{
		{"rebinding page", "evil.example:8080", "", nil, 403},
		{"rebinding page without port", "evil.example", "", nil, 403},
		{"localhost", "localhost:8080", "", nil, 200},
		{"127.0.0.1", "127.0.0.1:9", "", nil, 200},
		{"[::1]", "[::1]:8080", "", nil, 200},
		{"allowed name, any port", "box.lan:8080", "", []string{"box.lan"}, 200},
		{"allowed name, no port", "box.lan", "", []string{"box.lan"}, 200},
		{"allowed name with port", "box.lan:8080", "", []string{"box.lan:8080"}, 200},
		{"allowed name, other port", "box.lan:9090", "", []string{"box.lan:8080"}, 403},
		{"with a token", "evil.example:8080", token, nil, 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.Server.AuthToken = tt.token
			cfg.Server.AllowedHosts = tt.allowed
			ta := newArbstr(t, cfg)
			req, err := http.NewRequest(http.MethodGet, ta.URL+"/v1/requests", nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Host = tt.host
			if tt.token != "" {
				req.Header.Set("Authorization", "Bearer "+tt.token)
			}
			resp, err := clientFor(10 * time.Second).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			out := readBody(t, resp)
			if resp.StatusCode != tt.status {
				t.Fatalf("GET /v1/requests with Host %q = %d; want %d: %s", tt.host, resp.StatusCode, tt.status, out)
			}
			if tt.status != 403 {
				return
			}
			typ, code, _ := apiErr(t, out)
			if typ != "permission_error" {
				t.Errorf("type = %q; want permission_error", typ)
			}
			if code != "host_not_allowed" {
				t.Errorf("code = %q; want host_not_allowed", code)
			}
		})
	}
}

// TestPeakMemory runs arbstr in a child process (this test binary again,
// with ARBSTR_TEST_CHILD=1), sends it sixteen requests at once whose
// provider answers 100 MB each, and reads the child's peak resident memory
// (VmHWM) from /proc: the bounds on answers being read keep it under 100 MB.
func TestPeakMemory(t *testing.T) {
	if os.Getenv("ARBSTR_TEST_CHILD") == "1" {
		err := run(context.Background(), []string{"-config", os.Getenv("ARBSTR_TEST_CONFIG")}, os.Stdout, os.Stderr)
		t.Fatalf("run returned: %v", err) // it serves until the parent kills it
	}
	if runtime.GOOS != "linux" {
		t.Skip("VmHWM is read from /proc/<pid>/status")
	}
	if raceEnabled() {
		t.Skip("under -race the detector's shadow memory is part of the peak")
	}
	up := newUpstream(t, largeAnswer(100<<20, false))
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.json")
	cfgText := fmt.Sprintf(`{"server":{"listen":"127.0.0.1:0","max_attempts":1,"upstream_timeout_secs":60},
		"database":{"path":%q},"providers":[{"name":"p","url":%q}]}`, filepath.Join(dir, "arbstr.db"), up.URL+"/v1")
	if err := os.WriteFile(cfgPath, []byte(cfgText), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestPeakMemory$")
	cmd.Env = append(os.Environ(), "ARBSTR_TEST_CHILD=1", "ARBSTR_TEST_CONFIG="+cfgPath)
	logs := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	base := "http://" + waitListening(t, logs)

	const n = 16
	statuses := make([]int, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			resp, err := clientFor(2*time.Minute).Post(base+"/v1/chat/completions", "application/json", strings.NewReader(chatBody))
			if err != nil {
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			statuses[i] = resp.StatusCode
		})
	}
	wg.Wait()
	for i, status := range statuses {
		if status != http.StatusBadGateway {
			t.Errorf("request %d: status = %d; want 502", i, status)
		}
	}
	resp, err := clientFor(10 * time.Second).Get(base + "/v1/models")
	if err != nil {
		t.Fatalf("arbstr did not survive the large answers: %v\n%s", err, logs.String())
	}
	resp.Body.Close()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	kb := vmHWM(t, string(status))
	t.Logf("peak resident memory of arbstr: %d MB", kb>>10)
	if kb >= 100<<10 {
		t.Errorf("VmHWM = %d kB; want under 100 MB", kb)
	}
}

// vmHWM returns the VmHWM line of a /proc/<pid>/status, in kB.
func vmHWM(t *testing.T, status string) int64 {
	t.Helper()
	for line := range strings.Lines(status) {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				t.Fatalf("VmHWM line %q: %v", line, err)
			}
			return kb
		}
	}
	t.Fatalf("no VmHWM in /proc status:\n%s", status)
	return 0
}

// expect reports a value that differs from the one wanted, naming it.
func expect[T comparable](t testing.TB, what string, got, want T) {
	t.Helper()
	if got != want {
		t.Errorf("%s = %v; want %v", what, got, want)
	}
}

// expectContains reports a text that lacks a part it should hold.
func expectContains(t testing.TB, what, s, part string) {
	t.Helper()
	if !strings.Contains(s, part) {
		t.Errorf("%s does not contain %q:\n%s", what, part, s)
	}
}

// sendWithin sends on ch, failing the test when no one receives within
// 10 seconds.
func sendWithin(t testing.TB, ch chan<- struct{}) {
	t.Helper()
	select {
	case ch <- struct{}{}:
	case <-time.After(10 * time.Second):
		t.Fatal("no receiver within 10 s")
	}
}

// receiveWithin receives from ch, failing the test when nothing comes
// within 10 seconds; what names the awaited value.
func receiveWithin[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("no %s within 10 s", what)
	}
	var zero T
	return zero
}

// waitFor polls cond every millisecond, failing the test when it is not
// true within 10 seconds; what names the awaited condition.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10 s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// ---- What providers charge ----

// TestReportedCharge: a provider's reported charge is the request's cost,
// the price list's is kept as the quote, and both reach the client.
func TestReportedCharge(t *testing.T) {
	tests := []struct {
		name     string
		handler  http.HandlerFunc
		body     string
		wantCost string // x-arbstr-cost-sats, or the : arbstr comment's cost
	}{
		{"usage.cost.total_msats", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, `{"id":"c","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":1000,"cost":{"total_msats":2300}}}`)
		}, chatBody, "2.3"},
		{"X-Routstr-Cost-Msats", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Routstr-Cost-Msats", "2300")
			io.WriteString(w, completionJSON("hi", 1000, 1000))
		}, chatBody, "2.3"},
		{"usage.cost_sats", func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, `{"id":"c","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":1000,"cost_sats":2.3}}`)
		}, chatBody, "2.3"},
		{"stream usage chunk", func(w http.ResponseWriter, r *http.Request) {
			sse(w, chunkJSON("hi"), finishChunk,
				`{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":1000,"cost":{"total_msats":2300}}}`, "[DONE]")
		}, streamBody, "2.3"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := newUpstream(t, tc.handler)
			ta := newArbstr(t, testConfig(prov("p", up.URL, 1, 1))) // quote: 2 sats
			resp := ta.post(t, "/v1/chat/completions", tc.body)
			out := readBody(t, resp)
			if tc.body == chatBody {
				expect(t, "x-arbstr-cost-sats", resp.Header.Get("X-Arbstr-Cost-Sats"), tc.wantCost)
			} else {
				expectContains(t, "the : arbstr comment", out, `"cost_sats":`+tc.wantCost+`,"cost_source":"provider"`)
			}
			r := onlyRow(t, ta)
			expect(t, "cost", deref(r.Cost), msats(2300))
			expect(t, "quoted cost", deref(r.QuotedCost), msats(2000))
			expect(t, "cost source", deref(r.CostSource), "provider")
			if ratio := ta.srv.current().router.byName["p"].chargeRatio(); ratio != 1 {
				t.Errorf("charge ratio after one report = %g; want 1 until there are 5", ratio)
			}
		})
	}
}

// TestOverchargerStopsWinning: a provider that lists the lowest price but
// bills 15% more loses to one 10% dearer once its charge ratio is known.
func TestOverchargerStopsWinning(t *testing.T) {
	billing := func(factor float64) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			// 1000 input and 1000 output tokens at the listed 1 sat per 1k: 2000 msat.
			fmt.Fprintf(w, `{"id":"c","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":1000,"cost":{"total_msats":%d}}}`,
				int(2000*factor))
		}
	}
	over := newUpstream(t, billing(1.15))
	honest := newUpstream(t, billing(1.10))
	ta := newArbstr(t, testConfig(prov("advertises-low", over.URL, 1, 1), prov("honest", honest.URL, 1.1, 1.1)))
	body := `{"model":"m","max_tokens":1000,"messages":[{"role":"user","content":"` + strings.Repeat("abcd", 1000) + `"}]}`
	var last string
	for range 8 {
		resp := ta.post(t, "/v1/chat/completions", body)
		readBody(t, resp)
		last = resp.Header.Get("X-Arbstr-Provider")
	}
	expect(t, "provider after 8 requests", last, "honest")
	rows := ta.rows(t)
	var over8 int
	for _, r := range rows {
		if r.Provider == "advertises-low" {
			over8++
		}
	}
	expect(t, "requests sent to the overcharger before its ratio counted", over8, 5)
	_, b := ta.get(t, "/v1/stats")
	var st struct {
		Total struct {
			Overcharge float64 `json:"overcharge_sats"`
		} `json:"total"`
	}
	json.Unmarshal(b, &st)
	// 5 × 0.3 sats over the quote at the overcharger, 3 × 0 at the honest one
	// (its quote is its own dearer list).
	expect(t, "overcharge_sats", st.Total.Overcharge, 1.5)
}

// TestPaymentRequiredZeroesBalance: a 402 sets a polled balance to 0, so
// that the next request skips the provider; a provider whose balance is
// never read is left to its circuit breaker instead, or the 0 would stand
// for ever.
func TestPaymentRequiredZeroesBalance(t *testing.T) {
	for _, tc := range []struct {
		name     string
		polled   bool
		attempts []string
	}{
		{"balance read", true, []string{"2", "1"}},
		{"balance never read", false, []string{"2", "2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			broke := newUpstream(t, statusHandler(http.StatusPaymentRequired))
			good := newUpstream(t, jsonOK)
			pc := prov("broke", broke.URL, 1, 1)
			if tc.polled {
				pc.Discover, pc.APIKey, pc.Models = true, "sk-broke", []string{"m"}
			}
			ta := newArbstr(t, testConfig(pc, prov("good", good.URL, 2, 2)))
			for i, want := range tc.attempts {
				resp := ta.post(t, "/v1/chat/completions", chatBody)
				readBody(t, resp)
				expect(t, fmt.Sprintf("request %d: provider", i), resp.Header.Get("X-Arbstr-Provider"), "good")
				expect(t, fmt.Sprintf("request %d: attempts", i), resp.Header.Get("X-Arbstr-Attempts"), want)
			}
		})
	}
}

// ---- Clients, budgets and rate limits through the proxy ----

func clientsConfig(upURL string) *Config {
	cfg := testConfig(prov("p", upURL, 1000, 1000)) // 1 sat a token either way
	cfg.Server.AuthToken = "operator"
	cfg.Policies.Rules = []PolicyRule{
		{Name: "code", Keywords: []string{"code"}},
		{Name: "chat", Keywords: []string{"hello", "code"}},
	}
	cfg.Clients = []ClientConfig{
		{Name: "app", Token: "app-token", Policies: []string{"chat"}, BudgetSatsPerDay: 100},
		{Name: "bot", Token: "bot-token", RateLimitRPM: 2},
	}
	return cfg
}

func TestClientAuth(t *testing.T) {
	up := newUpstream(t, jsonOK)
	cfg := clientsConfig(up.URL)
	cfg.Clients[0].BudgetSatsPerDay = 1e6 // room for the default worst case of 4096 output tokens
	ta := newArbstr(t, cfg)
	tests := []struct {
		method, path, token string
		want                int
	}{
		{"POST", "/v1/chat/completions", "app-token", 200},
		{"POST", "/v1/chat/completions", "operator", 200},
		{"POST", "/v1/chat/completions", "nope", 401},
		{"POST", "/v1/chat/completions", "", 401},
		{"POST", "/v1/cost", "bot-token", 200},
		{"GET", "/v1/models", "bot-token", 200},
		{"GET", "/v1/budgets", "app-token", 200},
		{"GET", "/v1/stats", "app-token", 401},
		{"GET", "/v1/stats", "operator", 200},
		{"GET", "/providers", "bot-token", 401},
		{"GET", "/metrics", "bot-token", 401},
		{"GET", "/health", "", 200},
	}
	for _, tc := range tests {
		var body io.Reader
		if tc.method == "POST" {
			body = strings.NewReader(chatBody)
		}
		req, _ := http.NewRequest(tc.method, ta.URL+tc.path, body)
		if tc.token != "" {
			req.Header.Set("Authorization", "Bearer "+tc.token)
		}
		resp, err := testClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		out := readBody(t, resp)
		if resp.StatusCode != tc.want {
			t.Errorf("%s %s with %q = %d; want %d: %s", tc.method, tc.path, tc.token, resp.StatusCode, tc.want, out)
		}
	}
	// The client's requests are its own in the ledger, and keyword
	// matching skips the policy it may not use ("code" is first).
	resp := ta.post(t, "/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"code please"}]}`,
		"Authorization", "Bearer app-token")
	readBody(t, resp)
	expect(t, "policy for app's keyword match", resp.Header.Get("X-Arbstr-Policy"), "chat")
	resp = ta.post(t, "/v1/chat/completions", chatBody, "Authorization", "Bearer app-token", "X-Arbstr-Policy", "code")
	out := readBody(t, resp)
	expect(t, "status of a policy the client may not use", resp.StatusCode, http.StatusForbidden)
	if typ, code, _ := apiErr(t, out); typ != "permission_error" || code != "policy_not_allowed" {
		t.Errorf("error = %s/%s; want permission_error/policy_not_allowed", typ, code)
	}
	rows := ta.rows(t)
	expect(t, "newest row's client", rows[0].Client, "app")
	expect(t, "newest row's status", rows[0].Status, http.StatusForbidden)
}

func TestRateLimitThroughProxy(t *testing.T) {
	up := newUpstream(t, jsonOK)
	ta := newArbstr(t, clientsConfig(up.URL))
	var statuses []int
	var last *http.Response
	for range 3 {
		resp := ta.post(t, "/v1/chat/completions", chatBody, "Authorization", "Bearer bot-token")
		last = resp
		out := readBody(t, resp)
		statuses = append(statuses, resp.StatusCode)
		if resp.StatusCode == http.StatusTooManyRequests {
			if typ, code, _ := apiErr(t, out); typ != "requests" || code != "rate_limit_exceeded" {
				t.Errorf("error = %s/%s; want requests/rate_limit_exceeded", typ, code)
			}
		}
	}
	expect(t, "statuses", fmt.Sprint(statuses), "[200 200 429]")
	expect(t, "Retry-After", last.Header.Get("Retry-After"), "30")
	rows := ta.rows(t)
	expect(t, "rows", len(rows), 3)
	expect(t, "refusal's row status", rows[0].Status, http.StatusTooManyRequests)
}

// TestBudgetUnderConcurrency: 50 concurrent requests against a budget that
// covers 10 worst cases. What was spent plus what was reserved never passes
// the limit; the refusals are 429s with rows.
func TestBudgetUnderConcurrency(t *testing.T) {
	release := make(chan struct{})
	var maxSeen atomic.Int64
	var sv *serving
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		// While requests are held here, their reservations are in force.
		for _, b := range sv.spend.view(time.Now(), func(*budget) bool { return true }) {
			used := int64(math.Round((b.Spent + b.Reserved) * 1000))
			for old := maxSeen.Load(); used > old && !maxSeen.CompareAndSwap(old, used); old = maxSeen.Load() {
			}
		}
		select {
		case <-release:
		case <-time.After(10 * time.Second):
		}
		// 10 input and 9 output tokens at 1 sat each: 19 sats, under the
		// 10 + 10 reserved (max_tokens 10, input estimate 10).
		io.WriteString(w, completionJSON("ok", 10, 9))
	})
	cfg := clientsConfig(up.URL)
	cfg.Clients[0].BudgetSatsPerDay = 200 // 10 worst cases of 20 sats
	ta := newArbstr(t, cfg)
	sv = ta.srv.current()
	body := `{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"` + strings.Repeat("x", 40) + `"}]}`
	var wg sync.WaitGroup
	statuses := make(chan int, 50)
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp := ta.post(t, "/v1/chat/completions", body, "Authorization", "Bearer app-token")
			readBody(t, resp)
			statuses <- resp.StatusCode
		}()
	}
	waitFor(t, "the refusals", func() bool { return len(statuses) >= 40 })
	close(release)
	wg.Wait()
	close(statuses)
	count := map[int]int{}
	for s := range statuses {
		count[s]++
	}
	// Each reserves 10 input + 10 output tokens at 1 sat: 20 sats of the 200.
	expect(t, "answered", count[200], 10)
	expect(t, "refused", count[429], 40)
	if got := maxSeen.Load(); got > 200_000 {
		t.Errorf("spent + reserved reached %d msat; the limit is 200000", got)
	}
	rows := ta.rows(t)
	expect(t, "rows", len(rows), 50)
	v := sv.spend.view(time.Now(), func(*budget) bool { return true })
	expect(t, "spent after settling", v[0].Spent, 190.0)
	expect(t, "reserved after settling", v[0].Reserved, 0.0)
}

// TestBudgetSurvivesRestart: what a client spent is read back from the
// ledger when arbstr starts again.
func TestBudgetSurvivesRestart(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, completionJSON("ok", 30, 30)) })
	cfg := clientsConfig(up.URL)
	dir := t.TempDir()
	db := filepath.Join(dir, "ledger.db")
	start := func() (*server, *httptest.Server, *Store) {
		store, err := openStore(db, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		srv := newServer(cfg, newRouter(cfg, store.Ratio), store, slog.New(slog.DiscardHandler))
		return srv, httptest.NewServer(srv), store
	}
	post := func(hs *httptest.Server) int {
		req, _ := http.NewRequest("POST", hs.URL+"/v1/chat/completions", strings.NewReader(`{"model":"m","max_tokens":30,"messages":[{"role":"user","content":"hi"}]}`))
		req.Header.Set("Authorization", "Bearer app-token")
		resp, err := testClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	_, hs, store := start()
	expect(t, "first request", post(hs), 200) // 60 of 100 sats spent
	hs.Close()
	store.Close()

	srv, hs, store := start()
	defer func() { hs.Close(); store.Close() }()
	v := srv.current().spend.view(time.Now(), func(*budget) bool { return true })
	expect(t, "spent after a restart", v[0].Spent, 60.0)
	expect(t, "second request (60 + up to 31 ≤ 100)", post(hs), 200)
	expect(t, "third request (120 spent)", post(hs), 429)
	req, _ := http.NewRequest("POST", hs.URL+"/v1/chat/completions", strings.NewReader(`{"model":"m","max_tokens":30,"messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("Authorization", "Bearer app-token")
	refused, err := testClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	refused.Body.Close()
	// Retry-After runs to the end of the UTC day.
	if secs, err := strconv.Atoi(refused.Header.Get("Retry-After")); err != nil || secs < 1 || secs > 86400 {
		t.Errorf("Retry-After = %q; want the seconds to the end of the day", refused.Header.Get("Retry-After"))
	}

	req, _ = http.NewRequest("GET", hs.URL+"/v1/budgets", nil)
	req.Header.Set("Authorization", "Bearer bot-token")
	resp, err := testClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	out := readBody(t, resp)
	expect(t, "bot's budgets (it has none; it sees no other's)", out, `{"data":[],"object":"list"}`+"\n")
}

// TestReload: a new configuration takes over at once; a stream in flight
// finishes on the old one and keeps its row; what was learned about a
// provider that keeps its name carries over.
func TestReload(t *testing.T) {
	release := make(chan struct{})
	slow := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if !bytes.Contains(mustRead(r), []byte(`"stream":true`)) {
			io.WriteString(w, completionJSON("plain", 1, 1))
			return
		}
		sse(w, chunkJSON("before"))
		select {
		case <-release:
		case <-time.After(10 * time.Second):
		}
		sse(w, chunkJSON(" after"), finishChunk, usageChunk(3, 2), "[DONE]")
	})
	other := newUpstream(t, jsonOK)
	cfg := testConfig(prov("kept", slow.URL, 1, 1), prov("removed", other.URL, 1, 1))
	ta := newArbstr(t, cfg)

	resp := ta.post(t, "/v1/chat/completions", streamBody)
	reader := bufio.NewReader(resp.Body)
	if line, err := reader.ReadString('\n'); err != nil || !strings.Contains(line, "before") {
		t.Fatalf("first line of the stream = %q, %v", line, err)
	}

	learned, _ := ta.srv.current().router.byName["kept"].observedLatency()
	next := testConfig(prov("kept", slow.URL, 5, 5), prov("added", other.URL, 9, 9))
	next.Policies.Rules = []PolicyRule{{Name: "new-rule", Keywords: []string{"reloaded"}}}
	ta.srv.reload(context.Background(), next)

	close(release)
	rest, err := io.ReadAll(reader)
	if err != nil {
		t.Fatalf("the stream in flight broke: %v", err)
	}
	expectContains(t, "the stream in flight", string(rest), "data: [DONE]")
	r := onlyRow(t, ta)
	expect(t, "row of the stream in flight: success", r.Success, true)
	// Priced on the config it started with: 3 + 2 tokens at 1 sat per 1k.
	expect(t, "row of the stream in flight: cost", deref(r.Cost), msats(5))

	sv := ta.srv.current()
	nk := sv.router.byName["kept"]
	if ms, ok := nk.observedLatency(); !ok || ms != learned {
		t.Errorf("latency of kept after reload = %v, %v; want %v carried over", ms, ok, learned)
	}
	if sv.router.byName["removed"] != nil {
		t.Errorf("removed is still a provider")
	}
	if sv.router.byName["added"] == nil {
		t.Errorf("added is not a provider")
	}
	resp = ta.post(t, "/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"reloaded"}]}`)
	readBody(t, resp)
	expect(t, "policy after reload", resp.Header.Get("X-Arbstr-Policy"), "new-rule")
	expect(t, "provider after reload (kept is now cheaper)", resp.Header.Get("X-Arbstr-Provider"), "kept")
	expectContains(t, "the reload's log line", ta.logs.String(), `providers_added=added providers_removed=removed providers_changed=kept`)
}

// TestBinary builds arbstr as a user does and serves in mock mode from the
// binary itself: the test binary links what the tests import, so only the
// real one shows that arbstr links everything it needs (its SQLite
// driver, for one).
func TestBinary(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command to build with")
	}
	bin := filepath.Join(t.TempDir(), "arbstr")
	if out, err := exec.Command(goTool, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-listen", "127.0.0.1:0")
	cmd.Dir = t.TempDir() // no config here: mock mode
	logs := &syncBuffer{}
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() }()
	addr := waitListening(t, logs)
	resp, err := testClient.Post("http://"+addr+"/v1/chat/completions", "application/json",
		strings.NewReader(`{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`))
	if err != nil {
		t.Fatalf("chat: %v\n%s", err, logs.String())
	}
	out := readBody(t, resp)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("chat = %d: %s\n%s", resp.StatusCode, out, logs.String())
	}
	expectContains(t, "the answer", out, `"arbstr_provider":"mock-cheap"`)
}

// TestWaitingClientGetsProviderComments: once a waiting client has its
// headers, the provider's keep-alive comments reach it as they come.
func TestWaitingClientGetsProviderComments(t *testing.T) {
	after := waitHeadersAfter
	waitHeadersAfter = 100 * time.Millisecond
	t.Cleanup(func() { waitHeadersAfter = after })
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		for range 4 {
			io.WriteString(w, ": OPENROUTER PROCESSING\n\n")
			w.(http.Flusher).Flush()
			time.Sleep(100 * time.Millisecond)
		}
		sse(w, chunkJSON("Hello"), finishChunk, "[DONE]")
	})
	ta := newArbstr(t, testConfig(prov("p", up.URL, 1, 1)))
	resp := ta.post(t, "/v1/chat/completions", streamBody)
	out := readBody(t, resp)
	first := strings.Index(out, "data: ")
	if first < 0 {
		t.Fatalf("no data:\n%s", out)
	}
	if n := strings.Count(out[:first], ": OPENROUTER PROCESSING"); n < 2 {
		t.Errorf("%d provider comments before the first data line; want them passed on (at least 2 of 4 after the headers):\n%s", n, out)
	}
	expectContains(t, "the stream", out, "data: [DONE]")
}

// TestOddUsage: usage as careless providers write it is still counted, and
// a usage object without any count is no usage (estimated), never free.
func TestOddUsage(t *testing.T) {
	chat := &chatRequest{TextBytes: 40}
	embed := &chatRequest{TextBytes: 40, NoOutput: true}
	tests := []struct {
		name      string
		req       *chatRequest
		body      string
		in, out   int64
		estimated bool
	}{
		{"integers", chat, `{"usage":{"prompt_tokens":12,"completion_tokens":300}}`, 12, 300, false},
		{"floats", chat, `{"usage":{"prompt_tokens":12.0,"completion_tokens":299.6}}`, 12, 300, false},
		{"strings", chat, `{"usage":{"prompt_tokens":"12","completion_tokens":"300"}}`, 12, 300, false},
		{"responses names", chat, `{"usage":{"input_tokens":12,"output_tokens":300}}`, 12, 300, false},
		{"no prompt_tokens", chat, `{"usage":{"completion_tokens":300,"total_tokens":310}}`, 10, 300, true},
		{"only a total", chat, `{"choices":[{"message":{"content":"abcdefgh"}}],"usage":{"total_tokens":310}}`, 10, 2, true},
		{"garbage counts", chat, `{"usage":{"prompt_tokens":{},"completion_tokens":[1]}}`, 10, 0, true},
		{"negative", chat, `{"usage":{"prompt_tokens":-5,"completion_tokens":7}}`, 0, 7, false},
		{"embedding with completion_tokens", embed, `{"usage":{"prompt_tokens":8,"completion_tokens":50}}`, 8, 0, false},
		{"embedding without completion_tokens", embed, `{"usage":{"prompt_tokens":8,"total_tokens":8}}`, 8, 0, false},
		{"usage null", chat, `{"choices":[{"message":{"content":"abcdefgh"}}],"usage":null}`, 10, 2, true},
		{"usage not an object", chat, `{"choices":[{"message":{"content":"abcdefgh"}}],"usage":"12"}`, 10, 2, true},
		{"usage twice: the last", chat, `{"usage":{"prompt_tokens":1,"completion_tokens":2},"usage":{"prompt_tokens":12,"completion_tokens":300}}`, 12, 300, false},
		{"completion_tokens only, text estimated for nothing", chat, `{"choices":[{"message":{"content":"abcdefgh"}}],"usage":{"completion_tokens":3}}`, 10, 3, true},
		{"prompt_tokens only, output from the text", chat, `{"choices":[{"message":{"content":"abcdefgh","tool_calls":[{"function":{"arguments":"abcd"}}]}}],"usage":{"prompt_tokens":7}}`, 7, 3, true},
		{"no usage, responses output", chat, `{"output":[{"content":[{"type":"output_text","text":"abcdefgh"}]},{"arguments":"abcd"}]}`, 10, 3, true},
		{"not JSON", chat, `{"usage":{"prompt_tokens":1,"completion_tokens":2}`, 0, 0, false},
	}
	for _, tc := range tests {
		in, out, estimated, _, ok := answerTokens([]byte(tc.body), tc.req)
		if in2, out2, estimated2, ok2 := answerTokensByDecoder([]byte(tc.body), tc.req); in2 != in || out2 != out || estimated2 != estimated || ok2 != ok {
			t.Errorf("%s: answerTokens = %d, %d, %v, %v; encoding/json reads %d, %d, %v, %v", tc.name, in, out, estimated, ok, in2, out2, estimated2, ok2)
		}
		if !ok {
			if tc.body != "" && json.Valid([]byte(tc.body)) {
				t.Errorf("%s: not read", tc.name)
			}
			continue
		}
		if in != tc.in || out != tc.out {
			t.Errorf("%s: tokens = %d/%d; want %d/%d", tc.name, in, out, tc.in, tc.out)
		}
		if estimated != tc.estimated {
			t.Errorf("%s: estimated = %v; want %v", tc.name, estimated, tc.estimated)
		}
	}
}

// answerTokensByDecoder is answerTokens as arbstr wrote it before its
// scanner, decoding the whole answer with encoding/json: the reference
// that TestOddUsage checks it against and BenchmarkReadBodies compares it
// with.
func answerTokensByDecoder(body []byte, req *chatRequest) (in, out int64, estimated, ok bool) {
	var a struct {
		Usage *usage `json:"usage"`
		answerParts
	}
	if err := json.Unmarshal(body, &a); err != nil {
		if _, typeErr := errors.AsType[*json.UnmarshalTypeError](err); !typeErr {
			return 0, 0, false, false
		}
	}
	text := a.text()
	if a.Usage != nil {
		if in, out, estimated, ok := a.Usage.counted(req.TextBytes, text, req.NoOutput); ok {
			return in, out, estimated, true
		}
	}
	if req.NoOutput {
		text = 0
	}
	return estimateTokens(req.TextBytes), estimateTokens(text), true, true
}

// TestClientPolicyFallback: a client limited to policies that matches no
// keyword runs under its first policy, with that policy's caps and
// budgets; /v1/cost confines it the same way.
func TestClientPolicyFallback(t *testing.T) {
	up := newUpstream(t, jsonOK)
	cfg := testConfig(prov("p", up.URL, 1, 1))
	cfg.Policies.Rules = []PolicyRule{{Name: "cheap", AllowedModels: []string{"small"}, Keywords: []string{"cheap"}}}
	cfg.Clients = []ClientConfig{{Name: "app", Token: "app-token", Policies: []string{"cheap"}}}
	ta := newArbstr(t, cfg)
	resp := ta.post(t, "/v1/chat/completions", chatBody, "Authorization", "Bearer app-token") // model m, no keyword
	out := readBody(t, resp)
	expect(t, "status for a model its only policy does not allow", resp.StatusCode, http.StatusBadRequest)
	if _, code, _ := apiErr(t, out); code != "model_not_allowed" {
		t.Errorf("code = %q; want model_not_allowed", code)
	}
	resp = ta.post(t, "/v1/cost", chatBody, "Authorization", "Bearer app-token", "X-Arbstr-Policy", "other")
	readBody(t, resp)
	expect(t, "/v1/cost with a policy the client may not use", resp.StatusCode, http.StatusForbidden)
}

// TestReloadAddsBudget: a budget that a reload adds starts at what the
// ledger recorded this period.
func TestReloadAddsBudget(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, completionJSON("ok", 10, 20)) })
	cfg := testConfig(prov("p", up.URL, 1000, 1000)) // 30 sats a request
	cfg.Clients = []ClientConfig{{Name: "app", Token: "app-token"}}
	ta := newArbstr(t, cfg)
	readBody(t, ta.post(t, "/v1/chat/completions", chatBody, "Authorization", "Bearer app-token"))
	next := testConfig(prov("p", up.URL, 1000, 1000))
	next.Clients = []ClientConfig{{Name: "app", Token: "app-token", BudgetSatsPerDay: 40}}
	ta.srv.reload(context.Background(), next)
	v := ta.srv.current().spend.view(time.Now(), func(*budget) bool { return true })
	if len(v) != 1 {
		t.Fatalf("%d budgets after the reload; want 1", len(v))
	}
	expect(t, "spent of the budget the reload added", v[0].Spent, 30.0)
}

// TestReloadWithoutTheFile: a reload whose config file is gone fails and
// changes nothing; it never falls back to mock mode.
func TestReloadWithoutTheFile(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	os.WriteFile("config.toml", []byte("[server]\nauth_token = \"tok\"\n[database]\npath = \"l.db\"\n[[providers]]\nname = \"real\"\nurl = \"http://127.0.0.1:1\"\n"), 0o600)
	logs := &syncBuffer{}
	logger := slog.New(slog.NewTextHandler(logs, nil))
	started, err := configure(overrides{})
	if err != nil {
		t.Fatal(err)
	}
	os.Remove("config.toml")
	var applied *Config
	reload(overrides{}, started, func(c *Config) { applied = c }, logger)
	if applied != nil {
		t.Errorf("a reload without the file applied a config: auth_token %q, providers %d", applied.Server.AuthToken, len(applied.Providers))
	}
	expectContains(t, "the log", logs.String(), "reload failed")
}

// TestSlowFirstTokenWithDefaults plays the user's case at the real timings:
// a provider silent for 4 s behind ": OPENROUTER PROCESSING" comments, and
// one that fails after 3 s of silence before a healthy one answers, each
// called by a client that gives up on headers after 2 s, as SDKs with a
// 2 s timeout do.
func TestSlowFirstTokenWithDefaults(t *testing.T) {
	processing := func(silence time.Duration, then http.HandlerFunc) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			w.WriteHeader(http.StatusOK)
			for deadline := time.Now().Add(silence); time.Now().Before(deadline); {
				io.WriteString(w, ": OPENROUTER PROCESSING\n\n")
				w.(http.Flusher).Flush()
				select {
				case <-r.Context().Done():
					return
				case <-time.After(time.Second):
				}
			}
			then(w, r)
		}
	}
	failAfter := func(silence time.Duration) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-r.Context().Done():
			case <-time.After(silence):
				statusHandler(http.StatusInternalServerError)(w, r)
			}
		}
	}
	answer := func(w http.ResponseWriter, r *http.Request) {
		sse(w, chunkJSON("Hello"), finishChunk, usageChunk(5, 1), "[DONE]")
	}
	tests := []struct {
		name      string
		providers func(t *testing.T) []ProviderConfig
		provider  string
	}{
		{"silent 4 s behind comments", func(t *testing.T) []ProviderConfig {
			return []ProviderConfig{prov("slow", newUpstream(t, processing(4*time.Second, answer)).URL, 1, 1)}
		}, "slow"},
		{"fails after 3 s, then a healthy one", func(t *testing.T) []ProviderConfig {
			return []ProviderConfig{prov("a-failing", newUpstream(t, failAfter(3*time.Second)).URL, 1, 1),
				prov("b-healthy", newUpstream(t, answer).URL, 2, 2)}
		}, "b-healthy"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := testConfig(tc.providers(t)...)
			cfg.Server.UpstreamTimeoutSecs = 30
			ta := newArbstr(t, cfg)
			client := &http.Client{Transport: &http.Transport{ResponseHeaderTimeout: 2 * time.Second}, Timeout: time.Minute}
			req, _ := http.NewRequest(http.MethodPost, ta.URL+"/v1/chat/completions", strings.NewReader(streamBody))
			req.Header.Set("Content-Type", "application/json")
			resp, err := client.Do(req)
			if err != nil {
				t.Fatalf("a client with a 2 s header timeout: %v", err)
			}
			out := readBody(t, resp)
			expectContains(t, "the answer", out, "Hello")
			expectContains(t, "the summary", out, `"provider":"`+tc.provider+`"`)
			expectContains(t, "the end", out, "data: [DONE]")
			checkRow(t, onlyRow(t, ta), http.StatusOK, true, tc.provider, "")
		})
	}
}

// TestAnswerMemoryNotHeldAgainstProvider: an answer refused because other
// answers hold arbstr's memory for answers is not the provider's fault: its
// circuit stays closed.
func TestAnswerMemoryNotHeldAgainstProvider(t *testing.T) {
	up := newUpstream(t, jsonOK)
	cfg := testConfig(prov("p", up.URL, 1, 1))
	cfg.Server.MaxAttempts = 1
	ta := newArbstr(t, cfg)
	if !answerMemory.take(answerMemoryCap) {
		t.Fatal("answer memory already in use")
	}
	for i := range 4 {
		resp := ta.post(t, "/v1/chat/completions", chatBody)
		out := readBody(t, resp)
		expect(t, fmt.Sprintf("request %d: status", i), resp.StatusCode, http.StatusBadGateway)
		expectContains(t, fmt.Sprintf("request %d: message", i), out, "too large")
	}
	answerMemory.give(answerMemoryCap)
	expect(t, "circuit", ta.srv.current().router.byName["p"].state(time.Now()), stateClosed)
	resp := ta.post(t, "/v1/chat/completions", chatBody)
	readBody(t, resp)
	expect(t, "status once memory is free", resp.StatusCode, http.StatusOK)
}

// TestLedgerUnavailable: when the ledger cannot write and its queue is
// full, a new request is refused with 503 before any upstream call, and
// writes no row to a queue that cannot be written.
func TestLedgerUnavailable(t *testing.T) {
	var calls atomic.Int32
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { calls.Add(1); jsonOK(w, r) })
	ta := newArbstr(t, testConfig(prov("p", up.URL, 1, 1)))
	store := ta.srv.store
	store.queueSize = 1
	store.retryFirst, store.retryMax = 10*time.Millisecond, 50*time.Millisecond
	unlock := lockLedger(t, ta.dbPath)
	readBody(t, ta.post(t, "/v1/chat/completions", chatBody)) // admitted; its row waits
	waitForStore(t, "the ledger failing", func() bool { return store.Health() != nil })
	resp := ta.post(t, "/v1/chat/completions", chatBody)
	out := readBody(t, resp)
	expect(t, "status", resp.StatusCode, http.StatusServiceUnavailable)
	if typ, code, _ := apiErr(t, out); typ != "service_unavailable" || code != "ledger_unavailable" {
		t.Errorf("error = %s/%s; want service_unavailable/ledger_unavailable", typ, code)
	}
	expect(t, "upstream calls", calls.Load(), int32(1))
	expect(t, "rows queued", store.Queued(), 1)
	unlock()
	waitForStore(t, "the ledger recovered", func() bool { return store.Health() == nil })
	expect(t, "rows written", len(ta.rows(t)), 1)
}

// nextEvent returns the length of the first complete event in b, or 0.
func nextEvent(b []byte) int {
	n, _ := scanEvent(b, eventScan{})
	return n
}
