package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// This file loads arbstr's configuration. A JSON file and a TOML file
// are each parsed into the same generic tree (map[string]any of strings,
// int64, float64, bool, []any and map[string]any) and one walker, the
// configDecoder, turns that tree into a Config. The two formats therefore
// cannot drift apart: types, defaults, ${VAR} expansion, validation and
// warnings are written once.

// Config is arbstr's configuration. JSON and TOML files decode into the same
// structure; defaultConfig holds the defaults. Nothing marshals it through
// encoding/json, so it has no struct tags, but for the json:"-" that keeps
// secrets out of any output should that change.
type Config struct {
	// RateUnit is the unit of every token rate in the file: "sats_per_1k"
	// (the default) or "sats_per_1m". The rates of ProviderConfig and its
	// ModelRates are kept as written, in this unit; base_fee is always sats
	// per request.
	RateUnit  string
	Server    ServerConfig
	Database  DatabaseConfig
	Providers []ProviderConfig
	Policies  PoliciesConfig
	Logging   LoggingConfig
	Market    MarketConfig
	Clients   []ClientConfig
	Budgets   BudgetsConfig
}

// Rate units of Config.RateUnit.
const (
	rateUnitPer1k = "sats_per_1k"
	rateUnitPer1m = "sats_per_1m"
)

// MarketConfig is how often providers' listings and balances are read.
type MarketConfig struct {
	RefreshSecs    int     // default 120, at least 10
	StaleAfterSecs int     // default 900
	LowBalanceSats float64 // 0: no low-balance warning
}

// ClientConfig is one app or agent with its own token, budgets and rate
// limit.
type ClientConfig struct {
	Name               string
	Token              string `json:"-"` // never serialized anywhere
	Policies           []string
	BudgetSatsPerDay   float64 // 0: none
	BudgetSatsPerMonth float64 // 0: none
	RateLimitRPM       int     // 0: none
}

// BudgetsConfig holds what applies to every budget.
type BudgetsConfig struct {
	// DefaultReserveTokens is the output a request without max_tokens is
	// assumed to produce when its worst case is reserved; default 4096.
	DefaultReserveTokens int64
}

type ServerConfig struct {
	Listen              string
	AuthToken           string
	MaxBodyBytes        int64
	UpstreamTimeoutSecs int
	MaxAttempts         int
	ShutdownTimeoutSecs int
	BodyTimeoutSecs     int      // default 30
	AllowedOrigins      []string // browser origins that may call arbstr (CORS)
	AllowedHosts        []string // Host names served besides loopback ones
}

type DatabaseConfig struct {
	Path string
}

type ProviderConfig struct {
	Name       string
	URL        string
	APIKey     string `json:"-"` // never serialized anywhere: keys stay out of every output
	Models     []string
	InputRate  float64
	OutputRate float64
	BaseFee    float64
	ModelRates map[string]Rates
	// KeySource says where APIKey came from, for `providers` and warnings:
	// "config", "env ARBSTR_X_API_KEY", or "" when there is no key.
	KeySource string
	// Discover: read the provider's listing (GET {base}/models) for its
	// models and prices, and its balance (GET {base}/balance/info).
	Discover bool
}

// Rates keeps its struct tags: GET /providers shows model_rates through it.
type Rates struct {
	InputRate  float64 `json:"input_rate"`
	OutputRate float64 `json:"output_rate"`
}

type PoliciesConfig struct {
	DefaultStrategy string
	Rules           []PolicyRule
}

type PolicyRule struct {
	Name               string
	AllowedModels      []string
	Strategy           string
	MaxSatsPer1kOutput *float64
	MaxSatsPer1mOutput *float64 // at most one of the two is set
	Keywords           []string
	BudgetSatsPerDay   float64 // 0: none
	BudgetSatsPerMonth float64 // 0: none
}

type LoggingConfig struct {
	Level       string
	LogRequests bool
}

func defaultConfig() *Config {
	return &Config{
		Server: ServerConfig{
			Listen:              "127.0.0.1:8080",
			MaxBodyBytes:        16 << 20,
			UpstreamTimeoutSecs: 300,
			MaxAttempts:         3,
			ShutdownTimeoutSecs: 30,
			BodyTimeoutSecs:     30,
		},
		RateUnit: rateUnitPer1k,
		Market:   MarketConfig{RefreshSecs: 120, StaleAfterSecs: 900},
		Budgets:  BudgetsConfig{DefaultReserveTokens: 4096},
		Database: DatabaseConfig{Path: "./arbstr.db"},
		Policies: PoliciesConfig{DefaultStrategy: "cheapest"},
		Logging:  LoggingConfig{Level: "info", LogRequests: true},
	}
}

// findConfig returns the config file to load, the first that exists of the
// -config flag, $ARBSTR_CONFIG, ./config.json and ./config.toml. It
// returns "" and no error when there is none; the caller then serves in mock
// mode. A file named by the flag or the variable must exist: a typo there
// should stop arbstr, not quietly start it with mock providers.
func findConfig(flagPath string) (string, error) {
	from, path := "-config", flagPath
	if path == "" {
		from, path = "ARBSTR_CONFIG", os.Getenv("ARBSTR_CONFIG")
	}
	if path != "" {
		fi, err := os.Stat(path)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return "", fmt.Errorf("%s %s: no such file", from, path)
		case err != nil:
			return "", fmt.Errorf("%s: %w", from, err)
		case fi.IsDir():
			return "", fmt.Errorf("%s %s: is a directory", from, path)
		}
		return path, nil
	}
	for _, p := range []string{"config.json", "config.toml"} {
		_, err := os.Stat(p)
		if err == nil {
			return p, nil
		}
		// Anything but absence (a permission error, say) would otherwise send
		// arbstr into mock mode next to a config the user meant it to read.
		if !errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("config: %w", err)
		}
	}
	return "", nil
}

// loadConfig reads, decodes and validates the config file at path.
// The format follows the extension. Errors name the file and, for TOML, the
// line ("config.toml:12: providers[1].input_rate: want a number, got
// string"). Warnings are returned for the caller to show, in the same form.
// No message ever holds an API key.
func loadConfig(path string) (*Config, []string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read config: %w", err)
	}
	// Editors on Windows may start a UTF-8 file with a byte order mark, which
	// neither parser expects.
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))
	var tree map[string]any
	d := &configDecoder{file: path}
	switch ext := strings.ToLower(filepath.Ext(path)); ext {
	case ".json":
		tree, err = parseJSON(data)
	case ".toml":
		tree, d.lines, err = parseTOML(data)
	default:
		return nil, nil, fmt.Errorf("%s: unknown config format %q: want .json or .toml", path, ext)
	}
	var se *configSyntaxError
	if errors.As(err, &se) {
		return nil, nil, fmt.Errorf("%s:%d: %s", path, se.line, se.msg)
	} else if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	// Mode bits mean little on Windows, where every file would look open to
	// everyone.
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o077 != 0 && runtime.GOOS != "windows" {
		d.warnf("", "file is readable by group or others (mode %04o); it may hold API keys: chmod 600 %s", fi.Mode().Perm(), path)
	}
	cfg, err := d.decode(tree)
	return cfg, d.warnings, err
}

