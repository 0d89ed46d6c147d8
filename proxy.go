package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"mime"
	"net"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// This file is arbstr's HTTP face (SPEC §5, §7): the handlers, the upstream
// calls with fallback, the streaming copy, and the errors in OpenAI's shape.

// apiError is an error as the client sees it (§7).
type apiError struct {
	Status  int
	Type    string
	Code    string
	Message string
}

func (e *apiError) Error() string { return e.Message }

func errorf(status int, typ, code, format string, args ...any) *apiError {
	return &apiError{Status: status, Type: typ, Code: code, Message: fmt.Sprintf(format, args...)}
}

func badRequest(code, format string, args ...any) *apiError {
	return errorf(http.StatusBadRequest, "invalid_request_error", code, format, args...)
}

// writeError writes e in OpenAI's error shape:
// {"error":{"message":...,"type":...,"param":null,"code":...}}.
func writeError(w http.ResponseWriter, e *apiError) {
	writeJSON(w, e.Status, map[string]any{"error": map[string]any{
		"message": e.Message, "type": e.Type, "param": nil, "code": e.Code,
	}})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		// Only our own types are marshalled here; this is a programming error.
		panic(err)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}

// server serves arbstr's endpoints.
type server struct {
	cfg       *Config
	router    *Router
	store     *Store
	log       *slog.Logger
	transport http.RoundTripper
	timeout   time.Duration // server.upstream_timeout_secs
	started   time.Time
	mux       *http.ServeMux
	authHash  [32]byte // sha256 of server.auth_token, when set
	// drainMu orders inflight.Add against drain: once draining, no chat
	// request starts, so none can record after the ledger has closed.
	drainMu  sync.Mutex
	draining bool
	inflight sync.WaitGroup
	backoff  []time.Duration // between passes over the candidates (§6.1)
}

func newServer(cfg *Config, router *Router, store *Store, logger *slog.Logger) *server {
	timeout := time.Duration(cfg.Server.UpstreamTimeoutSecs) * time.Second
	s := &server{
		cfg:     cfg,
		router:  router,
		store:   store,
		log:     logger,
		timeout: timeout,
		started: time.Now(),
		backoff: []time.Duration{250 * time.Millisecond, time.Second},
		transport: &http.Transport{
			Proxy: http.ProxyFromEnvironment,
			DialContext: (&net.Dialer{
				Timeout:   30 * time.Second,
				KeepAlive: 30 * time.Second,
			}).DialContext,
			ForceAttemptHTTP2:     true,
			MaxIdleConns:          512,
			MaxIdleConnsPerHost:   128, // keep a warm pool per provider under load (§10)
			IdleConnTimeout:       90 * time.Second,
			TLSHandshakeTimeout:   10 * time.Second,
			ResponseHeaderTimeout: timeout,
			// Without Accept-Encoding from us, providers answer uncompressed,
			// so the body can be spliced and streamed event by event.
			DisableCompression: true,
		},
	}
	if cfg.Server.AuthToken != "" {
		s.authHash = sha256.Sum256([]byte(cfg.Server.AuthToken))
	}
	s.mux = s.routes()
	return s
}

// routes registers every endpoint (§7). The mux answers wrong methods itself;
// ServeHTTP turns its 404 and 405 into OpenAI-shaped errors.
func (s *server) routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/chat/completions", s.handleChat)
	mux.HandleFunc("POST /v1/cost", s.handleCost)
	mux.HandleFunc("GET /v1/models", s.handleModels)
	mux.HandleFunc("GET /health", s.handleHealth)
	mux.HandleFunc("GET /providers", s.handleProviders)
	mux.HandleFunc("GET /v1/stats", s.handleStats)
	mux.HandleFunc("GET /v1/requests", s.handleRequests)
	mux.HandleFunc("GET /v1/requests/{id}", s.handleRequest)
	return mux
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if s.cfg.Server.AuthToken != "" && r.URL.Path != "/health" && !s.authorized(r) {
		refusedHeaders(w, r)
		writeError(w, errorf(http.StatusUnauthorized, "authentication_error", "invalid_api_key",
			"missing or invalid bearer token; send Authorization: Bearer <server.auth_token>"))
		return
	}
	h, pattern := s.mux.Handler(r)
	if pattern != "" {
		s.mux.ServeHTTP(w, r) // it, not h, sets the request's path values
		return
	}
	// The mux's own answer: 404, or 405 with an Allow header.
	refusedHeaders(w, r)
	rec := &headerRecorder{header: make(http.Header)}
	h.ServeHTTP(rec, r)
	if rec.status == http.StatusMethodNotAllowed {
		allow := rec.header.Get("Allow")
		w.Header().Set("Allow", allow)
		writeError(w, errorf(http.StatusMethodNotAllowed, "invalid_request_error", "method_not_allowed",
			"method %s is not allowed on %s; allowed: %s", r.Method, r.URL.Path, allow))
		return
	}
	writeError(w, errorf(http.StatusNotFound, "invalid_request_error", "not_found",
		"no such endpoint: %s %s", r.Method, r.URL.Path))
}

// refusedHeaders gives a chat request refused before its handler runs the
// x-arbstr headers that every response of that endpoint carries (§5.2).
func refusedHeaders(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/v1/chat/completions" {
		(&exchange{id: newRequestID(), start: time.Now()}).setHeaders(w.Header())
	}
}

// headerRecorder captures the status and headers of the mux's error
// handlers and drops their plain-text body.
type headerRecorder struct {
	header http.Header
	status int
}

func (h *headerRecorder) Header() http.Header         { return h.header }
func (h *headerRecorder) Write(b []byte) (int, error) { return len(b), nil }
func (h *headerRecorder) WriteHeader(status int)      { h.status = status }

// authorized checks Authorization: Bearer TOKEN (§9): the scheme in any case,
// the token compared in constant time through its hash, so that not even its
// length leaks.
func (s *server) authorized(r *http.Request) bool {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "bearer") {
		return false
	}
	got := sha256.Sum256([]byte(strings.TrimSpace(token)))
	return subtle.ConstantTimeCompare(got[:], s.authHash[:]) == 1
}

// readChat reads and validates a chat body (§4 step 1, §7): JSON content
// type, at most server.max_body_bytes, an object with a model and messages.
func (s *server) readChat(w http.ResponseWriter, r *http.Request) ([]byte, *chatRequest, *apiError) {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || mt != "application/json" {
			return nil, nil, badRequest("invalid_content_type",
				"Content-Type must be application/json, got %q", ct)
		}
	}
	limit := s.cfg.Server.MaxBodyBytes
	tooLarge := errorf(http.StatusRequestEntityTooLarge, "invalid_request_error", "body_too_large",
		"request body exceeds server.max_body_bytes (%d bytes)", limit)
	if r.ContentLength > limit {
		return nil, nil, tooLarge // refused without reading it
	}
	var buf bytes.Buffer
	if r.ContentLength > 0 {
		// One allocation, and ReadFrom's final EOF read fits; no more than
		// 1 MiB up front for a client that only claims a large body.
		buf.Grow(int(min(r.ContentLength, 1<<20)) + 1)
	}
	if _, err := buf.ReadFrom(http.MaxBytesReader(w, r.Body, limit)); err != nil {
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			return nil, nil, tooLarge
		}
		return nil, nil, badRequest("invalid_body", "could not read the request body: %v", err)
	}
	body := buf.Bytes()
	req, aerr := parseChat(body)
	return body, req, aerr
}

