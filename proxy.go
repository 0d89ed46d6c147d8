package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	_ "embed"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io"
	"log/slog"
	"math"
	"mime"
	"net"
	"net/http"
	"net/url"
	"os"
	"reflect"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// This file is arbstr's HTTP face: the handlers, the upstream
// calls with fallback, the streaming copy, and the errors in OpenAI's shape.

// apiError is an error as the client sees it, written in OpenAI's error
// shape with a status, a type and a short code.
type apiError struct {
	Status  int
	Type    string
	Code    string
	Message string
	// retryAfter, when set, goes out as Retry-After in whole seconds, as
	// OpenAI's 429s carry it.
	retryAfter time.Duration
}

func (e *apiError) Error() string { return e.Message }

func apiErrorf(status int, typ, code, format string, args ...any) *apiError {
	return &apiError{Status: status, Type: typ, Code: code, Message: fmt.Sprintf(format, args...)}
}

func badRequest(code, format string, args ...any) *apiError {
	return apiErrorf(http.StatusBadRequest, "invalid_request_error", code, format, args...)
}

// writeError writes e in OpenAI's error shape, with its Retry-After.
func writeError(w http.ResponseWriter, e *apiError) {
	if e.retryAfter > 0 {
		secs := int64(math.Ceil(e.retryAfter.Seconds()))
		w.Header().Set("Retry-After", strconv.FormatInt(secs, 10))
	}
	writeJSON(w, e.Status, e.object())
}

// object is e in OpenAI's error shape:
// {"error":{"message":...,"type":...,"param":null,"code":...}}.
func (e *apiError) object() map[string]any {
	return map[string]any{"error": map[string]any{
		"message": e.Message, "type": e.Type, "param": nil, "code": e.Code,
	}}
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
	live      atomic.Pointer[serving] // replaced whole by a reload
	store     *Store
	log       *slog.Logger
	transport http.RoundTripper
	started   time.Time
	mux       *http.ServeMux
	// drainMu orders inflight.Add against drain: once draining, no chat
	// request starts, so none can record after the ledger has closed.
	drainMu  sync.Mutex
	draining bool
	inflight sync.WaitGroup
	backoff  []time.Duration // between passes over the candidates
	metrics  metrics
	mode     string // "config" or "mock", for the page

	reloadMu   sync.Mutex // orders reloads, and guards stopMarket
	stopMarket func()     // stops the current router's market reads
}

// serving is what requests are served with: a configuration and what is
// built from it. A reload replaces it whole, at once; a request keeps the
// one it started with to its end.
type serving struct {
	cfg      *Config
	router   *Router
	spend    *spendControl
	authHash [32]byte      // sha256 of server.auth_token, when set
	timeout  time.Duration // server.upstream_timeout_secs
}

func newServing(cfg *Config, router *Router, spend *spendControl) *serving {
	sv := &serving{cfg: cfg, router: router, spend: spend,
		timeout: time.Duration(cfg.Server.UpstreamTimeoutSecs) * time.Second}
	if cfg.Server.AuthToken != "" {
		sv.authHash = sha256.Sum256([]byte(cfg.Server.AuthToken))
	}
	return sv
}

// current is the serving in force.
func (s *server) current() *serving { return s.live.Load() }

func newServer(cfg *Config, router *Router, store *Store, logger *slog.Logger) *server {
	s := &server{
		store:   store,
		log:     logger,
		started: time.Now(),
		mode:    "config",
		backoff: []time.Duration{250 * time.Millisecond, time.Second},
		transport: &http.Transport{
			Proxy: http.ProxyFromEnvironment,
			DialContext: (&net.Dialer{
				Timeout:   30 * time.Second,
				KeepAlive: 30 * time.Second,
			}).DialContext,
			ForceAttemptHTTP2:   true,
			MaxIdleConns:        512,
			MaxIdleConnsPerHost: 128, // keep a warm pool per provider under load
			IdleConnTimeout:     90 * time.Second,
			TLSHandshakeTimeout: 10 * time.Second,
			// No ResponseHeaderTimeout: each attempt bounds its own wait
			// with server.upstream_timeout_secs, which a reload may change.
			// Without Accept-Encoding from us, providers answer uncompressed,
			// so the body can be spliced and streamed event by event.
			DisableCompression: true,
		},
	}
	spend := newSpendControl(cfg, time.Now(), nil)
	if err := spend.restore(time.Now(), s.spentSince, func(*budget) bool { return true }); err != nil {
		logger.Error("budgets: could not read what was spent from the ledger; they start at 0", "err", err)
	}
	s.live.Store(newServing(cfg, router, spend))
	s.mux = s.routes()
	return s
}

// spentSince is what the ledger recorded since a time, by client and by
// policy, once every queued row is written.
func (s *server) spentSince(since time.Time) (map[string]int64, error) {
	s.store.Sync(context.Background())
	return s.store.Spent(context.Background(), since)
}

// startMarket reads the first listings and balances of the discovering
// providers, waiting at most a few seconds, then keeps them fresh in the
// background until ctx ends or a reload replaces the router.
func (s *server) startMarket(ctx context.Context) {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	s.startMarketLocked(ctx, s.current().router)
}

func (s *server) startMarketLocked(ctx context.Context, rt *Router) {
	mctx, cancel := context.WithCancel(ctx)
	s.stopMarket = func() { cancel(); rt.WaitMarket() }
	rt.StartMarket(mctx, &http.Client{Transport: s.transport}, s.log)
}

// reload puts a new configuration in service at once: requests that start
// from now on use it, those in flight finish on the one they started with.
// What was learned about each provider that keeps its name carries over
// (circuit, latency, listing, balance, charge ratio), and so do budgets'
// spending and clients' rate limits. One log line says what changed.
func (s *server) reload(ctx context.Context, cfg *Config) {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	old := s.current()
	rt := newRouter(cfg, s.store.Ratio)
	rt.adopt(old.router)
	spend := newSpendControl(cfg, time.Now(), old.spend)
	isNew := func(b *budget) bool { return old.spend.budget(budgetKey(b.scope, b.name, b.period)) == nil }
	if err := spend.restore(time.Now(), s.spentSince, isNew); err != nil {
		s.log.Error("reload: could not read what new budgets have spent from the ledger; they start at 0", "err", err)
	}
	if s.stopMarket != nil {
		s.stopMarket()
	}
	s.startMarketLocked(ctx, rt)
	s.live.Store(newServing(cfg, rt, spend))
	added, removed, changed := providerChanges(old.cfg.Providers, cfg.Providers)
	s.log.Info("reload: new config in service", "providers_added", strings.Join(added, ","),
		"providers_removed", strings.Join(removed, ","), "providers_changed", strings.Join(changed, ","),
		"policies", len(cfg.Policies.Rules), "clients", len(cfg.Clients))
}

// shutdownMarket stops reading listings and balances.
func (s *server) shutdownMarket() {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	if s.stopMarket != nil {
		s.stopMarket()
		s.stopMarket = nil
	}
}

// providerChanges names the providers a reload adds, removes and changes.
func providerChanges(old, cur []ProviderConfig) (added, removed, changed []string) {
	byName := make(map[string]ProviderConfig, len(old))
	for _, p := range old {
		byName[p.Name] = p
	}
	for _, p := range cur {
		o, ok := byName[p.Name]
		switch {
		case !ok:
			added = append(added, p.Name)
		case !reflect.DeepEqual(o, p):
			changed = append(changed, p.Name)
		}
		delete(byName, p.Name)
	}
	for _, p := range old {
		if _, ok := byName[p.Name]; ok {
			removed = append(removed, p.Name)
		}
	}
	return added, removed, changed
}

// routes registers every endpoint. The mux answers wrong methods itself;
// ServeHTTP turns its 404 and 405 into OpenAI-shaped errors.
func (s *server) routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/chat/completions", s.handle(chatEndpoint))
	mux.HandleFunc("POST /v1/responses", s.handle(responsesEndpoint))
	mux.HandleFunc("POST /v1/embeddings", s.handle(embeddingsEndpoint))
	mux.HandleFunc("GET /v1/models/{model...}", s.handleModel)
	mux.HandleFunc("POST /v1/cost", s.handleCost)
	mux.HandleFunc("GET /v1/models", s.handleModels)
	mux.HandleFunc("GET /health", s.handleHealth)
	mux.HandleFunc("GET /metrics", s.handleMetrics)
	mux.HandleFunc("GET /{$}", s.handlePage)
	mux.HandleFunc("GET /providers", s.handleProviders)
	mux.HandleFunc("GET /v1/market", s.handleMarket)
	mux.HandleFunc("GET /v1/budgets", s.handleBudgets)
	mux.HandleFunc("GET /v1/stats", s.handleStats)
	mux.HandleFunc("GET /v1/requests", s.handleRequests)
	mux.HandleFunc("GET /v1/requests/{id}", s.handleRequest)
	return mux
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	sv := s.current()
	if aerr := sv.browserGuard(w, r); aerr != nil {
		refusedHeaders(w, r)
		writeError(w, aerr)
		return
	}
	if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
		// A listed origin's preflight, answered by browserGuard's headers.
		w.WriteHeader(http.StatusNoContent)
		return
	}
	c, ok := sv.caller(r)
	if !ok {
		refusedHeaders(w, r)
		if r.URL.Path == "/" {
			w.Header().Set("WWW-Authenticate", `Basic realm="arbstr"`)
		}
		writeError(w, apiErrorf(http.StatusUnauthorized, "authentication_error", "invalid_api_key",
			"missing or invalid bearer token; send Authorization: Bearer <token>, a client's or server.auth_token"))
		return
	}
	if c != nil {
		r = r.WithContext(context.WithValue(r.Context(), clientKey{}, c))
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
		writeError(w, apiErrorf(http.StatusMethodNotAllowed, "invalid_request_error", "method_not_allowed",
			"method %s is not allowed on %s; allowed: %s", r.Method, r.URL.Path, allow))
		return
	}
	writeError(w, apiErrorf(http.StatusNotFound, "invalid_request_error", "not_found",
		"no such endpoint: %s %s", r.Method, r.URL.Path))
}

// browserGuard keeps web pages in the user's browser from using a local
// arbstr. A page's request carries an Origin header: it is refused unless
// the origin is listed in server.allowed_origins, and a listed one gets
// CORS headers (the Fetch standard's CORS protocol). A page can also make
// its own name resolve to 127.0.0.1 (DNS rebinding) and then read arbstr as
// same-origin, sending no Origin on its GETs; its Host header still names
// the page's site, so without server.auth_token only loopback names and
// those in server.allowed_hosts are served. With a token, the token guards.
func (sv *serving) browserGuard(w http.ResponseWriter, r *http.Request) *apiError {
	if sv.cfg.Server.AuthToken == "" && !sv.hostAllowed(r.Host) {
		return apiErrorf(http.StatusForbidden, "permission_error", "host_not_allowed",
			"Host %q is not served: without server.auth_token arbstr answers only loopback names and server.allowed_hosts", r.Host)
	}
	origin := r.Header.Get("Origin")
	if origin == "" {
		return nil
	}
	if !slices.Contains(sv.cfg.Server.AllowedOrigins, origin) {
		return apiErrorf(http.StatusForbidden, "permission_error", "origin_not_allowed",
			"requests from web pages are refused unless their origin is listed in server.allowed_origins; %q is not", origin)
	}
	h := w.Header()
	h.Set("Access-Control-Allow-Origin", origin)
	h.Add("Vary", "Origin")
	h.Set("Access-Control-Expose-Headers", "X-Arbstr-Request-Id, X-Arbstr-Provider, X-Arbstr-Policy, X-Arbstr-Latency-Ms, X-Arbstr-Attempts, X-Arbstr-Cost-Sats")
	if r.Method == http.MethodOptions {
		h.Set("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
		if req := r.Header.Get("Access-Control-Request-Headers"); req != "" {
			h.Set("Access-Control-Allow-Headers", req) // a listed origin is trusted
		}
		h.Set("Access-Control-Max-Age", "600")
	}
	return nil
}

// hostAllowed reports whether a Host header names this machine (localhost
// or a loopback address, with any port) or a name in server.allowed_hosts.
// A request with no Host at all comes from no browser.
func (sv *serving) hostAllowed(host string) bool {
	if host == "" {
		return true
	}
	name := host
	if h, _, err := net.SplitHostPort(host); err == nil {
		name = h
	}
	name = strings.TrimSuffix(strings.TrimPrefix(name, "["), "]")
	if strings.EqualFold(name, "localhost") || net.ParseIP(name).IsLoopback() {
		return true
	}
	for _, allowed := range sv.cfg.Server.AllowedHosts {
		if strings.EqualFold(allowed, name) || strings.EqualFold(allowed, host) {
			return true
		}
	}
	return false
}

// refusedHeaders gives a chat request refused before its handler runs the
// x-arbstr headers that every response of that endpoint carries.
func refusedHeaders(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/v1/chat/completions" {
		(&exchange{id: newRequestID(), start: time.Now()}).setHeaders(w.Header(), nil)
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

// clientPaths are the endpoints a client's token opens: those that route
// and price requests, the models, and the client's own budgets.
func clientPath(path string) bool {
	switch path {
	case "/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/cost", "/v1/models", "/v1/budgets":
		return true
	}
	return strings.HasPrefix(path, "/v1/models/")
}

// caller says who sent a request: a client (by its token), or the operator
// (nil: server.auth_token's holder, or anyone where no token guards). ok is
// false for a request to refuse with 401. GET /health is open to all.
// Tokens are compared in constant time through their hashes, so that not
// even a token's length leaks.
func (sv *serving) caller(r *http.Request) (c *client, ok bool) {
	if r.URL.Path == "/health" {
		return nil, true
	}
	token, hasToken := bearerToken(r)
	if !hasToken && r.URL.Path == "/" {
		// A browser cannot send a bearer token to a page; it asks the
		// person for a password instead (HTTP Basic, RFC 7617).
		_, token, hasToken = r.BasicAuth()
	}
	operator := sv.cfg.Server.AuthToken != ""
	hash := sha256.Sum256([]byte(token))
	if hasToken && operator && subtle.ConstantTimeCompare(hash[:], sv.authHash[:]) == 1 {
		return nil, true
	}
	if len(sv.spend.clients) > 0 && clientPath(r.URL.Path) {
		// With clients configured, these endpoints need a token.
		if !hasToken {
			return nil, false
		}
		c = sv.spend.clientFor(hash)
		return c, c != nil
	}
	return nil, !operator
}

// clientKey is the context key of the client a request comes from.
type clientKey struct{}

// clientOf returns the client a request comes from, nil for the operator.
func clientOf(r *http.Request) *client {
	c, _ := r.Context().Value(clientKey{}).(*client)
	return c
}

// bearerToken returns the token of an Authorization: Bearer header, the
// scheme matched in any case.
func bearerToken(r *http.Request) (string, bool) {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "bearer") {
		return "", false
	}
	return strings.TrimSpace(token), true
}

// readBody reads and validates a request body: JSON content
// type, at most server.max_body_bytes, an object with a model and messages.
func (sv *serving) readBody(w http.ResponseWriter, r *http.Request, parse func([]byte) (*chatRequest, *apiError)) ([]byte, *chatRequest, *apiError) {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || mt != "application/json" {
			return nil, nil, badRequest("invalid_content_type",
				"Content-Type must be application/json, got %q", ct)
		}
	}
	limit := sv.cfg.Server.MaxBodyBytes
	tooLarge := func() *apiError { // built only for a refusal: it formats a message
		return apiErrorf(http.StatusRequestEntityTooLarge, "invalid_request_error", "body_too_large",
			"request body exceeds server.max_body_bytes (%d bytes)", limit)
	}
	if r.ContentLength > limit {
		return nil, nil, tooLarge() // refused without reading it
	}
	// A body must arrive within server.body_timeout_secs, so that a client
	// cannot hold a connection by never finishing it.
	if t := sv.cfg.Server.BodyTimeoutSecs; t > 0 {
		rc := http.NewResponseController(w)
		rc.SetReadDeadline(time.Now().Add(time.Duration(t) * time.Second))
		defer rc.SetReadDeadline(time.Time{})
	}
	var buf bytes.Buffer
	if r.ContentLength > 0 {
		// One allocation: ReadFrom grows the buffer unless bytes.MinRead
		// bytes are free before each read, the final one that sees EOF
		// included. No more than 1 MiB up front for a client that only
		// claims a large body.
		buf.Grow(int(min(r.ContentLength, 1<<20)) + bytes.MinRead)
	}
	if _, err := buf.ReadFrom(http.MaxBytesReader(w, r.Body, limit)); err != nil {
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			return nil, nil, tooLarge()
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// The rest of the body will not come: without this, the server
			// would try to read it before sending the answer.
			w.Header().Set("Connection", "close")
			return nil, nil, apiErrorf(http.StatusRequestTimeout, "invalid_request_error", "request_timeout",
				"the request body did not arrive within server.body_timeout_secs (%ds)", sv.cfg.Server.BodyTimeoutSecs)
		}
		return nil, nil, badRequest("invalid_body", "could not read the request body: %v", err)
	}
	body := buf.Bytes()
	req, aerr := parse(body)
	return body, req, aerr
}