// overrides are the settings given on the command line, which take
// precedence over the config file (see configure).
type overrides struct {
	configPath string // -config, or its alias -c
	listen     string // -listen
	mock       bool   // -mock
}

// configured is what configure found: the configuration to run, the file it
// came from ("" when there is none), whether arbstr serves its built-in mock
// providers, and the warnings to show.
type configured struct {
	cfg      *Config
	path     string
	mock     bool
	warnings []string
}

// configure builds the configuration arbstr runs with, from the config file
// and everything that overrides it; serve, check, providers and a reload all
// go through it. A flag beats the environment, which beats the file, which
// beats the defaults, with one exception: a provider's api_key in the file
// beats ARBSTR_<NAME>_API_KEY, which only fills a key the file leaves out.
// In detail:
//
//   - The file is -config (or -c), else $ARBSTR_CONFIG, else ./config.json,
//     else ./config.toml. With none, arbstr runs on the defaults in mock mode.
//   - -listen replaces server.listen.
//   - -mock (or no file) is mock mode: the caller replaces the providers
//     with mock ones, and database.path becomes ":memory:".
//   - DATABASE_URL replaces database.path, in mock mode too.
//   - ARBSTR_LOG_LEVEL replaces logging.level.
//   - ARBSTR_<NAME>_API_KEY is the key of a provider without api_key (or
//     with one that is empty).
//
// The warnings are the file's, then those about the result: a provider
// without a key, and a listen address off loopback without auth_token.
func configure(o overrides) (*configured, error) {
	path, err := findConfig(o.configPath)
	if err != nil {
		return nil, err
	}
	c := &configured{cfg: defaultConfig(), path: path, mock: o.mock || path == ""}
	if path != "" {
		if c.cfg, c.warnings, err = loadConfig(path); err != nil {
			return nil, err
		}
	}
	cfg := c.cfg
	listenFrom := "server.listen"
	if o.listen != "" {
		cfg.Server.Listen, listenFrom = o.listen, "-listen"
	}
	if c.mock {
		cfg.Database.Path = ":memory:"
		// The mock providers stand in for the file's: its having none is
		// no cause for a warning.
		c.warnings = slices.DeleteFunc(c.warnings, func(w string) bool {
			return strings.HasSuffix(w, noProvidersWarning)
		})
	}
	if v := os.Getenv("DATABASE_URL"); v != "" {
		cfg.Database.Path = databasePath(v)
	}
	if v := os.Getenv("ARBSTR_LOG_LEVEL"); v != "" {
		cfg.Logging.Level = strings.ToLower(v)
		if !slices.Contains([]string{"debug", "info", "warn", "error"}, cfg.Logging.Level) {
			return nil, fmt.Errorf("ARBSTR_LOG_LEVEL %q: want debug, info, warn or error", v)
		}
	}
	for i := range cfg.Providers {
		p := &cfg.Providers[i]
		env := providerKeyEnv(p.Name)
		switch {
		case p.APIKey != "":
		case os.Getenv(env) != "":
			p.APIKey, p.KeySource = os.Getenv(env), "env "+env
		case !c.mock:
			c.warnings = append(c.warnings, fmt.Sprintf("%s: providers[%d]: provider %q has no API key (no api_key, %s not set): it is sent no Authorization header", path, i, p.Name, env))
		}
	}
	if !isLoopbackListen(cfg.Server.Listen) && cfg.Server.AuthToken == "" {
		c.warnings = append(c.warnings, fmt.Sprintf("%s %q is not a loopback address and server.auth_token is not set: anyone who can reach it can spend your sats", listenFrom, cfg.Server.Listen))
	}
	return c, nil
}

// databasePath accepts DATABASE_URL as a plain path, sqlite:PATH,
// sqlite://PATH or file:PATH.
func databasePath(v string) string {
	for _, prefix := range []string{"sqlite://", "sqlite:", "file:"} {
		if rest, ok := strings.CutPrefix(v, prefix); ok {
			return rest
		}
	}
	return v
}

// isLoopbackListen reports whether addr, a host:port, serves only this
// machine: the host is "localhost" or a loopback IP (127.0.0.0/8, ::1). An
// empty host and 0.0.0.0 listen on every interface.
func isLoopbackListen(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	return err == nil && (strings.EqualFold(host, "localhost") || net.ParseIP(host).IsLoopback())
}

// providerKeyEnv is the environment variable that holds the key of a provider
// without api_key: ARBSTR_<NAME>_API_KEY, NAME upper-cased with every
// character outside A-Z and 0-9 made "_". Only ASCII letters are upper-cased,
// so that the name of the variable never depends on Unicode case tables.
func providerKeyEnv(name string) string {
	return "ARBSTR_" + strings.Map(func(r rune) rune {
		switch {
		case 'a' <= r && r <= 'z':
			return r - 'a' + 'A'
		case 'A' <= r && r <= 'Z', '0' <= r && r <= '9':
			return r
		}
		return '_'
	}, name) + "_API_KEY"
}

// configSyntaxError is a parse error at a line of the file. loadConfig turns
// it into "config.toml:12: msg". Its message never quotes the text it failed
// on (but for the one character encoding/json quotes): that text may be an
// API key pasted in the wrong place, and keys never appear in messages.
type configSyntaxError struct {
	line int
	msg  string
}

func (e *configSyntaxError) Error() string { return fmt.Sprintf("line %d: %s", e.line, e.msg) }

// configPath appends key to the path of its parent table, the way errors and
// the TOML line table spell keys: server.listen, providers[1].url,
// providers[0].model_rates."claude-3.5-sonnet". Keys that are not bare TOML
// keys are quoted, so that a dot inside a model name reads as one key.
func configPath(parent, key string) string {
	if key == "" || strings.Trim(key, bareKeyChars) != "" {
		key = strconv.Quote(key)
	}
	if parent == "" {
		return key
	}
	return parent + "." + key
}

const bareKeyChars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"

// maxNesting bounds how deep TOML arrays and tables may nest. A config needs
// four levels; the bound keeps a hostile file from exhausting the stack.
// encoding/json has its own bound.
const maxNesting = 64

// maxRate bounds every price (sats per 1000 tokens, or per request). The
// router computes costs in integer micro-sats: at this bound, the
// largest request body of the default max_body_bytes still costs far less
// than int64 holds, and no real price comes near it (it is 1000 sats a
// token).
const maxRate = 1e6

