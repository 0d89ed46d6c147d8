// Command arbstr is a local OpenAI-compatible proxy. It sends each chat
// completion to the cheapest provider that a policy allows, streams the answer
// back untouched, and records in one SQLite file what it cost in satoshis.
//
// Usage:
//
//	arbstr                          serve; the config is found as below
//	arbstr serve -c config.toml     serve with this config
//	arbstr -mock                    serve with built-in mock providers
//	arbstr check -c FILE            validate a config, print a summary
//	arbstr providers -c FILE        print providers, rates and key status
//
// The config is the first of -config (or -c), $ARBSTR_CONFIG, ./config.json
// and ./config.toml that exists; with none, arbstr serves in mock mode.
package main

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
)

const usageText = `usage:
  arbstr [serve] [-config FILE] [-listen ADDR] [-mock]
  arbstr check [-config FILE]
  arbstr providers [-config FILE]

  -config FILE, -c FILE  the config (.json or .toml); else $ARBSTR_CONFIG,
                         ./config.json or ./config.toml; with none, serve
                         runs the built-in mock providers
  -listen ADDR           serve on ADDR, overriding server.listen
  -mock                  serve the built-in mock providers

environment: ARBSTR_CONFIG, DATABASE_URL, ARBSTR_LOG_LEVEL,
ARBSTR_<NAME>_API_KEY (the key of provider NAME when it has no api_key)
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		// After the first signal, the default handling returns, so that a
		// second Ctrl-C ends arbstr without waiting out the grace period.
		<-ctx.Done()
		stop()
	}()
	// SIGHUP ends a Go program by default; for arbstr it means "re-read the
	// config", which serve listens for. This channel, never read, keeps the
	// signal caught for the life of the process (before serve listens,
	// after it stops listening, in check and providers), so that it never
	// kills arbstr.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGHUP)
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintf(os.Stderr, "arbstr: %v\n", err)
		if _, ok := errors.AsType[*usageError](err); ok {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// usageError is a command line that arbstr does not understand: an unknown
// subcommand or flag, or a stray argument. main exits 2 for it, as Go's flag
// package does, and 1 for any other error.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

// run is the whole program, so that tests can start it in-process and stop it
// by cancelling ctx. It prints the usage for -h (to stdout) and with a
// usageError (to stderr).
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	err := dispatch(ctx, args, stdout, stderr)
	switch _, isUsage := errors.AsType[*usageError](err); {
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprint(stdout, usageText)
		return nil
	case isUsage:
		fmt.Fprint(stderr, usageText)
	}
	return err
}

// dispatch runs the subcommand that args name; without one, serve.
func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cmd := "serve"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	switch cmd {
	case "serve":
		o, err := parseFlags(cmd, args)
		if err != nil {
			return err
		}
		return serve(ctx, o, stderr)
	case "check", "providers":
		c, err := loadForCommand(cmd, args)
		if err != nil {
			return err
		}
		if cmd == "check" {
			return check(c, stdout)
		}
		return listProviders(c, stdout)
	}
	return &usageError{fmt.Sprintf("unknown command %q", cmd)}
}

// parseFlags reads the flags of a subcommand: -config and its alias -c for
// all, -listen and -mock for serve. Arguments other than flags are an
// error: a mistyped flag or a file named without -config must not start
// arbstr in mock mode.
func parseFlags(cmd string, args []string) (overrides, error) {
	var o overrides
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // run prints the usage
	fs.StringVar(&o.configPath, "config", "", "")
	fs.StringVar(&o.configPath, "c", "", "")
	if cmd == "serve" {
		fs.StringVar(&o.listen, "listen", "", "")
		fs.BoolVar(&o.mock, "mock", false, "")
	}
	switch err := fs.Parse(args); {
	case errors.Is(err, flag.ErrHelp):
		return o, err
	case err != nil:
		return o, &usageError{fmt.Sprintf("%s: %v", cmd, err)}
	case fs.NArg() > 0:
		return o, &usageError{fmt.Sprintf("%s: unexpected argument %q", cmd, fs.Arg(0))}
	}
	return o, nil
}

// loadForCommand is the prologue of check and providers: their flags, then
// the config, which must exist (they have nothing to say about mock mode).
func loadForCommand(cmd string, args []string) (*configured, error) {
	o, err := parseFlags(cmd, args)
	if err != nil {
		return nil, err
	}
	c, err := configure(o)
	if err == nil && c.path == "" {
		err = errors.New("no config found: pass -config FILE (or -c FILE), set ARBSTR_CONFIG, or create ./config.json or ./config.toml")
	}
	return c, err
}

// rateUnitName is how check and providers name the unit of the rates they
// print: the column suffix and the words.
func rateUnitName(cfg *Config) (column, words string) {
	if cfg.RateUnit == rateUnitPer1m {
		return "1M", "sats per 1M tokens"
	}
	return "1k", "sats per 1k tokens"
}

func check(c *configured, stdout io.Writer) error {
	cfg := c.cfg
	_, unit := rateUnitName(cfg)
	fmt.Fprintf(stdout, "%s: ok\n", c.path)
	fmt.Fprintf(stdout, "  listen     %s\n", cfg.Server.Listen)
	fmt.Fprintf(stdout, "  database   %s\n", cfg.Database.Path)
	fmt.Fprintf(stdout, "  auth       %v\n", cfg.Server.AuthToken != "")
	fmt.Fprintf(stdout, "  rates in   %s (rate_unit %s); base fees in sats per request\n", unit, cfg.RateUnit)
	fmt.Fprintf(stdout, "  providers  %d\n", len(cfg.Providers))
	for _, p := range cfg.Providers {
		fmt.Fprintf(stdout, "    %-20s %s in %g out %g\n", p.Name, redactURL(p.URL), p.InputRate, p.OutputRate)
	}
	fmt.Fprintf(stdout, "  policies   %d (default strategy %s)\n", len(cfg.Policies.Rules), cfg.Policies.DefaultStrategy)
	for _, r := range cfg.Policies.Rules {
		fmt.Fprintf(stdout, "    %-20s %s, keywords %q\n", r.Name, r.Strategy, r.Keywords)
	}
	fmt.Fprintf(stdout, "  clients    %d\n", len(cfg.Clients))
	for _, w := range c.warnings {
		fmt.Fprintf(stdout, "warning: %s\n", w)
	}
	return nil
}

func listProviders(c *configured, stdout io.Writer) error {
	col, unit := rateUnitName(c.cfg)
	fmt.Fprintf(stdout, "rates in %s; base fees in sats per request\n", unit)
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "NAME\tURL\tMODELS\tIN/%s\tOUT/%s\tBASE\tKEY\n", col, col)
	for _, p := range c.cfg.Providers {
		models := strings.Join(p.Models, ",")
		if models == "" {
			models = "(any)"
		}
		// The key itself is never printed, not even a part of it.
		key := "none"
		if p.APIKey != "" {
			key = "set (" + p.KeySource + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%g\t%g\t%g\t%s\n", p.Name, redactURL(p.URL), models, p.InputRate, p.OutputRate, p.BaseFee, key)
	}
	return tw.Flush()
}

func serve(ctx context.Context, o overrides, stderr io.Writer) error {
	// Caught before anything else, so that a SIGHUP during start-up does not
	// end arbstr; one that arrives then is handled once it serves.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	c, err := configure(o)
	if err != nil {
		return err
	}
	cfg := c.cfg
	// A soft memory limit makes the garbage collector return the memory of
	// large answers promptly, so that a burst of them cannot push a small
	// machine's arbstr past its share; GOMEMLIMIT, when set, wins.
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(memoryLimit)
	}
	var level slog.Level
	level.UnmarshalText([]byte(cfg.Logging.Level)) // configure checked it
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	for _, w := range c.warnings {
		logger.Warn("config", "file", c.path, "warning", w)
	}
	mode := "config"
	if c.mock {
		mode = "mock"
		mocks, stop, err := startMocks()
		if err != nil {
			return err
		}
		defer stop()
		cfg.Providers = mocks
		if c.path == "" {
			logger.Info("no config found; serving built-in mock providers on loopback, ledger in memory")
		}
	}

	store, err := openStore(cfg.Database.Path, logger)
	if err != nil {
		return err
	}
	defer store.Close()
	router := newRouter(cfg, store.Ratio)
	srv := newServer(cfg, router, store, logger)
	srv.mode = mode
	// Listings and balances are read before arbstr serves, for a few
	// seconds at most, so that the first requests see the market.
	srv.startMarket(ctx)
	defer srv.shutdownMarket()
	applyReload := func(next *Config) { srv.reload(ctx, next) }

	ln, err := net.Listen("tcp", cfg.Server.Listen)
	if err != nil {
		return err
	}
	httpSrv := &http.Server{
		Handler: srv,
		// A slow client cannot hold a connection by trickling its headers;
		// there is no WriteTimeout, which would cut long streams.
		ReadHeaderTimeout: readHeaderTimeout,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
	}
	names := make([]string, len(cfg.Providers))
	for i, p := range cfg.Providers {
		names[i] = p.Name
	}
	logger.Info("arbstr started", "listen", ln.Addr().String(), "providers", strings.Join(names, ","),
		"database", cfg.Database.Path, "mode", mode)

	errc := make(chan error, 1)
	go func() { errc <- httpSrv.Serve(ln) }()
	for done := false; !done; {
		select {
		case err := <-errc:
			return err
		case <-hup:
			reload(o, c, applyReload, logger)
		case <-ctx.Done():
			done = true
		}
	}
	return shutdown(httpSrv, srv, store, time.Duration(cfg.Server.ShutdownTimeoutSecs)*time.Second, logger)
}

// shutdown stops accepting, lets requests and streams finish for up to
// grace, then writes every pending ledger row before the file closes.
func shutdown(httpSrv *http.Server, srv *server, store *Store, grace time.Duration, logger *slog.Logger) error {
	logger.Info("shutting down", "grace", grace)
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := httpSrv.Shutdown(sctx); err != nil {
		logger.Warn("grace period over; closing open connections", "err", err)
		httpSrv.Close()
	}
	// Closing connections cancels their requests; each still writes its row.
	srv.drain()
	if err := store.Close(); err != nil {
		return fmt.Errorf("close ledger: %w", err)
	}
	logger.Info("stopped")
	return nil
}

// reload re-reads the config on SIGHUP, with the overrides arbstr started
// with, and hands it to apply. A config that fails to load changes nothing:
// arbstr keeps serving the one it has. started is the configuration arbstr
// started with; in mock mode its mock providers carry over. server.listen
// and database.path take effect only at a restart, and a warning says so.
func reload(o overrides, started *configured, apply func(*Config), logger *slog.Logger) {
	logger.Info("reload: reading the config again")
	running := started.cfg
	if o.configPath == "" {
		// The file found at start, not the search again: a config.json
		// deleted (or not yet rewritten) must not turn arbstr into a mock
		// server that keeps the real providers and drops every guard.
		o.configPath = started.path
	}
	c, err := configure(o)
	if err == nil && c.mock && !started.mock {
		err = errors.New("no config file to read")
	}
	if err != nil {
		logger.Error("reload failed", "err", err)
		return
	}
	for _, w := range c.warnings {
		logger.Warn("config", "file", c.path, "warning", w)
	}
	next := c.cfg
	if c.mock {
		next.Providers = running.Providers
	}
	if next.Server.Listen != running.Server.Listen {
		logger.Warn("reload: server.listen changed; it takes effect at a restart", "listen", running.Server.Listen, "new", next.Server.Listen)
	}
	if next.Database.Path != running.Database.Path {
		logger.Warn("reload: database.path changed; it takes effect at a restart", "database", running.Database.Path, "new", next.Database.Path)
	}
	apply(next)
}

// memoryLimit is the soft limit of the Go runtime's memory: room for the
// answers being read (48 MiB at most) and what arbstr itself needs.
const memoryLimit = 64 << 20

// readHeaderTimeout bounds how long a client may take to send its request
// headers. A variable so that a test need not wait ten seconds.
var readHeaderTimeout = 10 * time.Second

// startMocks starts the providers of mock mode on loopback ports: real
// HTTP servers, different prices, the same models, so that routing,
// streaming, the market and the ledger can be seen with nothing but curl.
// They publish their prices and balance as Routstr providers do, and are
// read as discovering providers.
func startMocks() ([]ProviderConfig, func(), error) {
	mocks := []mockProvider{
		{cfg: ProviderConfig{Name: "mock-cheap", Models: []string{"gpt-4o-mini", "llama-3.1-8b", "text-embedding-3-small"},
			InputRate: 2, OutputRate: 6}, delay: 30 * time.Millisecond, balanceMsat: 21_000_000},
		{cfg: ProviderConfig{Name: "mock-pricey", Models: []string{"gpt-4o", "gpt-4o-mini", "llama-3.1-8b", "text-embedding-3-small"},
			InputRate: 5, OutputRate: 15, BaseFee: 1}, delay: 10 * time.Millisecond, balanceMsat: 5_000_000},
	}
	var servers []*http.Server
	stop := func() {
		for _, s := range servers {
			s.Close()
		}
	}
	var cfgs []ProviderConfig
	for _, mp := range mocks {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			stop()
			return nil, nil, fmt.Errorf("start mock provider: %w", err)
		}
		s := &http.Server{Handler: mp.routes(), ReadHeaderTimeout: 10 * time.Second}
		servers = append(servers, s)
		go s.Serve(ln)
		mp.cfg.URL = "http://" + ln.Addr().String() + "/v1"
		// A key that is no secret, so that the balance is read as from a
		// real Routstr provider.
		mp.cfg.APIKey, mp.cfg.KeySource, mp.cfg.Discover = "mock-key", "mock", true
		cfgs = append(cfgs, mp.cfg)
	}
	return cfgs, stop, nil
}

// mockProvider answers as an OpenAI-compatible Routstr provider does: chat
// completions (a JSON body with usage, or an SSE stream of chunks, one word
// per chunk, delay apart, with a usage chunk when asked and [DONE] last),
// the Responses API, embeddings, its listing with prices in sats, and its
// balance.
type mockProvider struct {
	cfg         ProviderConfig
	delay       time.Duration
	balanceMsat int64
}

func (m mockProvider) routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/chat/completions", m.chat)
	mux.HandleFunc("POST /v1/responses", m.responses)
	mux.HandleFunc("POST /v1/embeddings", m.embeddings)
	mux.HandleFunc("GET /v1/models", m.listing)
	mux.HandleFunc("GET /v1/balance/info", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"balance": m.balanceMsat, "reserved": 0})
	})
	return mux
}

// listing publishes the mock's models at its prices, in sats per token.
func (m mockProvider) listing(w http.ResponseWriter, r *http.Request) {
	var data []any
	for _, id := range m.cfg.Models {
		data = append(data, map[string]any{"id": id, "object": "model", "created": 1750000000, "enabled": true,
			"sats_pricing": map[string]any{"prompt": m.cfg.InputRate / 1000, "completion": m.cfg.OutputRate / 1000,
				"request": m.cfg.BaseFee, "max_cost": 500}})
	}
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": data})
}

// mockReply is what a mock answers to the text of a request: its words,
// and the tokens it counts in and out.
func (m mockProvider) reply(question string, prompt int64) (words []string, usage map[string]int64) {
	if len(question) > 60 {
		question = question[:60] + "..."
	}
	words = strings.Fields(fmt.Sprintf("This is %s answering %q with a mock reply, so that routing, streaming and costs can be tried without a real provider.", m.cfg.Name, question))
	out := int64(len(words))
	return words, map[string]int64{"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}
}

// pace waits between two words of a stream; false when the client left.
func (m mockProvider) pace(r *http.Request) bool {
	select {
	case <-r.Context().Done():
		return false
	case <-time.After(m.delay):
		return true
	}
}

func (m mockProvider) chat(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Model    string `json:"model"`
		Messages []struct {
			Role    string          `json:"role"`
			Content json.RawMessage `json:"content"`
		} `json:"messages"`
		Stream  bool `json:"stream"`
		Options struct {
			IncludeUsage bool `json:"include_usage"`
		} `json:"stream_options"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeError(w, badRequest("invalid_json", "invalid JSON: %v", err))
		return
	}
	var prompt int64
	question := ""
	for _, msg := range req.Messages {
		text := messageText(msg.Content)
		prompt += estimateTokens(int64(len(text))) + 4 // plus the per-message overhead real tokenizers add
		if msg.Role == "user" {
			question = text
		}
	}
	words, u := m.reply(question, prompt)
	id, created := fmt.Sprintf("chatcmpl-mock%016x", rand.Uint64()), time.Now().Unix()
	if !req.Stream {
		writeJSON(w, http.StatusOK, map[string]any{
			"id": id, "object": "chat.completion", "created": created, "model": req.Model,
			"choices": []any{map[string]any{"index": 0, "finish_reason": "stop",
				"message": map[string]any{"role": "assistant", "content": strings.Join(words, " ")}}},
			"usage": u,
		})
		return
	}
	ev := newMockStream(w)
	chunk := func(delta map[string]any, finish any) map[string]any {
		return map[string]any{"id": id, "object": "chat.completion.chunk", "created": created, "model": req.Model,
			"choices": []any{map[string]any{"index": 0, "delta": delta, "finish_reason": finish}}}
	}
	if !ev.send("", chunk(map[string]any{"role": "assistant", "content": ""}, nil)) {
		return
	}
	for i, word := range words {
		if i > 0 {
			word = " " + word
		}
		if !m.pace(r) || !ev.send("", chunk(map[string]any{"content": word}, nil)) {
			return
		}
	}
	ev.send("", chunk(map[string]any{}, "stop"))
	if req.Options.IncludeUsage {
		ev.send("", map[string]any{"id": id, "object": "chat.completion.chunk", "created": created,
			"model": req.Model, "choices": []any{}, "usage": u})
	}
	ev.raw("data: [DONE]\n\n")
}