// parseChat decodes what routing needs from a chat body and rejects bodies
// that no provider could serve (§4 step 1).
func parseChat(body []byte) (*chatRequest, *apiError) {
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	if len(trimmed) == 0 || trimmed[0] != '{' {
		if !json.Valid(body) {
			return nil, badRequest("invalid_json", "request body is not valid JSON")
		}
		return nil, badRequest("invalid_json", "request body must be a JSON object")
	}
	var raw chatFields
	if err := json.Unmarshal(body, &raw); err != nil {
		if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok && strings.HasPrefix(te.Field, "messages") {
			return nil, badRequest("invalid_messages", "messages must be a non-empty array of objects with a string role")
		}
		return nil, badRequest("invalid_json", "request body is not valid JSON: %v", err)
	}
	if hasMiscasedKey(body) {
		// encoding/json fills struct fields case-insensitively, but a
		// provider would not read "STREAM":true as a stream, so neither
		// may arbstr: this rare body is read again through a map, whose
		// keys are exact.
		var top map[string]json.RawMessage
		json.Unmarshal(body, &top)
		raw = chatFields{
			Model: top["model"], Stream: top["stream"], StreamOptions: top["stream_options"],
			MaxTokens: top["max_tokens"], MaxCompletionTokens: top["max_completion_tokens"],
		}
		if m := top["messages"]; len(m) > 0 && json.Unmarshal(m, &raw.Messages) != nil {
			return nil, badRequest("invalid_messages", "messages must be a non-empty array of objects with a string role")
		}
	}
	req := &chatRequest{StreamOptions: raw.StreamOptions}
	if len(raw.Model) == 0 || string(raw.Model) == "null" {
		return nil, badRequest("missing_model", "model is required")
	}
	model, ok := jsonString(raw.Model)
	if !ok {
		return nil, badRequest("invalid_model", "model must be a string")
	}
	if req.Model = model; model == "" {
		return nil, badRequest("missing_model", "model must not be empty")
	}
	if len(raw.Messages) == 0 {
		return nil, badRequest("invalid_messages", "messages must be a non-empty array")
	}
	switch string(raw.Stream) {
	case "", "null", "false":
	case "true":
		req.Stream = true
	default:
		return nil, badRequest("invalid_stream", "stream must be a boolean")
	}
	// max_completion_tokens, OpenAI's newer name, wins over max_tokens.
	for _, mt := range [][]byte{raw.MaxTokens, raw.MaxCompletionTokens} {
		var n int64
		if len(mt) > 0 && json.Unmarshal(mt, &n) == nil && n > 0 {
			req.MaxTokens = n
		}
	}
	lastUser := -1
	for i, m := range raw.Messages {
		if s, ok := jsonString(m.Content); ok {
			req.TextBytes += int64(len(s))
		} else {
			req.TextBytes += int64(len(messageText(m.Content)))
		}
		if m.Role == "user" {
			lastUser = i
		}
	}
	if lastUser >= 0 {
		req.LastUser = messageText(raw.Messages[lastUser].Content)
	}
	return req, nil
}

// chatFields are the members of a chat body that arbstr reads.
type chatFields struct {
	Model               json.RawMessage `json:"model"`
	Messages            []chatMessage   `json:"messages"`
	Stream              json.RawMessage `json:"stream"`
	StreamOptions       json.RawMessage `json:"stream_options"`
	MaxTokens           json.RawMessage `json:"max_tokens"`
	MaxCompletionTokens json.RawMessage `json:"max_completion_tokens"`
}

// hasMiscasedKey reports whether the JSON object in body, already known to be
// valid, has a top-level key that encoding/json would take for one of
// chatFields' though it differs in case (or hides behind an escape).
func hasMiscasedKey(body []byte) bool {
	depth, inString, isKey, expectKey, start := 0, false, false, false, 0
	for i := 0; i < len(body); i++ {
		c := body[i]
		if inString {
			switch c {
			case '\\':
				if isKey {
					return true // an escaped key: let the exact path decide
				}
				i++
			case '"':
				inString = false
				if isKey && miscased(body[start:i]) {
					return true
				}
			}
			continue
		}
		switch c {
		case '"':
			inString, isKey, start = true, depth == 1 && expectKey, i+1
			expectKey = false
		case '{', '[':
			depth++
			expectKey = depth == 1
		case '}', ']':
			depth--
		case ',':
			expectKey = depth == 1
		}
	}
	return false
}

var chatKeys = []string{"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens"}

func miscased(key []byte) bool {
	for _, k := range chatKeys {
		if len(key) == len(k) && string(key) != k && strings.EqualFold(string(key), k) {
			return true
		}
	}
	return false
}

// chatMessage is a message of a chat body, as far as arbstr reads it.
type chatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// jsonString decodes a JSON string value. Most strings hold no escapes and
// are taken as they are, without a second pass of the JSON decoder.
func jsonString(v json.RawMessage) (string, bool) {
	if len(v) < 2 || v[0] != '"' {
		return "", false
	}
	if bytes.IndexByte(v, '\\') < 0 {
		return string(v[1 : len(v)-1]), true
	}
	var s string
	return s, json.Unmarshal(v, &s) == nil
}