// ---- JSON ----

// parseJSON reads a JSON config into the tree the walker expects. Only
// syntax errors get a line: the walker knows lines of TOML files only, and
// a JSON key is easy to find by its path.
func parseJSON(data []byte) (map[string]any, error) {
	lineAt := func(off int64) int { return 1 + bytes.Count(data[:min(off, int64(len(data)))], []byte("\n")) }
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var v any
	var se *json.SyntaxError
	switch err := dec.Decode(&v); {
	case errors.As(err, &se):
		return nil, &configSyntaxError{lineAt(se.Offset), se.Error()}
	case err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF):
		return nil, &configSyntaxError{lineAt(int64(len(data))), "unexpected end of file"}
	case err != nil:
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, &configSyntaxError{lineAt(dec.InputOffset()), "unexpected text after the top-level object"}
	}
	tree, ok := v.(map[string]any)
	if !ok {
		return nil, &configSyntaxError{1, "the top level must be a JSON object"}
	}
	_, err := jsonTree("", tree)
	return tree, err
}

// jsonTree makes, in place, what encoding/json decoded into the tree the
// walker expects. Numbers become int64 when they are integers that fit and
// float64 otherwise, as TOML has them, so that 3.0 is a float to the walker
// in both formats. Keys starting with "//" are comments
// (config.example.json annotates itself with them) and are dropped.
func jsonTree(path string, v any) (_ any, err error) {
	switch x := v.(type) {
	case map[string]any:
		for _, k := range slices.Sorted(maps.Keys(x)) {
			if strings.HasPrefix(k, "//") {
				delete(x, k)
			} else if x[k], err = jsonTree(configPath(path, k), x[k]); err != nil {
				return nil, err
			}
		}
	case []any:
		for i := range x {
			if x[i], err = jsonTree(fmt.Sprintf("%s[%d]", path, i), x[i]); err != nil {
				return nil, err
			}
		}
	case json.Number:
		if n, err := x.Int64(); err == nil {
			return n, nil
		}
		f, err := x.Float64()
		if err != nil {
			return nil, fmt.Errorf("%s: number out of range", path)
		}
		return f, nil
	}
	return v, nil
}

// ---- TOML ----

// parseTOML parses arbstr's TOML subset: comments, bare, quoted and
// dotted keys, [tables], [[arrays of tables]], basic and literal strings,
// decimal integers and floats, booleans, arrays and inline tables, all as
// TOML 1.0 defines them. Everything else in TOML (multi-line strings, dates,
// hex, octal and binary integers, inf and nan) is an error, as are
// redefinitions, so that no file is ever misread. lines maps the
// configPath of every key, table header and array element to its line.
func parseTOML(data []byte) (tree map[string]any, lines map[string]int, err error) {
	src := string(data)
	for i, r := range src {
		if r == utf8.RuneError && !strings.HasPrefix(src[i:], "\uFFFD") {
			return nil, nil, &configSyntaxError{1 + strings.Count(src[:i], "\n"), "invalid UTF-8"}
		}
	}
	p := &tomlParser{src: src, line: 1, lines: make(map[string]int), kinds: make(map[string]tableKind)}
	root := make(map[string]any)
	cur, curPath := root, ""
	for {
		if err := p.skipBlank(); err != nil {
			return nil, nil, err
		}
		if p.eof() {
			return root, p.lines, nil
		}
		if p.peek() == '[' {
			cur, curPath, err = p.header(root)
		} else if err = p.keyValue(cur, curPath, 0); err == nil {
			err = p.endOfLine("value")
		}
		if err != nil {
			return nil, nil, err
		}
	}
}

// tableKind says how a table came to be, for the TOML 1.0 rules on defining
// a table only once.
type tableKind int

const (
	implicitTable tableKind = iota // made on the way to [a.b]: one [a] may still define it
	headerTable                    // defined by a [header]: another [header] is an error
	dottedTable                    // made by a dotted key: no [header] may define it
	inlineTable                    // nothing may be added to it
	tableArray                     // an [[array of tables]], not a static array
)

type tomlParser struct {
	src       string
	pos, line int
	lines     map[string]int
	kinds     map[string]tableKind // by configPath, for every table and array of tables
}

func (p *tomlParser) errorf(line int, format string, args ...any) error {
	return &configSyntaxError{line, fmt.Sprintf(format, args...)}
}

func (p *tomlParser) eof() bool { return p.pos >= len(p.src) }

// peek returns the byte at the cursor, or 0 at the end of the file.
func (p *tomlParser) peek() byte {
	if p.eof() {
		return 0
	}
	return p.src[p.pos]
}

// isControl reports the ASCII control characters that TOML allows neither
// in strings nor in comments: all but tab.
func isControl(c byte) bool { return c < 0x20 && c != '\t' || c == 0x7f }

// run consumes and returns the bytes at the cursor that are in chars.
func (p *tomlParser) run(chars string) string {
	start := p.pos
	for !p.eof() && strings.IndexByte(chars, p.src[p.pos]) >= 0 {
		p.pos++
	}
	return p.src[start:p.pos]
}

func (p *tomlParser) skipSpace() { p.run(" \t") }

// skipBlank skips spaces, comments and newlines.
func (p *tomlParser) skipBlank() error {
	for {
		p.skipSpace()
		switch {
		case p.peek() == '#':
			for !p.eof() && p.src[p.pos] != '\n' && p.src[p.pos] != '\r' {
				if isControl(p.src[p.pos]) {
					return p.errorf(p.line, "control character in comment")
				}
				p.pos++
			}
		case p.peek() == '\n':
			p.pos++
			p.line++
		case strings.HasPrefix(p.src[p.pos:], "\r\n"):
			p.pos += 2
			p.line++
		case p.peek() == '\r':
			return p.errorf(p.line, "carriage return without a newline")
		default:
			return nil
		}
	}
}

// endOfLine consumes what may follow a statement: spaces, a comment, and
// the newline or the end of the file. Anything else is an error, so that
// `a = 1 2` or `a = "x"y` is not read as something it is not.
func (p *tomlParser) endOfLine(after string) error {
	line := p.line
	if err := p.skipBlank(); err != nil || p.line > line || p.eof() {
		return err
	}
	return p.errorf(p.line, "unexpected text after the %s", after)
}

// key reads a possibly dotted key: a.b, "a.b".c, 'x' . y.
func (p *tomlParser) key() ([]string, error) {
	var keys []string
	for {
		p.skipSpace()
		k := p.run(bareKeyChars)
		if c := p.peek(); k == "" && (c == '"' || c == '\'') {
			var err error
			if k, err = p.quoted(); err != nil {
				return nil, err
			}
		} else if k == "" {
			return nil, p.errorf(p.line, "want a key")
		}
		keys = append(keys, k)
		p.skipSpace()
		if p.peek() != '.' {
			return keys, nil
		}
		p.pos++
	}
}