func (m mockProvider) responses(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	req, aerr := parseResponses(body)
	if err != nil || aerr != nil {
		writeError(w, badRequest("invalid_json", "not a Responses API request"))
		return
	}
	words, u := m.reply(req.LastUser, estimateTokens(req.TextBytes)+4)
	text := strings.Join(words, " ")
	part := map[string]any{"type": "output_text", "text": text, "annotations": []any{}}
	item := map[string]any{"type": "message", "id": "msg_mock", "role": "assistant", "status": "completed", "content": []any{part}}
	resp := map[string]any{"id": fmt.Sprintf("resp_mock%016x", rand.Uint64()), "object": "response",
		"created_at": time.Now().Unix(), "status": "completed", "model": req.Model, "output": []any{item},
		"usage": map[string]int64{"input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"], "total_tokens": u["total_tokens"]}}
	if !req.Stream {
		writeJSON(w, http.StatusOK, resp)
		return
	}
	// The events of OpenAI's stream, in its order, each numbered.
	ev := newMockStream(w)
	seq := 0
	send := func(typ string, fields map[string]any) bool {
		fields["type"], fields["sequence_number"] = typ, seq
		seq++
		return ev.send(typ, fields)
	}
	started := maps.Clone(resp)
	started["status"], started["output"] = "in_progress", []any{}
	delete(started, "usage")
	at := map[string]any{"item_id": "msg_mock", "output_index": 0, "content_index": 0}
	with := func(kv ...any) map[string]any {
		f := maps.Clone(at)
		for i := 0; i+1 < len(kv); i += 2 {
			f[kv[i].(string)] = kv[i+1]
		}
		return f
	}
	send("response.created", map[string]any{"response": started})
	send("response.in_progress", map[string]any{"response": started})
	send("response.output_item.added", map[string]any{"output_index": 0,
		"item": map[string]any{"type": "message", "id": "msg_mock", "role": "assistant", "status": "in_progress", "content": []any{}}})
	send("response.content_part.added", with("part", map[string]any{"type": "output_text", "text": "", "annotations": []any{}}))
	for i, word := range words {
		if i > 0 {
			word = " " + word
		}
		if !m.pace(r) || !send("response.output_text.delta", with("delta", word)) {
			return
		}
	}
	send("response.output_text.done", with("text", text))
	send("response.content_part.done", with("part", part))
	send("response.output_item.done", map[string]any{"output_index": 0, "item": item})
	send("response.completed", map[string]any{"response": resp})
}

