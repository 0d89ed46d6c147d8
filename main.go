// Command arbstr is a local OpenAI-compatible proxy. It sends each chat
// completion to the cheapest provider that a policy allows, streams the answer
// back untouched, and records in one SQLite file what it cost in satoshis.
//
// Usage:
//
//	arbstr                          serve; the config is found as below
//	arbstr -config config.toml      serve with this config
//	arbstr -mock                    serve with built-in mock providers
//	arbstr check -config FILE       validate a config, print a summary
//	arbstr providers -config FILE   print providers, rates and key status
//
// The config is the first of -config, $ARBSTR_CONFIG, ./config.json and
// ./config.toml that exists; with none, arbstr serves in mock mode.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		// After the first signal, the default handling returns, so that a
		// second Ctrl-C ends arbstr without waiting out the grace period.
		<-ctx.Done()
		stop()
	}()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintf(os.Stderr, "arbstr: %v\n", err)
		os.Exit(1)
	}
}

// run is the whole program, so that tests can start it in-process and stop it
// by cancelling ctx.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		switch args[0] {
		case "check":
			return check(args[1:], stdout)
		case "providers":
			return listProviders(args[1:], stdout)
		}
	}
	return serve(ctx, args, stderr)
}

// loadFor loads the config named by -config, or discovered as in §2. It
// returns a nil config when there is none.
func loadFor(flagPath string) (*Config, string, []string, error) {
	path, err := findConfig(flagPath)
	if err != nil || path == "" {
		return nil, "", nil, err
	}
	cfg, warnings, err := loadConfig(path)
	return cfg, path, warnings, err
}