// messageText returns the text of a message content: the string itself, or
// the text parts of an array joined by newlines (§4, §4.1).
func messageText(content json.RawMessage) string {
	if s, ok := jsonString(content); ok {
		return s
	}
	if len(content) == 0 || content[0] != '[' {
		return ""
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	json.Unmarshal(content, &parts) // a part of another shape keeps its zero value
	var texts []string
	for _, p := range parts {
		if p.Type == "text" {
			texts = append(texts, p.Text)
		}
	}
	return strings.Join(texts, "\n")
}

// withIncludeUsage adds "stream_options":{"include_usage":true} to a streaming
// body that does not say include_usage either way, leaving every other byte
// as the client sent it (§5.1). It reports whether it added the option.
// opts is the body's stream_options as parseChat found it: when there is
// none, the usual case, the option goes before the closing brace without
// another pass over the body.
func withIncludeUsage(body []byte, opts json.RawMessage) ([]byte, bool) {
	if len(opts) == 0 {
		return appendStreamOptions(body)
	}
	var fields map[string]json.RawMessage
	if string(opts) != "null" {
		if json.Unmarshal(opts, &fields) != nil {
			return body, false // not an object: the provider will say so
		}
		if _, ok := fields["include_usage"]; ok {
			return body, false // the client's choice, true or false, stands
		}
	}
	start, end := lastMember(body, "stream_options")
	switch {
	case start < 0:
		return body, false
	case fields == nil: // null: as if absent
		return splice(body, start, end, []byte(`{"include_usage":true}`)), true
	case len(fields) == 0:
		return splice(body, start+1, start+1, []byte(`"include_usage":true`)), true
	}
	return splice(body, start+1, start+1, []byte(`"include_usage":true,`)), true
}

// lastMember returns where the value of the last top-level member named key
// lies in body, the one a JSON decoder keeps, or -1 when there is none.
func lastMember(body []byte, key string) (start, end int) {
	start, end = -1, -1
	dec := json.NewDecoder(bytes.NewReader(body))
	if _, err := dec.Token(); err != nil { // the opening '{'
		return -1, -1
	}
	for dec.More() {
		k, err := dec.Token()
		if err != nil {
			return -1, -1
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return -1, -1
		}
		if k == key {
			end = int(dec.InputOffset())
			start = end - len(v)
		}
	}
	return start, end
}

// appendStreamOptions adds the option as the last member of the body.
func appendStreamOptions(body []byte) ([]byte, bool) {
	end := bytes.LastIndexByte(body, '}')
	if end < 0 {
		return body, false
	}
	return splice(body, end, end, []byte(`,"stream_options":{"include_usage":true}`)), true
}

// splice returns b with b[i:j] replaced by s, in a new slice.
func splice(b []byte, i, j int, s []byte) []byte {
	out := make([]byte, 0, len(b)-(j-i)+len(s))
	return append(append(append(out, b[:i]...), s...), b[j:]...)
}

// newRequestID returns a unique id for x-arbstr-request-id.
func newRequestID() string {
	var b [12]byte
	rand.Read(b[:])
	return "arb_" + hex.EncodeToString(b[:])
}

// exchange is one chat request on its way through arbstr: what was decided,
// what happened, and what goes into its ledger row.
type exchange struct {
	id         string
	start      time.Time
	req        *chatRequest
	route      *route
	body       []byte // what is sent upstream
	addedUsage bool   // arbstr added include_usage (§5.3)
	attempts   int
	provider   *provider // of the last attempt
	price      price     // of that provider for the model

	status    int
	success   bool
	errMsg    string
	hasUsage  bool
	estimated bool
	in, out   int64
	ttft      time.Duration
}

func (ex *exchange) costMsat() int64 { return ex.price.cost(ex.in, ex.out) }

// setHeaders sets the x-arbstr-* headers known so far (§5.2).
func (ex *exchange) setHeaders(h http.Header) {
	h.Set("X-Arbstr-Request-Id", ex.id)
	if ex.provider != nil {
		h.Set("X-Arbstr-Provider", ex.provider.Name)
	}
	if ex.route != nil && ex.route.policy != nil {
		h.Set("X-Arbstr-Policy", ex.route.policy.Name)
	}
	h.Set("X-Arbstr-Latency-Ms", strconv.FormatInt(time.Since(ex.start).Milliseconds(), 10))
	h.Set("X-Arbstr-Attempts", strconv.Itoa(ex.attempts))
}

// finish writes the ledger row and the log line of an exchange. It is called
// before the last bytes go to the client, so that a client that reads the
// ledger right after its answer finds the row, and so that the row, which
// Record journals before it returns, survives a crash of the process once
// the answer has reached the client.
func (s *server) finish(ex *exchange) {
	latency := time.Since(ex.start)
	row := ledgerRow{
		RequestID:      ex.id,
		Time:           ledgerStamp{ex.start},
		Model:          ex.req.Model,
		Streaming:      ex.req.Stream,
		UsageEstimated: ex.estimated,
		LatencyMs:      new(latency.Milliseconds()),
		Attempts:       ex.attempts,
		Success:        ex.success,
		Status:         ex.status,
		Endpoint:       "chat",
	}
	policy := ""
	if ex.route != nil {
		policy = ex.route.policyName()
	}
	if policy != "" {
		row.Policy = &policy
	}
	if ex.provider != nil {
		row.Provider = ex.provider.Name
	}
	if ex.req.Stream {
		row.TTFTMs = new(ex.ttft.Milliseconds())
	}
	if ex.errMsg != "" {
		row.Error = new(ex.errMsg)
	}
	var cost msats
	if ex.hasUsage {
		cost = msats(ex.costMsat())
		row.InputTokens, row.OutputTokens = new(ex.in), new(ex.out)
		row.Cost, row.QuotedCost = new(cost), new(cost)
		row.BaselineCost = new(max(msats(ex.route.baseline(ex.in, ex.out)), cost))
		row.CostSource = new("rates")
		if ex.estimated {
			row.CostSource = new("estimate")
		}
	}
	if s.cfg.Logging.LogRequests {
		s.store.Record(row)
	}
	level := slog.LevelInfo
	if !ex.success && ex.status >= 500 {
		level = slog.LevelWarn
	}
	s.log.Log(context.Background(), level, "request",
		"id", ex.id, "policy", policy, "model", row.Model, "provider", row.Provider,
		"stream", row.Streaming, "status", row.Status, "input_tokens", ex.in,
		"output_tokens", ex.out, "cost_sats", cost.sats(),
		"latency_ms", latency.Milliseconds(), "attempts", row.Attempts, "err", ex.errMsg)
}

// fail answers the client with e and records the exchange.
func (s *server) fail(w http.ResponseWriter, ex *exchange, e *apiError) {
	ex.status, ex.success, ex.errMsg = e.Status, false, e.Message
	s.finish(ex)
	ex.setHeaders(w.Header())
	writeError(w, e)
}

// statusClientClosed is recorded for a client that left before its answer
// (nginx's 499); the client itself never sees it.
const statusClientClosed = 499

func (s *server) handleChat(w http.ResponseWriter, r *http.Request) {
	if !s.enter() {
		writeError(w, errorf(http.StatusServiceUnavailable, "service_unavailable", "shutting_down", "arbstr is shutting down"))
		return
	}
	defer s.inflight.Done()
	ex := &exchange{id: newRequestID(), start: time.Now()}
	body, req, aerr := s.readChat(w, r)
	if aerr != nil {
		// Not a chat request: no ledger row (§8.2).
		ex.setHeaders(w.Header())
		writeError(w, aerr)
		return
	}
	ex.req, ex.body = req, body
	rt, aerr := s.router.Route(req, r.Header.Get("X-Arbstr-Policy"), ex.start, s.cfg.Server.MaxAttempts)
	ex.route = rt
	if aerr != nil {
		s.fail(w, ex, aerr)
		return
	}
	if req.Stream {
		ex.body, ex.addedUsage = withIncludeUsage(body, req.StreamOptions)
	}
	s.forward(w, r, ex)
}

// enter counts a chat request in flight, unless arbstr is draining.
func (s *server) enter() bool {
	s.drainMu.Lock()
	defer s.drainMu.Unlock()
	if s.draining {
		return false
	}
	s.inflight.Add(1)
	return true
}

// drain refuses new chat requests and waits for those in flight, each of
// which writes its ledger row before it ends (§2).
func (s *server) drain() {
	s.drainMu.Lock()
	s.draining = true
	s.drainMu.Unlock()
	s.inflight.Wait()
}

// attemptResult is how one upstream attempt ended.
type attemptResult struct {
	done       bool   // the client has its answer, or is gone: stop
	fail       string // when !done: what the provider answered, for the 502
	timeout    bool
	outcome    outcome
	retryAfter time.Duration
}

// forward tries the ordered candidates until one answers (§6.1): up to
// server.max_attempts attempts, walking the list again after a backoff when
// it is shorter than that.
func (s *server) forward(w http.ResponseWriter, r *http.Request, ex *exchange) {
	ctx := r.Context()
	var fails []string
	lastTimeout := false
	maxAttempts := s.cfg.Server.MaxAttempts
	for pass := 0; ex.attempts < maxAttempts; pass++ {
		if pass > 0 {
			t := time.NewTimer(s.backoff[min(pass, len(s.backoff))-1])
			select {
			case <-ctx.Done():
				t.Stop()
				ex.status, ex.errMsg = statusClientClosed, "client disconnected"
				s.finish(ex)
				return
			case <-t.C:
			}
		}
		tried := false
		for _, c := range ex.route.ordered {
			if ex.attempts >= maxAttempts {
				break
			}
			ok, probe := c.p.acquire(time.Now())
			if !ok {
				continue // its circuit opened since routing
			}
			tried = true
			ex.attempts++
			ex.provider, ex.price = c.p, c.price
			res := attemptResult{outcome: outcomeNeutral}
			func() {
				// Released however the attempt ends, a panic included, so
				// that a probe always frees its slot (§6.3).
				defer func() { c.p.release(time.Now(), probe, res.outcome, res.retryAfter) }()
				res = s.attempt(w, r, ex)
			}()
			if res.done {
				return
			}
			// What a failed attempt learned dies with it: usage seen in a
			// stream that then failed is not charged to this request.
			ex.hasUsage, ex.estimated, ex.in, ex.out, ex.ttft, ex.errMsg = false, false, 0, 0, 0, ""
			s.log.Debug("attempt failed", "id", ex.id, "provider", c.p.Name, "err", res.fail)
			fails = append(fails, c.p.Name+": "+res.fail)
			lastTimeout = res.timeout
		}
		if !tried {
			break
		}
	}
	if len(fails) == 0 {
		s.fail(w, ex, errorf(http.StatusServiceUnavailable, "service_unavailable", "no_provider_available",
			"every provider that serves model %q has an open circuit; retry later", ex.req.Model))
		return
	}
	status, code := http.StatusBadGateway, "all_providers_failed"
	if lastTimeout {
		status, code = http.StatusGatewayTimeout, "upstream_timeout"
	}
	s.fail(w, ex, errorf(status, "upstream_error", code,
		"all %d attempts failed: %s", ex.attempts, strings.Join(fails, "; ")))
}

// isFailure says whether an upstream status is a failure that moves the
// request to the next provider (§6.1). The other 4xx (400, 413, 422, and
// 405, 409, 415, ...) are about the request, the client's to see. A 1xx or
// 3xx is no answer to a chat completion: a failure.
func isFailure(status int) bool {
	switch status {
	case 401, 402, 403, 404, 429:
		return true
	}
	return status >= 500 || status < 400
}

// maxRetryAfter bounds how long a 429's Retry-After may keep a circuit
// open, so that a provider cannot switch itself off for a year.
const maxRetryAfter = time.Hour

// retryAfter returns how long a 429 asks to wait (§6.3): its Retry-After
// header, in delay-seconds or as an HTTP date.
func retryAfter(resp *http.Response) time.Duration {
	v := resp.Header.Get("Retry-After")
	if resp.StatusCode != http.StatusTooManyRequests || v == "" {
		return 0
	}
	var d time.Duration
	if secs, err := strconv.Atoi(strings.TrimSpace(v)); err == nil {
		d = time.Duration(secs) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = time.Until(t)
	}
	return min(max(d, 0), maxRetryAfter)
}

// attempt sends the request to one provider. Nothing reaches the client
// unless the result is done.
func (s *server) attempt(w http.ResponseWriter, r *http.Request, ex *exchange) attemptResult {
	p := ex.provider
	// The upstream call dies with the client (§5.1). For a plain request the
	// timeout bounds the whole exchange; for a stream, a timer bounds the wait
	// for headers and every gap between reads (§6.2).
	var ctx context.Context
	var cancel context.CancelFunc
	var timedOut atomic.Bool
	var idle *time.Timer
	if ex.req.Stream {
		ctx, cancel = context.WithCancel(r.Context())
		idle = time.AfterFunc(s.timeout, func() { timedOut.Store(true); cancel() })
		defer idle.Stop()
	} else {
		ctx, cancel = context.WithTimeout(r.Context(), s.timeout)
	}
	defer cancel()

	// The body goes from the bytes in memory, never from r.Body: the
	// transport may read a request body again after the server has closed
	// the inbound one (issue 2).
	up, err := http.NewRequestWithContext(ctx, http.MethodPost, p.endpoint, bytes.NewReader(ex.body))
	if err != nil {
		return attemptResult{fail: "bad url", outcome: outcomeFailure}
	}
	up.Header["Content-Type"] = []string{"application/json"}
	if ex.req.Stream {
		up.Header["Accept"] = []string{"text/event-stream"}
	} else {
		up.Header["Accept"] = []string{"application/json"}
	}
	if p.authHeader != "" {
		up.Header["Authorization"] = []string{p.authHeader}
	}
	sent := time.Now()
	resp, err := s.transport.RoundTrip(up)
	if err != nil {
		return s.transportFailure(r, ex, err, timedOut.Load())
	}
	defer resp.Body.Close()

	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		if err != nil {
			return s.transportFailure(r, ex, err, timedOut.Load())
		}
		if isFailure(resp.StatusCode) {
			return attemptResult{
				fail:       fmt.Sprintf("HTTP %d %s", resp.StatusCode, http.StatusText(resp.StatusCode)),
				outcome:    outcomeFailure,
				retryAfter: retryAfter(resp),
			}
		}
		// The client's own fault (400, 413, 422, ...): its status and body,
		// no fallback (§6.1).
		ex.status, ex.errMsg = resp.StatusCode, fmt.Sprintf("provider answered HTTP %d", resp.StatusCode)
		s.finish(ex)
		copyHeaders(w.Header(), resp.Header)
		ex.setHeaders(w.Header())
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		w.WriteHeader(resp.StatusCode)
		w.Write(b)
		return attemptResult{done: true, outcome: outcomeNeutral}
	}
	// Only answers count for lowest_latency: a provider that fails fast is
	// not fast.
	p.observe(time.Since(sent))
	if ex.req.Stream {
		return s.stream(w, r, ex, resp, idle, &timedOut)
	}
	return s.complete(w, r, ex, resp)
}