// header reads [a.b] or [[a.b]] and returns the table that the following
// keys go into, and its path.
func (p *tomlParser) header(root map[string]any) (map[string]any, string, error) {
	line := p.line
	p.pos++ // [
	closing := "]"
	if p.peek() == '[' {
		p.pos++
		closing = "]]"
	}
	keys, err := p.key()
	if err != nil {
		return nil, "", err
	}
	if !strings.HasPrefix(p.src[p.pos:], closing) {
		return nil, "", p.errorf(line, "want %s at the end of the table header", closing)
	}
	p.pos += len(closing)
	t, path := root, ""
	for _, k := range keys[:len(keys)-1] {
		if t, path, err = p.table(t, path, k, line, implicitTable); err != nil {
			return nil, "", err
		}
	}

	k := keys[len(keys)-1]
	path = configPath(path, k)
	next := make(map[string]any)
	arr, isArray := t[k].([]any)
	m, isTable := t[k].(map[string]any)
	switch kind := p.kinds[path]; {
	case t[k] == nil && closing == "]":
		t[k] = next
	case t[k] == nil:
		t[k], p.kinds[path], p.lines[path] = []any{next}, tableArray, line
		path += "[0]"
	case isArray && closing == "]]" && kind == tableArray:
		t[k] = append(arr, next)
		path = fmt.Sprintf("%s[%d]", path, len(arr))
	case isTable && closing == "]" && kind == implicitTable:
		next = m // made on the way to [a.b]: [a] may define it once
	case isTable && kind == dottedTable:
		return nil, "", p.errorf(line, "table [%s] is already defined by dotted keys", path)
	case isTable && kind == inlineTable:
		return nil, "", p.errorf(line, "table [%s] is already defined as an inline table", path)
	case isTable && closing == "]":
		return nil, "", p.errorf(line, "table [%s] is defined twice", path)
	default:
		return nil, "", p.errorf(line, "%s is already defined as something else", path)
	}
	p.kinds[path], p.lines[path] = headerTable, line
	return next, path, p.endOfLine("table header")
}

// keyValue reads `key = value` into table t, whose path is path.
func (p *tomlParser) keyValue(t map[string]any, path string, depth int) error {
	line := p.line
	keys, err := p.key()
	if err != nil {
		return err
	}
	if p.peek() != '=' {
		return p.errorf(line, "want = after a key")
	}
	p.pos++
	p.skipSpace()
	for _, k := range keys[:len(keys)-1] {
		if t, path, err = p.table(t, path, k, line, dottedTable); err != nil {
			return err
		}
	}
	k := keys[len(keys)-1]
	path = configPath(path, k)
	if _, dup := t[k]; dup {
		return p.errorf(line, "key %s is defined twice", path)
	}
	p.lines[path] = line
	v, err := p.value(path, depth)
	t[k] = v
	return err
}

// table returns the table t[k], on the way to a key, and its path. A table
// made here is of kind via: dottedTable for a dotted key, implicitTable for
// a [header]. TOML 1.0 lets dotted keys add only to tables that dotted keys
// made, and a header go on through the last table of an array of tables,
// as in [[providers]] followed by [providers.model_rates].
func (p *tomlParser) table(t map[string]any, path, k string, line int, via tableKind) (map[string]any, string, error) {
	path = configPath(path, k)
	switch x := t[k].(type) {
	case nil:
		next := make(map[string]any)
		t[k], p.lines[path], p.kinds[path] = next, line, via
		return next, path, nil
	case map[string]any:
		switch {
		case via == dottedTable && p.kinds[path] != dottedTable:
			return nil, "", p.errorf(line, "cannot add to table %s with a dotted key: it is defined elsewhere", path)
		case p.kinds[path] == inlineTable:
			return nil, "", p.errorf(line, "cannot add to inline table %s", path)
		}
		return x, path, nil
	case []any:
		if via == implicitTable && p.kinds[path] == tableArray {
			return x[len(x)-1].(map[string]any), fmt.Sprintf("%s[%d]", path, len(x)-1), nil
		}
	}
	return nil, "", p.errorf(line, "%s is not a table", path)
}

func (p *tomlParser) value(path string, depth int) (any, error) {
	if depth > maxNesting {
		return nil, p.errorf(p.line, "nested too deeply")
	}
	switch p.peek() {
	case '"', '\'':
		return p.quoted()
	case '[':
		return p.array(path, depth)
	case '{':
		return p.inlineTable(path, depth)
	}
	return p.scalar()
}

// quoted reads a basic string ("...", with escapes) or a literal string
// ('...', without).
func (p *tomlParser) quoted() (string, error) {
	q := p.src[p.pos]
	if strings.HasPrefix(p.src[p.pos:], strings.Repeat(string(q), 3)) {
		return "", p.errorf(p.line, "multi-line strings (%c%c%c) are not supported", q, q, q)
	}
	p.pos++
	var b strings.Builder
	for !p.eof() {
		switch c := p.src[p.pos]; {
		case c == q:
			p.pos++
			return b.String(), nil
		case c == '\\' && q == '"':
			// TOML's escapes are some of Go's. The errors do not quote the
			// sequence: the string may be a key.
			r, _, rest, err := strconv.UnquoteChar(p.src[p.pos:], '"')
			switch {
			case p.pos+1 == len(p.src):
				return "", p.errorf(p.line, "unterminated string")
			case !strings.ContainsRune(`btnfr"\\uU`, rune(p.src[p.pos+1])):
				return "", p.errorf(p.line, `invalid escape sequence: TOML allows \b \t \n \f \r \" \\ \uXXXX \UXXXXXXXX`)
			case err != nil:
				return "", p.errorf(p.line, "invalid unicode escape")
			}
			b.WriteRune(r)
			p.pos = len(p.src) - len(rest)
		case c == '\n' || c == '\r':
			return "", p.errorf(p.line, "unterminated string")
		case isControl(c):
			return "", p.errorf(p.line, "control character in string")
		default:
			b.WriteByte(c)
			p.pos++
		}
	}
	return "", p.errorf(p.line, "unterminated string")
}

func (p *tomlParser) array(path string, depth int) ([]any, error) {
	start := p.line
	p.pos++ // [
	a := []any{}
	for {
		if err := p.skipBlank(); err != nil {
			return nil, err
		}
		switch {
		case p.eof():
			return nil, p.errorf(start, "unterminated array")
		case p.peek() == ']':
			p.pos++
			return a, nil
		}
		ep := fmt.Sprintf("%s[%d]", path, len(a))
		p.lines[ep] = p.line
		v, err := p.value(ep, depth+1)
		if err != nil {
			return nil, err
		}
		a = append(a, v)
		if err := p.skipBlank(); err != nil {
			return nil, err
		}
		if p.peek() == ',' {
			p.pos++
		} else if p.peek() != ']' && !p.eof() {
			return nil, p.errorf(p.line, "want , or ] after an array element")
		}
	}
}