// parseChat decodes what routing needs from a chat body and rejects bodies
// that no provider could serve: a JSON object with a non-empty string model
// and a non-empty messages array. Keys are exact, as a provider reads them;
// of a key written twice, the last counts, and null is as good as absent.
func parseChat(body []byte) (*chatRequest, *apiError) {
	req := &chatRequest{}
	var model, messages, stream, maxTokens, maxCompletionTokens, tools []byte
	valid := jsonMembers(body, func(key, value []byte) {
		switch string(key) {
		case "model":
			model = value
		case "messages":
			messages = value
		case "stream":
			stream = value
		case "stream_options":
			req.StreamOptions = value
		case "max_tokens":
			maxTokens = value
		case "max_completion_tokens":
			maxCompletionTokens = value
		case "tools":
			tools = value
		}
	})
	if !valid {
		return nil, notAnObject(body)
	}
	// Every message is counted; the last user message's text is kept.
	count, shaped := 0, true
	var lastUser []byte
	if len(messages) > 0 && string(messages) != "null" {
		shaped = jsonElements(messages, func(m []byte) {
			count++
			n, role, content, ok := readMessage(m)
			shaped = shaped && ok
			req.TextBytes += n
			if role == "user" {
				lastUser = content
			}
		}) && shaped
	}
	if !shaped {
		return nil, badRequest("invalid_messages", "messages must be a non-empty array of objects with a string role")
	}
	var aerr *apiError
	if req.Model, aerr = parseModel(model); aerr != nil {
		return nil, aerr
	}
	if count == 0 {
		return nil, badRequest("invalid_messages", "messages must be a non-empty array")
	}
	switch string(stream) {
	case "", "null", "false":
	case "true":
		req.Stream = true
	default:
		return nil, badRequest("invalid_stream", "stream must be a boolean")
	}
	// max_completion_tokens, OpenAI's newer name, wins over max_tokens.
	for _, mt := range [][]byte{maxTokens, maxCompletionTokens} {
		if n := positiveInt(mt); n > 0 {
			req.MaxTokens = n
		}
	}
	// Tool definitions are sent to the model as text, so they are input.
	req.TextBytes += int64(len(tools))
	if lastUser != nil {
		req.LastUser = messageText(lastUser)
	}
	return req, nil
}

// positiveInt is the JSON integer v if it is above zero, else 0: a token
// limit that is absent, null or of another shape sets no limit.
func positiveInt(v []byte) int64 {
	n, err := strconv.ParseInt(string(v), 10, 64)
	if err != nil || n < 0 {
		return 0
	}
	return n
}

// notAnObject is the error for a body that jsonMembers refused: not JSON,
// or JSON but not an object.
func notAnObject(body []byte) *apiError {
	err := json.Unmarshal(body, new(json.RawMessage))
	switch trimmed := bytes.TrimLeft(body, " \t\r\n"); {
	case err != nil && len(trimmed) > 0 && trimmed[0] == '{':
		return badRequest("invalid_json", "request body is not valid JSON: %v", err)
	case err != nil:
		return badRequest("invalid_json", "request body is not valid JSON")
	}
	return badRequest("invalid_json", "request body must be a JSON object")
}

// readMessage reads a message of a chat body: the bytes of its text and of
// its tool calls' arguments, its role, and its content as written. ok is
// false when it is neither an object nor null, when its role is not a
// string, or when its tool calls are not a list of calls.
func readMessage(m []byte) (textBytes int64, role string, content []byte, ok bool) {
	if string(m) == "null" {
		return 0, "", nil, true
	}
	var toolCalls []byte
	roleOK := true
	object := jsonMembers(m, func(key, value []byte) {
		switch string(key) {
		case "role":
			role, roleOK = "", true
			if string(value) != "null" {
				role, roleOK = jsonString(value)
			}
		case "content":
			content = value
		case "tool_calls":
			toolCalls = value
		}
	})
	if n, isString := jsonStringLen(content); isString {
		textBytes = n
	} else {
		textBytes = int64(len(messageText(content)))
	}
	args, callsOK := toolCallsLen(toolCalls)
	return textBytes + args, role, content, object && roleOK && callsOK
}

// toolCallsLen is the length of the arguments of the tool calls v, a JSON
// array of calls such as {"function":{"arguments":"..."}}, or null. ok is
// false when v is not of that shape.
func toolCallsLen(v []byte) (n int64, ok bool) {
	if len(v) == 0 || string(v) == "null" {
		return 0, true
	}
	ok = true
	isObject := func(v []byte) bool { return v[0] == '{' || string(v) == "null" }
	array := jsonElements(v, func(call []byte) {
		// Of a key written twice, the last counts, its shape included.
		var args int64
		callOK := isObject(call)
		jsonMembers(call, func(key, fn []byte) {
			if string(key) != "function" {
				return
			}
			args, callOK = 0, isObject(fn)
			argsOK := true
			jsonMembers(fn, func(key, a []byte) {
				if string(key) == "arguments" {
					args, argsOK = 0, true
					if string(a) != "null" {
						args, argsOK = jsonStringLen(a)
					}
				}
			})
			callOK = callOK && argsOK
		})
		ok = ok && callOK
		n += args
	})
	return n, array && ok
}

// endpoint is one of the OpenAI APIs that arbstr routes: how its body is
// read, where it goes upstream, and how its answers are counted. All three
// share routing, fallback, circuits and the ledger.
type endpoint struct {
	name  string // the ledger's endpoint column
	path  string // appended to a provider's base URL, which ends in /v1
	parse func(body []byte) (*chatRequest, *apiError)
}

var (
	chatEndpoint       = &endpoint{name: "chat", path: "/chat/completions", parse: parseChat}
	responsesEndpoint  = &endpoint{name: "responses", path: "/responses", parse: parseResponses}
	embeddingsEndpoint = &endpoint{name: "embeddings", path: "/embeddings", parse: parseEmbeddings}
)

// url returns the endpoint's URL at a provider.
func (ep *endpoint) url(p *provider) string {
	if ep == chatEndpoint {
		return p.endpoint
	}
	return p.base + ep.path
}

// jsonObject decodes the top-level members of a body that must be a JSON
// object. Keys are exact, as a provider reads them.
func jsonObject(body []byte) (map[string]json.RawMessage, *apiError) {
	top := map[string]json.RawMessage{}
	if !jsonMembers(body, func(key, value []byte) { top[string(key)] = value }) {
		return nil, notAnObject(body)
	}
	return top, nil
}

// parseModel reads the model member that every routed body must have.
func parseModel(v json.RawMessage) (string, *apiError) {
	if len(v) == 0 || string(v) == "null" {
		return "", badRequest("missing_model", "model is required")
	}
	model, ok := jsonString(v)
	if !ok {
		return "", badRequest("invalid_model", "model must be a string")
	}
	if model == "" {
		return "", badRequest("missing_model", "model must not be empty")
	}
	return model, nil
}

// parseResponses reads a Responses API body: a model, and an input that is
// a string or an array of messages and items. The text of the input, the
// instructions and the tool definitions make the estimate of input tokens;
// the last user message's text is matched against keywords.
func parseResponses(body []byte) (*chatRequest, *apiError) {
	top, aerr := jsonObject(body)
	if aerr != nil {
		return nil, aerr
	}
	req := &chatRequest{}
	if req.Model, aerr = parseModel(top["model"]); aerr != nil {
		return nil, aerr
	}
	switch string(top["stream"]) {
	case "", "null", "false":
	case "true":
		req.Stream = true
	default:
		return nil, badRequest("invalid_stream", "stream must be a boolean")
	}
	req.MaxTokens = positiveInt(top["max_output_tokens"])
	input := top["input"]
	if s, ok := jsonString(input); ok {
		req.TextBytes, req.LastUser = int64(len(s)), s
	} else {
		var items []struct {
			Role      string          `json:"role"`
			Content   json.RawMessage `json:"content"`
			Arguments string          `json:"arguments"`
			Output    json.RawMessage `json:"output"`
		}
		if len(input) == 0 || json.Unmarshal(input, &items) != nil || len(items) == 0 {
			return nil, badRequest("invalid_input", "input must be a non-empty string or a non-empty array of items")
		}
		for _, it := range items {
			text := messageText(it.Content)
			req.TextBytes += int64(len(text)+len(it.Arguments)) + int64(len(messageText(it.Output)))
			if it.Role == "user" {
				req.LastUser = text
			}
		}
	}
	if s, ok := jsonString(top["instructions"]); ok {
		req.TextBytes += int64(len(s))
	}
	req.TextBytes += int64(len(top["tools"]))
	return req, nil
}

// parseEmbeddings reads an embeddings body: a model, and an input that is a
// string, an array of strings, or token arrays. Embeddings produce no output
// tokens; token arrays count as what they are.
func parseEmbeddings(body []byte) (*chatRequest, *apiError) {
	top, aerr := jsonObject(body)
	if aerr != nil {
		return nil, aerr
	}
	req := &chatRequest{NoOutput: true}
	if req.Model, aerr = parseModel(top["model"]); aerr != nil {
		return nil, aerr
	}
	invalid := badRequest("invalid_input", "input must be a non-empty string, array of strings, or array of token arrays")
	input := top["input"]
	if s, ok := jsonString(input); ok {
		if s == "" {
			return nil, invalid
		}
		req.TextBytes, req.LastUser = int64(len(s)), s
		return req, nil
	}
	var items []json.RawMessage
	if len(input) == 0 || json.Unmarshal(input, &items) != nil || len(items) == 0 {
		return nil, invalid
	}
	for _, it := range items {
		var tokens []int64
		switch s, ok := jsonString(it); {
		case ok:
			req.TextBytes += int64(len(s))
			req.LastUser = s
		case json.Unmarshal(it, &tokens) == nil:
			req.TextBytes += 4 * int64(len(tokens)) // as many tokens as listed
		default:
			var token int64
			if json.Unmarshal(it, &token) != nil {
				return nil, invalid
			}
			req.TextBytes += 4 // one token of a single token array
		}
	}
	return req, nil
}

// answerTokens reads the token counts of a non-streaming answer of any
// endpoint: from its usage (prompt_tokens and completion_tokens, or the
// Responses API's input_tokens and output_tokens), or, without usage,
// estimated from every part of the text sent and received.
func answerTokens(body []byte, req *chatRequest) (in, out int64, estimated bool, charge reportedUsage, ok bool) {
	var u *usage
	if !jsonMembers(body, func(key, value []byte) {
		if string(key) == "usage" {
			u = usageOf(value)
		}
	}) {
		return 0, 0, false, charge, false
	}
	// The text of the answer is read only when a count must be estimated:
	// usage usually holds both.
	if u != nil && (u.CompletionTokens.set || u.OutputTokens.set || req.NoOutput) {
		if in, out, estimated, ok := u.counted(req.TextBytes, 0, req.NoOutput); ok {
			return in, out, estimated, u.reportedUsage, true
		}
	}
	text := answerText(body)
	if u != nil {
		if in, out, estimated, ok := u.counted(req.TextBytes, text, req.NoOutput); ok {
			return in, out, estimated, u.reportedUsage, true
		}
	}
	if req.NoOutput {
		text = 0
	}
	return estimateTokens(req.TextBytes), estimateTokens(text), true, charge, true
}