func check(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	configPath := fs.String("config", "", "config file (.json or .toml)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, path, warnings, err := loadFor(*configPath)
	if err != nil {
		return err
	}
	if cfg == nil {
		return errors.New("no config found: pass -config FILE, set ARBSTR_CONFIG, or create ./config.json or ./config.toml")
	}
	fmt.Fprintf(stdout, "%s: ok\n", path)
	fmt.Fprintf(stdout, "  listen     %s\n", cfg.Server.Listen)
	fmt.Fprintf(stdout, "  database   %s\n", cfg.Database.Path)
	fmt.Fprintf(stdout, "  auth       %v\n", cfg.Server.AuthToken != "")
	fmt.Fprintf(stdout, "  providers  %d\n", len(cfg.Providers))
	for _, p := range cfg.Providers {
		fmt.Fprintf(stdout, "    %-20s %s\n", p.Name, redactURL(p.URL))
	}
	fmt.Fprintf(stdout, "  policies   %d (default strategy %s)\n", len(cfg.Policies.Rules), cfg.Policies.DefaultStrategy)
	for _, r := range cfg.Policies.Rules {
		fmt.Fprintf(stdout, "    %-20s %s, keywords %q\n", r.Name, r.Strategy, r.Keywords)
	}
	for _, w := range warnings {
		fmt.Fprintf(stdout, "warning: %s\n", w)
	}
	return nil
}

func listProviders(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("providers", flag.ContinueOnError)
	configPath := fs.String("config", "", "config file (.json or .toml)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, _, _, err := loadFor(*configPath)
	if err != nil {
		return err
	}
	if cfg == nil {
		return errors.New("no config found: pass -config FILE")
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tURL\tMODELS\tIN/1k\tOUT/1k\tBASE\tKEY")
	for _, p := range cfg.Providers {
		models := strings.Join(p.Models, ",")
		if models == "" {
			models = "(any)"
		}
		// The key itself is never printed, not even a part of it (§9).
		key := "none"
		if p.APIKey != "" {
			key = "set (" + p.KeySource + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%g\t%g\t%g\t%s\n", p.Name, redactURL(p.URL), models, p.InputRate, p.OutputRate, p.BaseFee, key)
	}
	return tw.Flush()
}

func serve(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("arbstr", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		configPath = fs.String("config", "", "config file (.json or .toml)")
		listen     = fs.String("listen", "", "address to serve on, overriding server.listen")
		mock       = fs.Bool("mock", false, "serve with built-in mock providers")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, path, warnings, err := loadFor(*configPath)
	if err != nil {
		return err
	}
	mode := "config"
	if cfg == nil || *mock {
		mode = "mock"
		if cfg == nil {
			cfg = defaultConfig()
		}
	}
	if *listen != "" {
		cfg.Server.Listen = *listen
		if !isLoopbackListen(*listen) && cfg.Server.AuthToken == "" {
			warnings = append(warnings, fmt.Sprintf("-listen %s is not a loopback address and server.auth_token is not set: anyone who can reach it can spend your sats", *listen))
		}
	}
	if v := os.Getenv("ARBSTR_LOG_LEVEL"); v != "" {
		cfg.Logging.Level = v
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.Logging.Level)); err != nil {
		return fmt.Errorf("log level %q: want debug, info, warn or error", cfg.Logging.Level)
	}
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	for _, w := range warnings {
		logger.Warn("config", "file", path, "warning", w)
	}

	if mode == "mock" {
		mocks, stop, err := startMocks()
		if err != nil {
			return err
		}
		defer stop()
		cfg.Providers = mocks
		cfg.Database.Path = ":memory:"
		if path == "" {
			logger.Info("no config found; serving built-in mock providers on loopback, ledger in memory")
		}
	}
	if v := os.Getenv("DATABASE_URL"); v != "" {
		cfg.Database.Path = databasePath(v)
	}

	store, err := openStore(cfg.Database.Path, logger)
	if err != nil {
		return err
	}
	defer store.Close()
	router := newRouter(cfg, store.Ratio)
	srv := newServer(cfg, router, store, logger)

	ln, err := net.Listen("tcp", cfg.Server.Listen)
	if err != nil {
		return err
	}
	httpSrv := &http.Server{
		Handler: srv,
		// A slow client cannot hold a connection by trickling its headers;
		// there is no WriteTimeout, which would cut long streams (§6.2).
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
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}

	// Stop accepting, let requests and streams finish, then write every
	// pending ledger row before the file closes (§2).
	grace := time.Duration(cfg.Server.ShutdownTimeoutSecs) * time.Second
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

// readHeaderTimeout bounds how long a client may take to send its request
// headers (§6.2). A variable so that a test need not wait ten seconds.
var readHeaderTimeout = 10 * time.Second

// databasePath accepts DATABASE_URL as a plain path, sqlite:PATH,
// sqlite://PATH or file:PATH (§2).
func databasePath(v string) string {
	for _, prefix := range []string{"sqlite://", "sqlite:", "file:"} {
		if rest, ok := strings.CutPrefix(v, prefix); ok {
			return rest
		}
	}
	return v
}

// startMocks starts the providers of mock mode (§2) on loopback ports: real
// HTTP servers, different prices, the same models, so that routing,
// streaming and the ledger can be seen with nothing but curl.
func startMocks() ([]ProviderConfig, func(), error) {
	mocks := []struct {
		cfg   ProviderConfig
		delay time.Duration
	}{
		{ProviderConfig{Name: "mock-cheap", Models: []string{"gpt-4o-mini", "llama-3.1-8b"},
			InputRate: 2, OutputRate: 6}, 30 * time.Millisecond},
		{ProviderConfig{Name: "mock-pricey", Models: []string{"gpt-4o", "gpt-4o-mini", "llama-3.1-8b"},
			InputRate: 5, OutputRate: 15, BaseFee: 1}, 10 * time.Millisecond},
	}
	var servers []*http.Server
	stop := func() {
		for _, s := range servers {
			s.Close()
		}
	}
	var cfgs []ProviderConfig
	for _, m := range mocks {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			stop()
			return nil, nil, fmt.Errorf("start mock provider: %w", err)
		}
		s := &http.Server{Handler: mockProvider{name: m.cfg.Name, delay: m.delay}, ReadHeaderTimeout: 10 * time.Second}
		servers = append(servers, s)
		go s.Serve(ln)
		m.cfg.URL = "http://" + ln.Addr().String() + "/v1"
		cfgs = append(cfgs, m.cfg)
	}
	return cfgs, stop, nil
}

// mockProvider answers chat completions as an OpenAI-compatible provider
// does: a JSON body with usage, or an SSE stream of chunks, one word per
// chunk, delay apart, with a usage chunk when asked and [DONE] last.
type mockProvider struct {
	name  string
	delay time.Duration
}

func (m mockProvider) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.URL.Path != "/v1/chat/completions" {
		writeError(w, errorf(http.StatusNotFound, "invalid_request_error", "not_found", "no such endpoint"))
		return
	}
	var req struct {
		Model    string `json:"model"`
		Messages []struct {
			Role    string          `json:"role"`
			Content json.RawMessage `json:"content"`
		} `json:"messages"`
		Stream        bool `json:"stream"`
		StreamOptions struct {
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
		prompt += int64(len(text)+3)/4 + 4 // plus the per-message overhead real tokenizers add
		if msg.Role == "user" {
			question = text
		}
	}
	if len(question) > 60 {
		question = question[:60] + "..."
	}
	reply := fmt.Sprintf("This is %s answering %q with a mock reply, so that routing, streaming and costs can be tried without a real provider.", m.name, question)
	words := strings.Fields(reply)
	id := fmt.Sprintf("chatcmpl-mock%016x", rand.Uint64())
	created := time.Now().Unix()
	u := map[string]int64{"prompt_tokens": prompt, "completion_tokens": int64(len(words)), "total_tokens": prompt + int64(len(words))}

	if !req.Stream {
		writeJSON(w, http.StatusOK, map[string]any{
			"id": id, "object": "chat.completion", "created": created, "model": req.Model,
			"choices": []any{map[string]any{"index": 0, "finish_reason": "stop",
				"message": map[string]any{"role": "assistant", "content": reply}}},
			"usage": u,
		})
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	rc := http.NewResponseController(w)
	send := func(delta map[string]any, finish any, usage any) bool {
		chunk := map[string]any{"id": id, "object": "chat.completion.chunk", "created": created, "model": req.Model,
			"choices": []any{map[string]any{"index": 0, "delta": delta, "finish_reason": finish}}}
		if usage != nil {
			chunk["choices"], chunk["usage"] = []any{}, usage
		}
		b, _ := json.Marshal(chunk)
		if _, err := fmt.Fprintf(w, "data: %s\n\n", b); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	if !send(map[string]any{"role": "assistant", "content": ""}, nil, nil) {
		return
	}
	for i, word := range words {
		select {
		case <-r.Context().Done():
			return
		case <-time.After(m.delay):
		}
		if i > 0 {
			word = " " + word
		}
		if !send(map[string]any{"content": word}, nil, nil) {
			return
		}
	}
	send(map[string]any{}, "stop", nil)
	if req.StreamOptions.IncludeUsage {
		send(nil, nil, u)
	}
	fmt.Fprint(w, "data: [DONE]\n\n")
	rc.Flush()
}