// transportFailure classifies an error before the answer started.
func (s *server) transportFailure(r *http.Request, ex *exchange, err error, timedOut bool) attemptResult {
	if r.Context().Err() != nil {
		ex.status, ex.errMsg = statusClientClosed, "client disconnected"
		s.finish(ex)
		return attemptResult{done: true, outcome: outcomeNeutral}
	}
	if timedOut || errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
		return attemptResult{fail: "timeout", timeout: true, outcome: outcomeFailure}
	}
	return attemptResult{fail: describe(err), outcome: outcomeFailure}
}

func isTimeout(err error) bool {
	ne, ok := errors.AsType[net.Error](err)
	return ok && ne.Timeout()
}

// describe names a transport error without its URL (which holds nothing
// secret, but is noise in a message that lists several providers).
func describe(err error) string {
	var oe *net.OpError
	if errors.As(err, &oe) {
		if oe.Op == "dial" {
			return "connection refused or unreachable"
		}
		return "connection error: " + oe.Op
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return "connection closed by provider"
	}
	return "transport error"
}

// usage is the OpenAI usage object.
type usage struct {
	PromptTokens     int64 `json:"prompt_tokens"`
	CompletionTokens int64 `json:"completion_tokens"`
}

// tokens returns the counts within [0, maxEstTokens], so that a provider's
// nonsense cannot overflow a cost.
func (u *usage) tokens() (in, out int64) {
	return min(max(u.PromptTokens, 0), maxEstTokens), min(max(u.CompletionTokens, 0), maxEstTokens)
}