// answerParts are the parts of an answer that hold its text: the content,
// reasoning and tool call arguments of its choices, or the content,
// summaries and arguments of a Responses API answer's output items.
type answerParts struct {
	Choices []struct {
		Message struct {
			Content          json.RawMessage `json:"content"`
			Reasoning        json.RawMessage `json:"reasoning"`
			ReasoningContent json.RawMessage `json:"reasoning_content"`
			ToolCalls        []toolCall      `json:"tool_calls"`
		} `json:"message"`
	} `json:"choices"`
	Output []struct {
		Content   json.RawMessage `json:"content"`
		Summary   json.RawMessage `json:"summary"`
		Arguments string          `json:"arguments"`
	} `json:"output"`
}

// text is the length of the answer's text.
func (a *answerParts) text() (n int64) {
	for _, ch := range a.Choices {
		m := ch.Message
		n += int64(len(messageText(m.Content)) + len(messageText(m.Reasoning)) + len(messageText(m.ReasoningContent)))
		n += toolCallBytes(m.ToolCalls)
	}
	for _, o := range a.Output {
		n += int64(len(messageText(o.Content)) + len(messageText(o.Summary)) + len(o.Arguments))
	}
	return n
}

// answerText is the length of the text of a valid answer.
func answerText(body []byte) int64 {
	var a answerParts
	json.Unmarshal(body, &a) // a part of another shape adds no text
	return a.text()
}

// toolCall is a function call an assistant made in an answer; its
// arguments are text the model wrote, and count as tokens.
type toolCall struct {
	Function struct {
		Arguments string `json:"arguments"`
	} `json:"function"`
}

func toolCallBytes(calls []toolCall) (n int64) {
	for _, tc := range calls {
		n += int64(len(tc.Function.Arguments))
	}
	return n
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

// jsonStringLen is the length of jsonString(v), without copying a string
// that holds no escape: parseChat counts every message but keeps only the
// last user's text.
func jsonStringLen(v json.RawMessage) (int64, bool) {
	if len(v) >= 2 && v[0] == '"' && bytes.IndexByte(v, '\\') < 0 {
		return int64(len(v) - 2), true
	}
	s, ok := jsonString(v)
	return int64(len(s)), ok
}

// jsonMembers calls f with the key and the value of each member of the JSON
// object b, in order, as written (a key with an escape is decoded), and
// reports whether b is exactly one valid JSON object, whitespace around it
// allowed. It checks the syntax as encoding/json does, in one pass and
// without allocating: every request and answer is read for a few of its
// members, and decoding them into structs took more of a request's time
// than anything else arbstr adds to it. f may have been called for the
// first members of a body that turns out not to be valid.
func jsonMembers(b []byte, f func(key, value []byte)) bool {
	return jsonContainer(b, '{', f)
}

// jsonElements is jsonMembers for a JSON array: f gets each element.
func jsonElements(b []byte, f func(value []byte)) bool {
	return jsonContainer(b, '[', func(_, value []byte) { f(value) })
}

// jsonContainer reads the object or array (open is '{' or '[') that is
// the whole of b, calling f for each member or element; an element has no
// key.
func jsonContainer(b []byte, open byte, f func(key, value []byte)) bool {
	i := skipSpace(b, 0)
	if i == len(b) || b[i] != open {
		return false
	}
	if i = skipSpace(b, i+1); i < len(b) && b[i] == closing(open) {
		return skipSpace(b, i+1) == len(b)
	}
	for {
		var key []byte
		start := i
		if open == '{' {
			var quoted []byte
			if quoted, start = scanKey(b, i); start < 0 {
				return false
			}
			key = quoted[1 : len(quoted)-1]
			if bytes.IndexByte(key, '\\') >= 0 {
				s, _ := jsonString(quoted)
				key = []byte(s)
			}
		}
		end := skipValue(b, start, 1)
		if end < 0 {
			return false
		}
		f(key, b[start:end])
		if i = skipSpace(b, end); i == len(b) {
			return false
		}
		switch b[i] {
		case closing(open):
			return skipSpace(b, i+1) == len(b)
		case ',':
			i = skipSpace(b, i+1)
		default:
			return false
		}
	}
}

// maxJSONDepth is encoding/json's limit on nested arrays and objects.
const maxJSONDepth = 10000

// skipValue returns the index after the JSON value that starts at b[i], or
// -1 if it is not valid JSON; depth counts the arrays and objects open
// around it. The arrays and objects open inside it are kept on a stack of
// their opening bytes rather than by recursion, so that a body nested
// 10,000 deep costs 10 KB, not megabytes of goroutine stack.
func skipValue(b []byte, i, depth int) int {
	var stack [64]byte
	open := stack[:0]
	for {
		// i is where a value starts.
		if i >= len(b) {
			return -1
		}
		switch c := b[i]; c {
		case '{', '[':
			if depth+len(open) >= maxJSONDepth {
				return -1
			}
			open = append(open, c)
			i = skipSpace(b, i+1)
			switch {
			case i < len(b) && b[i] == closing(c):
				open = open[:len(open)-1]
				i++
			case c == '{':
				if _, i = scanKey(b, i); i < 0 {
					return -1
				}
				continue
			default:
				continue
			}
		case '"':
			i = scanString(b, i)
		case 't':
			i = scanLiteral(b, i, "true")
		case 'f':
			i = scanLiteral(b, i, "false")
		case 'n':
			i = scanLiteral(b, i, "null")
		default:
			i = scanNumber(b, i)
		}
		if i < 0 {
			return -1
		}
		// A value ended at i: close the containers that end with it, and
		// go on to the next value in the innermost one still open.
		for next := false; !next; {
			if len(open) == 0 {
				return i
			}
			if i = skipSpace(b, i); i == len(b) {
				return -1
			}
			inner := open[len(open)-1]
			switch b[i] {
			case closing(inner):
				open = open[:len(open)-1]
				i++
			case ',':
				if i = skipSpace(b, i+1); inner == '{' {
					if _, i = scanKey(b, i); i < 0 {
						return -1
					}
				}
				next = true
			default:
				return -1
			}
		}
	}
}

// closing is the byte that closes an array or object opened by c.
func closing(c byte) byte {
	if c == '{' {
		return '}'
	}
	return ']'
}

// scanKey reads an object's key and its colon at b[i]: it returns the key
// as written, quotes included, and where the member's value starts, or -1.
func scanKey(b []byte, i int) (quoted []byte, value int) {
	if i >= len(b) || b[i] != '"' {
		return nil, -1
	}
	end := scanString(b, i)
	if end < 0 {
		return nil, -1
	}
	quoted = b[i:end]
	if i = skipSpace(b, end); i == len(b) || b[i] != ':' {
		return nil, -1
	}
	return quoted, skipSpace(b, i+1)
}

// The scanners below take the index of the first byte of a value in b and
// return the index after its last byte, or -1.

func scanString(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch c := b[i]; {
		case c == '"':
			return i + 1
		case c < 0x20:
			return -1
		case c == '\\':
			if i++; i == len(b) {
				return -1
			}
			switch b[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if i+4 >= len(b) {
					return -1
				}
				for _, h := range b[i+1 : i+5] {
					if !('0' <= h && h <= '9' || 'a' <= h && h <= 'f' || 'A' <= h && h <= 'F') {
						return -1
					}
				}
				i += 4
			default:
				return -1
			}
		}
	}
	return -1
}

// scanNumber follows JSON's grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func scanNumber(b []byte, i int) int {
	if b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && '1' <= b[i] && b[i] <= '9':
		i = skipDigits(b, i)
	default:
		return -1
	}
	if i < len(b) && b[i] == '.' {
		if j := skipDigits(b, i+1); j > i+1 {
			i = j
		} else {
			return -1
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		if i++; i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if j := skipDigits(b, i); j > i {
			i = j
		} else {
			return -1
		}
	}
	return i
}

func skipDigits(b []byte, i int) int {
	for i < len(b) && '0' <= b[i] && b[i] <= '9' {
		i++
	}
	return i
}

func scanLiteral(b []byte, i int, lit string) int {
	if !bytes.HasPrefix(b[i:], []byte(lit)) {
		return -1
	}
	return i + len(lit)
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// messageText returns the text of a message content: the string itself, or
// the text parts of an array joined by newlines. Keywords are matched
// against it, and the estimate of input tokens counts it.
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
		// "text" in chat; "input_text", "output_text" and "summary_text"
		// in the Responses API.
		if p.Type == "text" || strings.HasSuffix(p.Type, "_text") {
			texts = append(texts, p.Text)
		}
	}
	return strings.Join(texts, "\n")
}

// withIncludeUsage adds "stream_options":{"include_usage":true} to a streaming
// body that does not say include_usage either way, leaving every other byte
// as the client sent it. arbstr needs the usage chunk to price a stream;
// a client's explicit false stands. It reports whether it added the option.
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

// newRequestID returns a unique id for x-arbstr-request-id: "arb_", then
// the time in milliseconds (48 bits) and 64 random bits, in hex. Ids that
// grow with time add to the end of the ledger's unique index on
// request_id; random ones landed anywhere in it, and once the index
// outgrew SQLite's page cache every row cost the writer pages read and
// written, three times its time per row.
func newRequestID() string {
	var b [14]byte
	binary.BigEndian.PutUint64(b[:8], uint64(time.Now().UnixMilli())<<16)
	rand.Read(b[6:])
	return "arb_" + hex.EncodeToString(b[:])
}

// exchange is one request on its way through arbstr: what was decided
// before the first attempt, and how many attempts were made. What an attempt
// learns travels in its attemptResult, so a failed attempt leaves nothing
// behind to undo.
type exchange struct {
	sv         *serving // what the request is served with, to its end
	ep         *endpoint
	client     *client      // nil for the operator
	reserved   *reservation // in the request's budgets; nil without any
	noRow      bool         // refused because the ledger cannot write: no row
	id         string
	start      time.Time
	req        *chatRequest
	route      *route
	body       []byte // what is sent upstream
	addedUsage bool   // arbstr added include_usage; the client did not ask
	attempts   int
	logLine    *slog.Record // made by finish, written once the answer is out
	// wait sends a streaming client its headers and keep-alive comments
	// while no provider has sent a first event; nil for other requests.
	wait *streamWait
}

// answer is what arbstr learned of an upstream answer, for the ledger row.
type answer struct {
	status    int
	success   bool
	errMsg    string
	hasUsage  bool // token counts are known (reported or estimated)
	estimated bool // they were estimated from the text
	in, out   int64
	ttft      time.Duration
	// charged: the provider reported what it charged, chargedMsat.
	charged     bool
	chargedMsat int64
}

// cost is what the answer cost in msat: what the provider reported it
// charged, else its tokens at the price list in force.
func (a answer) cost(c *candidate) int64 {
	if a.charged {
		return a.chargedMsat
	}
	return c.price.cost(a.in, a.out)
}

// costSource says where the cost came from: "provider" (it reported its
// charge), "rates" (the price list and reported tokens) or "estimate".
func (a answer) costSource() string {
	switch {
	case a.charged:
		return "provider"
	case a.estimated:
		return "estimate"
	}
	return "rates"
}

// setHeaders sets the x-arbstr-* headers known so far. c is the provider
// that answered, nil when none did.
func (ex *exchange) setHeaders(h http.Header, c *candidate) {
	h.Set("X-Arbstr-Request-Id", ex.id)
	if c != nil {
		h.Set("X-Arbstr-Provider", c.p.Name)
	}
	if ex.route != nil && ex.route.policy != nil {
		h.Set("X-Arbstr-Policy", ex.route.policy.Name)
	}
	h.Set("X-Arbstr-Latency-Ms", strconv.FormatInt(time.Since(ex.start).Milliseconds(), 10))
	h.Set("X-Arbstr-Attempts", strconv.Itoa(ex.attempts))
}

// estimateTokens turns a length in bytes of text into tokens, at about four
// bytes a token, the rule of thumb OpenAI gives for English text.
func estimateTokens(bytes int64) int64 { return (bytes + 3) / 4 }

// finish records the ledger row and the metrics of an exchange, and makes
// its log line, which writeLogLine writes once the answer is out. c is the
// provider of the last attempt, nil when none was made. It is called before
// the last bytes go to the client, so that a client that reads the ledger
// right after its answer finds the row, and so that the row, which Record
// journals before it returns, survives a crash of the process once the
// answer has reached the client.
func (s *server) finish(ex *exchange, c *candidate, a answer) {
	latency := time.Since(ex.start)
	row := ledgerRow{
		RequestID:      ex.id,
		Time:           ledgerStamp{ex.start},
		Model:          ex.req.Model,
		Streaming:      ex.req.Stream,
		UsageEstimated: a.estimated,
		LatencyMs:      new(latency.Milliseconds()),
		Attempts:       ex.attempts,
		Success:        a.success,
		Status:         a.status,
		Endpoint:       ex.ep.name,
	}
	if ex.route != nil && ex.route.policy != nil {
		row.Policy = new(ex.route.policy.Name)
	}
	if c != nil {
		row.Provider = c.p.Name
	}
	if ex.req.Stream && a.ttft > 0 { // null for a stream that never began
		row.TTFTMs = new(a.ttft.Milliseconds())
	}
	if a.errMsg != "" {
		row.Error = new(a.errMsg)
	}
	if ex.client != nil {
		row.Client = ex.client.Name
	}
	var cost msats
	if a.hasUsage {
		s.price(&row, ex, c, a)
		cost = *row.Cost
	}
	// The recorded cost replaces what the request held in its budgets.
	ex.reserved.settle(int64(cost))
	ex.reserved = nil
	if ex.sv.cfg.Logging.LogRequests && !ex.noRow {
		s.store.Record(row)
	}
	s.metrics.request(&row, ex.sv.router.modelLabel(row.Model), a.ttft)
	ex.logLine = s.logLine(ex, &row, a, cost, latency)
}

// logLine is the log record of a finished request, or nil when its level is
// not logged; writeLogLine writes it once the answer is out.
func (s *server) logLine(ex *exchange, row *ledgerRow, a answer, cost msats, latency time.Duration) *slog.Record {
	level := slog.LevelInfo
	if !a.success && a.status >= 500 {
		level = slog.LevelWarn
	}
	if !s.log.Enabled(context.Background(), level) {
		return nil
	}
	rec := slog.NewRecord(time.Now(), level, "request", 0)
	rec.AddAttrs(slog.String("id", ex.id), slog.String("endpoint", ex.ep.name), slog.String("client", row.Client),
		slog.String("policy", ex.route.policyName()), slog.String("model", row.Model), slog.String("provider", row.Provider),
		slog.Bool("stream", row.Streaming), slog.Int("status", row.Status), slog.Int64("input_tokens", a.in),
		slog.Int64("output_tokens", a.out), slog.Float64("cost_sats", cost.sats()),
		slog.Int64("latency_ms", latency.Milliseconds()), slog.Int("attempts", row.Attempts), slog.String("err", a.errMsg))
	return &rec
}