// inlineTable reads { k = v, ... }. As in TOML 1.0 it must fit on one line
// and has no trailing comma.
func (p *tomlParser) inlineTable(path string, depth int) (map[string]any, error) {
	line := p.line
	p.pos++ // {
	t := make(map[string]any)
	p.kinds[path] = inlineTable
	p.skipSpace()
	if p.peek() == '}' {
		p.pos++
		return t, nil
	}
	for {
		if err := p.keyValue(t, path, depth+1); err != nil {
			return nil, err
		}
		p.skipSpace()
		comma := p.peek() == ','
		if comma {
			p.pos++
			p.skipSpace()
		}
		switch c := p.peek(); {
		case c == '\n' || c == '\r' || c == 0:
			return nil, p.errorf(line, "unterminated inline table: it must close on the line it opens")
		case c == '}' && comma:
			return nil, p.errorf(line, "trailing comma in inline table")
		case c == '}':
			p.pos++
			return t, nil
		case !comma:
			return nil, p.errorf(line, "want , or } in inline table")
		}
	}
}

var (
	tomlInteger = regexp.MustCompile(`^[+-]?(?:0|[1-9](?:_?[0-9])*)$`)
	tomlFloat   = regexp.MustCompile(`^[+-]?(?:0|[1-9](?:_?[0-9])*)(?:\.[0-9](?:_?[0-9])*)?(?:[eE][+-]?[0-9](?:_?[0-9])*)?$`)
)

// scalar reads a bare value: a boolean, an integer or a float. The token
// runs over every character any TOML bare value may hold, so that a date, a
// hex number, inf or nan is refused whole, never read in part.
func (p *tomlParser) scalar() (any, error) {
	tok := p.run(bareKeyChars + "+.:")
	digits := strings.ReplaceAll(tok, "_", "")
	switch {
	case tok == "":
		return nil, p.errorf(p.line, "want a value")
	case tok == "true" || tok == "false":
		return tok == "true", nil
	case tomlInteger.MatchString(tok):
		if n, err := strconv.ParseInt(digits, 10, 64); err == nil {
			return n, nil
		}
		return nil, p.errorf(p.line, "integer out of range")
	case tomlFloat.MatchString(tok):
		if f, err := strconv.ParseFloat(digits, 64); err == nil {
			return f, nil
		}
		return nil, p.errorf(p.line, "float out of range")
	}
	return nil, p.errorf(p.line, "invalid value (strings need quotes)")
}

// ---- The walker ----

// configDecoder walks the tree of either format into a Config.
// Types and ranges are checked where a value is read, and the rest (names,
// urls, strategies) by check once all is read; either way the error names
// the key, and its line when the parser gave one.
type configDecoder struct {
	file     string
	lines    map[string]int // configPath → line; nil for JSON
	unit     string         // the file's rate_unit, read before its rates
	warnings []string
}

// at returns the "file:line: " prefix for path: the line of the key or, for
// a key that is missing, of the nearest table around it (path cut at its last
// "." or "[").
func (d *configDecoder) at(path string) string {
	for p := path; p != ""; p = p[:max(strings.LastIndexAny(p, ".["), 0)] {
		if line, ok := d.lines[p]; ok {
			return fmt.Sprintf("%s:%d: ", d.file, line)
		}
	}
	return d.file + ": "
}

func (d *configDecoder) errorf(path, format string, args ...any) error {
	return errors.New(d.at(path) + path + ": " + fmt.Sprintf(format, args...))
}

func (d *configDecoder) warnf(path, format string, args ...any) {
	d.warnings = append(d.warnings, d.at(path)+fmt.Sprintf(format, args...))
}

// typeNames names the types of the tree in errors, as TOML names them.
var typeNames = map[string]string{"string": "string", "int64": "integer", "float64": "float",
	"bool": "boolean", "[]interface {}": "array", "map[string]interface {}": "table", "<nil>": "null"}

func (d *configDecoder) typeError(path, want string, v any) error {
	return d.errorf(path, "want %s, got %s", want, typeNames[fmt.Sprintf("%T", v)])
}

// fields maps the keys of a table to where their values go: a *string,
// *[]string, *bool, *int, *int64, *float64, number, atLeast, a nested
// fields, or a func that decodes the value itself.
type fields map[string]any

// number is a number from 0 to max, for amounts that *float64 (a price up to
// maxRate) does not fit: budgets, balances, and rates per 1M tokens.
type number struct {
	dst *float64
	max float64
}

// atLeast is an integer from min up, for counts whose floor is not 1.
type atLeast struct {
	dst *int
	min int64
}

// maxSats bounds amounts of sats such as budgets and balances: 10,000
// bitcoin is far beyond what anyone spends on tokens, and at this bound an
// amount in micro-sats, the unit costs are computed in, still fits an int64.
const maxSats = 1e12

// value decodes v, the value of the key at path, into dst, one of the kinds
// of fields. Strings get ${VAR} expanded. Integers are counts, from 1 up
// (from atLeast's min for an atLeast); int is 32 bits on linux/arm, a
// target arbstr supports, so an int is bounded by MaxInt32 on every
// platform: a config means the same on a Raspberry Pi as on a server, and a
// number of seconds times time.Second cannot overflow. Floats are prices,
// from 0 to maxRate (to number's max for a number), and may be written as
// integers.
func (d *configDecoder) value(path string, v any, dst any) error {
	switch dst := dst.(type) {
	case fields:
		return d.table(path, v, dst)
	case func(path string, v any) error:
		return dst(path, v)
	case *string:
		s, ok := v.(string)
		if !ok {
			return d.typeError(path, "a string", v)
		}
		var err error
		*dst, err = d.expand(path, s)
		return err
	case *[]string:
		*dst = []string{}
		return d.array(path, v, func(path string, v any) error {
			var s string
			err := d.value(path, v, &s)
			*dst = append(*dst, s)
			return err
		})
	case *bool:
		b, ok := v.(bool)
		if !ok {
			return d.typeError(path, "a boolean", v)
		}
		*dst = b
	case *int:
		n, err := d.count(path, v, 1, math.MaxInt32)
		*dst = int(n)
		return err
	case atLeast:
		n, err := d.count(path, v, dst.min, math.MaxInt32)
		*dst.dst = int(n)
		return err
	case *int64:
		n, err := d.count(path, v, 1, math.MaxInt64)
		*dst = n
		return err
	case *float64:
		return d.value(path, v, number{dst, maxRate})
	case number:
		f, ok := v.(float64)
		if n, isInt := v.(int64); isInt {
			f, ok = float64(n), true
		}
		switch {
		case !ok:
			return d.typeError(path, "a number", v)
		case f < 0:
			return d.errorf(path, "must not be negative, got %g", f)
		case f > dst.max:
			return d.errorf(path, "must be at most %g, got %g", dst.max, f)
		}
		*dst.dst = f
	default:
		panic(fmt.Sprintf("config: no decoder for %T", dst))
	}
	return nil
}