func (m mockProvider) embeddings(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	req, aerr := parseEmbeddings(body)
	var opts struct {
		Input  json.RawMessage `json:"input"`
		Format string          `json:"encoding_format"`
	}
	if err != nil || aerr != nil || json.Unmarshal(body, &opts) != nil {
		writeError(w, badRequest("invalid_json", "not an embeddings request"))
		return
	}
	inputs := 1
	var list []json.RawMessage
	if json.Unmarshal(opts.Input, &list) == nil && len(list) > 0 && (list[0][0] == '"' || list[0][0] == '[') {
		inputs = len(list) // strings or token arrays; a flat list of numbers is one input
	}
	var data []any
	for i := range inputs {
		vec := []float32{0.011, -0.027, 0.043, float32(i) / 10}
		var v any = vec
		if opts.Format == "base64" {
			// Little-endian float32s, base64-encoded, as OpenAI sends them.
			b := make([]byte, 0, 4*len(vec))
			for _, f := range vec {
				b = binary.LittleEndian.AppendUint32(b, math.Float32bits(f))
			}
			v = base64.StdEncoding.EncodeToString(b)
		}
		data = append(data, map[string]any{"object": "embedding", "index": i, "embedding": v})
	}
	tokens := estimateTokens(req.TextBytes)
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "model": req.Model, "data": data,
		"usage": map[string]int64{"prompt_tokens": tokens, "total_tokens": tokens}})
}

// mockStream writes server-sent events, flushed one by one.
type mockStream struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func newMockStream(w http.ResponseWriter) *mockStream {
	setStreamHeaders(w.Header())
	return &mockStream{w, http.NewResponseController(w)}
}

// send writes one event, with its event field when typ is set; false when
// the client is gone.
func (s *mockStream) send(typ string, data any) bool {
	b, _ := json.Marshal(data)
	prefix := ""
	if typ != "" {
		prefix = "event: " + typ + "\n"
	}
	return s.raw(prefix + "data: " + string(b) + "\n\n")
}

func (s *mockStream) raw(text string) bool {
	if _, err := io.WriteString(s.w, text); err != nil {
		return false
	}
	return s.rc.Flush() == nil
}