// price fills in what a request with known tokens cost. The quote is the
// tokens at the price list in force; when the provider reported what it
// charged, the charge is the cost. The baseline is the same tokens at the
// priciest qualified candidate's price list.
func (s *server) price(row *ledgerRow, ex *exchange, c *candidate, a answer) {
	quoted := msats(c.price.cost(a.in, a.out))
	cost := msats(a.cost(c))
	if a.charged {
		c.p.recordChargeOf(chargeSample{reported: a.chargedMsat, quoted: int64(quoted), model: ex.req.Model,
			in: a.in, out: a.out, at: time.Now()})
	}
	row.InputTokens, row.OutputTokens = new(a.in), new(a.out)
	row.Cost, row.QuotedCost, row.CostSource = new(cost), new(quoted), new(a.costSource())
	row.BaselineCost = new(max(msats(ex.route.baseline(a.in, a.out)), quoted))
}

// fail answers the client with e and records the exchange. c is the
// provider of the last attempt, nil when none was made. When a streaming
// client already has its headers (it waited for a first event), the error
// goes out as the stream's last data line instead, with no [DONE] after it;
// the ledger keeps the status the client would otherwise have had.
func (s *server) fail(w http.ResponseWriter, ex *exchange, c *candidate, e *apiError) {
	s.finish(ex, c, answer{status: e.Status, errMsg: e.Message})
	if ex.wait != nil && ex.wait.end() {
		w.Write(ex.ep.errorEvent(e))
		http.NewResponseController(w).Flush()
		return
	}
	ex.setHeaders(w.Header(), c)
	writeError(w, e)
}

// errorEvent is e as the last event of a stream of the endpoint: for chat,
// a data line in OpenAI's error shape, which SDKs raise as an error; for
// the Responses API, its typed error event.
func (ep *endpoint) errorEvent(e *apiError) []byte {
	if ep == responsesEndpoint {
		b, _ := json.Marshal(map[string]any{"type": "error", "code": e.Code, "message": e.Message, "param": nil})
		return append(append([]byte("event: error\ndata: "), b...), '\n', '\n')
	}
	b, _ := json.Marshal(e.object())
	return append(append([]byte("data: "), b...), '\n', '\n')
}

// statusClientClosed is recorded for a client that left before its answer
// (nginx's 499).
const statusClientClosed = 499

// clientLeft records an exchange whose client went away before its answer
// began, and answers it if the connection can still take an answer: a
// client that only half-closed its side is still reading, and must never
// get an empty 200.
func (s *server) clientLeft(w http.ResponseWriter, ex *exchange, c *candidate) attemptResult {
	e := apiErrorf(statusClientClosed, "invalid_request_error", "client_closed_request",
		"the client closed its side of the connection before the answer; arbstr cancelled the upstream request")
	s.finish(ex, c, answer{status: statusClientClosed, errMsg: "client disconnected"})
	if ex.wait != nil && ex.wait.end() {
		w.Write(ex.ep.errorEvent(e))
	} else {
		ex.setHeaders(w.Header(), c)
		writeError(w, e)
	}
	return attemptResult{done: true, outcome: outcomeNeutral}
}

// handle serves a routed endpoint: chat completions, responses and
// embeddings all go through routing, fallback and the ledger alike.
func (s *server) handle(ep *endpoint) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) { s.serveRouted(w, r, ep) }
}

func (s *server) serveRouted(w http.ResponseWriter, r *http.Request, ep *endpoint) {
	if !s.enter() {
		writeError(w, apiErrorf(http.StatusServiceUnavailable, "service_unavailable", "shutting_down", "arbstr is shutting down"))
		return
	}
	defer s.inflight.Done()
	sv := s.current()
	ex := &exchange{sv: sv, ep: ep, id: newRequestID(), start: time.Now()}
	// The log line is written last, after the other defers; the answer is
	// flushed before it unless the handler panicked.
	answered := false
	defer func() { s.writeLogLine(w, ex, answered) }()
	body, req, aerr := sv.readBody(w, r, ep.parse)
	if aerr != nil {
		// Not a chat request: no ledger row.
		ex.setHeaders(w.Header(), nil)
		writeError(w, aerr)
		return
	}
	ex.req, ex.body, ex.client = req, body, clientOf(r)
	if aerr := s.admit(r, ex); aerr != nil {
		s.fail(w, ex, nil, aerr)
		answered = true
		return
	}
	// A request that ends without its row (a panic) still frees what it
	// held in its budgets; finish settles all others.
	defer func() { ex.reserved.settle(0) }()
	if req.Stream {
		if ep == chatEndpoint {
			ex.body, ex.addedUsage = withIncludeUsage(body, req.StreamOptions)
		}
		ex.wait = s.startWait(w, ex)
		defer ex.wait.end()
	}
	s.forward(w, r, ex)
	answered = true
}

// writeLogLine writes the log line that finish made, if any. When the
// answer is whole it first sends it: formatting the line and writing it to
// stderr need not delay the answer.
func (s *server) writeLogLine(w http.ResponseWriter, ex *exchange, answered bool) {
	if ex.logLine == nil {
		return
	}
	if answered {
		http.NewResponseController(w).Flush()
	}
	s.log.Handler().Handle(context.Background(), *ex.logLine)
}

// admit decides whether a request may go upstream, in this order: the
// client's rate limit, the route (policy, candidates), the client's right
// to the policy, room in the ledger for its row, and its worst case
// reserved in every budget it falls under. A refusal is recorded like any
// other.
func (s *server) admit(r *http.Request, ex *exchange) *apiError {
	sv, c, now := ex.sv, ex.client, ex.start
	if c != nil && c.limiter != nil {
		if ok, wait := c.limiter.allow(now); !ok {
			e := apiErrorf(http.StatusTooManyRequests, "requests", "rate_limit_exceeded",
				"rate limit of client %q reached: %d requests per minute", c.Name, c.RateLimitRPM)
			e.retryAfter = wait
			return e
		}
	}
	header := r.Header.Get("X-Arbstr-Policy")
	if aerr := c.limit(ex.req, header); aerr != nil {
		return aerr
	}
	rt, aerr := sv.router.Route(ex.req, header, now, sv.cfg.Server.MaxAttempts)
	ex.route = rt
	if aerr != nil {
		return aerr
	}
	if sv.cfg.Logging.LogRequests {
		if err := s.store.Admit(r.Context()); errors.Is(err, ErrLedgerUnavailable) {
			// Its row would only lengthen a queue that cannot be written:
			// the refusal is logged and counted in the metrics instead.
			ex.noRow = true
			return apiErrorf(http.StatusServiceUnavailable, "service_unavailable", "ledger_unavailable",
				"the ledger cannot be written and its queue is full; no request is sent that cannot be recorded: %v", s.store.Health())
		}
	}
	budgets := sv.spend.budgetsFor(c, rt.policyName())
	if len(budgets) == 0 {
		return nil
	}
	res, aerr := sv.spend.reserve(budgets, rt.worstCase(ex.req, sv.cfg.Budgets.DefaultReserveTokens), now)
	ex.reserved = res
	return aerr
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
// which writes its ledger row before it ends.
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

// forward tries the ordered candidates until one answers: up to
// server.max_attempts attempts, walking the list again after a backoff when
// it is shorter than that, so that a single provider gets a second chance.
func (s *server) forward(w http.ResponseWriter, r *http.Request, ex *exchange) {
	var (
		fails       []string
		last        *candidate
		lastTimeout bool
	)
	maxAttempts := ex.sv.cfg.Server.MaxAttempts
	for pass := 0; ex.attempts < maxAttempts; pass++ {
		if pass > 0 && !sleepCtx(r.Context(), s.backoff[min(pass, len(s.backoff))-1]) {
			s.clientLeft(w, ex, last)
			return
		}
		tried := false
		for i := range ex.route.ordered {
			c := &ex.route.ordered[i]
			if ex.attempts >= maxAttempts {
				break
			}
			ok, probe := c.p.acquire(time.Now())
			if !ok {
				continue // its circuit opened since routing
			}
			tried, last = true, c
			ex.attempts++
			res := s.attemptOnce(w, r, ex, c, probe)
			if res.done {
				return
			}
			s.log.Debug("attempt failed", "id", ex.id, "provider", c.p.Name, "err", res.fail)
			fails = append(fails, c.p.Name+": "+res.fail)
			lastTimeout = res.timeout
		}
		if !tried {
			break
		}
	}
	if len(fails) == 0 {
		s.fail(w, ex, last, errNoProviderAvailable(ex.req.Model, false))
		return
	}
	status, code := http.StatusBadGateway, "all_providers_failed"
	if lastTimeout {
		status, code = http.StatusGatewayTimeout, "upstream_timeout"
	}
	s.fail(w, ex, last, apiErrorf(status, "upstream_error", code,
		"all %d attempts failed: %s", ex.attempts, strings.Join(fails, "; ")))
}

// errNoProviderAvailable is the 503 of a model whose every provider is set
// aside for now: its circuit is open, or (lowBalance) its balance is too
// low for the request.
func errNoProviderAvailable(model string, lowBalance bool) *apiError {
	why := "an open circuit"
	if lowBalance {
		why = "an open circuit or too low a balance for this request"
	}
	return apiErrorf(http.StatusServiceUnavailable, "service_unavailable", "no_provider_available",
		"every provider that serves model %q has %s; retry later", model, why)
}

// sleepCtx waits d, or less if ctx ends first; it reports whether it waited
// the whole time.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// attemptOnce makes one attempt and tells the circuit breaker how it went,
// however it ends, a panic included, so that a half-open circuit's probe
// always gives its slot back.
func (s *server) attemptOnce(w http.ResponseWriter, r *http.Request, ex *exchange, c *candidate, probe bool) (res attemptResult) {
	res.outcome = outcomeNeutral
	defer func() {
		c.p.release(time.Now(), probe, res.outcome, res.retryAfter)
		s.metrics.attempt(c.p.Name, res.outcome)
	}()
	return s.attempt(w, r, ex, c)
}

// isFailure says whether an upstream status is a failure that moves the
// request to the next provider. 400, 413 and 422 are about the request, as
// are the other 4xx (405, 409, 415, ...): the client's to see. A 1xx or 3xx
// is no answer to a chat completion: a failure.
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

// retryAfter returns how long a 429 asks to wait: its Retry-After header,
// in delay-seconds or as an HTTP date (RFC 9110, section 10.2.3).
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
//
// The upstream call dies with the client. For a plain request the timeout
// bounds the whole exchange. For a stream, a timer bounds the wait for the
// first data event from the attempt's start (comments do not extend it, so
// a provider trickling keep-alives cannot hold a client for ever), and after
// that every gap between two events.
func (s *server) attempt(w http.ResponseWriter, r *http.Request, ex *exchange, c *candidate) attemptResult {
	var (
		ctx      context.Context
		cancel   context.CancelFunc
		timedOut atomic.Bool
		deadline *time.Timer
	)
	if ex.req.Stream {
		ctx, cancel = context.WithCancel(r.Context())
		deadline = time.AfterFunc(ex.sv.timeout, func() { timedOut.Store(true); cancel() })
		defer deadline.Stop()
	} else {
		ctx, cancel = context.WithTimeout(r.Context(), ex.sv.timeout)
	}
	defer cancel()

	// The body goes from the bytes in memory, never from r.Body: the
	// transport may read a request body again (to retry on a connection
	// that died idle) after the server has closed the inbound one.
	up, err := http.NewRequestWithContext(ctx, http.MethodPost, ex.ep.url(c.p), bytes.NewReader(ex.body))
	if err != nil {
		return attemptResult{fail: "bad url", outcome: outcomeFailure}
	}
	up.Header["Content-Type"] = []string{"application/json"}
	if ex.req.Stream {
		up.Header["Accept"] = []string{"text/event-stream"}
	} else {
		up.Header["Accept"] = []string{"application/json"}
	}
	if c.p.authHeader != "" {
		up.Header["Authorization"] = []string{c.p.authHeader}
	}
	sent := time.Now()
	resp, err := s.transport.RoundTrip(up)
	if err != nil {
		return s.transportFailure(w, r, ex, c, err, timedOut.Load())
	}
	defer resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return s.refused(w, r, ex, c, resp, timedOut.Load())
	}
	// Only answers count for lowest_latency: a provider that fails fast is
	// not fast.
	c.p.observe(time.Since(sent))
	if ex.req.Stream {
		rl := &relay{s: s, w: w, rc: http.NewResponseController(w), ex: ex, c: c, resp: resp,
			deadline: deadline, timedOut: &timedOut}
		return rl.run(r.Context())
	}
	return s.complete(w, r, ex, c, resp)
}

// refused handles an upstream answer that is not 2xx: a failure that moves
// the request on, or the client's own fault (400, 413, 422, ...), passed
// through with its status and body and no fallback.
func (s *server) refused(w http.ResponseWriter, r *http.Request, ex *exchange, c *candidate, resp *http.Response, timedOut bool) attemptResult {
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return s.transportFailure(w, r, ex, c, err, timedOut)
	}
	if resp.StatusCode == http.StatusPaymentRequired {
		// Out of funds there: skipped until its balance is read again.
		c.p.paymentRequired(time.Now())
	}
	if isFailure(resp.StatusCode) {
		return attemptResult{
			fail:       fmt.Sprintf("HTTP %d %s", resp.StatusCode, http.StatusText(resp.StatusCode)),
			outcome:    outcomeFailure,
			retryAfter: retryAfter(resp),
		}
	}
	b = redactKey(b, c.p.APIKey)
	s.finish(ex, c, answer{status: resp.StatusCode, errMsg: fmt.Sprintf("provider answered HTTP %d", resp.StatusCode)})
	if ex.wait != nil && ex.wait.end() {
		// The client already has a 200 and is reading a stream: the
		// provider's error becomes the stream's last data line.
		w.Write(passedErrorEvent(ex.ep, b, resp.StatusCode))
		http.NewResponseController(w).Flush()
		return attemptResult{done: true, outcome: outcomeNeutral}
	}
	h := w.Header()
	copyHeaders(h, resp.Header, c.p.APIKey)
	ex.setHeaders(h, c)
	h.Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(resp.StatusCode)
	w.Write(b)
	return attemptResult{done: true, outcome: outcomeNeutral}
}