func (d *configDecoder) count(path string, v any, least, limit int64) (int64, error) {
	n, ok := v.(int64)
	switch {
	case !ok:
		return 0, d.typeError(path, "an integer", v)
	case n < least:
		return 0, d.errorf(path, "must be at least %d, got %d", least, n)
	case n > limit:
		return 0, d.errorf(path, "must be at most %d, got %d", limit, n)
	}
	return n, nil
}

// table decodes the table v. Unknown keys are warnings, so that configs
// written for other arbstr versions still load.
func (d *configDecoder) table(path string, v any, fs fields) error {
	m, ok := v.(map[string]any)
	if !ok {
		return d.typeError(path, "a table", v)
	}
	for _, k := range slices.Sorted(maps.Keys(m)) {
		kp := configPath(path, k)
		if dst, ok := fs[k]; !ok {
			d.warnf(kp, "unknown key %q", kp)
		} else if err := d.value(kp, m[k], dst); err != nil {
			return err
		}
	}
	return nil
}

func (d *configDecoder) array(path string, v any, each func(path string, v any) error) error {
	a, ok := v.([]any)
	if !ok {
		return d.typeError(path, "an array", v)
	}
	for i, e := range a {
		if err := each(fmt.Sprintf("%s[%d]", path, i), e); err != nil {
			return err
		}
	}
	return nil
}

var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// expand replaces each ${VAR} in s by the environment variable VAR.
// $VAR without braces is left alone. An unset variable is an error naming it
// and the key; the message never holds the value, which may be a key.
func (d *configDecoder) expand(path, s string) (string, error) {
	var b strings.Builder
	for {
		before, after, found := strings.Cut(s, "${")
		b.WriteString(before)
		if !found {
			return b.String(), nil
		}
		name, rest, found := strings.Cut(after, "}")
		if !found {
			return "", d.errorf(path, "${ without a closing }")
		}
		if !envName.MatchString(name) {
			return "", d.errorf(path, "invalid ${...}: want ${NAME}, NAME of letters, digits and _")
		}
		v, ok := os.LookupEnv(name)
		if !ok {
			return "", d.errorf(path, "environment variable %s is not set", name)
		}
		b.WriteString(v)
		s = rest
	}
}

// decode turns the tree into a Config, starting from the defaults.
func (d *configDecoder) decode(tree map[string]any) (*Config, error) {
	cfg := defaultConfig()
	if err := d.rateUnit(tree, cfg); err != nil {
		return nil, err
	}
	d.unit = cfg.RateUnit
	s, pol, l, m := &cfg.Server, &cfg.Policies, &cfg.Logging, &cfg.Market
	err := d.table("", tree, fields{
		"rate_unit": func(string, any) error { return nil }, // read by rateUnit
		"server": fields{
			"listen":                &s.Listen,
			"auth_token":            &s.AuthToken,
			"max_body_bytes":        &s.MaxBodyBytes,
			"upstream_timeout_secs": &s.UpstreamTimeoutSecs,
			"max_attempts":          &s.MaxAttempts,
			"shutdown_timeout_secs": &s.ShutdownTimeoutSecs,
			"body_timeout_secs":     &s.BodyTimeoutSecs,
			"allowed_origins":       &s.AllowedOrigins,
			"allowed_hosts":         &s.AllowedHosts,
		},
		"database": fields{"path": &cfg.Database.Path},
		"market": fields{
			"refresh_secs":     atLeast{&m.RefreshSecs, 10},
			"stale_after_secs": &m.StaleAfterSecs,
			"low_balance_sats": number{&m.LowBalanceSats, maxSats},
		},
		"budgets": fields{"default_reserve_tokens": &cfg.Budgets.DefaultReserveTokens},
		"clients": func(path string, v any) error {
			return d.array(path, v, func(path string, v any) error {
				c, err := d.client(path, v)
				cfg.Clients = append(cfg.Clients, c)
				return err
			})
		},
		"providers": func(path string, v any) error {
			return d.array(path, v, func(path string, v any) error {
				pc, err := d.provider(path, v)
				cfg.Providers = append(cfg.Providers, pc)
				return err
			})
		},
		"policies": fields{
			"default_strategy": &pol.DefaultStrategy,
			"rules": func(path string, v any) error {
				return d.array(path, v, func(path string, v any) error {
					r, err := d.rule(path, v)
					pol.Rules = append(pol.Rules, r)
					return err
				})
			},
		},
		"logging": fields{"level": &l.Level, "log_requests": &l.LogRequests},
	})
	if err == nil {
		err = d.check(cfg)
	}
	if err != nil {
		return nil, err
	}
	if len(cfg.Providers) == 0 {
		d.warnf("", noProvidersWarning)
	}
	return cfg, nil
}

// rateUnit reads rate_unit before the rest of the file, because every rate
// is read in its unit. arbstr files written since mid-2026 price tokens in
// sats per 1M tokens with no marker in the file: read per 1k, such a file
// would make every request cost about 1000 times too much and still load.
// So a file without rate_unit that holds a key only those files have is
// refused, with both ways out. A [vault] table asks for billing, which
// arbstr does not do: serving such a file would give away for free what its
// author meant to sell, so it is always refused.
func (d *configDecoder) rateUnit(tree map[string]any, cfg *Config) error {
	if _, ok := tree["vault"]; ok {
		return d.errorf("vault", "arbstr does no billing, so it cannot serve a file that asks for it through [vault]: remove the table, and bill elsewhere if you sell access")
	}
	if v, ok := tree["rate_unit"]; ok {
		if err := d.value("rate_unit", v, &cfg.RateUnit); err != nil {
			return err
		}
		if cfg.RateUnit != rateUnitPer1k && cfg.RateUnit != rateUnitPer1m {
			return d.errorf("rate_unit", "unknown unit %q: want %q or %q", cfg.RateUnit, rateUnitPer1k, rateUnitPer1m)
		}
		return nil
	}
	if path := newerFileKey(tree); path != "" {
		return d.errorf(path, "only arbstr files written since mid-2026 have this key, and those price tokens in sats per 1M tokens; "+
			"without rate_unit this file's rates would be read per 1k tokens, and every request would cost about 1000x too much. "+
			`Add rate_unit = "sats_per_1m" at the top of the file, or rate_unit = "sats_per_1k" to confirm that its rates are per 1k tokens`)
	}
	return nil
}