// complete handles a non-streaming 2xx answer (§5.2): the body as the
// provider sent it, with "arbstr_provider" spliced in after its opening brace.
func (s *server) complete(w http.ResponseWriter, r *http.Request, ex *exchange, resp *http.Response) attemptResult {
	body, err := readAll(resp)
	if err != nil {
		return s.transportFailure(r, ex, err, false)
	}
	var parsed struct {
		Usage   *usage `json:"usage"`
		Choices []struct {
			Message struct {
				Content string `json:"content"`
			} `json:"message"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(body, &parsed); err != nil {
		if _, ok := errors.AsType[*json.UnmarshalTypeError](err); !ok {
			return attemptResult{fail: "invalid JSON in a 2xx answer", outcome: outcomeFailure}
		}
	}
	open := len(body) - len(bytes.TrimLeft(body, " \t\r\n"))
	if open == len(body) || body[open] != '{' {
		return attemptResult{fail: "answer is not a JSON object", outcome: outcomeFailure}
	}
	if parsed.Usage != nil {
		ex.hasUsage = true
		ex.in, ex.out = parsed.Usage.tokens()
	} else {
		// No usage: estimate, ≈ 4 bytes a token, and say so (§5.3, §8.1).
		var text int64
		for _, c := range parsed.Choices {
			text += int64(len(c.Message.Content))
		}
		ex.hasUsage, ex.estimated = true, true
		ex.in, ex.out = (ex.req.TextBytes+3)/4, (text+3)/4
	}
	ex.status, ex.success = resp.StatusCode, true
	s.finish(ex)

	insert := ex.provider.bodyField
	if rest := bytes.TrimLeft(body[open+1:], " \t\r\n"); len(rest) > 0 && rest[0] == '}' {
		insert = insert[:len(insert)-1] // an empty object takes no comma
	}
	h := w.Header()
	copyHeaders(h, resp.Header)
	ex.setHeaders(h)
	if !ex.estimated {
		h.Set("X-Arbstr-Cost-Sats", strconv.FormatFloat(msatToSats(ex.costMsat()), 'f', -1, 64))
	}
	h.Set("Content-Length", strconv.Itoa(len(body)+len(insert)))
	w.WriteHeader(resp.StatusCode)
	// Three writes into the server's buffer; the body is not copied.
	w.Write(body[:open+1])
	w.Write(insert)
	w.Write(body[open+1:])
	return attemptResult{done: true, outcome: outcomeSuccess}
}

// maxAnswerBytes bounds what arbstr holds of one provider answer: a whole
// non-streaming body, or one stream event. A chat completion is far smaller;
// a provider that sends more is broken or hostile, and must not exhaust a
// small machine's memory.
const maxAnswerBytes = 32 << 20

var errAnswerTooLarge = errors.New("answer larger than 32 MiB")

// readAll reads a response body into one buffer sized by Content-Length when
// the provider sent a plausible one.
func readAll(resp *http.Response) ([]byte, error) {
	var buf bytes.Buffer
	if resp.ContentLength > 0 {
		buf.Grow(int(min(resp.ContentLength, 1<<20)) + 1)
	}
	n, err := buf.ReadFrom(io.LimitReader(resp.Body, maxAnswerBytes+1))
	if err == nil && n > maxAnswerBytes {
		err = errAnswerTooLarge
	}
	return buf.Bytes(), err
}

// Hop-by-hop headers (RFC 9110 §7.6.1) are never forwarded (§9).
var hopHeaders = []string{
	"Connection",
	"Proxy-Connection", // non-standard, sent by old clients
	"Keep-Alive",
	"Proxy-Authenticate",
	"Proxy-Authorization",
	"Te",
	"Trailer",
	"Transfer-Encoding",
	"Upgrade",
}

// copyHeaders copies the provider's end-to-end response headers: not the
// hop-by-hop ones, not those named in its Connection header, not
// Content-Length, which arbstr sets for the body it writes, and not x-arbstr-*.
func copyHeaders(dst, src http.Header) {
	for k, vv := range src {
		// arbstr's own headers are arbstr's to set, never a provider's.
		if k == "Content-Length" || slices.Contains(hopHeaders, k) || strings.HasPrefix(k, "X-Arbstr-") {
			continue
		}
		dst[k] = vv
	}
	for _, f := range src["Connection"] {
		for name := range strings.SplitSeq(f, ",") {
			dst.Del(strings.TrimSpace(name))
		}
	}
}

// scanChunk reads what arbstr needs from the data of a stream event by
// scanning its bytes: the length of its content strings, whether a
// finish_reason is set, and whether it holds a usage or an error object.
// Decoding every chunk with encoding/json cost more than all else arbstr does
// to a stream (issue 5); the rare chunk with usage is decoded by the caller.
// A quoted key followed by a colon can only be a key, since every quote
// inside a JSON string is escaped. Content is measured as written, escapes
// included, which is near enough for an estimate of 4 bytes a token.
func scanChunk(data []byte) (content int64, finished, hasUsage, hasError bool) {
	for rest := data; ; {
		v, next, ok := valueOf(rest, `"content"`)
		if !ok {
			break
		}
		if v[0] == '"' {
			content += stringLen(v)
		}
		rest = next
	}
	v, _, ok := valueOf(data, `"finish_reason"`)
	finished = ok && v[0] == '"'
	v, _, ok = valueOf(data, `"usage"`)
	hasUsage = ok && v[0] == '{'
	v, _, ok = valueOf(data, `"error"`)
	hasError = ok && (v[0] == '{' || v[0] == '"')
	return content, finished, hasUsage, hasError
}

// valueOf finds key followed by a colon in b and returns the bytes from its
// value on (never empty), and the bytes after the key to search on from.
func valueOf(b []byte, key string) (value, rest []byte, ok bool) {
	for {
		i := bytes.Index(b, []byte(key))
		if i < 0 {
			return nil, nil, false
		}
		b = b[i+len(key):]
		v := bytes.TrimLeft(b, " \t\r\n")
		if len(v) > 0 && v[0] == ':' {
			if v = bytes.TrimLeft(v[1:], " \t\r\n"); len(v) > 0 {
				return v, b, true
			}
		}
	}
}

// stringLen returns the length of the JSON string at the start of v, in
// bytes as written between its quotes.
func stringLen(v []byte) int64 {
	for i := 1; i < len(v); i++ {
		switch v[i] {
		case '\\':
			i++
		case '"':
			return int64(i - 1)
		}
	}
	return 0
}

// streamBufs recycles the 32 KiB read buffers of streams, the size
// httputil.ReverseProxy copies with.
var streamBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// stream copies a 2xx event stream to the client (§5.3), event by event as
// they arrive. It reads usage on the way, withholds the usage-only chunk that
// arbstr itself asked for, and writes the ": arbstr" comment before [DONE].
// Until the first data event arrives nothing is sent, so that a provider
// failing before it can be replaced by the next one.
func (s *server) stream(w http.ResponseWriter, r *http.Request, ex *exchange, resp *http.Response, idle *time.Timer, timedOut *atomic.Bool) attemptResult {
	bufp := streamBufs.Get().(*[]byte)
	defer streamBufs.Put(bufp)
	buf := *bufp
	rc := http.NewResponseController(w)

	var (
		n            int    // bytes held in buf
		started      bool   // headers went out
		pending      []byte // events before the first data event
		usageSeen    bool
		finished     bool // a finish_reason was seen
		contentBytes int64
		firstData    time.Time
		firstContent time.Time
		clientGone   bool
	)
	write := func(b []byte) {
		if !clientGone {
			if _, err := w.Write(b); err != nil {
				clientGone = true
			}
		}
	}
	// end settles the exchange once the stream is over; the final bytes
	// (the ": arbstr" comment and [DONE], or an error event) follow it.
	end := func(success bool, errMsg string) {
		ex.status, ex.success, ex.errMsg = http.StatusOK, success, errMsg
		if !firstContent.IsZero() {
			ex.ttft = firstContent.Sub(ex.start)
		} else if !firstData.IsZero() {
			ex.ttft = firstData.Sub(ex.start)
		}
		if !usageSeen {
			ex.hasUsage, ex.estimated = true, true
			ex.in, ex.out = (ex.req.TextBytes+3)/4, (contentBytes+3)/4
		}
		s.finish(ex)
	}
	summary := func() []byte {
		b, _ := json.Marshal(struct {
			RequestID      string  `json:"request_id"`
			Provider       string  `json:"provider"`
			InputTokens    int64   `json:"input_tokens"`
			OutputTokens   int64   `json:"output_tokens"`
			UsageEstimated bool    `json:"usage_estimated,omitempty"`
			CostSats       float64 `json:"cost_sats"`
			LatencyMs      int64   `json:"latency_ms"`
		}{ex.id, ex.provider.Name, ex.in, ex.out, ex.estimated, msatToSats(ex.costMsat()), time.Since(ex.start).Milliseconds()})
		return append(append([]byte(": arbstr "), b...), '\n', '\n')
	}
	interrupted := func(reason string) attemptResult {
		end(false, "stream interrupted: "+reason)
		msg, _ := json.Marshal("upstream stream interrupted: " + reason)
		write([]byte(`data: {"error":{"message":` + string(msg) + `,"type":"upstream_error","code":"stream_interrupted"}}` + "\n\n"))
		rc.Flush()
		return attemptResult{done: true, outcome: outcomeFailure}
	}

	for {
		if n == len(buf) {
			// One event is larger than the buffer: grow it for this stream,
			// up to a bound.
			if len(buf) >= maxAnswerBytes {
				if !started {
					return attemptResult{fail: "stream event larger than 32 MiB", outcome: outcomeFailure}
				}
				return interrupted("stream event larger than 32 MiB")
			}
			buf = append(buf, make([]byte, len(buf))...)
		}
		m, rerr := resp.Body.Read(buf[n:])
		if m > 0 {
			idle.Reset(s.timeout)
			n += m
		}
		off, wrote := 0, false
		for {
			k := nextEvent(buf[off:n])
			if k == 0 {
				break
			}
			ev := buf[off : off+k]
			off += k
			data, isData := eventData(ev)
			if !isData {
				// A comment or another field: passed on as it is.
				if started {
					write(ev)
					wrote = true
				} else if pending = append(pending, ev...); len(pending) > maxAnswerBytes {
					return attemptResult{fail: "no data event in 32 MiB", outcome: outcomeFailure}
				}
				continue
			}
			now := time.Now()
			if firstData.IsZero() {
				firstData = now
			}
			if bytes.Equal(data, []byte("[DONE]")) {
				if !started {
					return attemptResult{fail: "stream ended before its first event", outcome: outcomeFailure}
				}
				end(true, "")
				write(summary())
				write(ev)
				rc.Flush()
				return attemptResult{done: true, outcome: outcomeSuccess}
			}
			content, finish, hasUsage, hasError := scanChunk(data)
			if hasError && !started {
				return attemptResult{fail: "error event before the first chunk", outcome: outcomeFailure}
			}
			if hasError {
				// The provider's error reaches the client as it was sent;
				// then the stream ends as an interrupted one (§5.3).
				write(ev)
				return interrupted("the provider sent an error event")
			}
			if content > 0 && firstContent.IsZero() {
				firstContent = now
			}
			contentBytes += content
			finished = finished || finish
			if hasUsage {
				var u struct {
					Usage   *usage            `json:"usage"`
					Choices []json.RawMessage `json:"choices"`
				}
				if json.Unmarshal(data, &u) == nil && u.Usage != nil {
					usageSeen, ex.hasUsage = true, true
					ex.in, ex.out = u.Usage.tokens()
					if ex.addedUsage && len(u.Choices) == 0 {
						continue // arbstr asked for it; the client did not
					}
				}
			}
			if !started {
				started = true
				h := w.Header()
				copyHeaders(h, resp.Header)
				ex.setHeaders(h)
				h.Set("Content-Type", "text/event-stream")
				h.Set("Cache-Control", "no-cache")
				h.Set("X-Accel-Buffering", "no") // tell nginx in front not to buffer
				w.WriteHeader(http.StatusOK)
				write(pending)
				pending = nil
			}
			write(ev)
			wrote = true
		}
		if off > 0 {
			n = copy(buf, buf[off:n])
		}
		if wrote && !clientGone {
			if err := rc.Flush(); err != nil {
				clientGone = true
			}
		}
		if clientGone || (rerr != nil && r.Context().Err() != nil) {
			if !started {
				ex.status, ex.errMsg = statusClientClosed, "client disconnected"
				s.finish(ex)
				return attemptResult{done: true, outcome: outcomeNeutral}
			}
			end(false, "client disconnected")
			return attemptResult{done: true, outcome: outcomeNeutral}
		}
		if rerr == nil {
			continue
		}
		reason := "connection lost"
		if timedOut.Load() {
			reason = fmt.Sprintf("no data for %s", s.timeout)
		}
		switch {
		case !started && timedOut.Load():
			return attemptResult{fail: "timeout", timeout: true, outcome: outcomeFailure}
		case !started:
			return attemptResult{fail: "stream ended before its first event", outcome: outcomeFailure}
		case rerr == io.EOF && (finished || usageSeen):
			// A provider that ends a complete answer without [DONE]: end it
			// for the client as OpenAI would.
			end(true, "")
			write(summary())
			write([]byte("data: [DONE]\n\n"))
			rc.Flush()
			return attemptResult{done: true, outcome: outcomeSuccess}
		case rerr == io.EOF:
			reason = "the provider closed the stream before the answer was complete"
		}
		return interrupted(reason)
	}
}

// nextEvent returns the length of the first complete event in b, up to and
// including the blank line that ends it, or 0 when b holds no complete event
// yet. Lines end in CRLF, LF or CR (the SSE specification's three forms).
func nextEvent(b []byte) int {
	lineStart := 0
	for i := 0; i < len(b); i++ {
		c := b[i]
		if c != '\n' && c != '\r' {
			continue
		}
		end := i + 1
		if c == '\r' {
			if end == len(b) {
				if i == lineStart {
					// The blank line that ends the event; a LF that may
					// follow makes an empty event of its own, which SSE
					// ignores, and the bytes the client gets are the same.
					return end
				}
				return 0 // a LF may follow in the next read
			}
			if b[end] == '\n' {
				end++
			}
		}
		if i == lineStart {
			return end
		}
		lineStart = end
		i = end - 1
	}
	return 0
}

// eventData returns the data of an event, its data lines joined by "\n"
// (with "data:" and one optional space removed), and whether it had any.
func eventData(ev []byte) ([]byte, bool) {
	var data []byte
	found, joined := false, false
	for len(ev) > 0 {
		i := bytes.IndexAny(ev, "\r\n")
		if i < 0 {
			i = len(ev)
		}
		line := ev[:i]
		if i < len(ev) && ev[i] == '\r' && i+1 < len(ev) && ev[i+1] == '\n' {
			i++
		}
		ev = ev[min(i+1, len(ev)):]
		v, ok := bytes.CutPrefix(line, []byte("data"))
		if !ok || (len(v) > 0 && v[0] != ':') {
			continue // another field, or a comment
		}
		v = bytes.TrimPrefix(v, []byte(":"))
		v = bytes.TrimPrefix(v, []byte(" "))
		switch {
		case !found:
			data, found = v, true
		case !joined:
			data, joined = append(append(append([]byte(nil), data...), '\n'), v...), true
		default:
			data = append(append(data, '\n'), v...)
		}
	}
	return data, found
}

// handleCost is the routing dry run of §7: the decision, no upstream call.
func (s *server) handleCost(w http.ResponseWriter, r *http.Request) {
	_, req, aerr := s.readChat(w, r)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	rt, aerr := s.router.Route(req, r.Header.Get("X-Arbstr-Policy"), time.Now(), 0)
	if aerr != nil && aerr.Status != http.StatusServiceUnavailable {
		writeError(w, aerr) // a refusal: the same 400 the chat request gets
		return
	}
	// With every circuit open, the dry run still shows who was set aside.
	type costCandidate struct {
		Provider        string   `json:"provider"`
		InputRate       float64  `json:"input_rate"`
		OutputRate      float64  `json:"output_rate"`
		BaseFee         float64  `json:"base_fee"`
		EstInputTokens  int64    `json:"estimated_input_tokens"`
		EstOutputTokens int64    `json:"estimated_output_tokens"`
		EstimatedCost   float64  `json:"estimated_cost_sats"`
		ObservedLatency *float64 `json:"observed_latency_ms"`
		Circuit         string   `json:"circuit"`
	}
	out := struct {
		Model    string          `json:"model"`
		Policy   *string         `json:"policy"`
		Strategy string          `json:"strategy"`
		Stream   bool            `json:"stream"`
		EstIn    int64           `json:"estimated_input_tokens"`
		EstOut   int64           `json:"estimated_output_tokens"`
		Cands    []costCandidate `json:"candidates"`
		Excluded []exclusion     `json:"excluded"`
	}{Model: req.Model, Strategy: rt.strategy, Stream: req.Stream, EstIn: rt.estIn, EstOut: rt.estOut,
		Cands: []costCandidate{}, Excluded: rt.excluded}
	if rt.policy != nil {
		out.Policy = &rt.policy.Name
	}
	if out.Excluded == nil {
		out.Excluded = []exclusion{}
	}
	now := time.Now()
	for _, c := range rt.ordered {
		cc := costCandidate{
			Provider: c.p.Name, InputRate: float64(c.price.InMicro) / 1000, OutputRate: float64(c.price.OutMicro) / 1000,
			BaseFee: msatToSats(c.price.BaseMsat), EstInputTokens: rt.estIn, EstOutputTokens: rt.estOut,
			EstimatedCost: msatToSats(c.estMsat), Circuit: c.p.state(now),
		}
		if c.seen {
			ms := math.Round(c.latency*10) / 10
			cc.ObservedLatency = &ms
		}
		out.Cands = append(out.Cands, cc)
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *server) handleModels(w http.ResponseWriter, r *http.Request) {
	type model struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Created int64  `json:"created"`
		OwnedBy string `json:"owned_by"`
	}
	owners := map[string][]string{}
	for _, p := range s.router.providers {
		for _, m := range p.Models {
			if !slices.Contains(owners[m], p.Name) {
				owners[m] = append(owners[m], p.Name)
			}
		}
	}
	data := make([]model, 0, len(owners))
	for id, names := range owners {
		// owned_by lists the providers that serve the model.
		data = append(data, model{id, "model", s.started.Unix(), strings.Join(names, ",")})
	}
	sort.Slice(data, func(i, j int) bool { return data[i].ID < data[j].ID })
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data})
}

func (s *server) handleHealth(w http.ResponseWriter, r *http.Request) {
	now := time.Now()
	states := map[string]map[string]string{}
	open, notClosed := 0, 0
	for _, p := range s.router.providers {
		st := p.state(now)
		if st == stateOpen {
			open++
		}
		if st != stateClosed {
			notClosed++
		}
		states[p.Name] = map[string]string{"state": st}
	}
	status, code := "ok", http.StatusOK
	switch {
	case len(s.router.providers) == 0 || open == len(s.router.providers):
		status, code = "unhealthy", http.StatusServiceUnavailable
	case notClosed > 0:
		status = "degraded"
	}
	writeJSON(w, code, map[string]any{"status": status, "providers": states})
}

func (s *server) handleProviders(w http.ResponseWriter, r *http.Request) {
	type providerInfo struct {
		Name       string           `json:"name"`
		URL        string           `json:"url"`
		Models     []string         `json:"models"`
		InputRate  float64          `json:"input_rate"`
		OutputRate float64          `json:"output_rate"`
		BaseFee    float64          `json:"base_fee"`
		ModelRates map[string]Rates `json:"model_rates,omitempty"`
		HasAPIKey  bool             `json:"has_api_key"`
		Circuit    string           `json:"circuit"`
		Latency    *float64         `json:"observed_latency_ms"`
	}
	now := time.Now()
	list := make([]providerInfo, 0, len(s.router.providers))
	for _, p := range s.router.providers {
		pi := providerInfo{
			Name: p.Name, URL: redactURL(p.URL), Models: p.Models, InputRate: p.InputRate, OutputRate: p.OutputRate,
			BaseFee: p.BaseFee, ModelRates: p.ModelRates, HasAPIKey: p.APIKey != "", Circuit: p.state(now),
		}
		if pi.Models == nil {
			pi.Models = []string{}
		}
		if ms, ok := p.observedLatency(); ok {
			ms = math.Round(ms*10) / 10
			pi.Latency = &ms
		}
		list = append(list, pi)
	}
	writeJSON(w, http.StatusOK, map[string]any{"providers": list})
}

// statsRanges are the named windows of GET /v1/stats and /v1/requests.
var statsRanges = map[string]time.Duration{
	"1h": time.Hour, "24h": 24 * time.Hour, "7d": 7 * 24 * time.Hour, "30d": 30 * 24 * time.Hour, "all": 0,
}

// ledgerParams reads the query string of a ledger read endpoint. url.Query
// drops a malformed pair silently (limit=%zz, limit=5;x); ParseQuery
// reports it, and a parameter that cannot be read is a 400, never a silent
// default.
func ledgerParams(r *http.Request) (url.Values, *apiError) {
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return nil, badRequest("invalid_query", "malformed query string: %v", err)
	}
	return q, nil
}

// ledgerFilters reads the filters that stats and requests share.
func ledgerFilters(q url.Values) (ledgerMatch, *apiError) {
	m := ledgerMatch{
		Provider: q.Get("provider"), Model: q.Get("model"), Policy: q.Get("policy"),
		Client: q.Get("client"), Endpoint: q.Get("endpoint"),
	}
	for _, p := range []struct {
		name string
		dst  **bool
	}{{"streaming", &m.Streaming}, {"success", &m.Success}} {
		if v := q.Get(p.name); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return m, badRequest("invalid_"+p.name, "%s must be true or false, got %q", p.name, v)
			}
			*p.dst = &b
		}
	}
	return m, nil
}

// ledgerWindow reads range, or since and until (RFC 3339). def is the range
// used when none of the three is given ("" for all time).
func ledgerWindow(q url.Values, def string) (since, until time.Time, e *apiError) {
	rng := strings.TrimPrefix(q.Get("range"), "last_")
	if rng == "" && q.Get("since") == "" && q.Get("until") == "" {
		rng = def
	}
	if rng != "" {
		d, ok := statsRanges[rng]
		if !ok {
			return since, until, badRequest("invalid_range", "range must be one of 1h, 24h, 7d, 30d, all, got %q", q.Get("range"))
		}
		if d > 0 {
			since = time.Now().UTC().Add(-d)
		}
	}
	for _, p := range []struct {
		name string
		dst  *time.Time
	}{{"since", &since}, {"until", &until}} {
		if v := q.Get(p.name); v != "" {
			t, err := time.Parse(time.RFC3339Nano, v)
			if err != nil {
				return since, until, badRequest("invalid_"+p.name, "%s must be an RFC 3339 time such as 2026-01-02T15:04:05Z, got %q", p.name, v)
			}
			*p.dst = t.UTC()
		}
	}
	if !until.IsZero() && since.After(until) {
		return since, until, badRequest("invalid_since", "since is after until")
	}
	return since, until, nil
}

func (s *server) handleStats(w http.ResponseWriter, r *http.Request) {
	q, e := ledgerParams(r)
	if e != nil {
		writeError(w, e)
		return
	}
	var sq statsQuery
	sq.GroupBy = q.Get("group_by")
	if _, ok := statsGroupColumns[sq.GroupBy]; !ok {
		writeError(w, badRequest("invalid_group_by", "group_by must be provider, model, policy, client or endpoint, got %q", sq.GroupBy))
		return
	}
	if sq.ledgerMatch, e = ledgerFilters(q); e != nil {
		writeError(w, e)
		return
	}
	// The default window, 24h, applies only when no bound is given.
	if sq.Since, sq.Until, e = ledgerWindow(q, "24h"); e != nil {
		writeError(w, e)
		return
	}
	if err := s.store.Sync(r.Context()); err != nil {
		return // the client left
	}
	res, err := s.store.Stats(r.Context(), sq)
	if err != nil {
		s.ledgerError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (s *server) handleRequests(w http.ResponseWriter, r *http.Request) {
	q, e := ledgerParams(r)
	if e == nil {
		var rq requestsQuery
		if rq, e = requestsParams(q); e == nil {
			s.listRequests(w, r, rq)
			return
		}
	}
	writeError(w, e)
}

// requestsParams reads the parameters of GET /v1/requests: limit (1 to
// 1000, default 50) and offset, or page and per_page (1-based, per_page at
// most 100) but not both; the filters; a window (range, since, until; all
// time by default); sort and order.
func requestsParams(q url.Values) (requestsQuery, *apiError) {
	rq := requestsQuery{Limit: 50, Sort: q.Get("sort"), Order: q.Get("order")}
	if q.Has("page") || q.Has("per_page") {
		if q.Has("limit") || q.Has("offset") {
			return rq, badRequest("invalid_page", "page and per_page cannot be given with limit or offset")
		}
	}
	page, perPage := 1, 0
	for _, p := range []struct {
		name     string
		dst      *int
		min, max int
	}{
		{"limit", &rq.Limit, 1, 1000}, {"offset", &rq.Offset, 0, 1 << 30},
		{"page", &page, 1, 1 << 20}, {"per_page", &perPage, 1, 100},
	} {
		if v, ok := q[p.name]; ok {
			n, err := strconv.Atoi(v[0])
			if err != nil || n < p.min || n > p.max {
				return rq, badRequest("invalid_"+p.name, "%s must be an integer from %d to %d, got %q", p.name, p.min, p.max, v[0])
			}
			*p.dst = n
		}
	}
	if q.Has("page") || q.Has("per_page") {
		if perPage == 0 {
			perPage = 50
		}
		rq.Limit, rq.Offset = perPage, (page-1)*perPage
	}
	if _, ok := requestsSortColumns[rq.Sort]; !ok {
		return rq, badRequest("invalid_sort", "sort must be timestamp, cost_sats or latency_ms, got %q", rq.Sort)
	}
	if rq.Order != "" && rq.Order != "asc" && rq.Order != "desc" {
		return rq, badRequest("invalid_order", "order must be asc or desc, got %q", rq.Order)
	}
	var e *apiError
	if rq.ledgerMatch, e = ledgerFilters(q); e != nil {
		return rq, e
	}
	rq.Since, rq.Until, e = ledgerWindow(q, "")
	return rq, e
}

func (s *server) listRequests(w http.ResponseWriter, r *http.Request, rq requestsQuery) {
	if err := s.store.Sync(r.Context()); err != nil {
		return
	}
	rows, err := s.store.Requests(r.Context(), rq)
	if err != nil {
		s.ledgerError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": rows})
}

func (s *server) handleRequest(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := s.store.Sync(r.Context()); err != nil {
		return
	}
	row, ok, err := s.store.Request(r.Context(), id)
	if err != nil {
		s.ledgerError(w, r, err)
		return
	}
	if !ok {
		writeError(w, errorf(http.StatusNotFound, "invalid_request_error", "request_not_found",
			"no request with id %q in the ledger", id))
		return
	}
	writeJSON(w, http.StatusOK, row)
}

// redactURL shows a provider URL without what may be a credential: the
// user information and the query (§9).
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable url)"
	}
	if u.User != nil {
		u.User = url.User("redacted")
	}
	if u.RawQuery != "" {
		u.RawQuery = "redacted"
	}
	return u.String()
}

func (s *server) ledgerError(w http.ResponseWriter, r *http.Request, err error) {
	if r.Context().Err() != nil {
		return
	}
	s.log.Error("ledger query failed", "err", err)
	writeError(w, errorf(http.StatusInternalServerError, "server_error", "ledger_error", "the ledger could not be read"))
}