// passedErrorEvent turns a provider's error body into one data line: the
// JSON as it was, on one line, or an OpenAI-shaped error that quotes it.
func passedErrorEvent(ep *endpoint, body []byte, status int) []byte {
	var buf bytes.Buffer
	if ep == chatEndpoint && json.Compact(&buf, body) == nil && bytes.HasPrefix(buf.Bytes(), []byte("{")) {
		return append(append([]byte("data: "), buf.Bytes()...), '\n', '\n')
	}
	return ep.errorEvent(apiErrorf(status, "invalid_request_error", "upstream_rejected",
		"provider answered HTTP %d: %s", status, strings.ToValidUTF8(string(body), "")))
}

// transportFailure classifies an error before the answer started.
func (s *server) transportFailure(w http.ResponseWriter, r *http.Request, ex *exchange, c *candidate, err error, timedOut bool) attemptResult {
	switch {
	case r.Context().Err() != nil:
		return s.clientLeft(w, ex, c)
	case errors.Is(err, errAnswerTooLarge):
		return attemptResult{fail: err.Error(), outcome: outcomeFailure}
	case errors.Is(err, errAnswerMemory):
		// Other answers hold the memory: not this provider's fault.
		return attemptResult{fail: err.Error(), outcome: outcomeNeutral}
	case timedOut || errors.Is(err, context.DeadlineExceeded) || isTimeout(err):
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
	PromptTokens     tokenCount `json:"prompt_tokens"`
	CompletionTokens tokenCount `json:"completion_tokens"`
	InputTokens      tokenCount `json:"input_tokens"`  // the Responses API's name
	OutputTokens     tokenCount `json:"output_tokens"` // the Responses API's name
	reportedUsage
}

// usageOf reads a usage object, or returns nil for a value that is not an
// object. Its reported charge is copied: the answer it is read from goes
// back to a pool.
func usageOf(v []byte) *usage {
	if len(v) == 0 || v[0] != '{' {
		return nil
	}
	u := new(usage)
	jsonMembers(v, func(key, value []byte) {
		switch string(key) {
		case "prompt_tokens":
			u.PromptTokens.UnmarshalJSON(value)
		case "completion_tokens":
			u.CompletionTokens.UnmarshalJSON(value)
		case "input_tokens":
			u.InputTokens.UnmarshalJSON(value)
		case "output_tokens":
			u.OutputTokens.UnmarshalJSON(value)
		case "cost":
			u.Cost = bytes.Clone(value)
		case "cost_sats":
			u.CostSats = bytes.Clone(value)
		}
	})
	return u
}

// counted returns the tokens of a usage object. A count it lacks is
// estimated from the text (inBytes sent, outBytes received), and estimated
// says so; ok is false when it holds no count at all, which is no usage.
// An answer without output (noOutput: embeddings) has 0 output tokens
// whatever it says. Counts are bounded, so that a provider's nonsense
// cannot overflow a cost.
func (u *usage) counted(inBytes, outBytes int64, noOutput bool) (in, out int64, estimated, ok bool) {
	inC, outC := u.PromptTokens, u.CompletionTokens
	if !inC.set {
		inC = u.InputTokens
	}
	if !outC.set {
		outC = u.OutputTokens
	}
	if !inC.set && !outC.set {
		return 0, 0, false, false
	}
	in, out = inC.n, outC.n
	if !inC.set {
		in, estimated = estimateTokens(inBytes), true
	}
	switch {
	case noOutput:
		out = 0
	case !outC.set:
		out, estimated = estimateTokens(outBytes), true
	}
	return min(max(in, 0), maxEstTokens), min(max(out, 0), maxEstTokens), estimated, true
}

// tokenCount is a token count as providers write it: an integer, or, from
// a careless one, a float or a number in a string, rounded. Anything else
// leaves it unset, so that one odd field does not lose the whole answer.
type tokenCount struct {
	n   int64
	set bool
}

func (t *tokenCount) UnmarshalJSON(b []byte) error {
	if s, ok := jsonString(b); ok {
		b = []byte(s)
	}
	if f, err := strconv.ParseFloat(string(b), 64); err == nil && !math.IsNaN(f) && !math.IsInf(f, 0) {
		t.n, t.set = int64(math.Round(min(max(f, 0), maxEstTokens))), true
	}
	return nil
}

// complete handles a non-streaming 2xx answer: the body as the provider sent
// it, with "arbstr_provider" spliced in after its opening brace.
func (s *server) complete(w http.ResponseWriter, r *http.Request, ex *exchange, c *candidate, resp *http.Response) attemptResult {
	held, err := s.readAnswer(resp)
	defer held.release()
	body := held.b
	if err != nil {
		return s.transportFailure(w, r, ex, c, err, false)
	}
	open := len(body) - len(bytes.TrimLeft(body, " \t\r\n"))
	if open == len(body) || body[open] != '{' {
		return attemptResult{fail: "answer is not a JSON object", outcome: outcomeFailure}
	}
	in, out, estimated, charge, ok := answerTokens(body, ex.req)
	if !ok {
		return attemptResult{fail: "invalid JSON in a 2xx answer", outcome: outcomeFailure}
	}
	a := answer{status: resp.StatusCode, success: true, hasUsage: true, estimated: estimated, in: in, out: out}
	a.chargedMsat, a.charged = charge.charge(resp.Header)
	s.finish(ex, c, a)

	body = redactKey(body, c.p.APIKey)
	insert := c.p.bodyField
	if rest := bytes.TrimLeft(body[open+1:], " \t\r\n"); len(rest) > 0 && rest[0] == '}' {
		insert = insert[:len(insert)-1] // an empty object takes no comma
	}
	h := w.Header()
	copyHeaders(h, resp.Header, c.p.APIKey)
	// The body is no longer the bytes the provider's encoding described.
	h.Del("Content-Encoding")
	ex.setHeaders(h, c)
	if !a.estimated || a.charged {
		h.Set("X-Arbstr-Cost-Sats", strconv.FormatFloat(msatToSats(a.cost(c)), 'f', -1, 64))
	}
	h.Set("Content-Length", strconv.Itoa(len(body)+len(insert)))
	w.WriteHeader(resp.StatusCode)
	// Three writes into the server's buffer; the body is not copied.
	w.Write(body[:open+1])
	w.Write(insert)
	w.Write(body[open+1:])
	return attemptResult{done: true, outcome: outcomeSuccess}
}

// Answers are held in memory while they are read: a whole non-streaming
// body, to splice it and read its usage, or one event of a stream. Both are
// bounded per answer and in total, so that a provider that sends a huge
// answer, or many at once, cannot exhaust a small machine's memory: the
// answer that does not fit is a failure of that provider, never a crash.
const (
	maxAnswerBytes   = 16 << 20 // one answer or one event
	answerMemoryCap  = 48 << 20 // all answers being read at once
	answerFirstChunk = 64 << 10 // read before the size of an answer is known
)

var (
	errAnswerTooLarge = fmt.Errorf("answer too large: over %d MiB", maxAnswerBytes>>20)
	errAnswerMemory   = fmt.Errorf("answer too large: arbstr's %d MiB for answers being read is in use", answerMemoryCap>>20)
)

// answerMemory counts the bytes that may still be taken for answers. It is
// taken without waiting, so two large answers can never wait on each other.
var answerMemory = newByteBudget(answerMemoryCap)

type byteBudget struct{ free atomic.Int64 }

func newByteBudget(n int64) *byteBudget {
	b := &byteBudget{}
	b.free.Store(n)
	return b
}

func (b *byteBudget) take(n int64) bool {
	if b.free.Add(-n) < 0 {
		b.free.Add(n)
		return false
	}
	return true
}

func (b *byteBudget) give(n int64) { b.free.Add(n) }

// heldBuffer is a byte slice whose capacity is counted in answerMemory.
type heldBuffer struct{ b []byte }

// grow makes room for at least one more read, doubling the capacity up to
// maxAnswerBytes (plus one byte, to tell a full answer from a larger one).
func (h *heldBuffer) grow(want int) error {
	if want <= cap(h.b) {
		return nil
	}
	if cap(h.b) > maxAnswerBytes {
		return errAnswerTooLarge
	}
	size := min(max(want, 2*cap(h.b)), maxAnswerBytes+1)
	if !answerMemory.take(int64(size)) {
		return errAnswerMemory
	}
	nb := make([]byte, len(h.b), size)
	copy(nb, h.b)
	answerMemory.give(int64(cap(h.b)))
	h.b = nb
	return nil
}

func (h *heldBuffer) release() {
	answerMemory.give(int64(cap(h.b)))
	h.b = nil
}

// readAnswer reads a non-streaming answer body into memory counted in
// answerMemory; the caller releases it once the answer is written.
func (s *server) readAnswer(resp *http.Response) (*heldBuffer, error) {
	h := &heldBuffer{}
	// Memory is taken as the bytes arrive, never on the word of a
	// Content-Length: a provider that announces 16 MiB and then stalls must
	// not hold the memory every other answer needs.
	first := answerFirstChunk
	if resp.ContentLength >= 0 && resp.ContentLength < answerFirstChunk {
		first = int(resp.ContentLength) + 1
	}
	if err := h.grow(first); err != nil {
		return h, err
	}
	for {
		if len(h.b) == cap(h.b) {
			if err := h.grow(cap(h.b) + 1); err != nil {
				return h, err
			}
		}
		n, err := resp.Body.Read(h.b[len(h.b):cap(h.b)])
		h.b = h.b[:len(h.b)+n]
		if len(h.b) > maxAnswerBytes {
			return h, errAnswerTooLarge
		}
		if err == io.EOF {
			return h, nil
		}
		if err != nil {
			return h, err
		}
	}
}

// Hop-by-hop headers (RFC 9110, section 7.6.1) are never forwarded, in
// either direction.
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
// Content-Length, which arbstr sets for the body it writes, and not
// x-arbstr-*, which are arbstr's to set. A value that holds the provider's
// key, echoed by a careless or hostile provider, has it replaced.
func copyHeaders(dst, src http.Header, key string) {
	for k, vv := range src {
		if k == "Content-Length" || slices.Contains(hopHeaders, k) || strings.HasPrefix(k, "X-Arbstr-") {
			continue
		}
		if key != "" {
			for i, v := range vv {
				if strings.Contains(v, key) {
					vv = slices.Clone(vv)
					vv[i] = strings.ReplaceAll(v, key, redacted)
				}
			}
		}
		dst[k] = vv
	}
	for _, f := range src["Connection"] {
		for name := range strings.SplitSeq(f, ",") {
			dst.Del(strings.TrimSpace(name))
		}
	}
}

// redacted stands for a provider's key wherever the provider echoed it.
const redacted = "[redacted]"

// redactKey returns b with every occurrence of key replaced by [redacted],
// so that a provider that echoes the key it was sent (in an error body, an
// answer or a stream event) cannot hand it to the client. b itself is
// returned when it holds no key, the usual case, at the cost of one search.
func redactKey(b []byte, key string) []byte {
	if key == "" || !bytes.Contains(b, []byte(key)) {
		return b
	}
	return bytes.ReplaceAll(b, []byte(key), []byte(redacted))
}

// outputKeys name the strings of a chat chunk that are output the model
// wrote: its text, its reasoning (OpenRouter's reasoning, DeepSeek's
// reasoning_content) and the arguments of its tool calls. Without a usage
// chunk, they are what the output tokens are estimated from.
var outputKeys = []string{`"content"`, `"reasoning"`, `"reasoning_content"`, `"arguments"`}

// scanChunk reads what arbstr needs from the data of a stream event by
// scanning its bytes: the length of its output strings, whether a
// finish_reason is set, and whether it holds a usage or an error object.
// Decoding every chunk with encoding/json cost more than all else arbstr does
// to a stream; the rare chunk with usage is decoded by the caller. A quoted
// key followed by a colon can only be a key, since every quote inside a JSON
// string is escaped. Content is measured as written, escapes included, which
// is near enough for an estimate of 4 bytes a token.
func scanChunk(data []byte) (content int64, finished, hasUsage, hasError bool) {
	for _, key := range outputKeys {
		for rest := data; ; {
			v, next, ok := valueOf(rest, key)
			if !ok {
				break
			}
			if v[0] == '"' {
				content += stringLen(v)
			}
			rest = next
		}
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

// sseReader reads a server-sent event stream (the WHATWG HTML standard,
// section 9.2) one complete event at a time, so that each can be looked at
// and passed on whole. It serves OpenAI's chat chunks and the Responses
// API's typed events alike: it knows only the framing.
type sseReader struct {
	body  io.Reader
	pool  *[]byte    // the pooled buffer, while buf is it
	held  heldBuffer // a larger buffer for an event over 32 KiB
	buf   []byte
	off   int // start of the bytes not yet returned
	n     int // end of the bytes read
	ready int // length of the complete event at off, when known; else 0
	// scan is where the search for the end of the event at off stopped,
	// relative to off.
	scan eventScan
	err  error
}

func newSSEReader(body io.Reader) *sseReader {
	p := streamBufs.Get().(*[]byte)
	return &sseReader{body: body, pool: p, buf: *p}
}

// close gives the reader's memory back.
func (sr *sseReader) close() {
	if sr.pool != nil {
		streamBufs.Put(sr.pool)
		sr.pool = nil
	}
	sr.held.release()
	sr.buf = nil
}

// buffered reports whether a complete event is already read, so that the
// caller can write it before flushing.
func (sr *sseReader) buffered() bool {
	if sr.ready == 0 {
		sr.ready, sr.scan = scanEvent(sr.buf[sr.off:sr.n], sr.scan)
	}
	return sr.ready > 0
}

// next returns the next complete event, its blank line included, valid
// until the following call. At the end of the body it returns the body's
// error: io.EOF for a clean end.
func (sr *sseReader) next() ([]byte, error) {
	for !sr.buffered() {
		if sr.err != nil {
			return nil, sr.err
		}
		if err := sr.fill(); err != nil {
			return nil, err
		}
	}
	ev := sr.buf[sr.off : sr.off+sr.ready]
	sr.off += sr.ready
	sr.ready = 0
	return ev, nil
}

// fill reads once more from the body, first making room: the bytes of an
// incomplete event move to the front of the buffer, and a buffer that one
// event fills is replaced by a larger one, up to maxAnswerBytes.
func (sr *sseReader) fill() error {
	if sr.off > 0 {
		sr.n = copy(sr.buf, sr.buf[sr.off:sr.n])
		sr.off = 0
	}
	if sr.n == len(sr.buf) {
		// One event fills the buffer: move it to a larger one, counted in
		// answerMemory (the pooled buffer is not).
		sr.held.b = sr.buf[:sr.n:sr.n]
		if sr.pool != nil {
			sr.held.b = nil
		}
		if err := sr.held.grow(2 * sr.n); err != nil {
			return err
		}
		if sr.pool != nil {
			sr.held.b = append(sr.held.b, sr.buf[:sr.n]...)
			streamBufs.Put(sr.pool)
			sr.pool = nil
		}
		sr.buf = sr.held.b[:cap(sr.held.b)]
	}
	m, err := sr.body.Read(sr.buf[sr.n:])
	sr.n += m
	sr.err = err
	return nil
}

// eventScan is where a scan for the end of an event stopped: the bytes
// before from hold no event's end, and the line being read starts at
// lineStart. A later scan of the same bytes, with more read, goes on from
// there, so that a large event is scanned once, not once per read.
type eventScan struct{ from, lineStart int }

// scanEvent returns the length of the first complete event in b, up to and
// including the blank line that ends it, or 0 when b holds no complete event
// yet; lines end in CRLF, LF or CR, the three forms SSE allows. It goes on
// from at, an earlier scan of the same bytes, and when b holds no complete
// event it says where to go on from.
func scanEvent(b []byte, at eventScan) (n int, next eventScan) {
	lineStart := at.lineStart
	for i := at.from; i < len(b); i++ {
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
					return end, eventScan{}
				}
				// A LF may follow in the next read: look at this CR again.
				return 0, eventScan{i, lineStart}
			}
			if b[end] == '\n' {
				end++
			}
		}
		if i == lineStart {
			return end, eventScan{}
		}
		lineStart = end
		i = end - 1
	}
	return 0, eventScan{len(b), lineStart}
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

// A streaming client may wait long for its first token: slow and reasoning
// models can think for a minute, and clients and proxies with a first-byte
// timeout give up on a silent connection. After waitHeadersAfter without a
// first event, the client gets its headers (200, text/event-stream) and
// then a keep-alive comment at least every keepAliveEvery: the provider's
// own comments, or arbstr's. It has seen only comments, so a provider that
// fails meanwhile is still replaced by the next, invisibly. The headers go
// out after 1.5 s rather than 2: an SDK with a 2 s timeout (on the headers)
// would race them at 2.
var (
	waitHeadersAfter = 1500 * time.Millisecond
	keepAliveEvery   = 5 * time.Second
)

// streamWait sends a waiting streaming client its headers and keep-alive
// comments from a timer, until the relay of an answer, or an error, takes
// the response over with end.
type streamWait struct {
	mu    sync.Mutex // guards the fields below and writes to w until ended
	w     http.ResponseWriter
	rc    *http.ResponseController
	id    string
	sent  bool // the headers went out
	ended bool
	timer *time.Timer
}

func (s *server) startWait(w http.ResponseWriter, ex *exchange) *streamWait {
	sw := &streamWait{w: w, rc: http.NewResponseController(w), id: ex.id}
	sw.mu.Lock() // tick takes it too: it must see the timer
	sw.timer = time.AfterFunc(waitHeadersAfter, sw.tick)
	sw.mu.Unlock()
	return sw
}

func (sw *streamWait) tick() {
	sw.mu.Lock()
	defer sw.mu.Unlock()
	if sw.ended {
		return
	}
	if !sw.sent {
		sw.sent = true
		setStreamHeaders(sw.w.Header())
		sw.w.Header().Set("X-Arbstr-Request-Id", sw.id)
		sw.w.WriteHeader(http.StatusOK)
	}
	sw.w.Write([]byte(": arbstr waiting\n\n"))
	sw.rc.Flush()
	sw.timer.Reset(keepAliveEvery)
}

// pass sends the client a comment of the provider's, as a keep-alive, once
// the client has its headers; false when it has not (the relay keeps the
// comment for later) or the wait is over.
func (sw *streamWait) pass(comment []byte) bool {
	sw.mu.Lock()
	defer sw.mu.Unlock()
	if sw.ended || !sw.sent {
		return false
	}
	sw.w.Write(comment)
	sw.rc.Flush()
	sw.timer.Reset(keepAliveEvery)
	return true
}

// end stops the keep-alives and reports whether the headers went out; from
// then on the caller alone writes to the response. It may be called more
// than once.
func (sw *streamWait) end() (headersSent bool) {
	sw.mu.Lock()
	defer sw.mu.Unlock()
	sw.ended = true
	sw.timer.Stop()
	return sw.sent
}

// setStreamHeaders sets the headers of an event stream to the client.
func setStreamHeaders(h http.Header) {
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // tell nginx in front not to buffer
}

// relay copies one upstream event stream to the client, event by event as
// they arrive. It reads usage on the way, withholds the usage-only chunk that
// arbstr itself asked for, and writes the ": arbstr" comment before the end.
// Until the first data event nothing of the answer is sent, so that a
// provider failing before it can be replaced by the next one.
type relay struct {
	s        *server
	w        http.ResponseWriter
	rc       *http.ResponseController
	ex       *exchange
	c        *candidate
	resp     *http.Response
	deadline *time.Timer // the first data event's deadline, then the longest gap
	timedOut *atomic.Bool

	started    bool   // the first data event went to the client
	pending    []byte // comments and other fields that came before it
	wrote      bool   // written since the last flush
	clientGone bool
	usageSeen  bool
	// usage holds the counts of the usage chunk, and the charge the
	// provider reported with it, once usageSeen.
	usage        answer
	finished     bool // a finish_reason was seen
	contentBytes int64
	firstData    time.Time
	firstContent time.Time
}

// maxPending bounds the comments kept for the client before the first data
// event; a provider that sends more loses the rest, which SSE clients ignore
// anyway.
const maxPending = 64 << 10

func (rl *relay) run(ctx context.Context) attemptResult {
	sr := newSSEReader(rl.resp.Body)
	defer sr.close()
	for {
		ev, err := sr.next()
		if err != nil {
			return rl.ended(ctx, err)
		}
		if res, done := rl.event(ev); done {
			return res
		}
		if rl.wrote && !sr.buffered() {
			rl.wrote = false
			if rl.rc.Flush() != nil {
				rl.clientGone = true
			}
		}
		if rl.clientGone {
			rl.settle(false, "client disconnected")
			return attemptResult{done: true, outcome: outcomeNeutral}
		}
	}
}

// event handles one event; done says the attempt is over.
func (rl *relay) event(ev []byte) (res attemptResult, done bool) {
	data, isData := eventData(ev)
	if !isData {
		// A comment or another field: passed on as it is.
		switch {
		case rl.started:
			rl.write(ev)
		case ev[0] == ':' && rl.ex.wait != nil && rl.ex.wait.pass(redactKey(ev, rl.c.p.APIKey)):
			// A comment: the waiting client has it now, as a keep-alive.
		case len(rl.pending)+len(ev) <= maxPending:
			rl.pending = append(rl.pending, ev...)
		}
		return res, false
	}
	now := time.Now()
	if rl.firstData.IsZero() {
		rl.firstData = now
	}
	// From the first data event on, the timer bounds the gap between events.
	rl.deadline.Reset(rl.ex.sv.timeout)
	if rl.ex.ep == responsesEndpoint {
		return rl.typedEvent(ev, data, now)
	}
	if string(data) == "[DONE]" {
		if !rl.started {
			return attemptResult{fail: "stream ended before its first event", outcome: outcomeFailure}, true
		}
		return rl.complete(ev), true
	}
	content, finish, hasUsage, hasError := scanChunk(data)
	if hasError {
		if !rl.started {
			return attemptResult{fail: "error event before the first chunk", outcome: outcomeFailure}, true
		}
		// The provider's error reaches the client as it was sent; then the
		// stream ends as an interrupted one.
		rl.write(ev)
		return rl.interrupted("the provider sent an error event"), true
	}
	if content > 0 && rl.firstContent.IsZero() {
		rl.firstContent = now
	}
	rl.contentBytes += content
	rl.finished = rl.finished || finish
	if hasUsage && rl.readUsage(data) {
		return res, false // arbstr asked for it; the client did not
	}
	if !rl.started {
		rl.start()
	}
	rl.write(ev)
	return res, false
}

// typedEvent handles an event of the Responses API, whose type says what it
// is: text deltas are counted for an estimate, response.completed (or
// response.incomplete) ends the answer and carries its usage, and an error
// or response.failed ends the stream as interrupted.
func (rl *relay) typedEvent(ev, data []byte, now time.Time) (res attemptResult, done bool) {
	typ := eventType(ev, data)
	switch typ {
	case "error", "response.failed":
		if !rl.started {
			return attemptResult{fail: "error event before the first event", outcome: outcomeFailure}, true
		}
		rl.write(ev)
		return rl.interrupted("the provider sent an error event"), true
	case "response.completed", "response.incomplete":
		var u *usage
		valid := jsonMembers(data, func(key, value []byte) {
			if string(key) == "response" {
				u = nil
				jsonMembers(value, func(key, value []byte) {
					if string(key) == "usage" {
						u = usageOf(value)
					}
				})
			}
		})
		if valid && u != nil {
			rl.takeUsage(u)
		}
		rl.finished = true
		if !rl.started {
			rl.start()
		}
		return rl.complete(ev), true
	}
	if strings.HasSuffix(typ, ".delta") {
		if v, _, ok := valueOf(data, `"delta"`); ok && v[0] == '"' {
			if rl.firstContent.IsZero() {
				rl.firstContent = now
			}
			rl.contentBytes += stringLen(v)
		}
	}
	if !rl.started {
		rl.start()
	}
	rl.write(ev)
	return res, false
}

// eventType returns a typed event's type: its event field when it has one,
// as OpenAI sends it, else the "type" member of its data.
func eventType(ev, data []byte) string {
	for line := range bytes.Lines(ev) {
		if v, ok := bytes.CutPrefix(line, []byte("event:")); ok {
			return string(bytes.TrimSpace(v))
		}
	}
	var t struct {
		Type string `json:"type"`
	}
	json.Unmarshal(data, &t)
	return t.Type
}

// readUsage takes the token counts of a usage chunk, and reports whether the
// chunk is to be withheld: a usage-only chunk that arbstr asked for.
func (rl *relay) readUsage(data []byte) (withhold bool) {
	var u *usage
	choices := 0
	if !jsonMembers(data, func(key, value []byte) {
		switch string(key) {
		case "usage":
			u = usageOf(value)
		case "choices":
			choices = 0
			if !jsonElements(value, func([]byte) { choices++ }) && string(value) != "null" {
				choices = 1 // not a list: not known to be empty, so passed on
			}
		}
	}) || u == nil || !rl.takeUsage(u) {
		return false
	}
	return rl.ex.addedUsage && choices == 0
}

// takeUsage keeps the counts and the reported charge of a usage object, if
// it has any count.
func (rl *relay) takeUsage(u *usage) bool {
	in, out, estimated, ok := u.counted(rl.ex.req.TextBytes, rl.contentBytes, rl.ex.req.NoOutput)
	if !ok {
		return false
	}
	rl.usageSeen = true
	rl.usage = answer{in: in, out: out, estimated: estimated}
	rl.usage.chargedMsat, rl.usage.charged = u.charge(rl.resp.Header)
	return true
}

// start sends the headers, unless the client got them while it waited, and
// the comments that came before the first data event.
func (rl *relay) start() {
	rl.started = true
	if rl.ex.wait == nil || !rl.ex.wait.end() {
		h := rl.w.Header()
		copyHeaders(h, rl.resp.Header, rl.c.p.APIKey)
		rl.ex.setHeaders(h, rl.c)
		setStreamHeaders(h)
		rl.w.WriteHeader(http.StatusOK)
	}
	rl.write(rl.pending)
	rl.pending = nil
}

func (rl *relay) write(b []byte) {
	if rl.clientGone || len(b) == 0 {
		return
	}
	if _, err := rl.w.Write(redactKey(b, rl.c.p.APIKey)); err != nil {
		rl.clientGone = true
	}
	rl.wrote = true
}

// ended handles the end of the upstream body, err being why it ended.
func (rl *relay) ended(ctx context.Context, err error) attemptResult {
	if ctx.Err() != nil {
		if !rl.started {
			return rl.s.clientLeft(rl.w, rl.ex, rl.c)
		}
		rl.settle(false, "client disconnected")
		return attemptResult{done: true, outcome: outcomeNeutral}
	}
	timedOut := rl.timedOut.Load()
	reason := "connection lost"
	switch {
	case errors.Is(err, errAnswerTooLarge) || errors.Is(err, errAnswerMemory):
		reason = "stream event " + err.Error()
		if !rl.started {
			o := outcomeFailure
			if errors.Is(err, errAnswerMemory) {
				o = outcomeNeutral // other answers hold the memory
			}
			return attemptResult{fail: reason, outcome: o}
		}
	case !rl.started && timedOut:
		return attemptResult{fail: "timeout", timeout: true, outcome: outcomeFailure}
	case !rl.started:
		return attemptResult{fail: "stream ended before its first event", outcome: outcomeFailure}
	case err == io.EOF && (rl.finished || rl.usageSeen):
		// A provider that ends a complete answer without [DONE]: end it
		// for the client as OpenAI would.
		return rl.complete([]byte("data: [DONE]\n\n"))
	case err == io.EOF:
		reason = "the provider closed the stream before the answer was complete"
	case timedOut:
		reason = fmt.Sprintf("no data for %s", rl.ex.sv.timeout)
	}
	return rl.interrupted(reason)
}

// settle records the stream's outcome. Without a usage chunk the tokens are
// estimated from the text, and the row says so.
func (rl *relay) settle(success bool, errMsg string) answer {
	a := rl.usage
	if !rl.usageSeen {
		a = answer{estimated: true, in: estimateTokens(rl.ex.req.TextBytes), out: estimateTokens(rl.contentBytes)}
	}
	a.status, a.success, a.errMsg, a.hasUsage = http.StatusOK, success, errMsg, true
	switch {
	case !rl.firstContent.IsZero():
		a.ttft = rl.firstContent.Sub(rl.ex.start)
	case !rl.firstData.IsZero():
		a.ttft = rl.firstData.Sub(rl.ex.start)
	}
	rl.s.finish(rl.ex, rl.c, a)
	return a
}

// complete ends a whole answer: the ledger row, then the ": arbstr" comment,
// then the final event (the provider's [DONE], or arbstr's).
func (rl *relay) complete(final []byte) attemptResult {
	a := rl.settle(true, "")
	rl.write(rl.summary(a))
	rl.write(final)
	rl.rc.Flush()
	return attemptResult{done: true, outcome: outcomeSuccess}
}

// interrupted ends a stream that broke after its first event: the client
// gets an error as the last data line, with no [DONE] after it.
func (rl *relay) interrupted(reason string) attemptResult {
	rl.settle(false, "stream interrupted: "+reason)
	rl.write(rl.ex.ep.errorEvent(apiErrorf(http.StatusBadGateway, "upstream_error", "stream_interrupted",
		"upstream stream interrupted: %s", reason)))
	rl.rc.Flush()
	return attemptResult{done: true, outcome: outcomeFailure}
}

// summary is the ": arbstr" comment that ends a stream: SDKs ignore
// comments, so it tells a curious client what the request cost without
// breaking any.
func (rl *relay) summary(a answer) []byte {
	b, _ := json.Marshal(struct {
		RequestID      string  `json:"request_id"`
		Provider       string  `json:"provider"`
		InputTokens    int64   `json:"input_tokens"`
		OutputTokens   int64   `json:"output_tokens"`
		UsageEstimated bool    `json:"usage_estimated,omitempty"`
		CostSats       float64 `json:"cost_sats"`
		CostSource     string  `json:"cost_source"`
		LatencyMs      int64   `json:"latency_ms"`
	}{rl.ex.id, rl.c.p.Name, a.in, a.out, a.estimated, msatToSats(a.cost(rl.c)), a.costSource(),
		time.Since(rl.ex.start).Milliseconds()})
	return append(append([]byte(": arbstr "), b...), '\n', '\n')
}

// handleCost is the routing dry run: the decision, no upstream call.
func (s *server) handleCost(w http.ResponseWriter, r *http.Request) {
	sv := s.current()
	_, req, aerr := sv.readBody(w, r, parseChat)
	if aerr == nil {
		aerr = clientOf(r).limit(req, r.Header.Get("X-Arbstr-Policy"))
	}
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	rt, aerr := sv.router.Route(req, r.Header.Get("X-Arbstr-Policy"), time.Now(), 0)
	if aerr != nil && aerr.Status != http.StatusServiceUnavailable {
		writeError(w, aerr) // a refusal: the same 400 the chat request gets
		return
	}
	// With every circuit open, the dry run still shows who was set aside.
	out := costAnswer{Model: req.Model, RateUnit: sv.cfg.RateUnit, Strategy: rt.strategy, Stream: req.Stream,
		EstIn: rt.estIn, EstOut: rt.estOut, Cands: []costCandidate{}, Excluded: rt.excluded}
	if rt.policy != nil {
		out.Policy = &rt.policy.Name
	}
	if out.Excluded == nil {
		out.Excluded = []exclusion{}
	}
	now := time.Now()
	for _, c := range rt.ordered {
		out.Cands = append(out.Cands, sv.costCandidate(c, rt, now))
	}
	writeJSON(w, http.StatusOK, out)
}

// costAnswer is the answer of POST /v1/cost.
type costAnswer struct {
	Model    string          `json:"model"`
	RateUnit string          `json:"rate_unit"`
	Policy   *string         `json:"policy"`
	Strategy string          `json:"strategy"`
	Stream   bool            `json:"stream"`
	EstIn    int64           `json:"estimated_input_tokens"`
	EstOut   int64           `json:"estimated_output_tokens"`
	Cands    []costCandidate `json:"candidates"`
	Excluded []exclusion     `json:"excluded"`
}

// costCandidate is a provider of /v1/cost, in the order it would be tried.
// Rates are in the config's rate unit; the estimate is at the price list,
// and the ranking multiplies it by the provider's charge ratio.
type costCandidate struct {
	Provider        string   `json:"provider"`
	InputRate       float64  `json:"input_rate"`
	OutputRate      float64  `json:"output_rate"`
	BaseFee         float64  `json:"base_fee"`
	EstInputTokens  int64    `json:"estimated_input_tokens"`
	EstOutputTokens int64    `json:"estimated_output_tokens"`
	EstimatedCost   float64  `json:"estimated_cost_sats"`
	ChargeRatio     float64  `json:"charge_ratio"`
	RankedCost      float64  `json:"ranked_cost_sats"`
	ObservedLatency *float64 `json:"observed_latency_ms"`
	Circuit         string   `json:"circuit"`
}

func (sv *serving) costCandidate(c candidate, rt *route, now time.Time) costCandidate {
	cc := costCandidate{
		Provider: c.p.Name, InputRate: sv.router.displayRate(c.price.InMicro), OutputRate: sv.router.displayRate(c.price.OutMicro),
		BaseFee: msatToSats(c.price.BaseMsat), EstInputTokens: rt.estIn, EstOutputTokens: rt.estOut,
		EstimatedCost: msatToSats(c.estMsat), ChargeRatio: c.ratio, RankedCost: msatToSats(c.rankMsat), Circuit: c.p.state(now),
	}
	if c.seen {
		ms := math.Round(c.latency*10) / 10
		cc.ObservedLatency = &ms
	}
	return cc
}

// model is an entry of GET /v1/models, in OpenAI's shape.
type model struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"` // the providers that serve it
}