// noProvidersWarning is the warning of a file without providers.
const noProvidersWarning = "no providers configured: every chat request will fail"

// newerFileKey returns the path of the first key in tree that only arbstr
// files written since mid-2026 have, or "". It reads the raw tree, before
// any type is checked, so it skips whatever is not of the expected shape.
func newerFileKey(tree map[string]any) string {
	for _, k := range []string{"routing", "tokenstats"} {
		if _, ok := tree[k]; ok {
			return k
		}
	}
	find := func(list any, path string, keys ...string) string {
		a, _ := list.([]any)
		for i, e := range a {
			m, _ := e.(map[string]any)
			for _, k := range keys {
				if _, ok := m[k]; ok {
					return fmt.Sprintf("%s[%d].%s", path, i, k)
				}
			}
		}
		return ""
	}
	if p := find(tree["providers"], "providers", "tier", "auto_discover"); p != "" {
		return p
	}
	policies, _ := tree["policies"].(map[string]any)
	return find(policies["rules"], "policies.rules", "max_sats_per_1m_output")
}

// rate returns the decoder of a token rate into dst. A rate is kept as
// written, in the file's rate_unit; its bound is maxRate per 1k tokens in
// either unit. A rate of 1000 sats per 1k tokens (a sat a token) or more is
// more likely a rate per 1M tokens in a file read per 1k, so it is a warning.
func (d *configDecoder) rate(dst *float64) func(path string, v any) error {
	return func(path string, v any) error {
		per, scale, hint := "1k", 1.0, ` If so, set rate_unit = "sats_per_1m".`
		if d.unit == rateUnitPer1m {
			per, scale, hint = "1M", 1000, ""
		}
		if err := d.value(path, v, number{dst, maxRate * scale}); err != nil {
			return err
		}
		if *dst >= 1000*scale {
			d.warnf(path, "%s = %g sats per %s tokens, %g sats a token: is this per 1M?%s", path, *dst, per, *dst/(1000*scale), hint)
		}
		return nil
	}
}

// provider decodes one providers[] entry. A provider whose api_key is
// missing or expands to "" gets ARBSTR_<NAME>_API_KEY later, from
// configure, with the other overrides. The warnings name the provider,
// never the key.
func (d *configDecoder) provider(path string, v any) (ProviderConfig, error) {
	var pc ProviderConfig
	literal := false // api_key is written out in the file, not a ${VAR}
	discover := &sameBool{d: d}
	err := d.table(path, v, fields{
		"name": &pc.Name,
		"url":  &pc.URL,
		"api_key": func(path string, v any) error {
			s, _ := v.(string)
			literal = !strings.Contains(s, "${")
			return d.value(path, v, &pc.APIKey)
		},
		"models":        &pc.Models,
		"input_rate":    d.rate(&pc.InputRate),
		"output_rate":   d.rate(&pc.OutputRate),
		"base_fee":      &pc.BaseFee,
		"discover":      discover.value(&pc.Discover),
		"auto_discover": discover.value(&pc.Discover),
		// model_rates is read last, below, because a model's entry may
		// leave out a rate that the provider's own rate then fills.
		"model_rates": func(string, any) error { return nil },
	})
	if m, _ := v.(map[string]any); err == nil && m["model_rates"] != nil {
		pc.ModelRates, err = d.modelRates(configPath(path, "model_rates"), m["model_rates"], &pc)
	}
	if err == nil && discover.disagree {
		err = d.errorf(path+".auto_discover", "auto_discover is another name of discover, and the two disagree")
	}
	if err != nil {
		return pc, err
	}
	if pc.APIKey != "" {
		pc.KeySource = "config"
		if literal {
			d.warnf(path+".api_key", "provider %q: api_key is written in the file; prefer \"${VAR}\" or the environment variable %s", pc.Name, providerKeyEnv(pc.Name))
		}
	}
	return pc, nil
}

// sameBool decodes two keys that are one setting under two names, such as
// discover and auto_discover, and notes whether they disagree.
type sameBool struct {
	d        *configDecoder
	seen     bool
	disagree bool
}

func (b *sameBool) value(dst *bool) func(path string, v any) error {
	return func(path string, v any) error {
		var x bool
		if err := b.d.value(path, v, &x); err != nil {
			return err
		}
		b.disagree = b.disagree || (b.seen && x != *dst)
		*dst, b.seen = x, true
		return nil
	}
}

// client decodes one clients[] entry. Its token is checked with the others
// in check; the warning names the client, never the token.
func (d *configDecoder) client(path string, v any) (ClientConfig, error) {
	var c ClientConfig
	literal := false // the token is written out in the file, not a ${VAR}
	err := d.table(path, v, fields{
		"name": &c.Name,
		"token": func(path string, v any) error {
			s, _ := v.(string)
			literal = !strings.Contains(s, "${")
			return d.value(path, v, &c.Token)
		},
		"policies":              &c.Policies,
		"budget_sats_per_day":   number{&c.BudgetSatsPerDay, maxSats},
		"budget_sats_per_month": number{&c.BudgetSatsPerMonth, maxSats},
		"rate_limit_rpm":        atLeast{&c.RateLimitRPM, 0},
	})
	if err == nil && literal && c.Token != "" {
		d.warnf(path+".token", "client %q: token is written in the file; prefer \"${VAR}\"", c.Name)
	}
	return c, err
}

// modelRates decodes model_rates: model → {input_rate, output_rate}. A rate
// that an entry leaves out is the provider's, so that an entry overrides
// only what it names. Model names get ${VAR} expanded like the models list,
// so that the two still match.
func (d *configDecoder) modelRates(path string, v any, pc *ProviderConfig) (map[string]Rates, error) {
	m, ok := v.(map[string]any)
	if !ok {
		return nil, d.typeError(path, "a table", v)
	}
	rates := make(map[string]Rates, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		kp := configPath(path, k)
		model, err := d.expand(kp, k)
		if err != nil {
			return nil, err
		}
		if _, dup := rates[model]; dup {
			return nil, d.errorf(kp, "model %q is listed twice", model)
		}
		r := Rates{InputRate: pc.InputRate, OutputRate: pc.OutputRate}
		if err := d.table(kp, m[k], fields{"input_rate": d.rate(&r.InputRate), "output_rate": d.rate(&r.OutputRate)}); err != nil {
			return nil, err
		}
		rates[model] = r
	}
	return rates, nil
}