// models lists each model that any provider serves once, sorted by id.
func (s *server) models() []model {
	rt := s.current().router
	t := rt.table.Load()
	owners := map[string][]string{}
	for i, p := range rt.providers {
		for _, m := range t.served[i] {
			if !slices.Contains(owners[m], p.Name) {
				owners[m] = append(owners[m], p.Name)
			}
		}
	}
	data := make([]model, 0, len(owners))
	for id, names := range owners {
		data = append(data, model{id, "model", s.started.Unix(), strings.Join(names, ",")})
	}
	sort.Slice(data, func(i, j int) bool { return data[i].ID < data[j].ID })
	return data
}

func (s *server) handleModels(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": s.models()})
}

// handleModel answers one model by id, as SDKs' models.retrieve asks. Model
// ids may hold slashes ("google/gemini-2.5-flash").
func (s *server) handleModel(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("model")
	for _, m := range s.models() {
		if m.ID == id {
			writeJSON(w, http.StatusOK, m)
			return
		}
	}
	writeError(w, apiErrorf(http.StatusNotFound, "invalid_request_error", "model_not_found",
		"the model %q does not exist or no provider serves it", id))
}

// handleHealth says whether arbstr can serve: "unhealthy" (503) when no
// provider can take a request, "degraded" while a circuit is not closed or
// the ledger cannot write, "ok" otherwise.
func (s *server) handleHealth(w http.ResponseWriter, r *http.Request) {
	providers := s.current().router.providers
	now := time.Now()
	states := map[string]map[string]string{}
	open, notClosed := 0, 0
	for _, p := range providers {
		st := p.state(now)
		if st == stateOpen {
			open++
		}
		if st != stateClosed {
			notClosed++
		}
		states[p.Name] = map[string]string{"state": st}
	}
	out := map[string]any{"providers": states}
	status, code := "ok", http.StatusOK
	ledgerErr := s.store.Health()
	switch {
	case len(providers) == 0 || open == len(providers):
		status, code = "unhealthy", http.StatusServiceUnavailable
	case notClosed > 0 || ledgerErr != nil:
		status = "degraded"
	}
	if ledgerErr != nil {
		out["ledger"] = map[string]string{"status": "failing", "error": ledgerErr.Error()}
	}
	out["status"] = status
	writeJSON(w, code, out)
}

// providerInfo is a provider as GET /providers shows it: its configuration
// (never its key), its circuit and latency, and its part of the market.
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
	providerMarket
}

func (s *server) handleProviders(w http.ResponseWriter, r *http.Request) {
	rt := s.current().router
	now := time.Now()
	market := rt.ProviderMarket(now)
	list := make([]providerInfo, 0, len(rt.providers))
	for i, p := range rt.providers {
		pi := providerInfo{
			Name: p.Name, URL: redactURL(p.URL), Models: p.Models, InputRate: p.InputRate, OutputRate: p.OutputRate,
			BaseFee: p.BaseFee, ModelRates: p.ModelRates, HasAPIKey: p.APIKey != "", Circuit: p.state(now),
			providerMarket: market[i],
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
	writeJSON(w, http.StatusOK, map[string]any{"rate_unit": rt.RateUnit(), "providers": list})
}

// handleBudgets shows every budget to the operator, and a client its own.
func (s *server) handleBudgets(w http.ResponseWriter, r *http.Request) {
	c := clientOf(r)
	list := s.current().spend.view(time.Now(), func(b *budget) bool {
		return c == nil || (b.scope == "client" && b.name == c.Name)
	})
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": list})
}

func (s *server) handleMarket(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.current().router.Market(time.Now()))
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
		writeError(w, apiErrorf(http.StatusNotFound, "invalid_request_error", "request_not_found",
			"no request with id %q in the ledger", id))
		return
	}
	writeJSON(w, http.StatusOK, row)
}

// redactURL shows a provider URL without what may be a credential: the
// user information and the query.
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
	writeError(w, apiErrorf(http.StatusInternalServerError, "server_error", "ledger_error", "the ledger could not be read"))
}

// ---- Metrics in the Prometheus text format ----

// metrics counts requests for GET /metrics. Counting takes no lock that
// every request shares: each series is found in a sync.Map, whose reads of
// existing keys take no lock, and counted with atomics.
type metrics struct {
	requests sync.Map // requestKey → *requestSeries
	attempts sync.Map // attemptKey → *atomic.Uint64
	duration sync.Map // provider → *histogram
	ttft     sync.Map // provider → *histogram
}

type requestKey struct{ provider, model, policy, client, class string }

type requestSeries struct {
	count                  atomic.Uint64
	costMsat, baselineMsat atomic.Int64
	in, out                atomic.Int64
}

type attemptKey struct{ provider, outcome string }

// histogramBuckets are the upper bounds, in seconds, of the duration
// histograms: from a fast cached answer to a long reasoning stream.
var histogramBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}

type histogram struct {
	counts [16]atomic.Uint64 // per bucket, the last for +Inf
	sum    atomic.Int64      // nanoseconds
}

func (h *histogram) observe(d time.Duration) {
	i, _ := slices.BinarySearch(histogramBuckets, d.Seconds())
	h.counts[i].Add(1)
	h.sum.Add(int64(d))
}

// load returns the value stored under key in m, storing the one new makes
// when there is none.
func load[K comparable, V any](m *sync.Map, key K, new func() *V) *V {
	if v, ok := m.Load(key); ok {
		return v.(*V)
	}
	v, _ := m.LoadOrStore(key, new())
	return v.(*V)
}

func newOf[V any]() *V { return new(V) }

// attempt counts one upstream attempt and how it ended.
func (m *metrics) attempt(provider string, o outcome) {
	name := [...]string{outcomeSuccess: "success", outcomeFailure: "failure", outcomeNeutral: "neutral"}[o]
	load(&m.attempts, attemptKey{provider, name}, newOf[atomic.Uint64]).Add(1)
}

// request counts one recorded request.
func (m *metrics) request(row *ledgerRow, model string, ttft time.Duration) {
	class := strconv.Itoa(row.Status/100) + "xx"
	policy := ""
	if row.Policy != nil {
		policy = *row.Policy
	}
	rs := load(&m.requests, requestKey{row.Provider, model, policy, row.Client, class}, newOf[requestSeries])
	rs.count.Add(1)
	if row.Cost != nil {
		rs.costMsat.Add(int64(*row.Cost))
		rs.baselineMsat.Add(int64(*row.BaselineCost))
		rs.in.Add(*row.InputTokens)
		rs.out.Add(*row.OutputTokens)
	}
	if row.Provider == "" {
		return
	}
	load(&m.duration, row.Provider, newOf[histogram]).observe(time.Duration(*row.LatencyMs) * time.Millisecond)
	if row.Streaming && ttft > 0 {
		load(&m.ttft, row.Provider, newOf[histogram]).observe(ttft)
	}
}

// promWriter writes the Prometheus text exposition format, version 0.0.4:
// for each metric a HELP and a TYPE line, then its samples.
type promWriter struct {
	b bytes.Buffer
}