// rule decodes one policies.rules[] entry.
func (d *configDecoder) rule(path string, v any) (PolicyRule, error) {
	r := PolicyRule{Strategy: "cheapest"}
	err := d.table(path, v, fields{
		"name":           &r.Name,
		"allowed_models": &r.AllowedModels,
		"strategy":       &r.Strategy,
		"max_sats_per_1k_output": func(path string, v any) error {
			r.MaxSatsPer1kOutput = new(float64)
			return d.value(path, v, r.MaxSatsPer1kOutput)
		},
		"max_sats_per_1m_output": func(path string, v any) error {
			r.MaxSatsPer1mOutput = new(float64)
			return d.value(path, v, number{r.MaxSatsPer1mOutput, maxRate * 1000})
		},
		"keywords":              &r.Keywords,
		"budget_sats_per_day":   number{&r.BudgetSatsPerDay, maxSats},
		"budget_sats_per_month": number{&r.BudgetSatsPerMonth, maxSats},
	})
	if err == nil && r.MaxSatsPer1kOutput != nil && r.MaxSatsPer1mOutput != nil {
		err = d.errorf(path+".max_sats_per_1m_output", "give max_sats_per_1k_output or max_sats_per_1m_output, not both")
	}
	return r, err
}

// check enforces the rules that the walker leaves: listen and
// database.path, provider, rule and client names, urls, strategies,
// clients' tokens and policies, browser origins and hosts, and the level.
// It folds the strategy alias, the level's case and the origins' case.
func (d *configDecoder) check(cfg *Config) error {
	if _, _, err := net.SplitHostPort(cfg.Server.Listen); err != nil {
		return d.errorf("server.listen", "want host:port, such as 127.0.0.1:8080, got %q", cfg.Server.Listen)
	}
	if cfg.Database.Path == "" {
		return d.errorf("database.path", "must not be empty")
	}
	// Names travel in response headers (x-arbstr-provider,
	// x-arbstr-policy), where a control character would break the response.
	seen := make(map[string]string) // kind and name → path
	name := func(kind, path, name string) error {
		other, dup := seen[kind+" "+name]
		switch {
		case name == "":
			return d.errorf(path+".name", "missing or empty")
		case strings.ContainsFunc(name, unicode.IsControl):
			return d.errorf(path+".name", "must not contain control characters")
		case dup:
			return d.errorf(path+".name", "duplicate %s name %q (also %s)", kind, name, other)
		}
		seen[kind+" "+name] = path
		return nil
	}
	for i, pc := range cfg.Providers {
		path := fmt.Sprintf("providers[%d]", i)
		if err := name("provider", path, pc.Name); err != nil {
			return err
		}
		// The message does not repeat the URL, which may carry credentials.
		if u, err := url.Parse(pc.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return d.errorf(path+".url", "want an http:// or https:// URL with a host")
		}
	}
	if err := d.strategy("policies.default_strategy", &cfg.Policies.DefaultStrategy); err != nil {
		return err
	}
	for i := range cfg.Policies.Rules {
		r := &cfg.Policies.Rules[i]
		path := fmt.Sprintf("policies.rules[%d]", i)
		if err := name("rule", path, r.Name); err != nil {
			return err
		}
		if err := d.strategy(path+".strategy", &r.Strategy); err != nil {
			return err
		}
	}
	for i, c := range cfg.Clients {
		if err := name("client", fmt.Sprintf("clients[%d]", i), c.Name); err != nil {
			return err
		}
	}
	if err := d.checkClients(cfg); err != nil {
		return err
	}
	if err := d.checkBrowsers(&cfg.Server); err != nil {
		return err
	}
	level := strings.ToLower(cfg.Logging.Level)
	if !slices.Contains([]string{"debug", "info", "warn", "error"}, level) {
		return d.errorf("logging.level", "unknown level %q: want debug, info, warn or error", cfg.Logging.Level)
	}
	cfg.Logging.Level = level
	return nil
}

// checkClients checks clients' tokens and policies. A token says who is
// asking, so each client has one of its own, distinct from the other
// clients' and from server.auth_token; and a client may be allowed only
// policies that exist, since a misspelt name would silently allow nothing.
// Messages name the clients, never a token.
func (d *configDecoder) checkClients(cfg *Config) error {
	tokens := make(map[string]string) // token → path of the client that has it
	for i, c := range cfg.Clients {
		path := fmt.Sprintf("clients[%d]", i)
		other, dup := tokens[c.Token]
		switch {
		case c.Token == "":
			return d.errorf(path+".token", "missing or empty")
		case c.Token == cfg.Server.AuthToken:
			return d.errorf(path+".token", "the same as server.auth_token: a client needs a token of its own")
		case dup:
			return d.errorf(path+".token", "the same token as %s: each client needs a token of its own", other)
		}
		tokens[c.Token] = path
		for j, p := range c.Policies {
			if !slices.ContainsFunc(cfg.Policies.Rules, func(r PolicyRule) bool { return r.Name == p }) {
				return d.errorf(fmt.Sprintf("%s.policies[%d]", path, j), "no policy rule is named %q", p)
			}
		}
	}
	return nil
}

// checkBrowsers checks the origins and hosts that browsers may reach
// arbstr from. A browser sends an Origin of scheme://host[:port] in lower
// case, so an origin is checked for that shape and folded to lower case: an
// entry that can never match would be a silent mistake. "*" is refused: it
// would let any web page the user opens spend their sats.
func (d *configDecoder) checkBrowsers(s *ServerConfig) error {
	for i, o := range s.AllowedOrigins {
		path := fmt.Sprintf("server.allowed_origins[%d]", i)
		if o == "*" {
			return d.errorf(path, `"*" would let any web page you open spend your sats through arbstr: list each origin that may`)
		}
		u, err := url.Parse(o)
		if err != nil || u.Scheme == "" || u.Host == "" || u.User != nil || u.Path != "" || u.RawQuery != "" || u.Fragment != "" || strings.HasSuffix(o, "?") || strings.HasSuffix(o, "#") {
			return d.errorf(path, "want scheme://host[:port] with no path, such as http://localhost:3000, got %q", o)
		}
		s.AllowedOrigins[i] = strings.ToLower(o)
	}
	for i, h := range s.AllowedHosts {
		if h == "" || strings.ContainsAny(h, "/ \t") || strings.ContainsFunc(h, unicode.IsControl) {
			return d.errorf(fmt.Sprintf("server.allowed_hosts[%d]", i), "want a host name, such as arbstr.lan, got %q", h)
		}
	}
	return nil
}

// strategy checks a routing strategy, and folds lowest_cost, the
// name early arbstr configs use, into cheapest.
func (d *configDecoder) strategy(path string, s *string) error {
	switch *s {
	case "lowest_cost":
		*s = "cheapest"
	case "cheapest", "lowest_latency", "round_robin":
	default:
		return d.errorf(path, "unknown strategy %q: want cheapest, lowest_cost, lowest_latency or round_robin", *s)
	}
	return nil
}