func (pw *promWriter) family(name, typ, help string) {
	fmt.Fprintf(&pw.b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
}

// sample writes one sample; labels alternate names and values.
func (pw *promWriter) sample(name string, value float64, labels ...string) {
	pw.b.WriteString(name)
	if len(labels) > 0 {
		pw.b.WriteByte('{')
		for i := 0; i+1 < len(labels); i += 2 {
			if i > 0 {
				pw.b.WriteByte(',')
			}
			pw.b.WriteString(labels[i])
			pw.b.WriteString(`="`)
			pw.b.WriteString(promEscaper.Replace(labels[i+1]))
			pw.b.WriteByte('"')
		}
		pw.b.WriteByte('}')
	}
	pw.b.WriteByte(' ')
	pw.b.WriteString(strconv.FormatFloat(value, 'g', -1, 64))
	pw.b.WriteByte('\n')
}

// promEscaper escapes a label value as the text format asks.
var promEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

// sortedKeys returns the keys of a sync.Map in the order less gives, so
// that the exposition is stable between scrapes.
func sortedKeys[K comparable](m *sync.Map, less func(a, b K) int) []K {
	var keys []K
	m.Range(func(k, _ any) bool { keys = append(keys, k.(K)); return true })
	slices.SortFunc(keys, less)
	return keys
}

func (pw *promWriter) histograms(name, help string, m *sync.Map) {
	pw.family(name, "histogram", help)
	for _, provider := range sortedKeys(m, strings.Compare) {
		v, _ := m.Load(provider)
		h := v.(*histogram)
		var cum uint64
		for i, le := range histogramBuckets {
			cum += h.counts[i].Load()
			pw.sample(name+"_bucket", float64(cum), "provider", provider, "le", strconv.FormatFloat(le, 'g', -1, 64))
		}
		cum += h.counts[len(histogramBuckets)].Load()
		pw.sample(name+"_bucket", float64(cum), "provider", provider, "le", "+Inf")
		pw.sample(name+"_sum", time.Duration(h.sum.Load()).Seconds(), "provider", provider)
		pw.sample(name+"_count", float64(cum), "provider", provider)
	}
}

func compareRequestKeys(a, b requestKey) int {
	return cmp.Or(strings.Compare(a.provider, b.provider), strings.Compare(a.model, b.model),
		strings.Compare(a.policy, b.policy), strings.Compare(a.client, b.client), strings.Compare(a.class, b.class))
}

// writeCounters writes the request, cost and token counters.
func (m *metrics) writeCounters(pw *promWriter) {
	keys := sortedKeys(&m.requests, compareRequestKeys)
	series := func(k requestKey) *requestSeries { v, _ := m.requests.Load(k); return v.(*requestSeries) }
	labels := func(k requestKey) []string {
		return []string{"provider", k.provider, "model", k.model, "policy", k.policy, "client", k.client}
	}
	pw.family("arbstr_requests_total", "counter", "Requests recorded, by provider, model, policy, client and status class.")
	for _, k := range keys {
		pw.sample("arbstr_requests_total", float64(series(k).count.Load()), append(labels(k), "code", k.class)...)
	}
	for _, c := range []struct {
		name, help string
		get        func(*requestSeries) int64
	}{
		{"arbstr_cost_sats_total", "What requests cost, in sats.", func(s *requestSeries) int64 { return s.costMsat.Load() }},
		{"arbstr_baseline_cost_sats_total", "What the same requests would have cost at the priciest qualified provider, in sats.",
			func(s *requestSeries) int64 { return s.baselineMsat.Load() }},
	} {
		pw.family(c.name, "counter", c.help)
		for _, k := range keys {
			pw.sample(c.name, msatToSats(c.get(series(k))), append(labels(k), "code", k.class)...)
		}
	}
	pw.family("arbstr_tokens_total", "counter", "Tokens of recorded requests, by direction (input or output).")
	for _, k := range keys {
		s := series(k)
		pw.sample("arbstr_tokens_total", float64(s.in.Load()), append(labels(k), "code", k.class, "direction", "input")...)
		pw.sample("arbstr_tokens_total", float64(s.out.Load()), append(labels(k), "code", k.class, "direction", "output")...)
	}
	pw.family("arbstr_upstream_attempts_total", "counter", "Upstream attempts, by provider and outcome (success, failure, neutral).")
	for _, k := range sortedKeys(&m.attempts, func(a, b attemptKey) int {
		return cmp.Or(strings.Compare(a.provider, b.provider), strings.Compare(a.outcome, b.outcome))
	}) {
		v, _ := m.attempts.Load(k)
		pw.sample("arbstr_upstream_attempts_total", float64(v.(*atomic.Uint64).Load()), "provider", k.provider, "outcome", k.outcome)
	}
	pw.histograms("arbstr_request_duration_seconds", "Time from a request's arrival to the end of its answer.", &m.duration)
	pw.histograms("arbstr_stream_time_to_first_token_seconds", "Time from a streaming request's arrival to its first content.", &m.ttft)
}

// modelLabel bounds the model label of the metrics: a model that no
// provider lists is counted as "other", so that a client cannot grow the
// number of series without limit by inventing model names.
func (rt *Router) modelLabel(model string) string {
	if _, ok := rt.table.Load().byModel[model]; ok {
		return model
	}
	return "other"
}

func (s *server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	pw := &promWriter{}
	s.metrics.writeCounters(pw)
	now := time.Now()
	sv := s.current()
	pw.family("arbstr_circuit_state", "gauge", "Circuit breaker state by provider: 0 closed, 1 half-open, 2 open.")
	for _, p := range sv.router.providers {
		state := map[string]float64{stateClosed: 0, stateHalfOpen: 1, stateOpen: 2}[p.state(now)]
		pw.sample("arbstr_circuit_state", state, "provider", p.Name)
	}
	pw.family("arbstr_balance_sats", "gauge", "A provider's spendable balance as it last reported it.")
	for i, pm := range sv.router.ProviderMarket(now) {
		if pm.BalanceSats != nil {
			pw.sample("arbstr_balance_sats", *pm.BalanceSats, "provider", sv.router.providers[i].Name)
		}
	}
	pw.family("arbstr_token_price_sats", "gauge", "The price in force per token, by provider, model and direction (input or output).")
	for _, m := range sv.router.Market(now).Models {
		for _, o := range m.Providers {
			in, out := o.InputRate/1000, o.OutputRate/1000
			if sv.cfg.RateUnit == rateUnitPer1m {
				in, out = o.InputRate/1e6, o.OutputRate/1e6
			}
			pw.sample("arbstr_token_price_sats", in, "provider", o.Provider, "model", m.ID, "direction", "input")
			pw.sample("arbstr_token_price_sats", out, "provider", o.Provider, "model", m.ID, "direction", "output")
		}
	}
	pw.family("arbstr_budget_remaining_sats", "gauge", "What a budget has left in its current period.")
	for _, b := range sv.spend.view(now, func(*budget) bool { return true }) {
		pw.sample("arbstr_budget_remaining_sats", b.Remaining, "scope", b.Scope, "name", b.Name, "period", b.Period)
	}
	pw.family("arbstr_ledger_queue_rows", "gauge", "Ledger rows waiting to be written.")
	pw.sample("arbstr_ledger_queue_rows", float64(s.store.Queued()))
	pw.family("arbstr_goroutines", "gauge", "Goroutines of the arbstr process.")
	pw.sample("arbstr_goroutines", float64(runtime.NumGoroutine()))
	if rss, ok := residentBytes(); ok {
		pw.family("arbstr_resident_memory_bytes", "gauge", "Resident memory of the arbstr process.")
		pw.sample("arbstr_resident_memory_bytes", float64(rss))
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	w.Write(pw.b.Bytes())
}

// residentBytes reads the process's resident memory from /proc on Linux.
func residentBytes() (int64, bool) {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0, false
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0, false
	}
	pages, err := strconv.ParseInt(f[1], 10, 64)
	return pages * int64(os.Getpagesize()), err == nil
}

// ---- The page ----

//go:embed page.html
var pageHTML string

// pageTemplate is the page of GET /: html/template escapes every value it
// shows, names of providers and models included, which come from configs
// and from providers' listings.
var pageTemplate = template.Must(template.New("page").Funcs(template.FuncMap{
	"sats": func(v float64) string { return strconv.FormatFloat(math.Round(v*1000)/1000, 'f', -1, 64) },
}).Parse(pageHTML))

// pageData is what the page shows.
type pageData struct {
	Now, Mode, RateUnit string
	Today, Month        statsTotals
	SavedPct            string
	Chart               chart
	Providers           []pageProvider
	Market              []pageModel
	Budgets             []budgetView
	Requests            []pageRequest
}

type pageProvider struct{ Name, Circuit, PriceSource, Balance, Models string }

type pageModel struct {
	Model, Cheapest, Cost, Spread string
	Providers                     int
}

type pageRequest struct {
	Time, Endpoint, Model, Provider, Client, Tokens, Cost, Latency string
	Status                                                         int
	Success                                                        bool
}

// chart is the 30-day bar chart of the page, laid out in SVG units.
type chart struct {
	Width, Height, Base, LabelY, LegendY, LegendText int
	Max                                              float64
	Days                                             []chartDay
}

type chartDay struct {
	Label              string
	Cost, Baseline     float64
	X, W, CostY, CostH int
	BaseY, BaseH       int
	Tick               bool
}

// newChart lays out one pair of bars a day for the 30 days up to today,
// cost drawn solid over the outlined baseline.
func newChart(days []dayTotals, today time.Time) chart {
	c := chart{Width: 760, Height: 240, Base: 190, LabelY: 206, LegendY: 222, LegendText: 231}
	byDay := make(map[string]dayTotals, len(days))
	for _, d := range days {
		byDay[d.Day] = d
		c.Max = max(c.Max, msatToSats(d.BaselineMsat), msatToSats(d.CostMsat))
	}
	const left, slot = 44, 23
	top := 10
	for i := range 30 {
		day := today.AddDate(0, 0, i-29)
		d := byDay[day.Format("2006-01-02")]
		cd := chartDay{Label: day.Format("Jan 2"), Cost: msatToSats(d.CostMsat), Baseline: msatToSats(d.BaselineMsat),
			X: left + i*slot, W: slot - 5, Tick: i%5 == 4}
		scale := func(v float64) int {
			if c.Max == 0 {
				return 0
			}
			return int(math.Round(v / c.Max * float64(c.Base-top)))
		}
		cd.CostH, cd.BaseH = scale(cd.Cost), scale(cd.Baseline)
		cd.CostY, cd.BaseY = c.Base-cd.CostH, c.Base-cd.BaseH
		c.Days = append(c.Days, cd)
	}
	return c
}

func (s *server) handlePage(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/" {
		writeError(w, apiErrorf(http.StatusNotFound, "invalid_request_error", "not_found", "no such endpoint: %s %s", r.Method, r.URL.Path))
		return
	}
	data, err := s.pageData(r.Context())
	if err != nil {
		s.ledgerError(w, r, err)
		return
	}
	var buf bytes.Buffer
	if err := pageTemplate.Execute(&buf, data); err != nil {
		s.log.Error("render page", "err", err)
		writeError(w, apiErrorf(http.StatusInternalServerError, "server_error", "page_error", "the page could not be rendered"))
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	// The page needs nothing from elsewhere; say so to the browser.
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'")
	h.Set("X-Content-Type-Options", "nosniff")
	w.Write(buf.Bytes())
}

func (s *server) pageData(ctx context.Context) (*pageData, error) {
	if err := s.store.Sync(ctx); err != nil {
		return nil, err
	}
	now := time.Now().UTC()
	today, _ := periodBounds(periodDay, now)
	monthStart := today.AddDate(0, 0, -29)
	sv := s.current()
	d := &pageData{Now: now.Format("2006-01-02 15:04:05 UTC"), Mode: s.mode, RateUnit: sv.cfg.RateUnit}
	for _, p := range []struct {
		since time.Time
		dst   *statsTotals
	}{{today, &d.Today}, {monthStart, &d.Month}} {
		res, err := s.store.Stats(ctx, statsQuery{Since: p.since})
		if err != nil {
			return nil, err
		}
		*p.dst = res.Total
	}
	d.SavedPct = "0%"
	if d.Month.BaselineCostSats > 0 {
		d.SavedPct = strconv.FormatFloat(math.Round(d.Month.SavedSats/d.Month.BaselineCostSats*1000)/10, 'f', -1, 64) + "%"
	}
	days, err := s.store.Daily(ctx, monthStart)
	if err != nil {
		return nil, err
	}
	d.Chart = newChart(days, today)
	rows, err := s.store.Requests(ctx, requestsQuery{Limit: 20})
	if err != nil {
		return nil, err
	}
	for _, row := range rows {
		d.Requests = append(d.Requests, pageRequestOf(row))
	}
	d.Providers, d.Market = pageMarket(sv.router, now)
	d.Budgets = sv.spend.view(now, func(*budget) bool { return true })
	return d, nil
}

func pageRequestOf(row ledgerRow) pageRequest {
	pr := pageRequest{Time: row.Time.UTC().Format("Jan 2 15:04:05"), Endpoint: row.Endpoint, Model: row.Model,
		Provider: row.Provider, Client: row.Client, Status: row.Status, Success: row.Success,
		Tokens: "–", Cost: "–", Latency: "–"}
	if pr.Endpoint == "" {
		pr.Endpoint = "chat"
	}
	if row.LatencyMs != nil {
		pr.Latency = strconv.FormatInt(*row.LatencyMs, 10) + " ms"
	}
	if row.InputTokens != nil && row.OutputTokens != nil {
		pr.Tokens = fmt.Sprintf("%d / %d", *row.InputTokens, *row.OutputTokens)
		if row.UsageEstimated {
			pr.Tokens += " (est.)"
		}
	}
	if row.Cost != nil {
		pr.Cost = strconv.FormatFloat(row.Cost.sats(), 'f', -1, 64)
	}
	return pr
}

// pageMarket lists the providers and, per model, the cheapest provider and
// the spread, at the prices in force.
func pageMarket(rt *Router, now time.Time) ([]pageProvider, []pageModel) {
	var provs []pageProvider
	for i, pm := range rt.ProviderMarket(now) {
		p := rt.providers[i]
		pp := pageProvider{Name: p.Name, Circuit: p.state(now), PriceSource: pm.PriceSource, Balance: "–",
			Models: strings.Join(pm.ModelsServed, ", ")}
		if pm.ListingAge != nil {
			pp.PriceSource += fmt.Sprintf(", %s old", time.Duration(*pm.ListingAge)*time.Second)
			if pm.ListingStale {
				pp.PriceSource += " (stale)"
			}
		}
		if pm.ListingError != "" {
			pp.PriceSource += "; last listing failed: " + pm.ListingError
		}
		if pm.BalanceSats != nil {
			pp.Balance = strconv.FormatFloat(*pm.BalanceSats, 'f', -1, 64)
		}
		switch {
		case pm.AnyModel:
			pp.Models = "any"
		case pm.ServesNothing != "":
			pp.Models = "none: " + pm.ServesNothing
		}
		provs = append(provs, pp)
	}
	var models []pageModel
	for _, m := range rt.Market(now).Models {
		cheapest := m.Providers[0]
		models = append(models, pageModel{Model: m.ID, Cheapest: cheapest.Provider, Providers: len(m.Providers),
			Cost:   strconv.FormatFloat(cheapest.ReferenceCostSats, 'f', -1, 64),
			Spread: strconv.FormatFloat(m.SpreadPct, 'f', -1, 64) + "%"})
	}
	return provs, models
}
