package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// The tests of config.go: the TOML subset, the JSON reader, the walker that
// gives both their meaning, and configure, which applies the overrides.

// tomlAccepted are inputs of the TOML subset and the trees they parse into.
var tomlAccepted = []struct {
	in   string
	want map[string]any
}{
	{"", map[string]any{}},
	{"# only a comment\n\n   \t# another\n", map[string]any{}},
	{"a = 1", map[string]any{"a": int64(1)}}, // no newline at the end
	{"a = 1\r\nb = 2\r\n", map[string]any{"a": int64(1), "b": int64(2)}},
	{"a = 1 # trailing comment\n[t] # after a header\n", map[string]any{"a": int64(1), "t": map[string]any{}}},

	// Keys: bare, quoted, literal, empty quoted, dotted with spaces.
	{`bare-key_1 = 1
"quoted key" = 2
'literal.key' = 3
"" = 4
"\u00e9" = 5
`, map[string]any{"bare-key_1": int64(1), "quoted key": int64(2), "literal.key": int64(3), "": int64(4), "é": int64(5)}},
	{`a.b.c = 1
a.b.d = "x"
a . e = true
"q.r".s = 2
`, map[string]any{
		"a":   map[string]any{"b": map[string]any{"c": int64(1), "d": "x"}, "e": true},
		"q.r": map[string]any{"s": int64(2)},
	}},

	// Tables, implicit tables defined later, quoted header keys.
	{`[server]
listen = "x"
[a.b]
c = 1
[a]
d = 2
[ q . "r.s" ]
t = 3
`, map[string]any{
		"server": map[string]any{"listen": "x"},
		"a":      map[string]any{"b": map[string]any{"c": int64(1)}, "d": int64(2)},
		"q":      map[string]any{"r.s": map[string]any{"t": int64(3)}},
	}},
	// A header may pass through a table made by dotted keys (TOML 1.0).
	{`[fruit]
apple.color = "red"
[fruit.apple.texture]
smooth = true
`, map[string]any{"fruit": map[string]any{"apple": map[string]any{
		"color": "red", "texture": map[string]any{"smooth": true}}}}},

	// Arrays of tables, a sub-table of the last element, and
	// [[policies.rules]] under [policies].
	{`[[p]]
name = "a"
[[p]]
name = "b"
[p.m]
x = 1
[policies]
default_strategy = "cheapest"
[[policies.rules]]
name = "r1"
[[policies.rules]]
name = "r2"
`, map[string]any{
		"p": []any{
			map[string]any{"name": "a"},
			map[string]any{"name": "b", "m": map[string]any{"x": int64(1)}},
		},
		"policies": map[string]any{
			"default_strategy": "cheapest",
			"rules":            []any{map[string]any{"name": "r1"}, map[string]any{"name": "r2"}},
		},
	}},
	{"[[a]]\n[[a]]\n", map[string]any{"a": []any{map[string]any{}, map[string]any{}}}},

	// Strings.
	{`s = "tab\there\nnl \"q\" \\ \u00e9 \U0001F600 \b\f\r"
l = 'C:\path\n "x"'
e = ""
u = "héllo wörld"
h = "a # not a comment"
`, map[string]any{
		"s": "tab\there\nnl \"q\" \\ é 😀 \b\f\r",
		"l": `C:\path\n "x"`,
		"e": "",
		"u": "héllo wörld",
		"h": "a # not a comment",
	}},

	// Integers and floats.
	{`a = 1_000
b = -17
c = +5
d = 0
e = 9223372036854775807
f = -9223372036854775808
g = -0
`, map[string]any{"a": int64(1000), "b": int64(-17), "c": int64(5), "d": int64(0),
		"e": int64(9223372036854775807), "f": int64(-9223372036854775808), "g": int64(0)}},
	{`a = 1.5
b = -0.25
c = 1e3
d = 6.626e-34
e = 1_000.000_1
f = 5E+2
g = 0.0
h = 1e06
i = +3.0
`, map[string]any{"a": 1.5, "b": -0.25, "c": 1e3, "d": 6.626e-34, "e": 1000.0001,
		"f": 500.0, "g": 0.0, "h": 1e6, "i": 3.0}},
	{"t = true\nf = false\n", map[string]any{"t": true, "f": false}},

	// Arrays: multi-line, comments inside, trailing comma, nesting, mixed.
	{`models = [
  "gpt-4o",   # the big one
  # a whole-line comment
  'gpt-4o-mini',
]
empty = []
nested = [[1, 2], ["a"], []]
mixed = [1, 2.5, "x", true, {k = "v"}]
`, map[string]any{
		"models": []any{"gpt-4o", "gpt-4o-mini"},
		"empty":  []any{},
		"nested": []any{[]any{int64(1), int64(2)}, []any{"a"}, []any{}},
		"mixed":  []any{int64(1), 2.5, "x", true, map[string]any{"k": "v"}},
	}},

	// Inline tables, with dotted keys and nesting.
	{`p = { name = "a", rates = { in = 1 }, x.y = 2 }
e = {}
model_rates = { "claude-3.5-sonnet" = { input_rate = 12, output_rate = 60 } }
`, map[string]any{
		"p":           map[string]any{"name": "a", "rates": map[string]any{"in": int64(1)}, "x": map[string]any{"y": int64(2)}},
		"e":           map[string]any{},
		"model_rates": map[string]any{"claude-3.5-sonnet": map[string]any{"input_rate": int64(12), "output_rate": int64(60)}},
	}},
}

// tomlRejected are inputs outside the subset, with the line that the error
// must name and a piece of its message.
var tomlRejected = []struct {
	in   string
	line int
	msg  string
}{
	// Outside the subset.
	{`a = """x"""`, 1, "multi-line strings"},
	{"x = 1\na = '''x'''", 2, "multi-line strings"},
	{`"""a""" = 1`, 1, "multi-line strings"},
	{"a = 1979-05-27", 1, "invalid value"},
	{"a = 1979-05-27T07:32:00Z", 1, "invalid value"},
	{"a = 1979-05-27 07:32:00", 1, "invalid value"},
	{"a = 07:32:00", 1, "invalid value"},
	{"a = 0xFF", 1, "invalid value"},
	{"a = 0o17", 1, "invalid value"},
	{"a = 0b101", 1, "invalid value"},
	{"a = inf", 1, "invalid value"},
	{"a = -inf", 1, "invalid value"},
	{"a = +nan", 1, "invalid value"},

	// Redefinitions.
	{"a = 1\na = 2", 2, "defined twice"},
	{"a = 1\n\"a\" = 2", 2, "defined twice"},
	{"[t]\nx = 1\n[t]", 3, "table [t] is defined twice"},
	{"[t.u]\n[t]\n[t]", 3, "defined twice"},
	{"[t]\nx = 1\nx = 2", 3, "defined twice"},
	{"a.b = 1\n[a]", 2, "table [a] is already defined by dotted keys"},
	{"[fruit]\napple.color = 1\n[fruit.apple]", 3, "table [fruit.apple] is already defined by dotted keys"},
	{"a = {b = 1}\na.c = 2", 2, "cannot add to table a"},
	{"a = {b = 1}\n[a.c]", 2, "cannot add to inline table a"},
	{"a = {b = 1}\n[a]", 2, "table [a] is already defined as an inline table"},
	{"[a.b]\n[a]\nb.c = 1", 3, "cannot add to table a.b"},
	{"a.b = 1\na.b.c = 2", 2, "a.b is not a table"},
	{"a = 1\n[a.b]", 2, "a is not a table"},
	{"[[a]]\n[a]", 2, "already defined"},
	{"[a]\n[[a]]", 2, "already defined"},
	{"a = []\n[[a]]", 2, "already defined"},
	{"[[a]]\nb = 1\n[a.b]", 3, "already defined"},
	{"a = {b = 1, b = 2}", 1, "defined twice"},
	{"[[p]]\nname = 1\nname = 2", 3, "key p[0].name is defined twice"},

	// Garbage after a value or a header.
	{"a = 1 2", 1, "unexpected text after the value"},
	{"a = 1,", 1, "unexpected text after the value"},
	{`a = "x" y`, 1, "unexpected text after the value"},
	{"a = [1] ]", 1, "unexpected text after the value"},
	{"[a] b = 1", 1, "unexpected text after the table header"},
	{"[a]]", 1, "unexpected text after the table header"},

	// Unterminated things.
	{`a = "abc`, 1, "unterminated string"},
	{"a = \"abc\nb = 1", 1, "unterminated string"},
	{"a = 'abc", 1, "unterminated string"},
	{`a = "abc\`, 1, "unterminated string"},
	{"x = 1\na = [1, 2", 2, "unterminated array"},
	{"x = 1\na = [\n  1,\n  2,\n", 2, "unterminated array"},
	{"a = [1, 2\nb = 3", 2, "want , or ]"},
	{"a = [1 2]", 1, "want , or ]"},
	{"a = {b = 1", 1, "unterminated inline table"},
	{"a = {b = 1,\nc = 2}", 1, "unterminated inline table"},
	{"a = {b = 1\n}", 1, "unterminated inline table"},
	{"a = {b = 1,}", 1, "trailing comma"},
	{"a = {b = 1 c = 2}", 1, "want , or }"},
	{"[a", 1, "want ]"},
	{"[[a]", 1, "want ]]"},
	{"[[a] ]", 1, "want ]]"},

	// Escapes, control characters, encoding.
	{`a = "\q"`, 1, "invalid escape"},
	{`a = "\x41"`, 1, "invalid escape"},
	{`a = "\e"`, 1, "invalid escape"},
	{`a = "\u12"`, 1, "invalid unicode escape"},
	{`a = "\u12G4"`, 1, "invalid unicode escape"},
	{`a = "\uD800"`, 1, "invalid unicode escape"},
	{`a = "\U00110000"`, 1, "invalid unicode escape"},
	{"a = \"x\x01y\"", 1, "control character"},
	{"a = 'x\x7fy'", 1, "control character"},
	{"# comment \x00\n", 1, "control character"},
	{"a = 1\rb = 2", 1, "carriage return"},
	{"\xff = 1", 1, "invalid UTF-8"},
	{"a = 1\nb = \"\xc3\"", 2, "invalid UTF-8"},

	// Numbers and other values.
	{"a = 01", 1, "invalid value"},
	{"a = 1__0", 1, "invalid value"},
	{"a = _1", 1, "invalid value"},
	{"a = 1_", 1, "invalid value"},
	{"a = 1.", 1, "invalid value"},
	{"a = .5", 1, "invalid value"},
	{"a = 1e", 1, "invalid value"},
	{"a = 1.e5", 1, "invalid value"},
	{"a = 1e5.5", 1, "invalid value"},
	{"a = +-1", 1, "invalid value"},
	{"a = 99999999999999999999", 1, "integer out of range"},
	{"a = 1e400", 1, "float out of range"},
	{"a = True", 1, "invalid value"},
	{"a = bare", 1, "invalid value"},
	{"a =", 1, "want a value"},
	{"a = # nothing\n", 1, "want a value"},
	{"a = [1,,2]", 1, "want a value"},
	{"a = " + strings.Repeat("[", 100) + strings.Repeat("]", 100), 1, "nested too deeply"},

	// Keys and headers.
	{"= 1", 1, "want a key"},
	{"a 1", 1, "want = after a key"},
	{"a\n= 1", 1, "want = after a key"},
	{"a. = 1", 1, "want a key"},
	{"[]", 1, "want a key"},
	{"x = 1\n\n# c\n[b]\nc = \"d\" e", 5, "unexpected text"},
	{"a = [\n1,\n2,\n]\nb = ?", 5, "want a value"},
}

func TestParseTOML(t *testing.T) {
	for _, tt := range tomlAccepted {
		got, _, err := parseTOML([]byte(tt.in))
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("parseTOML(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
		}
	}
}

func TestParseTOMLRejects(t *testing.T) {
	for _, tt := range tomlRejected {
		got, _, err := parseTOML([]byte(tt.in))
		want := fmt.Sprintf("line %d: ", tt.line)
		if err == nil || !strings.HasPrefix(err.Error(), want) || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("parseTOML(%q) = %v, %v; want error %q...%q", tt.in, got, err, want, tt.msg)
		}
	}
}

// A pasted key in the wrong place must not come back in a parse error, since
// keys never appear in messages: parse errors describe, they never quote.
func TestParseErrorsQuoteNoSecret(t *testing.T) {
	const secret = "sk-Zq9XwV7pL3mN8bR2"
	tests := []struct{ name, text string }{
		{"a.toml", "api_key = " + secret},
		{"a.toml", "api_key = '" + secret},
		{"a.toml", `api_key = "` + secret + `"` + secret},
		{"a.toml", `api_key = "` + secret + `\q"`},
		{"a.toml", secret},
		{"a.toml", "[" + secret},
		{"a.json", `{"api_key": ` + secret + `}`},
		{"a.json", `{"api_key": "` + secret + `\q"}`},
		{"a.json", `{"api_key": "` + secret + `"` + secret + `}`},
		{"a.json", `{"api_key": "` + secret + `"} ` + secret},
	}
	for _, tt := range tests {
		_, _, err := loadConfigText(t, tt.name, tt.text)
		if err == nil {
			t.Errorf("loadConfig(%q) = nil error; want one", tt.text)
			continue
		}
		if part := secretPart(err.Error(), secret); part != "" {
			t.Errorf("loadConfig(%q) = %v; want no part of the key (found %q)", tt.text, err, part)
		}
	}
}

// secretPart returns a piece of secret, 4 bytes or longer, found in msg.
func secretPart(msg, secret string) string {
	for i := 0; i+4 <= len(secret); i++ {
		if strings.Contains(msg, secret[i:i+4]) {
			return secret[i : i+4]
		}
	}
	return ""
}

func TestParseTOMLLines(t *testing.T) {
	tree, lines, err := parseTOML([]byte(early2026TOML))
	if err != nil || tree == nil {
		t.Fatalf("parseTOML(early2026TOML) = %v", err)
	}
	want := map[string]int{
		"server":                           1,
		"server.listen":                    2,
		"database.path":                    5,
		"providers[0]":                     7,
		"providers[0].api_key":             10,
		"providers[0].models":              11,
		"providers[0].models[2]":           11,
		"providers[0].output_rate":         13,
		"providers[0].base_fee":            14,
		"providers[1]":                     16,
		"providers[1].name":                17,
		"providers[1].url":                 18,
		"providers[1].models[1]":           19,
		"providers[1].input_rate":          20,
		"policies":                         23,
		"policies.default_strategy":        24,
		"policies.rules[0]":                26,
		"policies.rules[0].name":           27,
		"policies.rules[0].allowed_models": 28,
		"policies.rules[0].strategy":       29,
		"policies.rules[0].keywords":       31,
		"policies.rules[1].name":           34,
		"policies.rules[1].strategy":       36,
		"policies.rules[1].keywords":       37,
		"logging":                          39,
		"logging.log_requests":             41,
	}
	for path, line := range want {
		if lines[path] != line {
			t.Errorf("parseTOML(early2026TOML) lines[%q] = %d; want %d", path, lines[path], line)
		}
	}
	_, lines, _ = parseTOML([]byte("m = [\n  \"a\",\n\n  \"b\",\n]\nt = { x.y = 1 }\n[p.q.r]\n"))
	for path, line := range map[string]int{"m": 1, "m[0]": 2, "m[1]": 4, "t": 6, "t.x": 6, "t.x.y": 6, "p": 7, "p.q": 7, "p.q.r": 7} {
		if lines[path] != line {
			t.Errorf("parseTOML lines[%q] = %d; want %d", path, lines[path], line)
		}
	}
}

// early2026TOML is the config.example.toml of arbstr of early 2026, which
// must load unchanged.
const early2026TOML = `[server]
listen = "127.0.0.1:8080"

[database]
path = "./arbstr.db"

[[providers]]
name = "provider-alpha"
url = "https://api.routstr.example/v1"
api_key = "${ROUTSTR_API_KEY}"
models = ["gpt-4o", "gpt-4o-mini", "claude-3.5-sonnet"]
input_rate = 10     # sats per 1000 input tokens
output_rate = 30    # sats per 1000 output tokens
base_fee = 1

[[providers]]
name = "provider-beta"
url = "https://another.example/v1"
models = ["gpt-4o", "claude-3.5-sonnet"]
input_rate = 8
output_rate = 35

[policies]
default_strategy = "cheapest"

[[policies.rules]]
name = "code"
allowed_models = ["claude-3.5-sonnet", "gpt-4o"]
strategy = "lowest_cost"
max_sats_per_1k_output = 50
keywords = ["code", "programming", "debug", "function"]

[[policies.rules]]
name = "quick"
allowed_models = ["gpt-4o-mini"]
strategy = "cheapest"
keywords = ["quick", "simple", "fast"]

[logging]
level = "info"
log_requests = true
`

// loadConfigText writes text to a private file of that name in a new
// directory and loads it.
func loadConfigText(t *testing.T, name, text string) (*Config, []string, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return loadConfig(path)
}

func TestLoadConfigEarly2026(t *testing.T) {
	t.Setenv("ROUTSTR_API_KEY", "alpha-secret-key")
	t.Setenv("ARBSTR_PROVIDER_BETA_API_KEY", "")
	t.Setenv("DATABASE_URL", "")
	t.Setenv("ARBSTR_LOG_LEVEL", "")
	want := defaultConfig()
	*want = Config{
		RateUnit: rateUnitPer1k, Server: want.Server, Market: want.Market, Budgets: want.Budgets,
		Database: DatabaseConfig{Path: "./arbstr.db"},
		Providers: []ProviderConfig{
			{Name: "provider-alpha", URL: "https://api.routstr.example/v1", APIKey: "alpha-secret-key",
				Models:    []string{"gpt-4o", "gpt-4o-mini", "claude-3.5-sonnet"},
				InputRate: 10, OutputRate: 30, BaseFee: 1, KeySource: "config"},
			{Name: "provider-beta", URL: "https://another.example/v1",
				Models:    []string{"gpt-4o", "claude-3.5-sonnet"},
				InputRate: 8, OutputRate: 35},
		},
		Policies: PoliciesConfig{DefaultStrategy: "cheapest", Rules: []PolicyRule{
			{Name: "code", AllowedModels: []string{"claude-3.5-sonnet", "gpt-4o"}, Strategy: "cheapest",
				MaxSatsPer1kOutput: new(50.0), Keywords: []string{"code", "programming", "debug", "function"}},
			{Name: "quick", AllowedModels: []string{"gpt-4o-mini"}, Strategy: "cheapest",
				Keywords: []string{"quick", "simple", "fast"}},
		}},
		Logging: LoggingConfig{Level: "info", LogRequests: true},
	}
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(early2026TOML), 0o600); err != nil {
		t.Fatal(err)
	}
	got, warnings, err := loadConfig(path)
	if err != nil || !reflect.DeepEqual(got, want) || len(warnings) != 0 {
		t.Fatalf("loadConfig(early2026TOML) = %+v, %q, %v; want %+v and no warnings", got, warnings, err, want)
	}
	c, err := configure(overrides{configPath: path})
	if err != nil || !reflect.DeepEqual(c.cfg, want) {
		t.Fatalf("configure(early2026TOML) = %+v, %v; want %+v", c, err, want)
	}
	wantWarnings := []string{path + `: providers[1]: provider "provider-beta" has no API key (no api_key, ARBSTR_PROVIDER_BETA_API_KEY not set): it is sent no Authorization header`}
	if !reflect.DeepEqual(c.warnings, wantWarnings) {
		t.Errorf("configure(early2026TOML) warnings = %q; want %q", c.warnings, wantWarnings)
	}

	// The second provider takes its key from the environment.
	t.Setenv("ARBSTR_PROVIDER_BETA_API_KEY", "beta-secret-key")
	want.Providers[1].APIKey, want.Providers[1].KeySource = "beta-secret-key", "env ARBSTR_PROVIDER_BETA_API_KEY"
	c, err = configure(overrides{configPath: path})
	if err != nil || !reflect.DeepEqual(c.cfg, want) || len(c.warnings) != 0 {
		t.Errorf("configure(early2026TOML) = %+v, %v; want %+v and no warnings", c, err, want)
	}
}

// exampleTOML is config.example.json written in TOML, the way the README
// shows it; both must decode to the same Config.
const exampleTOML = `# arbstr configuration.
rate_unit = "sats_per_1k"

[server]
listen = "127.0.0.1:8080"
auth_token = ""
max_body_bytes = 16_777_216
upstream_timeout_secs = 300
max_attempts = 3
shutdown_timeout_secs = 30
body_timeout_secs = 30
allowed_origins = []
allowed_hosts = []

[database]
path = "./arbstr.db"

[[providers]]
name = "routstr-alpha"
url = "https://api.routstr.example/v1"
api_key = "${ROUTSTR_ALPHA_KEY}"
models = ["gpt-4o", "gpt-4o-mini", "claude-3.5-sonnet"]
input_rate = 10
output_rate = 30
base_fee = 1
discover = false

[providers.model_rates]
gpt-4o-mini = { input_rate = 1.5, output_rate = 6 }
"claude-3.5-sonnet" = { input_rate = 12, output_rate = 60 }

[[providers]]
name = "routstr-beta"
url = "https://beta.routstr.example"
api_key = "${ROUTSTR_BETA_KEY}"
models = ["gpt-4o", "claude-3.5-sonnet"]
input_rate = 8
output_rate = 35
base_fee = 0

[policies]
default_strategy = "cheapest"

[[policies.rules]]
name = "code"
allowed_models = ["claude-3.5-sonnet", "gpt-4o"]
strategy = "cheapest"
max_sats_per_1k_output = 50
keywords = ["code", "programming", "debug", "function"]
budget_sats_per_day = 5000
budget_sats_per_month = 0

[[policies.rules]]
name = "quick"
allowed_models = ["gpt-4o-mini"]
strategy = "lowest_latency"
max_sats_per_1m_output = 20000
keywords = ["quick", "simple", "fast"]

[market]
refresh_secs = 120
stale_after_secs = 900
low_balance_sats = 0

[budgets]
default_reserve_tokens = 4096

[logging]
level = "info"
log_requests = true
`

func TestConfigExample(t *testing.T) {
	t.Setenv("ROUTSTR_ALPHA_KEY", "alpha-secret-key")
	t.Setenv("ROUTSTR_BETA_KEY", "beta-secret-key")
	fromJSON, warnings, err := loadConfig("config.example.json")
	if err != nil {
		t.Fatalf("loadConfig(%q) = %v", "config.example.json", err)
	}
	// The repository's file may be group-readable after a checkout; no other
	// warning is expected.
	for _, w := range warnings {
		if !strings.Contains(w, "chmod 600") {
			t.Errorf("loadConfig(%q) warning %q; want none", "config.example.json", w)
		}
	}
	fromTOML, _, err := loadConfigText(t, "config.toml", exampleTOML)
	if err != nil || !reflect.DeepEqual(fromJSON, fromTOML) {
		t.Errorf("loadConfig(exampleTOML) = %+v, %v; want %+v", fromTOML, err, fromJSON)
	}
	// Spot checks that the example shows what it claims.
	p := fromJSON.Providers
	if len(p) != 2 || p[0].APIKey != "alpha-secret-key" || p[1].KeySource != "config" ||
		p[0].ModelRates["claude-3.5-sonnet"] != (Rates{12, 60}) || len(fromJSON.Policies.Rules) != 2 {
		t.Errorf("loadConfig(%q) = %+v; want two providers with keys and model_rates, two rules", "config.example.json", fromJSON)
	}
}

// The same configuration in both formats decodes to the same Config, with
// the same warnings, and a mistake gives the same error but for the file
// name and line.
func TestConfigJSONMatchesTOML(t *testing.T) {
	t.Setenv("ARBSTR_P1_API_KEY", "p1-secret-key")
	t.Setenv("ARBSTR_P2_API_KEY", "")
	const tomlText = `[server]
listen = "0.0.0.0:9000"
max_attempts = 5
extra = 1
[[providers]]
name = "p1"
url = "http://127.0.0.1:9001"
models = []
model_rates = { m1 = { output_rate = 2.5 } }
input_rate = 1
output_rate = 2
[[providers]]
name = "p2"
url = "https://p2.example"
[policies]
default_strategy = "lowest_cost"
[[policies.rules]]
name = "r"
strategy = "round_robin"
max_sats_per_1k_output = 0
[logging]
level = "DEBUG"
log_requests = false
`
	const jsonText = `{
  "//": "comment",
  "server": {"listen": "0.0.0.0:9000", "max_attempts": 5, "extra": 1},
  "providers": [
    {"name": "p1", "url": "http://127.0.0.1:9001", "models": [],
     "model_rates": {"m1": {"output_rate": 2.5}}, "input_rate": 1, "output_rate": 2},
    {"name": "p2", "url": "https://p2.example", "//": "no key"}
  ],
  "policies": {"default_strategy": "lowest_cost",
    "rules": [{"name": "r", "strategy": "round_robin", "max_sats_per_1k_output": 0}]},
  "logging": {"level": "DEBUG", "log_requests": false}
}`
	fromTOML, tw, err := loadConfigText(t, "c.toml", tomlText)
	if err != nil {
		t.Fatalf("loadConfig(tomlText) = %v", err)
	}
	fromJSON, jw, err := loadConfigText(t, "c.json", jsonText)
	if err != nil || !reflect.DeepEqual(fromJSON, fromTOML) {
		t.Fatalf("loadConfig(jsonText) = %+v, %v; want %+v", fromJSON, err, fromTOML)
	}
	if got, want := fromTOML.Providers[0].ModelRates["m1"], (Rates{InputRate: 1, OutputRate: 2.5}); got != want {
		t.Errorf("model_rates m1 = %+v; want %+v (input_rate from the provider)", got, want)
	}
	if got := fromTOML.Policies.DefaultStrategy; got != "cheapest" {
		t.Errorf("default_strategy lowest_cost = %q; want %q", got, "cheapest")
	}
	if got := fromTOML.Logging.Level; got != "debug" {
		t.Errorf("level DEBUG = %q; want %q", got, "debug")
	}
	if len(tw) != 1 || len(jw) != 1 {
		t.Fatalf("warnings = %q and %q; want 1 each", tw, jw)
	}
	for i := range tw {
		if stripLocation(tw[i]) != stripLocation(jw[i]) {
			t.Errorf("warning %d = %q (TOML) and %q (JSON); want the same", i, tw[i], jw[i])
		}
	}

	// The same mistake, in both formats.
	_, _, terr := loadConfigText(t, "c.toml", strings.Replace(tomlText, "input_rate = 1\n", "input_rate = \"1\"\n", 1))
	_, _, jerr := loadConfigText(t, "c.json", strings.Replace(jsonText, `"input_rate": 1,`, `"input_rate": "1",`, 1))
	const want = "providers[0].input_rate: want a number, got string"
	if terr == nil || jerr == nil || stripLocation(terr.Error()) != want || stripLocation(jerr.Error()) != want {
		t.Errorf("input_rate \"1\": errors %v and %v; want %q", terr, jerr, want)
	}
	// Only TOML errors name a line.
	if !strings.HasSuffix(strings.Fields(terr.Error())[0], "c.toml:10:") || !strings.HasSuffix(strings.Fields(jerr.Error())[0], "c.json:") {
		t.Errorf("input_rate \"1\": errors %v and %v; want line 10 in c.toml and no line in c.json", terr, jerr)
	}
}

// In JSON a duplicate key takes its last value, as encoding/json has it, and
// keys starting with "//" are comments at any depth.
func TestConfigJSONDuplicatesAndComments(t *testing.T) {
	t.Setenv("ARBSTR_TEST_KEY", "env-secret-key")
	cfg, warnings, err := loadConfigText(t, "c.json", `{"server": {"max_attempts": 1, "max_attempts": 2, "//": 0},
  "providers": [{"name": "p", "url": "https://p.example", "api_key": "${ARBSTR_TEST_KEY}",
    "model_rates": {"//": "x", "m": {"//": 1, "input_rate": 1}}}]}`)
	if err != nil || len(warnings) != 0 || cfg.Server.MaxAttempts != 2 || cfg.Providers[0].ModelRates["m"] != (Rates{InputRate: 1}) {
		t.Errorf("loadConfig = %+v, %q, %v; want max_attempts 2, model_rates m, no warnings", cfg, warnings, err)
	}
}

// stripLocation drops the "file:line: " prefix of a message.
func stripLocation(msg string) string {
	_, rest, _ := strings.Cut(msg, ": ")
	return rest
}

func TestConfigEnvExpansion(t *testing.T) {
	t.Setenv("ARBSTR_TEST_HOST", "127.0.0.1")
	t.Setenv("ARBSTR_TEST_MODEL", "gpt-4o")
	t.Setenv("ARBSTR_TEST_KEY", "env-secret-key")
	t.Setenv("ARBSTR_TEST_TRICK", "${ARBSTR_TEST_HOST}")
	t.Setenv("ARBSTR_TEST_EMPTY", "")
	os.Unsetenv("ARBSTR_TEST_UNSET")
	cfg, _, err := loadConfigText(t, "config.toml", `[server]
listen = "${ARBSTR_TEST_HOST}:8080"
auth_token = "$ARBSTR_TEST_HOST"
[database]
path = "${ARBSTR_TEST_TRICK}/${ARBSTR_TEST_MODEL}${ARBSTR_TEST_EMPTY}.db"
[[providers]]
name = "p"
url = "http://${ARBSTR_TEST_HOST}:9000"
api_key = "${ARBSTR_TEST_KEY}"
models = ["${ARBSTR_TEST_MODEL}", "x-${ARBSTR_TEST_MODEL}"]
model_rates = { "${ARBSTR_TEST_MODEL}" = { input_rate = 1 } }
`)
	if err != nil {
		t.Fatalf("loadConfig = %v", err)
	}
	p := cfg.Providers[0]
	for _, tt := range []struct{ got, want string }{
		{cfg.Server.Listen, "127.0.0.1:8080"},
		{cfg.Server.AuthToken, "$ARBSTR_TEST_HOST"},          // no braces: literal
		{cfg.Database.Path, "${ARBSTR_TEST_HOST}/gpt-4o.db"}, // not expanded twice
		{p.URL, "http://127.0.0.1:9000"},
		{p.APIKey, "env-secret-key"},
		{strings.Join(p.Models, ","), "gpt-4o,x-gpt-4o"},
		{fmt.Sprint(p.ModelRates), "map[gpt-4o:{1 0}]"},
	} {
		if tt.got != tt.want {
			t.Errorf("expanded %q; want %q", tt.got, tt.want)
		}
	}

	errs := []struct{ text, want string }{
		{"[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\napi_key = \"${ARBSTR_TEST_UNSET}\"\n",
			":4: providers[0].api_key: environment variable ARBSTR_TEST_UNSET is not set"},
		{"[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\nmodels = [\n  \"a\",\n  \"${ARBSTR_TEST_UNSET}\",\n]\n",
			":6: providers[0].models[1]: environment variable ARBSTR_TEST_UNSET is not set"},
		{"[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\n[providers.model_rates]\n\"${ARBSTR_TEST_UNSET}\" = {}\n",
			`:5: providers[0].model_rates."${ARBSTR_TEST_UNSET}": environment variable ARBSTR_TEST_UNSET is not set`},
		{"[server]\nlisten = \"${ARBSTR_TEST_HOST\"\n", ":2: server.listen: ${ without a closing }"},
		{"[server]\nlisten = \"${}:80\"\n", ":2: server.listen: invalid ${...}"},
		{"[server]\nlisten = \"${A-B}:80\"\n", ":2: server.listen: invalid ${...}"},
	}
	for _, tt := range errs {
		_, _, err := loadConfigText(t, "config.toml", tt.text)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("loadConfig(%q) = %v; want %q", tt.text, err, tt.want)
		}
	}
}

func TestProviderKeyEnv(t *testing.T) {
	for _, tt := range []struct{ name, want string }{
		{"provider-alpha", "ARBSTR_PROVIDER_ALPHA_API_KEY"},
		{"Routstr.Beta 2", "ARBSTR_ROUTSTR_BETA_2_API_KEY"},
		{"ünï", "ARBSTR__N__API_KEY"},
		{"ABC_9", "ARBSTR_ABC_9_API_KEY"},
	} {
		if got := providerKeyEnv(tt.name); got != tt.want {
			t.Errorf("providerKeyEnv(%q) = %q; want %q", tt.name, got, tt.want)
		}
	}
}

// A provider without api_key takes ARBSTR_<NAME>_API_KEY, applied by
// configure with the other overrides; api_key in the file wins.
func TestConfigKeyFromEnv(t *testing.T) {
	t.Setenv("ARBSTR_ROUTSTR_BETA_2_API_KEY", "from-env")
	t.Setenv("ARBSTR_WITH_KEY_API_KEY", "ignored")
	t.Setenv("ARBSTR_EMPTY_KEY_API_KEY", "from-env-too")
	t.Setenv("ARBSTR_NONE_API_KEY", "")
	t.Setenv("ARBSTR_TEST_KEY", "from-config")
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(`[[providers]]
name = "Routstr.Beta 2"
url = "https://b.example"
[[providers]]
name = "with-key"
url = "https://w.example"
api_key = "${ARBSTR_TEST_KEY}"
[[providers]]
name = "empty-key"
url = "https://e.example"
api_key = ""
[[providers]]
name = "none"
url = "https://n.example"
`), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := configure(overrides{configPath: path})
	if err != nil {
		t.Fatalf("configure = %v", err)
	}
	cfg := c.cfg
	want := []struct{ key, source string }{
		{"from-env", "env ARBSTR_ROUTSTR_BETA_2_API_KEY"},
		{"from-config", "config"},
		{"from-env-too", "env ARBSTR_EMPTY_KEY_API_KEY"},
		{"", ""},
	}
	for i, w := range want {
		p := cfg.Providers[i]
		if p.APIKey != w.key || p.KeySource != w.source {
			t.Errorf("provider %q key, source = %q, %q; want %q, %q", p.Name, p.APIKey, p.KeySource, w.key, w.source)
		}
	}
}

func TestConfigErrors(t *testing.T) {
	t.Setenv("ARBSTR_A_API_KEY", "a-secret-key")
	t.Setenv("ARBSTR_B_API_KEY", "b-secret-key")
	const provider = "[[providers]]\nname = \"a\"\nurl = \"https://a.example\"\n" // lines 1-3
	tests := []struct {
		text string
		want string // the message after the file name
	}{
		// Providers.
		{"[[providers]]\nurl = \"https://a.example\"\n", "1: providers[0].name: missing or empty"},
		{"[[providers]]\nname = \"a\"\n", "1: providers[0].url: want an http:// or https:// URL with a host"},
		{provider + "[[providers]]\nname = \"a\"\nurl = \"https://b.example\"\n", `5: providers[1].name: duplicate provider name "a" (also providers[0])`},
		{"[[providers]]\nname = \"\"\n", "2: providers[0].name: missing or empty"},
		{"[[providers]]\nname = \"a\\nb\"\n", "2: providers[0].name: must not contain control characters"},
		{"[[providers]]\nname = \"a\"\nurl = \"\"\n", "3: providers[0].url: want an http:// or https:// URL with a host"},
		{"[[providers]]\nname = \"a\"\nurl = \"ftp://a.example\"\n", "3: providers[0].url: want an http:// or https:// URL with a host"},
		{"[[providers]]\nname = \"a\"\nurl = \"https://\"\n", "3: providers[0].url: want an http:// or https:// URL with a host"},
		{"[[providers]]\nname = \"a\"\nurl = \"localhost:8080\"\n", "3: providers[0].url: want an http:// or https:// URL with a host"},
		{"[[providers]]\nname = \"a\"\nurl = \"a.example/v1\"\n", "3: providers[0].url: want an http:// or https:// URL with a host"},
		{"[[providers]]\nname = \"a\"\nurl = \"http://a b\"\n", "3: providers[0].url: want an http:// or https:// URL with a host"},
		{provider + "input_rate = -1\n", "4: providers[0].input_rate: must not be negative, got -1"},
		{provider + "output_rate = -0.5\n", "4: providers[0].output_rate: must not be negative, got -0.5"},
		{provider + "base_fee = -2\n", "4: providers[0].base_fee: must not be negative, got -2"},
		{provider + "input_rate = 1e10\n", "4: providers[0].input_rate: must be at most 1e+06, got 1e+10"},
		{provider + "[providers.model_rates]\nm = { input_rate = 1, output_rate = -3 }\n", "5: providers[0].model_rates.m.output_rate: must not be negative, got -3"},
		{provider + "model_rates.\"m.x\".input_rate = -1\n", `4: providers[0].model_rates."m.x".input_rate: must not be negative, got -1`},
		{provider + "model_rates = { m = 1 }\n", "4: providers[0].model_rates.m: want a table, got integer"},
		{provider + "model_rates = [1]\n", "4: providers[0].model_rates: want a table, got array"},

		// Types.
		{provider + "input_rate = \"10\"\n", "4: providers[0].input_rate: want a number, got string"},
		{provider + "models = \"gpt-4o\"\n", "4: providers[0].models: want an array, got string"},
		{provider + "models = [\n  \"a\",\n  1,\n]\n", "6: providers[0].models[1]: want a string, got integer"},
		{provider + "name2 = 1\napi_key = 1\n", "5: providers[0].api_key: want a string, got integer"},
		{"[server]\nmax_attempts = 2.5\n", "2: server.max_attempts: want an integer, got float"},
		{"[server]\nmax_attempts = 3.0\n", "2: server.max_attempts: want an integer, got float"},
		{"[server]\nlisten = 8080\n", "2: server.listen: want a string, got integer"},
		{"[logging]\nlog_requests = \"yes\"\n", "2: logging.log_requests: want a boolean, got string"},
		{"server = 1\n", "1: server: want a table, got integer"},
		{"[providers]\nname = \"a\"\n", "1: providers: want an array, got table"},
		{"providers = [1]\n", "1: providers[0]: want a table, got integer"},
		{"[policies]\nrules = {}\n", "2: policies.rules: want an array, got table"},
		{"[[policies.rules]]\nname = \"r\"\nkeywords = [true]\n", "3: policies.rules[0].keywords[0]: want a string, got boolean"},

		// Server.
		{"[server]\nmax_body_bytes = 0\n", "2: server.max_body_bytes: must be at least 1, got 0"},
		{"[server]\nupstream_timeout_secs = 0\n", "2: server.upstream_timeout_secs: must be at least 1, got 0"},
		{"[server]\nmax_attempts = -1\n", "2: server.max_attempts: must be at least 1, got -1"},
		{"[server]\nshutdown_timeout_secs = 0\n", "2: server.shutdown_timeout_secs: must be at least 1, got 0"},
		{"[server]\nupstream_timeout_secs = 3_000_000_000\n", "2: server.upstream_timeout_secs: must be at most 2147483647, got 3000000000"},
		{"[server]\nlisten = \"8080\"\n", `2: server.listen: want host:port, such as 127.0.0.1:8080, got "8080"`},
		{"[server]\nlisten = \"\"\n", `2: server.listen: want host:port, such as 127.0.0.1:8080, got ""`},
		{"[database]\npath = \"\"\n", "2: database.path: must not be empty"},

		// Policies.
		{"[policies]\ndefault_strategy = \"fastest\"\n", `2: policies.default_strategy: unknown strategy "fastest": want cheapest, lowest_cost, lowest_latency or round_robin`},
		{"[[policies.rules]]\nname = \"r\"\nstrategy = \"Cheapest\"\n", `3: policies.rules[0].strategy: unknown strategy "Cheapest": want cheapest, lowest_cost, lowest_latency or round_robin`},
		{"[[policies.rules]]\nstrategy = \"cheapest\"\n", "1: policies.rules[0].name: missing or empty"},
		{"[[policies.rules]]\nname = \"r\"\n[[policies.rules]]\nname = \"r\"\n", `4: policies.rules[1].name: duplicate rule name "r" (also policies.rules[0])`},
		{"[[policies.rules]]\nname = \"r\"\nmax_sats_per_1k_output = -1\n", "3: policies.rules[0].max_sats_per_1k_output: must not be negative, got -1"},
		{"[[policies.rules]]\nname = \"r\"\nmax_sats_per_1k_output = \"50\"\n", "3: policies.rules[0].max_sats_per_1k_output: want a number, got string"},

		// Logging.
		{"[logging]\nlevel = \"verbose\"\n", `2: logging.level: unknown level "verbose": want debug, info, warn or error`},
		{"[logging]\nlevel = \"warning\"\n", `2: logging.level: unknown level "warning": want debug, info, warn or error`},
	}
	for _, tt := range tests {
		path := filepath.Join(t.TempDir(), "config.toml")
		if err := os.WriteFile(path, []byte(tt.text), 0o600); err != nil {
			t.Fatal(err)
		}
		_, _, err := loadConfig(path)
		want := path + ":" + tt.want
		if err == nil || err.Error() != want {
			t.Errorf("loadConfig(%q) = %v; want %v", tt.text, err, want)
		}
	}
}

// Errors of the JSON reader and of loadConfig itself. JSON errors name a
// line only for a syntax error: the walker knows the lines of TOML only.
func TestLoadConfigFileErrors(t *testing.T) {
	tests := []struct {
		name, text string
		want       string // after the file name
	}{
		{"c.yaml", "a: 1", `: unknown config format ".yaml": want .json or .toml`},
		{"c.json", "", ":1: unexpected end of file"},
		{"c.json", "[1]", ":1: the top level must be a JSON object"},
		{"c.json", "{\n\"a\": 1,\n}", ":3: invalid character '}' looking for beginning of object key string"},
		{"c.json", "{\n  \"server\": {\n    \"listen\": x\n  }\n}", ":3: invalid character 'x' looking for beginning of value"},
		{"c.json", "{\n\"server\": {}\n} {}", ":3: unexpected text after the top-level object"},
		{"c.json", "{\"server\": {\"listen\": \"x\"", ":1: unexpected end of file"},
		{"c.json", "{\"server\": {\"max_attempts\": 1e999}}", ": server.max_attempts: number out of range"},
		{"c.json", "{\"server\": {\"max_attempts\": 99999999999999999999}}", ": server.max_attempts: want an integer, got float"},
		{"c.json", "{\"server\": {\"max_attempts\": 3.0}}", ": server.max_attempts: want an integer, got float"},
		{"c.json", "{\"server\": {\"auth_token\": null}}", ": server.auth_token: want a string, got null"},
		{"c.json", "{\n\"providers\": [\n  {\"name\": \"a\", \"url\": \"https://a.example\"},\n\n  {\"url\": \"https://b.example\"}\n]}", ": providers[1].name: missing or empty"},
	}
	for _, tt := range tests {
		path := filepath.Join(t.TempDir(), tt.name)
		if err := os.WriteFile(path, []byte(tt.text), 0o600); err != nil {
			t.Fatal(err)
		}
		_, _, err := loadConfig(path)
		if want := path + tt.want; err == nil || err.Error() != want {
			t.Errorf("loadConfig(%q) = %v; want %v", tt.text, err, want)
		}
	}
	if _, _, err := loadConfig(filepath.Join(t.TempDir(), "missing.toml")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("loadConfig(missing) = %v; want a not-exist error", err)
	}
}

func TestConfigWarnings(t *testing.T) {
	t.Setenv("ARBSTR_TEST_KEY", "env-secret-key")
	t.Setenv("ARBSTR_NOKEY_API_KEY", "")
	const provider = "[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\napi_key = \"${ARBSTR_TEST_KEY}\"\n" // lines 1-4
	tests := []struct {
		text string
		want []string // each after the file name
	}{
		{provider, nil},
		{"[[providers]]\nname = \"lit\"\nurl = \"https://p.example\"\napi_key = \"literal-secret-key\"\n",
			[]string{`:4: provider "lit": api_key is written in the file; prefer "${VAR}" or the environment variable ARBSTR_LIT_API_KEY`}},
		// A provider without a key and listen off loopback are warnings
		// of configure, which knows the overrides (TestConfigure).
		{"[[providers]]\nname = \"nokey\"\nurl = \"https://p.example\"\n", nil},
		{"[server]\nlisten = \"0.0.0.0:8080\"\n" + provider, nil},
		{"", []string{": no providers configured: every chat request will fail"}},

		// Unknown keys, at every level, in the order of their paths.
		{"top = 1\n[server]\nfoo = 1\n[bar]\nx = 1\n" + provider + "extra = \"x\"\nmodel_rates = { m = { input_rate = 1, fee = 2 } }\n[[policies.rules]]\nname = \"r\"\nmore = []\n[logging]\nfile = \"x\"\n",
			[]string{
				`:4: unknown key "bar"`,
				`:16: unknown key "logging.file"`,
				`:14: unknown key "policies.rules[0].more"`,
				`:10: unknown key "providers[0].extra"`,
				`:11: unknown key "providers[0].model_rates.m.fee"`,
				`:3: unknown key "server.foo"`,
				`:1: unknown key "top"`,
			}},
	}
	for _, tt := range tests {
		checkWarnings(t, tt.text, tt.want)
	}
}

func TestConfigFileModeWarning(t *testing.T) {
	t.Setenv("ARBSTR_TEST_KEY", "env-secret-key")
	const text = "[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\napi_key = \"${ARBSTR_TEST_KEY}\"\n"
	for _, tt := range []struct {
		mode os.FileMode
		want []string
	}{
		{0o600, nil},
		{0o400, nil},
		{0o640, []string{"file is readable by group or others (mode 0640); it may hold API keys: chmod 600 PATH"}},
		{0o644, []string{"file is readable by group or others (mode 0644); it may hold API keys: chmod 600 PATH"}},
		{0o604, []string{"file is readable by group or others (mode 0604); it may hold API keys: chmod 600 PATH"}},
	} {
		path := filepath.Join(t.TempDir(), "config.toml")
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, tt.mode); err != nil {
			t.Fatal(err)
		}
		var want []string
		for _, w := range tt.want {
			want = append(want, path+": "+strings.ReplaceAll(w, "PATH", path))
		}
		_, warnings, err := loadConfig(path)
		if err != nil || !reflect.DeepEqual(warnings, want) {
			t.Errorf("loadConfig(mode %04o) = %q, %v; want %q", tt.mode, warnings, err, want)
		}
	}
}

// No error or warning ever holds a key, whether written in the file or taken
// from the environment.
func TestConfigMessagesHoldNoKey(t *testing.T) {
	const secret = "sk-Zq9XwV7pL3mN8bR2"
	t.Setenv("ARBSTR_TEST_SECRET", secret)
	t.Setenv("ARBSTR_P_API_KEY", secret)
	texts := []string{
		// Warnings with a key in the file, in the environment, or both.
		"[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\napi_key = \"" + secret + "\"\n[server]\nlisten = \"0.0.0.0:1\"\n",
		"[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\n",
		"[[providers]]\nname = \"q\"\nurl = \"https://p.example\"\napi_key = \"${ARBSTR_TEST_SECRET}\"\n",
		"[server]\nauth_token = \"" + secret + "\"\nlisten = \"0.0.0.0:1\"\n",
		// Errors after a key was read.
		"[[providers]]\nname = \"p\"\napi_key = \"" + secret + "\"\n",
		"[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\napi_key = \"" + secret + "\"\ninput_rate = -1\n",
		"[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\napi_key = \"" + secret + "\"\n[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\n",
		"[[providers]]\nname = \"p\"\nurl = \"https://user:" + secret + "@p.example:bad\"\n",
		"[[providers]]\nname = \"p\"\nurl = \"ftp://user:" + secret + "@p.example\"\n",
		"[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\napi_key = \"" + secret + "${NOPE\"\n",
		"[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\napi_key = \"" + secret + "${ARBSTR_TEST_UNSET_VAR}\"\n",
		"[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\napi_key = [\"" + secret + "\"]\n",
		// Client tokens: written in the file, repeated, or the auth token.
		"[[clients]]\nname = \"c\"\ntoken = \"" + secret + "\"\n",
		"[[clients]]\nname = \"c\"\ntoken = \"" + secret + "\"\n[[clients]]\nname = \"d\"\ntoken = \"${ARBSTR_TEST_SECRET}\"\n",
		"[server]\nauth_token = \"${ARBSTR_TEST_SECRET}\"\n[[clients]]\nname = \"c\"\ntoken = \"" + secret + "\"\n",
		"[[clients]]\nname = \"c\"\ntoken = \"" + secret + "${NOPE\"\n",
		"[[clients]]\nname = \"c\"\ntoken = \"" + secret + "\"\npolicies = [\"none\"]\n",
	}
	for _, text := range texts {
		path := filepath.Join(t.TempDir(), "config.toml")
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		// configure adds the warnings about keys from the environment and
		// the listen address to those of the file.
		c, err := configure(overrides{configPath: path})
		var msgs []string
		if c != nil {
			msgs = c.warnings
		}
		if err != nil {
			msgs = append(msgs, err.Error())
		}
		for _, m := range msgs {
			if part := secretPart(m, secret); part != "" {
				t.Errorf("loadConfig(%q) message %q; want no part of the key (found %q)", text, m, part)
			}
		}
	}
}

func TestIsLoopbackListen(t *testing.T) {
	for _, tt := range []struct {
		addr string
		want bool
	}{
		{"127.0.0.1:8080", true},
		{"127.1.2.3:80", true},
		{"localhost:8080", true},
		{"LocalHost:8080", true},
		{"[::1]:8080", true},
		{":8080", false},
		{"0.0.0.0:8080", false},
		{"[::]:8080", false},
		{"192.168.1.10:8080", false},
		{"example.com:80", false},
		{"", false},
		{"127.0.0.1", false},
	} {
		if got := isLoopbackListen(tt.addr); got != tt.want {
			t.Errorf("isLoopbackListen(%q) = %v; want %v", tt.addr, got, tt.want)
		}
	}
}

func TestFindConfig(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	t.Setenv("ARBSTR_CONFIG", "")
	write := func(name string) string {
		if err := os.WriteFile(name, []byte("{}"), 0o600); err != nil {
			t.Fatal(err)
		}
		return name
	}
	check := func(flag, want, wantErr string) {
		t.Helper()
		got, err := findConfig(flag)
		switch {
		case wantErr == "" && (err != nil || got != want):
			t.Errorf("findConfig(%q) = %q, %v; want %q", flag, got, err, want)
		case wantErr != "" && (err == nil || !strings.Contains(err.Error(), wantErr) || got != ""):
			t.Errorf("findConfig(%q) = %q, %v; want error %q", flag, got, err, wantErr)
		}
	}

	check("", "", "") // nothing: mock mode
	write("config.toml")
	check("", "config.toml", "")
	write("config.json")
	check("", "config.json", "") // JSON before TOML
	other := write("other.toml")
	t.Setenv("ARBSTR_CONFIG", other)
	check("", other, "")
	t.Setenv("ARBSTR_CONFIG", "missing.toml")
	check("", "", "ARBSTR_CONFIG missing.toml: no such file")
	flagFile := write("flag.json")
	check(flagFile, flagFile, "") // the flag wins over everything
	check("nope.json", "", "-config nope.json: no such file")
	if err := os.Mkdir("adir", 0o700); err != nil {
		t.Fatal(err)
	}
	check("adir", "", "-config adir: is a directory")
}

// FuzzParseTOML checks that no input makes the parser panic, that a parse is
// deterministic, that every error names a line of the input, and that the
// walker copes with any tree the parser makes.
func FuzzParseTOML(f *testing.F) {
	for _, tt := range tomlAccepted {
		f.Add([]byte(tt.in))
	}
	for _, tt := range tomlRejected {
		f.Add([]byte(tt.in))
	}
	f.Add([]byte(early2026TOML))
	f.Add([]byte(exampleTOML))
	f.Fuzz(func(t *testing.T, data []byte) {
		tree, lines, err := parseTOML(data)
		tree2, lines2, err2 := parseTOML(data)
		if fmt.Sprint(err) != fmt.Sprint(err2) || !reflect.DeepEqual(tree, tree2) || !reflect.DeepEqual(lines, lines2) {
			t.Fatalf("parseTOML(%q) not deterministic: %v then %v", data, err, err2)
		}
		if err != nil {
			var se *configSyntaxError
			if !errors.As(err, &se) || se.line < 1 || se.line > 1+strings.Count(string(data), "\n") {
				t.Fatalf("parseTOML(%q) = %v; want an error on a line of the input", data, err)
			}
			return
		}
		checkTreeTypes(t, data, tree)
		d := &configDecoder{file: "fuzz.toml", lines: lines}
		d.decode(tree)
	})
}

// checkTreeTypes fails unless v holds only the types the walker knows.
func checkTreeTypes(t *testing.T, data []byte, v any) {
	switch x := v.(type) {
	case map[string]any:
		for _, e := range x {
			checkTreeTypes(t, data, e)
		}
	case []any:
		for _, e := range x {
			checkTreeTypes(t, data, e)
		}
	case string, int64, float64, bool:
	default:
		t.Fatalf("parseTOML(%q) holds a %T", data, v)
	}
}

// ---- The keys of the second version ----

// secondTOML sets every key of the second version, and secondJSON says the
// same in JSON; both must decode to secondWant.
const secondTOML = `rate_unit = "sats_per_1m"
[server]
auth_token = "${ARBSTR_TEST_AUTH}"
body_timeout_secs = 12
allowed_origins = ["http://localhost:3000", "HTTPS://App.Example:8443"]
allowed_hosts = ["arbstr.lan", "arbstr.lan:8080"]
[market]
refresh_secs = 10
stale_after_secs = 600
low_balance_sats = 2_500.5
[budgets]
default_reserve_tokens = 1024
[[providers]]
name = "p1"
url = "https://p1.example/v1"
api_key = "${ARBSTR_TEST_KEY}"
input_rate = 10000
output_rate = 30000
base_fee = 1
discover = true
model_rates = { m = { output_rate = 60000 } }
[[providers]]
name = "p2"
url = "https://p2.example"
api_key = "${ARBSTR_TEST_KEY}"
auto_discover = true
discover = true
[[policies.rules]]
name = "code"
max_sats_per_1m_output = 50000
budget_sats_per_day = 1000
budget_sats_per_month = 20_000
[[policies.rules]]
name = "quick"
max_sats_per_1k_output = 50
[[clients]]
name = "agent"
token = "${ARBSTR_TEST_AGENT}"
policies = ["code", "quick"]
budget_sats_per_day = 100
budget_sats_per_month = 2000
rate_limit_rpm = 60
[[clients]]
name = "app"
token = "${ARBSTR_TEST_APP}"
rate_limit_rpm = 0
`

const secondJSON = `{
  "rate_unit": "sats_per_1m",
  "server": {"auth_token": "${ARBSTR_TEST_AUTH}", "body_timeout_secs": 12,
    "allowed_origins": ["http://localhost:3000", "HTTPS://App.Example:8443"],
    "allowed_hosts": ["arbstr.lan", "arbstr.lan:8080"]},
  "market": {"refresh_secs": 10, "stale_after_secs": 600, "low_balance_sats": 2500.5},
  "budgets": {"default_reserve_tokens": 1024},
  "providers": [
    {"name": "p1", "url": "https://p1.example/v1", "api_key": "${ARBSTR_TEST_KEY}",
     "input_rate": 10000, "output_rate": 30000, "base_fee": 1, "discover": true,
     "model_rates": {"m": {"output_rate": 60000}}},
    {"name": "p2", "url": "https://p2.example", "api_key": "${ARBSTR_TEST_KEY}", "auto_discover": true, "discover": true}
  ],
  "policies": {"rules": [
    {"name": "code", "max_sats_per_1m_output": 50000, "budget_sats_per_day": 1000, "budget_sats_per_month": 20000},
    {"name": "quick", "max_sats_per_1k_output": 50}
  ]},
  "clients": [
    {"name": "agent", "token": "${ARBSTR_TEST_AGENT}", "policies": ["code", "quick"],
     "budget_sats_per_day": 100, "budget_sats_per_month": 2000, "rate_limit_rpm": 60},
    {"name": "app", "token": "${ARBSTR_TEST_APP}", "rate_limit_rpm": 0}
  ]
}`

func secondWant() *Config {
	want := defaultConfig()
	want.RateUnit = rateUnitPer1m
	want.Server.AuthToken = "auth-secret"
	want.Server.BodyTimeoutSecs = 12
	want.Server.AllowedOrigins = []string{"http://localhost:3000", "https://app.example:8443"}
	want.Server.AllowedHosts = []string{"arbstr.lan", "arbstr.lan:8080"}
	want.Market = MarketConfig{RefreshSecs: 10, StaleAfterSecs: 600, LowBalanceSats: 2500.5}
	want.Budgets = BudgetsConfig{DefaultReserveTokens: 1024}
	want.Providers = []ProviderConfig{
		{Name: "p1", URL: "https://p1.example/v1", APIKey: "provider-secret", KeySource: "config",
			InputRate: 10000, OutputRate: 30000, BaseFee: 1, Discover: true,
			ModelRates: map[string]Rates{"m": {InputRate: 10000, OutputRate: 60000}}},
		{Name: "p2", URL: "https://p2.example", APIKey: "provider-secret", KeySource: "config", Discover: true},
	}
	want.Policies.Rules = []PolicyRule{
		{Name: "code", Strategy: "cheapest", MaxSatsPer1mOutput: new(50000.0), BudgetSatsPerDay: 1000, BudgetSatsPerMonth: 20000},
		{Name: "quick", Strategy: "cheapest", MaxSatsPer1kOutput: new(50.0)},
	}
	want.Clients = []ClientConfig{
		{Name: "agent", Token: "agent-secret", Policies: []string{"code", "quick"},
			BudgetSatsPerDay: 100, BudgetSatsPerMonth: 2000, RateLimitRPM: 60},
		{Name: "app", Token: "app-secret"},
	}
	return want
}

func setSecondEnv(t *testing.T) {
	t.Setenv("ARBSTR_TEST_AUTH", "auth-secret")
	t.Setenv("ARBSTR_TEST_KEY", "provider-secret")
	t.Setenv("ARBSTR_TEST_AGENT", "agent-secret")
	t.Setenv("ARBSTR_TEST_APP", "app-secret")
}

func TestConfigSecondVersionKeys(t *testing.T) {
	setSecondEnv(t)
	for _, tt := range []struct{ name, text string }{{"c.toml", secondTOML}, {"c.json", secondJSON}} {
		got, warnings, err := loadConfigText(t, tt.name, tt.text)
		if want := secondWant(); err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("loadConfig(%s) = %+v, %v; want %+v", tt.name, got, err, want)
		}
		if len(warnings) != 0 {
			t.Errorf("loadConfig(%s) warnings = %q; want none", tt.name, warnings)
		}
	}
}

// A file that sets none of the new keys gets their defaults.
func TestConfigSecondVersionDefaults(t *testing.T) {
	for _, tt := range []struct{ name, text string }{
		{"c.toml", "[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\n[[policies.rules]]\nname = \"r\"\n"},
		{"c.json", `{"providers": [{"name": "p", "url": "https://p.example"}], "policies": {"rules": [{"name": "r"}]}}`},
	} {
		cfg, _, err := loadConfigText(t, tt.name, tt.text)
		if err != nil {
			t.Fatalf("loadConfig(%s) = %v", tt.name, err)
		}
		r, p := cfg.Policies.Rules[0], cfg.Providers[0]
		for _, c := range []struct {
			what      string
			got, want any
		}{
			{"rate_unit", cfg.RateUnit, "sats_per_1k"},
			{"server.body_timeout_secs", cfg.Server.BodyTimeoutSecs, 30},
			{"server.allowed_origins", len(cfg.Server.AllowedOrigins), 0},
			{"server.allowed_hosts", len(cfg.Server.AllowedHosts), 0},
			{"market", cfg.Market, MarketConfig{RefreshSecs: 120, StaleAfterSecs: 900}},
			{"budgets.default_reserve_tokens", cfg.Budgets.DefaultReserveTokens, int64(4096)},
			{"clients", len(cfg.Clients), 0},
			{"providers[0].discover", p.Discover, false},
			{"rules[0].max_sats_per_1m_output", r.MaxSatsPer1mOutput, (*float64)(nil)},
			{"rules[0].budget_sats_per_day", r.BudgetSatsPerDay, 0.0},
			{"rules[0].budget_sats_per_month", r.BudgetSatsPerMonth, 0.0},
		} {
			if !reflect.DeepEqual(c.got, c.want) {
				t.Errorf("loadConfig(%s) %s = %v; want %v", tt.name, c.what, c.got, c.want)
			}
		}
	}
}

// secondErrors are mistakes in the keys of the second version: TOML text and
// the error after the file name; the JSON form, where given, must give the
// same error but for the line.
var secondErrors = []struct {
	toml, json string
	want       string
}{
	// rate_unit.
	{"rate_unit = \"sats_per_1b\"\n", `{"rate_unit": "sats_per_1b"}`, `1: rate_unit: unknown unit "sats_per_1b": want "sats_per_1k" or "sats_per_1m"`},
	{"rate_unit = \"SATS_PER_1M\"\n", "", `1: rate_unit: unknown unit "SATS_PER_1M": want "sats_per_1k" or "sats_per_1m"`},
	{"rate_unit = 1000\n", `{"rate_unit": 1000}`, "1: rate_unit: want a string, got integer"},

	// Policy rules.
	{"rate_unit = \"sats_per_1k\"\n[[policies.rules]]\nname = \"r\"\nmax_sats_per_1k_output = 50\nmax_sats_per_1m_output = 50000\n",
		`{"rate_unit": "sats_per_1k", "policies": {"rules": [{"name": "r", "max_sats_per_1k_output": 50, "max_sats_per_1m_output": 50000}]}}`,
		"5: policies.rules[0].max_sats_per_1m_output: give max_sats_per_1k_output or max_sats_per_1m_output, not both"},
	{"rate_unit = \"sats_per_1m\"\n[[policies.rules]]\nname = \"r\"\nmax_sats_per_1m_output = -1\n",
		`{"rate_unit": "sats_per_1m", "policies": {"rules": [{"name": "r", "max_sats_per_1m_output": -1}]}}`,
		"4: policies.rules[0].max_sats_per_1m_output: must not be negative, got -1"},
	{"rate_unit = \"sats_per_1m\"\n[[policies.rules]]\nname = \"r\"\nmax_sats_per_1m_output = \"5\"\n", "",
		"4: policies.rules[0].max_sats_per_1m_output: want a number, got string"},
	{"[[policies.rules]]\nname = \"r\"\nbudget_sats_per_day = -1\n",
		`{"policies": {"rules": [{"name": "r", "budget_sats_per_day": -1}]}}`,
		"3: policies.rules[0].budget_sats_per_day: must not be negative, got -1"},
	{"[[policies.rules]]\nname = \"r\"\nbudget_sats_per_month = \"10\"\n",
		`{"policies": {"rules": [{"name": "r", "budget_sats_per_month": "10"}]}}`,
		"3: policies.rules[0].budget_sats_per_month: want a number, got string"},
	{"[[policies.rules]]\nname = \"r\"\nbudget_sats_per_month = 3e15\n", "",
		"3: policies.rules[0].budget_sats_per_month: must be at most 1e+12, got 3e+15"},

	// Server.
	{"[server]\nbody_timeout_secs = 0\n", `{"server": {"body_timeout_secs": 0}}`, "2: server.body_timeout_secs: must be at least 1, got 0"},
	{"[server]\nbody_timeout_secs = 1.5\n", `{"server": {"body_timeout_secs": 1.5}}`, "2: server.body_timeout_secs: want an integer, got float"},
	{"[server]\nallowed_origins = [\"*\"]\n", `{"server": {"allowed_origins": ["*"]}}`,
		`2: server.allowed_origins[0]: "*" would let any web page you open spend your sats through arbstr: list each origin that may`},
	{"[server]\nallowed_origins = \"http://a.example\"\n", `{"server": {"allowed_origins": "http://a.example"}}`,
		"2: server.allowed_origins: want an array, got string"},
	{"[server]\nallowed_origins = [\n  \"http://a.example\",\n  \"http://b.example/\",\n]\n", "",
		`4: server.allowed_origins[1]: want scheme://host[:port] with no path, such as http://localhost:3000, got "http://b.example/"`},
	{"[server]\nallowed_hosts = [\"\"]\n", `{"server": {"allowed_hosts": [""]}}`, `2: server.allowed_hosts[0]: want a host name, such as arbstr.lan, got ""`},
	{"[server]\nallowed_hosts = [\"http://arbstr.lan\"]\n", "", `2: server.allowed_hosts[0]: want a host name, such as arbstr.lan, got "http://arbstr.lan"`},
	{"[server]\nallowed_hosts = [1]\n", "", "2: server.allowed_hosts[0]: want a string, got integer"},

	// Providers.
	{"[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\ndiscover = \"yes\"\n",
		`{"providers": [{"name": "p", "url": "https://p.example", "discover": "yes"}]}`,
		"4: providers[0].discover: want a boolean, got string"},
	{"rate_unit = \"sats_per_1k\"\n[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\ndiscover = true\nauto_discover = false\n",
		`{"rate_unit": "sats_per_1k", "providers": [{"name": "p", "url": "https://p.example", "discover": true, "auto_discover": false}]}`,
		"6: providers[0].auto_discover: auto_discover is another name of discover, and the two disagree"},

	// Market and budgets.
	{"[market]\nrefresh_secs = 9\n", `{"market": {"refresh_secs": 9}}`, "2: market.refresh_secs: must be at least 10, got 9"},
	{"[market]\nstale_after_secs = 0\n", `{"market": {"stale_after_secs": 0}}`, "2: market.stale_after_secs: must be at least 1, got 0"},
	{"[market]\nlow_balance_sats = -5\n", `{"market": {"low_balance_sats": -5}}`, "2: market.low_balance_sats: must not be negative, got -5"},
	{"[market]\nrefresh_secs = \"60\"\n", "", "2: market.refresh_secs: want an integer, got string"},
	{"market = 1\n", `{"market": 1}`, "1: market: want a table, got integer"},
	{"[budgets]\ndefault_reserve_tokens = 0\n", `{"budgets": {"default_reserve_tokens": 0}}`, "2: budgets.default_reserve_tokens: must be at least 1, got 0"},

	// Clients.
	{"[[clients]]\ntoken = \"${ARBSTR_TEST_AGENT}\"\n", `{"clients": [{"token": "${ARBSTR_TEST_AGENT}"}]}`, "1: clients[0].name: missing or empty"},
	{"[[clients]]\nname = \"c\"\n", `{"clients": [{"name": "c"}]}`, "1: clients[0].token: missing or empty"},
	{"[[clients]]\nname = \"c\"\ntoken = \"${ARBSTR_TEST_AGENT}\"\n[[clients]]\nname = \"c\"\ntoken = \"${ARBSTR_TEST_APP}\"\n", "",
		`5: clients[1].name: duplicate client name "c" (also clients[0])`},
	{"[[clients]]\nname = \"c\"\ntoken = \"${ARBSTR_TEST_AGENT}\"\n[[clients]]\nname = \"d\"\ntoken = \"${ARBSTR_TEST_AGENT}\"\n",
		`{"clients": [{"name": "c", "token": "${ARBSTR_TEST_AGENT}"}, {"name": "d", "token": "${ARBSTR_TEST_AGENT}"}]}`,
		"6: clients[1].token: the same token as clients[0]: each client needs a token of its own"},
	{"[server]\nauth_token = \"${ARBSTR_TEST_AGENT}\"\n[[clients]]\nname = \"c\"\ntoken = \"${ARBSTR_TEST_AGENT}\"\n", "",
		"5: clients[0].token: the same as server.auth_token: a client needs a token of its own"},
	{"[[policies.rules]]\nname = \"code\"\n[[clients]]\nname = \"c\"\ntoken = \"${ARBSTR_TEST_AGENT}\"\npolicies = [\"code\", \"cod\"]\n",
		`{"policies": {"rules": [{"name": "code"}]}, "clients": [{"name": "c", "token": "${ARBSTR_TEST_AGENT}", "policies": ["code", "cod"]}]}`,
		`6: clients[0].policies[1]: no policy rule is named "cod"`},
	{"[[clients]]\nname = \"c\"\ntoken = \"${ARBSTR_TEST_AGENT}\"\nbudget_sats_per_day = -1\n", "", "4: clients[0].budget_sats_per_day: must not be negative, got -1"},
	{"[[clients]]\nname = \"c\"\ntoken = \"${ARBSTR_TEST_AGENT}\"\nbudget_sats_per_month = true\n", "", "4: clients[0].budget_sats_per_month: want a number, got boolean"},
	{"[[clients]]\nname = \"c\"\ntoken = \"${ARBSTR_TEST_AGENT}\"\nrate_limit_rpm = -1\n",
		`{"clients": [{"name": "c", "token": "${ARBSTR_TEST_AGENT}", "rate_limit_rpm": -1}]}`,
		"4: clients[0].rate_limit_rpm: must be at least 0, got -1"},
	{"[[clients]]\nname = \"c\"\ntoken = \"${ARBSTR_TEST_AGENT}\"\nrate_limit_rpm = 1.5\n", "", "4: clients[0].rate_limit_rpm: want an integer, got float"},
	{"[[clients]]\nname = \"c\"\ntoken = \"${ARBSTR_TEST_UNSET}\"\n", "", "3: clients[0].token: environment variable ARBSTR_TEST_UNSET is not set"},
	{"[clients]\nname = \"c\"\n", `{"clients": {"name": "c"}}`, "1: clients: want an array, got table"},
}

func TestConfigSecondVersionErrors(t *testing.T) {
	t.Setenv("ARBSTR_TEST_AGENT", "agent-secret")
	t.Setenv("ARBSTR_TEST_APP", "app-secret")
	os.Unsetenv("ARBSTR_TEST_UNSET")
	for _, tt := range secondErrors {
		path := filepath.Join(t.TempDir(), "config.toml")
		if err := os.WriteFile(path, []byte(tt.toml), 0o600); err != nil {
			t.Fatal(err)
		}
		_, _, err := loadConfig(path)
		if want := path + ":" + tt.want; err == nil || err.Error() != want {
			t.Errorf("loadConfig(%q) = %v; want %v", tt.toml, err, want)
		}
		if tt.json == "" {
			continue
		}
		_, _, jerr := loadConfigText(t, "config.json", tt.json)
		_, want, _ := strings.Cut(tt.want, ": ")
		if jerr == nil || stripLocation(jerr.Error()) != want {
			t.Errorf("loadConfig(%s) = %v; want %q", tt.json, jerr, want)
		}
	}
}

// Files written for arbstr since mid-2026 price tokens per 1M with no marker.
// Without rate_unit, a key that only those files have refuses the file, at
// that key, with the reason and both fixes. [vault] is refused always.
func TestConfigNewerFiles(t *testing.T) {
	const refusal = "only arbstr files written since mid-2026 have this key, and those price tokens in sats per 1M tokens; " +
		"without rate_unit this file's rates would be read per 1k tokens, and every request would cost about 1000x too much. " +
		`Add rate_unit = "sats_per_1m" at the top of the file, or rate_unit = "sats_per_1k" to confirm that its rates are per 1k tokens`
	const vault = "vault: arbstr does no billing, so it cannot serve a file that asks for it through [vault]: remove the table, and bill elsewhere if you sell access"
	const provider = "[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\n" // lines 1-3 (or 2-4 after rate_unit)
	tests := []struct{ text, want string }{
		{provider + "tier = \"local\"\n", "4: providers[0].tier: " + refusal},
		{provider + provider + "auto_discover = true\n", "7: providers[1].auto_discover: " + refusal},
		{"[[policies.rules]]\nname = \"r\"\nmax_sats_per_1m_output = 50000\n", "3: policies.rules[0].max_sats_per_1m_output: " + refusal},
		{provider + "[routing]\ncomplexity_threshold_low = 0.4\n", "4: routing: " + refusal},
		{provider + "[tokenstats]\nurl = \"https://t.example\"\n", "4: tokenstats: " + refusal},
		{provider + "[routing.complexity_weights]\ncode_blocks = 1.0\n", "4: routing: " + refusal},
		{provider + "[vault]\nurl = \"http://localhost:3000\"\n", "4: " + vault},
		{"rate_unit = \"sats_per_1m\"\n" + provider + "[vault]\nurl = \"http://localhost:3000\"\n", "5: " + vault},
		{"rate_unit = \"sats_per_1k\"\n" + provider + "[vault]\n", "5: " + vault},
	}
	for _, tt := range tests {
		path := filepath.Join(t.TempDir(), "config.toml")
		if err := os.WriteFile(path, []byte(tt.text), 0o600); err != nil {
			t.Fatal(err)
		}
		_, _, err := loadConfig(path)
		if want := path + ":" + tt.want; err == nil || err.Error() != want {
			t.Errorf("loadConfig(%q) = %v; want %v", tt.text, err, want)
		}
	}
	// JSON alike, without a line.
	_, _, err := loadConfigText(t, "c.json", `{"providers": [{"name": "p", "url": "https://p.example", "tier": "local"}]}`)
	if want := "providers[0].tier: " + refusal; err == nil || stripLocation(err.Error()) != want {
		t.Errorf("loadConfig(JSON with tier) = %v; want %q", err, want)
	}
	_, _, err = loadConfigText(t, "c.json", `{"rate_unit": "sats_per_1m", "vault": {}}`)
	if err == nil || stripLocation(err.Error()) != vault {
		t.Errorf("loadConfig(JSON with vault) = %v; want %q", err, vault)
	}

	// With rate_unit, either unit, tier, [routing] and [tokenstats] are
	// unknown keys, and auto_discover and max_sats_per_1m_output are read.
	for _, unit := range []string{"sats_per_1k", "sats_per_1m"} {
		text := "rate_unit = \"" + unit + "\"\n" + provider + "tier = \"local\"\nauto_discover = true\n" +
			"[[policies.rules]]\nname = \"r\"\nmax_sats_per_1m_output = 50000\n[routing]\nx = 1\n[tokenstats]\nurl = \"u\"\n"
		path := filepath.Join(t.TempDir(), "config.toml")
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, warnings, err := loadConfig(path)
		want := []string{path + `:5: unknown key "providers[0].tier"`, path + `:10: unknown key "routing"`, path + `:12: unknown key "tokenstats"`}
		if err != nil || !reflect.DeepEqual(warnings, want) {
			t.Fatalf("loadConfig(rate_unit %s) = %q, %v; want %q", unit, warnings, err, want)
		}
		if cfg.RateUnit != unit || !cfg.Providers[0].Discover || *cfg.Policies.Rules[0].MaxSatsPer1mOutput != 50000 {
			t.Errorf("loadConfig(rate_unit %s) = %+v; want that unit, discover, max_sats_per_1m_output 50000", unit, cfg)
		}
	}
}

// testdata/arbstr-2026.toml is a config in the shape of arbstr's
// config.example.toml of mid/late 2026. As it is, it is refused; with
// rate_unit = "sats_per_1m" it loads, its rates as written.
func TestConfigArbstr2026(t *testing.T) {
	t.Setenv("PROVIDER1_API_KEY", "provider1-secret")
	text, err := os.ReadFile("testdata/arbstr-2026.toml")
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = loadConfigText(t, "config.toml", string(text))
	for _, want := range []string{"1000x too much", `rate_unit = "sats_per_1m"`, `rate_unit = "sats_per_1k" to confirm`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("loadConfig(arbstr-2026.toml) = %v; want an error with %q", err, want)
		}
	}

	cfg, warnings, err := loadConfigText(t, "config.toml", "rate_unit = \"sats_per_1m\"\n"+string(text))
	if err != nil {
		t.Fatalf("loadConfig(arbstr-2026.toml with rate_unit) = %v", err)
	}
	var unknown []string
	for _, w := range warnings {
		if _, key, ok := strings.Cut(w, "unknown key "); ok {
			unknown = append(unknown, key)
		}
	}
	if want := []string{`"providers[0].tier"`, `"providers[1].tier"`, `"routing"`, `"tokenstats"`}; !reflect.DeepEqual(unknown, want) {
		t.Errorf("loadConfig(arbstr-2026.toml with rate_unit) unknown keys = %q; want %q (all warnings %q)", unknown, want, warnings)
	}
	p := cfg.Providers
	for _, tt := range []struct {
		what      string
		got, want any
	}{
		{"rate_unit", cfg.RateUnit, "sats_per_1m"},
		{"providers", len(p), 2},
		{"providers[0] rates", [3]float64{p[0].InputRate, p[0].OutputRate, p[0].BaseFee}, [3]float64{10000, 30000, 1}},
		{"providers[1] rates", [3]float64{p[1].InputRate, p[1].OutputRate, p[1].BaseFee}, [3]float64{8000, 35000, 0}},
		{"rules[0].max_sats_per_1m_output", *cfg.Policies.Rules[0].MaxSatsPer1mOutput, 50000.0},
		{"rules[0].max_sats_per_1k_output", cfg.Policies.Rules[0].MaxSatsPer1kOutput, (*float64)(nil)},
	} {
		if !reflect.DeepEqual(tt.got, tt.want) {
			t.Errorf("loadConfig(arbstr-2026.toml with rate_unit) %s = %v; want %v", tt.what, tt.got, tt.want)
		}
	}
}

// A token rate of 1000 sats per 1k tokens, a sat a token, or more is most
// likely a rate per 1M in a file read per 1k: a warning. The bound on rates
// is the same price in either unit.
func TestConfigRateWarnings(t *testing.T) {
	t.Setenv("ARBSTR_TEST_KEY", "env-secret-key")
	const provider = "[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\napi_key = \"${ARBSTR_TEST_KEY}\"\n" // lines 1-4
	const per1m = "rate_unit = \"sats_per_1m\"\n"                                                                   // shifts the lines by 1
	tests := []struct {
		text string
		want []string // each after the file name
	}{
		{provider + "input_rate = 999.9\noutput_rate = 0\nbase_fee = 5000\n", nil},
		{provider + "input_rate = 1000\n", []string{`:5: providers[0].input_rate = 1000 sats per 1k tokens, 1 sats a token: is this per 1M? If so, set rate_unit = "sats_per_1m".`}},
		{provider + "output_rate = 30000\n", []string{`:5: providers[0].output_rate = 30000 sats per 1k tokens, 30 sats a token: is this per 1M? If so, set rate_unit = "sats_per_1m".`}},
		{provider + "input_rate = 1\nmodel_rates = { m = { output_rate = 2000 } }\n",
			[]string{`:6: providers[0].model_rates.m.output_rate = 2000 sats per 1k tokens, 2 sats a token: is this per 1M? If so, set rate_unit = "sats_per_1m".`}},
		{per1m + provider + "input_rate = 999999\noutput_rate = 30000\n", nil},
		{per1m + provider + "input_rate = 1e6\n", []string{`:6: providers[0].input_rate = 1e+06 sats per 1M tokens, 1 sats a token: is this per 1M?`}},
		{per1m + provider + "[providers.model_rates]\n\"m.x\" = { input_rate = 2_000_000 }\n",
			[]string{`:7: providers[0].model_rates."m.x".input_rate = 2e+06 sats per 1M tokens, 2 sats a token: is this per 1M?`}},
	}
	for _, tt := range tests {
		checkWarnings(t, tt.text, tt.want)
	}

	bounds := []struct{ text, want string }{
		{provider + "input_rate = 1_000_001\n", "5: providers[0].input_rate: must be at most 1e+06, got 1.000001e+06"},
		{per1m + provider + "input_rate = 1_000_000_001\n", "6: providers[0].input_rate: must be at most 1e+09, got 1.000000001e+09"},
		{per1m + provider + "base_fee = 1_000_001\n", "6: providers[0].base_fee: must be at most 1e+06, got 1.000001e+06"},
	}
	for _, tt := range bounds {
		path := filepath.Join(t.TempDir(), "config.toml")
		if err := os.WriteFile(path, []byte(tt.text), 0o600); err != nil {
			t.Fatal(err)
		}
		_, _, err := loadConfig(path)
		if want := path + ":" + tt.want; err == nil || err.Error() != want {
			t.Errorf("loadConfig(%q) = %v; want %v", tt.text, err, want)
		}
	}
	cfg, _, err := loadConfigText(t, "config.toml", per1m+provider+"input_rate = 1e9\n")
	if err != nil || cfg.Providers[0].InputRate != 1e9 {
		t.Errorf("loadConfig(per 1M, input_rate 1e9) = %v; want it read as written", err)
	}
}

// A client's token written in the file is a warning that names the client,
// as a literal api_key is.
func TestConfigClientTokenWarning(t *testing.T) {
	t.Setenv("ARBSTR_TEST_AGENT", "agent-secret")
	const secret = "tok-Zq9XwV7pL3mN8bR2"
	path := filepath.Join(t.TempDir(), "config.toml")
	text := "[[clients]]\nname = \"lit\"\ntoken = \"" + secret + "\"\n[[clients]]\nname = \"env\"\ntoken = \"${ARBSTR_TEST_AGENT}\"\n"
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	_, warnings, err := loadConfig(path)
	want := []string{path + `:3: client "lit": token is written in the file; prefer "${VAR}"`,
		path + ": no providers configured: every chat request will fail"}
	if err != nil || !reflect.DeepEqual(warnings, want) {
		t.Errorf("loadConfig(%q) = %q, %v; want %q", text, warnings, err, want)
	}
}

// configure applies every override on top of the file, in the precedence
// its doc comment states, and warns once about a listen address off
// loopback, naming where it came from.
func TestConfigure(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	for _, k := range []string{"ARBSTR_CONFIG", "DATABASE_URL", "ARBSTR_LOG_LEVEL", "ARBSTR_P_API_KEY"} {
		t.Setenv(k, "")
	}
	const file = "[server]\nlisten = \"0.0.0.0:9000\"\n[database]\npath = \"file.db\"\n[logging]\nlevel = \"warn\"\n[[providers]]\nname = \"p\"\nurl = \"https://p.example\"\n"
	if err := os.WriteFile("c.toml", []byte(file), 0o600); err != nil {
		t.Fatal(err)
	}
	const offLoopback = " is not a loopback address and server.auth_token is not set: anyone who can reach it can spend your sats"
	const noKey = `c.toml: providers[0]: provider "p" has no API key (no api_key, ARBSTR_P_API_KEY not set): it is sent no Authorization header`
	tests := []struct {
		name                   string
		o                      overrides
		env                    map[string]string
		listen, db, level, key string
		mock                   bool
		warnings               []string
	}{
		{"file", overrides{configPath: "c.toml"}, nil, "0.0.0.0:9000", "file.db", "warn", "", false,
			[]string{noKey, `server.listen "0.0.0.0:9000"` + offLoopback}},
		{"-listen beats server.listen", overrides{configPath: "c.toml", listen: "127.0.0.1:0"}, nil, "127.0.0.1:0", "file.db", "warn", "", false,
			[]string{noKey}},
		{"-listen off loopback", overrides{configPath: "c.toml", listen: ":0"}, nil, ":0", "file.db", "warn", "", false,
			[]string{noKey, `-listen ":0"` + offLoopback}},
		{"environment beats the file", overrides{configPath: "c.toml", listen: "localhost:0"},
			map[string]string{"DATABASE_URL": "sqlite://env.db", "ARBSTR_LOG_LEVEL": "DEBUG", "ARBSTR_P_API_KEY": "env-secret"},
			"localhost:0", "env.db", "debug", "env-secret", false, nil},
		{"ARBSTR_CONFIG", overrides{listen: "localhost:0"}, map[string]string{"ARBSTR_CONFIG": "c.toml"}, "localhost:0", "file.db", "warn", "", false,
			[]string{noKey}},
		{"-mock keeps the file's settings", overrides{configPath: "c.toml", listen: "localhost:0", mock: true}, nil, "localhost:0", ":memory:", "warn", "", true, nil},
		{"DATABASE_URL beats mock's :memory:", overrides{configPath: "c.toml", listen: "localhost:0", mock: true},
			map[string]string{"DATABASE_URL": "mock.db"}, "localhost:0", "mock.db", "warn", "", true, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			c, err := configure(tt.o)
			if err != nil {
				t.Fatalf("configure(%+v) = %v", tt.o, err)
			}
			key := ""
			if len(c.cfg.Providers) > 0 {
				key = c.cfg.Providers[0].APIKey
			}
			got := []any{c.cfg.Server.Listen, c.cfg.Database.Path, c.cfg.Logging.Level, key, c.mock}
			if want := []any{tt.listen, tt.db, tt.level, tt.key, tt.mock}; !reflect.DeepEqual(got, want) {
				t.Errorf("configure(%+v) listen, database, level, key, mock = %q; want %q", tt.o, got, want)
			}
			if !reflect.DeepEqual(c.warnings, tt.warnings) {
				t.Errorf("configure(%+v) warnings = %q; want %q", tt.o, c.warnings, tt.warnings)
			}
		})
	}

	// No file: the defaults, in mock mode.
	if err := os.Remove("c.toml"); err != nil {
		t.Fatal(err)
	}
	c, err := configure(overrides{})
	if err != nil || c.path != "" || !c.mock || c.cfg.Database.Path != ":memory:" || len(c.warnings) != 0 {
		t.Errorf("configure(no file) = %+v, %v; want mock mode on the defaults, ledger in memory, no warnings", c, err)
	}
	// A bad override is an error, never a silent default.
	t.Setenv("ARBSTR_LOG_LEVEL", "verbose")
	if _, err := configure(overrides{}); err == nil || err.Error() != `ARBSTR_LOG_LEVEL "verbose": want debug, info, warn or error` {
		t.Errorf("configure(ARBSTR_LOG_LEVEL=verbose) = %v; want an error", err)
	}
	t.Setenv("ARBSTR_LOG_LEVEL", "")
	if _, err := configure(overrides{configPath: "missing.toml"}); err == nil || err.Error() != "-config missing.toml: no such file" {
		t.Errorf("configure(-config missing.toml) = %v; want no such file", err)
	}
}

// ---- router.go ----

// The tests of router.go: the policy, the candidates, their order and what
// they are estimated to cost. Routers are built with
// newRouter and asked directly; no HTTP.

// routerNow is the clock of the router tests: Route takes the time as an
// argument, so circuits can be tested without sleeping.
var routerNow = time.Date(2026, 1, 10, 12, 0, 0, 0, time.UTC)

// routerProv is a provider config for the router tests. Routing never dials,
// so the URL need only be well formed.
func routerProv(name string, in, out float64, models ...string) ProviderConfig {
	return ProviderConfig{Name: name, URL: "https://" + name + ".example/v1", Models: models, InputRate: in, OutputRate: out}
}

// routerConfig is the default config with these rules and providers.
func routerConfig(rules []PolicyRule, providers ...ProviderConfig) *Config {
	cfg := defaultConfig()
	cfg.Providers = providers
	cfg.Policies.Rules = rules
	return cfg
}

// candidateNames lists the providers of cs, in order.
func candidateNames(cs []candidate) []string {
	names := []string{}
	for _, c := range cs {
		names = append(names, c.p.Name)
	}
	return names
}

// routeString describes a routing decision for failure messages.
func routeString(r *route, aerr *apiError) string {
	if aerr != nil {
		return fmt.Sprintf("error %d %s/%s %q", aerr.Status, aerr.Type, aerr.Code, aerr.Message)
	}
	return fmt.Sprintf("policy %q, %s, order %v, excluded %v", r.policyName(), r.strategy, candidateNames(r.ordered), r.excluded)
}

// isAPIError reports whether aerr has this status and code and a message
// holding each of parts.
func isAPIError(aerr *apiError, status int, code string, parts ...string) bool {
	if aerr == nil || aerr.Status != status || aerr.Code != code {
		return false
	}
	for _, p := range parts {
		if !strings.Contains(aerr.Message, p) {
			return false
		}
	}
	return true
}

func TestContainsWord(t *testing.T) {
	// containsWord gets text and word already lower-cased, as matchKeywords
	// passes them.
	tests := []struct {
		text, word string
		want       bool
	}{
		{"code", "code", true},
		{"code this", "code", true},
		{"please code.", "code", true},
		{"(code)", "code", true},
		{"code, then test", "code", true},
		{"\"code\"", "code", true},
		{"code's", "code", true},
		{"code-review", "code", true},
		{"line one\ncode\tline two", "code", true},
		{"encode", "code", false},
		{"codes", "code", false},
		{"barcode", "code", false},
		{"code_review", "code", false},
		{"code2", "code", false},
		{"2code", "code", false},
		{"", "code", false},
		{"cod", "code", false},
		// A rejected occurrence does not stop the search.
		{"encode then code", "code", true},
		{"barcodes codecode encoded", "code", false},
		{"codecode code", "code", true},
		// Keywords with spaces.
		{"write a unit test for this", "unit test", true},
		{"unit test", "unit test", true},
		{"unit tests", "unit test", false},
		{"unit-test", "unit test", false},
		{"unittest", "unit test", false},
		{"community test", "unit test", false},
		// Text in other scripts around the word: only letters, digits and
		// _ count as word characters, in any script.
		{"café code", "code", true},
		{"un café, code", "code", true},
		{"日本語 code です", "code", true},
		{"x\u00a0code\u00a0y", "code", true}, // no-break spaces
		{"code—this", "code", true},          // an em dash
		{"écode", "code", false},
		{"codeé", "code", false},
		{"ωcode", "code", false},
		{"code٣", "code", false}, // an Arabic-Indic digit
		{"café", "café", true},
		{"cafés", "café", false},
		{"un café noir", "café", true},
		{"c++ please", "c++", true},
		// Invalid UTF-8 around the word is no letter.
		{"\xffcode\xfe", "code", true},
	}
	for _, tt := range tests {
		if got := containsWord(tt.text, tt.word); got != tt.want {
			t.Errorf("containsWord(%q, %q) = %v; want %v", tt.text, tt.word, got, tt.want)
		}
	}
}

// keywordRules are policies.rules for the keyword tests, in config order.
var keywordRules = []PolicyRule{
	{Name: "code", Strategy: "round_robin", Keywords: []string{"code", "Debug", "unit test", "  refactor "}},
	{Name: "quick", Strategy: "cheapest", Keywords: []string{"quick", "TL;DR"}},
	{Name: "café", Strategy: "cheapest", Keywords: []string{"Café"}},
	{Name: "later", Strategy: "cheapest", Keywords: []string{"code", "later"}},
	{Name: "blank", Strategy: "cheapest", Keywords: []string{"", "   "}},
}

func TestMatchKeywords(t *testing.T) {
	rt := newRouter(routerConfig(keywordRules), nil)
	tests := []struct {
		text string
		want string // the policy's name, "" for none
	}{
		{"Code this", "code"},
		{"please CODE.", "code"},
		{"(code)", "code"},
		{"encode this", ""},
		{"it codes", ""},
		{"a barcode scanner", ""},
		{"DEBUG it", "code"},
		{"Write a Unit Test for me", "code"},
		{"unit tests please", ""},
		{"Refactor this", "code"}, // the keyword was written with spaces around
		{"a quick question", "quick"},
		{"tl;dr please", "quick"},
		// The first rule in config order wins, wherever its keyword is.
		{"quick question about code", "code"},
		{"later", "later"},
		{"un café, code", "code"},
		{"CAFÉ au lait", "café"},
		{"cafés", ""},
		{"日本語 code です", "code"},
		{"", ""},
		{"   ", ""},
		{"nothing to see here", ""},
	}
	for _, tt := range tests {
		var got string
		if pol := rt.matchKeywords(tt.text, nil); pol != nil {
			got = pol.Name
		}
		if got != tt.want {
			t.Errorf("matchKeywords(%q) = %q; want %q", tt.text, got, tt.want)
		}
	}
}

func TestRoutePolicy(t *testing.T) {
	rules := append(slices.Clone(keywordRules),
		PolicyRule{Name: "Fast Lane", Strategy: "lowest_latency"},
		PolicyRule{Name: "unset", Keywords: []string{"unset"}}, // Strategy "" means cheapest
	)
	cfg := routerConfig(rules, routerProv("a", 1, 1))
	cfg.Policies.DefaultStrategy = "lowest_latency"
	rt := newRouter(cfg, nil)
	const names = `configured policies: "code", "quick", "café", "later", "blank", "Fast Lane", "unset"`
	tests := []struct {
		header, lastUser string
		policy, strategy string
		errMsg           string // the whole message of an unknown_policy 400
	}{
		{"", "code this", "code", "round_robin", ""},
		{"", "quick one", "quick", "cheapest", ""},
		{"", "unset", "unset", "cheapest", ""},
		// No match: no policy, policies.default_strategy.
		{"", "hello", "", "lowest_latency", ""},
		{"", "", "", "lowest_latency", ""},
		// Only the last user message is matched: the caller passes it as
		// LastUser, and Route reads nothing else.
		{"", "and now the weather", "", "lowest_latency", ""},
		// The header is an exact name and beats the keywords.
		{"quick", "code this", "quick", "cheapest", ""},
		{"code", "hello", "code", "round_robin", ""},
		{"Fast Lane", "quick code", "Fast Lane", "lowest_latency", ""},
		{"café", "", "café", "cheapest", ""},
		{"Quick", "code this", "", "", `unknown policy "Quick" in X-Arbstr-Policy; ` + names},
		{"quick ", "", "", "", `unknown policy "quick " in X-Arbstr-Policy; ` + names},
		{"fast lane", "", "", "", `unknown policy "fast lane" in X-Arbstr-Policy; ` + names},
		{"nope", "code", "", "", `unknown policy "nope" in X-Arbstr-Policy; ` + names},
	}
	for _, tt := range tests {
		r, aerr := rt.Route(&chatRequest{Model: "m", TextBytes: 40, LastUser: tt.lastUser}, tt.header, routerNow, 0)
		f := fmt.Sprintf("Route(header %q, last user %q)", tt.header, tt.lastUser)
		if tt.errMsg != "" {
			if !isAPIError(aerr, http.StatusBadRequest, "unknown_policy") || aerr.Message != tt.errMsg || aerr.Type != "invalid_request_error" {
				t.Errorf("%s = %s; want 400 unknown_policy %q", f, routeString(r, aerr), tt.errMsg)
			}
			continue
		}
		if aerr != nil || r.policyName() != tt.policy || r.strategy != tt.strategy {
			t.Errorf("%s = %s; want policy %q, %s", f, routeString(r, aerr), tt.policy, tt.strategy)
		}
		if tt.policy == "" && r.policy != nil {
			t.Errorf("%s policy = %v; want nil", f, r.policy)
		}
	}

	// With no rules at all, the error says so.
	rt = newRouter(routerConfig(nil, routerProv("a", 1, 1)), nil)
	r, aerr := rt.Route(&chatRequest{Model: "m"}, "code", routerNow, 0)
	if want := `unknown policy "code" in X-Arbstr-Policy; configured policies: none configured`; !isAPIError(aerr, http.StatusBadRequest, "unknown_policy") || aerr.Message != want {
		t.Errorf("Route(header %q) with no rules = %s; want %q", "code", routeString(r, aerr), want)
	}
}

func TestRouteCandidates(t *testing.T) {
	// Equal prices and names in reverse config order: qualified keeps config
	// order, ordered (cheapest) sorts by name.
	cfg := routerConfig(nil,
		routerProv("zulu", 1, 1, "m1", "m2"),
		routerProv("yankee", 1, 1), // empty models: serves every model
		routerProv("xray", 1, 1, "m2"),
		routerProv("whiskey", 1, 1, "m1", "m2", "m1"), // listed twice, counted once
		ProviderConfig{Name: "victor", URL: "https://victor.example", Models: []string{}, InputRate: 1, OutputRate: 1},
	)
	rt := newRouter(cfg, nil)
	tests := []struct {
		model              string
		qualified, ordered []string
	}{
		{"m1", []string{"zulu", "yankee", "whiskey", "victor"}, []string{"victor", "whiskey", "yankee", "zulu"}},
		{"m2", []string{"zulu", "yankee", "xray", "whiskey", "victor"}, []string{"victor", "whiskey", "xray", "yankee", "zulu"}},
		{"other", []string{"yankee", "victor"}, []string{"victor", "yankee"}},
		{"M1", []string{"yankee", "victor"}, []string{"victor", "yankee"}}, // models match exactly
	}
	for _, tt := range tests {
		r, aerr := rt.Route(&chatRequest{Model: tt.model, TextBytes: 8}, "", routerNow, 0)
		if aerr != nil || !slices.Equal(qualifiedNames(r), tt.qualified) || !slices.Equal(candidateNames(r.ordered), tt.ordered) {
			t.Errorf("Route(%q) = %s, qualified %v; want qualified %v, order %v",
				tt.model, routeString(r, aerr), qualifiedNames(r), tt.qualified, tt.ordered)
		}
	}

	// No provider with empty models: an unknown model is a 400.
	rt = newRouter(routerConfig(nil, routerProv("a", 1, 1, "m1"), routerProv("b", 1, 1, "m2")), nil)
	for _, model := range []string{"m3", "M1", "m1 "} {
		r, aerr := rt.Route(&chatRequest{Model: model}, "", routerNow, 0)
		want := fmt.Sprintf("no provider serves model %q", model)
		if !isAPIError(aerr, http.StatusBadRequest, "no_provider") || aerr.Message != want {
			t.Errorf("Route(%q) = %s; want 400 no_provider %q", model, routeString(r, aerr), want)
		}
	}
	rt = newRouter(routerConfig(nil), nil)
	if r, aerr := rt.Route(&chatRequest{Model: "m"}, "", routerNow, 0); !isAPIError(aerr, http.StatusBadRequest, "no_provider", `no provider serves model "m"`) {
		t.Errorf("Route(%q) with no providers = %s; want 400 no_provider", "m", routeString(r, aerr))
	}
}

func TestRoutePolicyConstraints(t *testing.T) {
	withRates := func(pc ProviderConfig, model string, in, out float64) ProviderConfig {
		pc.ModelRates = map[string]Rates{model: {InputRate: in, OutputRate: out}}
		return pc
	}
	cfg := routerConfig([]PolicyRule{
		{Name: "cap50", Strategy: "cheapest", MaxSatsPer1kOutput: new(50.0), Keywords: []string{"cap"}},
		{Name: "only-m2", Strategy: "cheapest", AllowedModels: []string{"m2"}, Keywords: []string{"only"}},
		{Name: "cap0", Strategy: "cheapest", MaxSatsPer1kOutput: new(0.0), Keywords: []string{"zero"}},
		{Name: "cap10", Strategy: "cheapest", MaxSatsPer1kOutput: new(10.0), Keywords: []string{"ten"}},
		{Name: "nocap", Strategy: "cheapest", AllowedModels: []string{"m1", "m2", "m3"}, Keywords: []string{"nocap"}},
		{Name: "frac", Strategy: "cheapest", MaxSatsPer1kOutput: new(0.6), Keywords: []string{"frac"}},
	},
		routerProv("cheap", 1, 30, "m1", "m2"),
		withRates(routerProv("mr", 1, 20, "m1"), "m1", 1, 60), // model_rates make it dearer
		routerProv("edge", 1, 50, "m1"),                       // exactly the cap: kept
		routerProv("over", 1, 50.001, "m1"),
		withRates(routerProv("mrok", 1, 70, "m1"), "m1", 1, 45), // model_rates make it cheaper
		routerProv("free", 0, 0, "m1", "m2", "m4"),
		routerProv("m3only", 1, 30, "m3"),
		routerProv("f1", 0.15, 0.6, "m4"),
		routerProv("f2", 0.15, 0.601, "m4"),
	)
	rt := newRouter(cfg, nil)
	exceeds := func(name, rate, max string) exclusion {
		return exclusion{name, "output rate " + rate + " sats/1k exceeds the policy's max_sats_per_1k_output " + max}
	}
	tests := []struct {
		lastUser, model string
		qualified       []string
		excluded        []exclusion
		errCode, errMsg string
	}{
		{"cap", "m1", []string{"cheap", "edge", "mrok", "free"},
			[]exclusion{exceeds("mr", "60", "50"), exceeds("over", "50.001", "50")}, "", ""},
		{"cap", "m2", []string{"cheap", "free"}, nil, "", ""},
		{"zero", "m1", []string{"free"}, []exclusion{exceeds("cheap", "30", "0"), exceeds("mr", "60", "0"),
			exceeds("edge", "50", "0"), exceeds("over", "50.001", "0"), exceeds("mrok", "45", "0")}, "", ""},
		{"frac", "m4", []string{"free", "f1"}, []exclusion{exceeds("f2", "0.601", "0.6")}, "", ""},
		{"nocap", "m1", []string{"cheap", "mr", "edge", "over", "mrok", "free"}, nil, "", ""},
		// No policy: no other policy's constraints apply.
		{"hello", "m1", []string{"cheap", "mr", "edge", "over", "mrok", "free"}, nil, "", ""},
		{"only", "m2", []string{"cheap", "free"}, nil, "", ""},
		{"only", "m1", nil, nil, "model_not_allowed", `model "m1" is not allowed by policy "only-m2"`},
		{"only", "m3", nil, nil, "model_not_allowed", `model "m3" is not allowed by policy "only-m2"`},
		// Every candidate over the cap: a 400 that names the policy.
		{"ten", "m3", nil, []exclusion{exceeds("m3only", "30", "10")},
			"no_provider", `no provider serves model "m3" within policy "cap10"`},
	}
	for _, tt := range tests {
		r, aerr := rt.Route(&chatRequest{Model: tt.model, TextBytes: 400, LastUser: tt.lastUser}, "", routerNow, 0)
		f := fmt.Sprintf("Route(%q, last user %q)", tt.model, tt.lastUser)
		if tt.errCode != "" {
			if !isAPIError(aerr, http.StatusBadRequest, tt.errCode) || aerr.Message != tt.errMsg || aerr.Type != "invalid_request_error" {
				t.Errorf("%s = %s; want 400 %s %q", f, routeString(r, aerr), tt.errCode, tt.errMsg)
			}
		} else if aerr != nil || !slices.Equal(qualifiedNames(r), tt.qualified) {
			t.Errorf("%s = %s, qualified %v; want qualified %v", f, routeString(r, aerr), qualifiedNames(r), tt.qualified)
		}
		if !slices.Equal(r.excluded, tt.excluded) {
			t.Errorf("%s excluded = %v; want %v", f, r.excluded, tt.excluded)
		}
	}
}

func TestRouteCircuits(t *testing.T) {
	cfg := routerConfig([]PolicyRule{{Name: "cap", Strategy: "cheapest", MaxSatsPer1kOutput: new(5.0), Keywords: []string{"cap"}}},
		routerProv("a", 1, 1), routerProv("b", 2, 2), routerProv("c", 3, 3), routerProv("pricey", 1, 9))
	rt := newRouter(cfg, nil)
	a, b, c := rt.byName["a"], rt.byName["b"], rt.byName["c"]
	trip := func(p *provider, now time.Time) {
		for range breakerThreshold {
			p.release(now, false, outcomeFailure, 0)
		}
	}
	routeAt := func(lastUser string, now time.Time) (*route, *apiError) {
		return rt.Route(&chatRequest{Model: "m", TextBytes: 40, LastUser: lastUser}, "", now, 0)
	}
	check := func(what string, r *route, aerr *apiError, ordered []string, excluded []exclusion) {
		t.Helper()
		if aerr != nil || !slices.Equal(candidateNames(r.ordered), ordered) || !slices.Equal(r.excluded, excluded) {
			t.Errorf("Route(%s) = %s; want order %v, excluded %v", what, routeString(r, aerr), ordered, excluded)
		}
	}

	r, aerr := routeAt("", routerNow)
	check("all closed", r, aerr, []string{"a", "b", "c", "pricey"}, nil)

	// A circuit opened by the breaker: set aside, with the reason.
	trip(a, routerNow)
	r, aerr = routeAt("", routerNow)
	check("a open", r, aerr, []string{"b", "c", "pricey"}, []exclusion{{"a", "circuit open"}})
	if !slices.Equal(qualifiedNames(r), []string{"a", "b", "c", "pricey"}) {
		t.Errorf("Route(a open) qualified = %v; want all four: circuits do not disqualify", qualifiedNames(r))
	}
	// Exclusions come in config order, whatever their reason.
	r, aerr = routeAt("cap", routerNow)
	check("a open, cap", r, aerr, []string{"b", "c"}, []exclusion{
		{"a", "circuit open"}, {"pricey", "output rate 9 sats/1k exceeds the policy's max_sats_per_1k_output 5"}})

	// Half-open once the time is up: available while the probe slot is free.
	later := routerNow.Add(breakerOpenFor + time.Second)
	r, aerr = routeAt("", later)
	check("a half-open", r, aerr, []string{"a", "b", "c", "pricey"}, nil)
	if ok, probe := a.acquire(later); !ok || !probe {
		t.Fatalf("a.acquire(half-open) = %v, %v; want the probe", ok, probe)
	}
	r, aerr = routeAt("", later)
	check("a probing", r, aerr, []string{"b", "c", "pricey"}, []exclusion{{"a", "circuit open"}})
	a.release(later, true, outcomeSuccess, 0)
	r, aerr = routeAt("", later)
	check("a closed again", r, aerr, []string{"a", "b", "c", "pricey"}, nil)

	// An openUntil in the future, however it got there.
	openCircuitUntil(b, routerNow.Add(time.Minute))
	r, aerr = routeAt("", routerNow)
	check("b open", r, aerr, []string{"a", "c", "pricey"}, []exclusion{{"b", "circuit open"}})

	// All open: 503.
	trip(a, routerNow)
	trip(c, routerNow)
	trip(rt.byName["pricey"], routerNow)
	r, aerr = routeAt("", routerNow)
	if !isAPIError(aerr, http.StatusServiceUnavailable, "no_provider_available", `model "m"`) || aerr.Type != "service_unavailable" {
		t.Errorf("Route(all open) = %s; want 503 service_unavailable", routeString(r, aerr))
	}
	want := []exclusion{{"a", "circuit open"}, {"b", "circuit open"}, {"c", "circuit open"}, {"pricey", "circuit open"}}
	if !slices.Equal(r.excluded, want) {
		t.Errorf("Route(all open) excluded = %v; want %v", r.excluded, want)
	}
	// Those left after the policy are all open: 503 too, not 400.
	r, aerr = routeAt("cap", routerNow)
	if !isAPIError(aerr, http.StatusServiceUnavailable, "no_provider_available") {
		t.Errorf("Route(all open, cap) = %s; want 503", routeString(r, aerr))
	}
}

func TestRouteOrder(t *testing.T) {
	withRates := func(pc ProviderConfig, in, out float64) ProviderConfig {
		pc.ModelRates = map[string]Rates{"m": {InputRate: in, OutputRate: out}}
		return pc
	}
	withFee := func(pc ProviderConfig, fee float64) ProviderConfig {
		pc.BaseFee = fee
		return pc
	}
	// Unless a case says otherwise: 1000 input tokens (4000 bytes) and 500
	// output tokens (max_tokens).
	tests := []struct {
		name      string
		strategy  string
		providers []ProviderConfig
		observe   map[string][]time.Duration
		textBytes int64
		maxTokens int64
		want      []string
	}{
		// a 25000 msat, c 31500 (with a base fee of 30 sats), d 23000.
		{"cheapest by estimate", "cheapest", []ProviderConfig{
			routerProv("a", 10, 30), withFee(routerProv("c", 1, 1), 30), routerProv("d", 8, 30)},
			nil, 4000, 500, []string{"d", "a", "c"}},
		// a and b both 25000 msat: the faster first.
		{"cheapest ties by latency", "cheapest", []ProviderConfig{
			routerProv("a", 10, 30), routerProv("b", 5, 40), routerProv("c", 30, 30)},
			map[string][]time.Duration{"a": {200 * time.Millisecond}, "b": {100 * time.Millisecond}, "c": {time.Millisecond}},
			4000, 500, []string{"b", "a", "c"}},
		{"cheapest ties by latency, averaged", "cheapest", []ProviderConfig{
			routerProv("a", 10, 30), routerProv("b", 5, 40)},
			// a: 100 then 600 gives 0.8·100 + 0.2·600 = 200 ms; b: 150 ms.
			map[string][]time.Duration{"a": {100 * time.Millisecond, 600 * time.Millisecond}, "b": {150 * time.Millisecond}},
			4000, 500, []string{"b", "a"}},
		{"cheapest ties by latency, then name", "cheapest", []ProviderConfig{
			routerProv("zeta", 2, 2), routerProv("alpha", 2, 2), routerProv("mid", 2, 2)},
			map[string][]time.Duration{"zeta": {50 * time.Millisecond}, "alpha": {50 * time.Millisecond}, "mid": {40 * time.Millisecond}},
			4000, 500, []string{"mid", "alpha", "zeta"}},
		// router.go counts an unobserved provider as 0 ms on a tie, so that
		// it gets observed.
		{"cheapest tie, unobserved first", "cheapest", []ProviderConfig{
			routerProv("a", 10, 30), routerProv("b", 5, 40)},
			map[string][]time.Duration{"a": {100 * time.Millisecond}},
			4000, 500, []string{"b", "a"}},
		// model_rates: a is 10/30 in general but 1/1 for m.
		{"cheapest with model_rates", "cheapest", []ProviderConfig{
			routerProv("d", 8, 30), withRates(routerProv("a", 10, 30), 1, 1)},
			nil, 4000, 500, []string{"a", "d"}},
		// The estimate is of this request: few output tokens favour cheap
		// input, many favour cheap output.
		{"cheapest, short answer", "cheapest", []ProviderConfig{
			routerProv("cheapout", 20, 10), routerProv("cheapin", 1, 50)},
			nil, 4000, 10, []string{"cheapin", "cheapout"}},
		{"cheapest, long answer", "cheapest", []ProviderConfig{
			routerProv("cheapin", 1, 50), routerProv("cheapout", 20, 10)},
			nil, 4, 10000, []string{"cheapout", "cheapin"}},
		// A 0.4 msat difference still orders: the estimate is exact.
		{"cheapest, sub-sat differences", "cheapest", []ProviderConfig{
			routerProv("b", 0.151, 0.6), routerProv("a", 0.15, 0.6)},
			nil, 4000, 500, []string{"a", "b"}},
		// lowest_latency: unobserved first (in config order), then by the
		// moving average.
		{"lowest_latency", "lowest_latency", []ProviderConfig{
			routerProv("a", 1, 1), routerProv("b", 1, 1), routerProv("c", 1, 1), routerProv("d", 1, 1), routerProv("e", 1, 1)},
			map[string][]time.Duration{
				"a": {300 * time.Millisecond},
				"c": {100 * time.Millisecond},
				"e": {100 * time.Millisecond, 600 * time.Millisecond}, // 200 ms
			},
			4000, 500, []string{"b", "d", "c", "e", "a"}},
		{"lowest_latency ignores price", "lowest_latency", []ProviderConfig{
			routerProv("cheap", 1, 1), routerProv("fast", 100, 100)},
			map[string][]time.Duration{"cheap": {time.Second}, "fast": {10 * time.Millisecond}},
			4000, 500, []string{"fast", "cheap"}},
		{"lowest_latency, none observed", "lowest_latency", []ProviderConfig{
			routerProv("z", 1, 1), routerProv("y", 1, 1), routerProv("x", 1, 1)},
			nil, 4000, 500, []string{"z", "y", "x"}},
	}
	for _, tt := range tests {
		cfg := routerConfig(nil, tt.providers...)
		cfg.Policies.DefaultStrategy = tt.strategy
		rt := newRouter(cfg, nil)
		for name, ds := range tt.observe {
			for _, d := range ds {
				rt.byName[name].observe(d)
			}
		}
		r, aerr := rt.Route(&chatRequest{Model: "m", TextBytes: tt.textBytes, MaxTokens: tt.maxTokens}, "", routerNow, 0)
		if aerr != nil || !slices.Equal(candidateNames(r.ordered), tt.want) {
			t.Errorf("%s: Route = %s; want order %v", tt.name, routeString(r, aerr), tt.want)
		}
	}
}

func TestObserveLatency(t *testing.T) {
	p := newProvider(routerProv("a", 1, 1))
	if ms, ok := p.observedLatency(); ok || ms != 0 {
		t.Errorf("observedLatency() = %v, %v; want 0, false", ms, ok)
	}
	for _, tt := range []struct {
		ttfb time.Duration
		want float64
	}{
		{100 * time.Millisecond, 100}, // the first observation is taken whole
		{600 * time.Millisecond, 200}, // then 0.8·old + 0.2·new
		{200 * time.Millisecond, 200},
		{1500 * time.Microsecond, 160.3},
	} {
		p.observe(tt.ttfb)
		if ms, ok := p.observedLatency(); !ok || math.Abs(ms-tt.want) > 1e-9 {
			t.Errorf("observe(%v): observedLatency() = %v, %v; want %v, true", tt.ttfb, ms, ok, tt.want)
		}
	}
}

func TestRouteRoundRobin(t *testing.T) {
	cfg := routerConfig([]PolicyRule{
		{Name: "rr1", Strategy: "round_robin", Keywords: []string{"alpha"}},
		{Name: "rr2", Strategy: "round_robin", Keywords: []string{"beta"}},
		{Name: "cheap", Strategy: "cheapest", Keywords: []string{"gamma"}},
	}, routerProv("a", 3, 3), routerProv("b", 1, 1), routerProv("c", 2, 2), routerProv("other", 1, 1, "x"))
	cfg.Policies.DefaultStrategy = "round_robin"
	rt := newRouter(cfg, nil)
	// Each policy, and no policy, keeps its own rotation, in config order
	// whatever the prices.
	calls := []struct {
		lastUser string
		want     []string
	}{
		{"alpha", []string{"a", "b", "c"}},
		{"alpha", []string{"b", "c", "a"}},
		{"beta", []string{"a", "b", "c"}},
		{"gamma", []string{"b", "c", "a"}}, // cheapest: no rotation
		{"alpha", []string{"c", "a", "b"}},
		{"beta", []string{"b", "c", "a"}},
		{"hello", []string{"a", "b", "c"}},
		{"alpha", []string{"a", "b", "c"}},
		{"hello", []string{"b", "c", "a"}},
		{"beta", []string{"c", "a", "b"}},
		{"beta", []string{"a", "b", "c"}},
		{"gamma", []string{"b", "c", "a"}},
		{"hello", []string{"c", "a", "b"}},
		{"hello", []string{"a", "b", "c"}},
	}
	for i, c := range calls {
		r, aerr := rt.Route(&chatRequest{Model: "m", TextBytes: 40, LastUser: c.lastUser}, "", routerNow, 0)
		if aerr != nil || !slices.Equal(candidateNames(r.ordered), c.want) {
			t.Errorf("call %d: Route(last user %q) = %s; want order %v", i, c.lastUser, routeString(r, aerr), c.want)
		}
	}

	// The first providers of a run of requests, with one provider's circuit
	// open part of the time: the rotation goes on over those available.
	rt = newRouter(routerConfig(nil, routerProv("a", 1, 1), routerProv("b", 1, 1), routerProv("c", 1, 1), routerProv("d", 1, 1)), nil)
	rt.defaultStrategy = "round_robin"
	var firsts []string
	for i := range 8 {
		now := routerNow.Add(time.Duration(i) * time.Second)
		if i == 4 {
			b := rt.byName["b"]
			openCircuitUntil(b, now.Add(time.Hour))
		}
		r, aerr := rt.Route(&chatRequest{Model: "m", TextBytes: 40}, "", now, 0)
		if aerr != nil {
			t.Fatalf("Route #%d = %s", i, routeString(r, aerr))
		}
		firsts = append(firsts, r.ordered[0].p.Name)
	}
	// Calls 0-3 rotate over a b c d; from call 4 over a c d, starting at
	// index 4%3, 5%3, ...
	if want := []string{"a", "b", "c", "d", "c", "d", "a", "c"}; !slices.Equal(firsts, want) {
		t.Errorf("first providers of 8 round_robin routes = %v; want %v", firsts, want)
	}
}

// Route is called from every handler at once; round_robin must still give
// each provider its share, and -race must find nothing.
func TestRouteConcurrent(t *testing.T) {
	cfg := routerConfig(nil, routerProv("a", 1, 1), routerProv("b", 2, 2), routerProv("c", 3, 3))
	cfg.Policies.DefaultStrategy = "round_robin"
	rt := newRouter(cfg, nil)
	const workers, each = 8, 300
	var (
		mu     sync.Mutex
		counts = map[string]int{}
		wg     sync.WaitGroup
	)
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				r, aerr := rt.Route(&chatRequest{Model: "m", TextBytes: 40}, "", routerNow, 0)
				if aerr != nil {
					t.Errorf("Route = %s", routeString(r, aerr))
					return
				}
				first := r.ordered[0].p
				first.observe(time.Duration(w*i) * time.Microsecond)
				mu.Lock()
				counts[first.Name]++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	want := map[string]int{"a": workers * each / 3, "b": workers * each / 3, "c": workers * each / 3}
	if !reflect.DeepEqual(counts, want) {
		t.Errorf("first providers of %d concurrent round_robin routes = %v; want %v", workers*each, counts, want)
	}
}

func TestMicroRate(t *testing.T) {
	for _, tt := range []struct {
		sats float64 // per 1000 tokens
		want int64   // µsat per token
	}{
		{0, 0},
		{1, 1000},
		{30, 30000},
		{0.15, 150},
		{0.6, 600},
		{2.25, 2250},
		{0.1 + 0.2, 300}, // 0.30000000000000004 as a float64 sum
		{33.3333, 33333},
		{12.3456, 12346},
		{0.001, 1},
		{0.0004, 0}, // below the resolution of three decimals
		{1e6, 1e9},  // maxRate
	} {
		if got := microRate(tt.sats); got != tt.want {
			t.Errorf("microRate(%v) = %d; want %d", tt.sats, got, tt.want)
		}
	}
	// A float64 sum, not a constant expression folded exactly.
	a, b := 0.1, 0.2
	if got := microRate(a + b); got != 300 {
		t.Errorf("microRate(%v) = %d; want 300", a+b, got)
	}
}

func TestPriceCost(t *testing.T) {
	tests := []struct {
		in, out, fee  float64 // sats per 1000 tokens, sats
		inTok, outTok int64
		want          int64 // msat
	}{
		{10, 30, 1, 1000, 500, 26000},
		{10, 30, 0, 0, 0, 0},
		{0, 0, 0.5, 0, 0, 500},
		{0, 0, 1, 100, 100, 1000},
		{8, 35, 0, 1234, 567, 29717}, // 9872 + 19845
		// Fractional rates, rounded once, to the nearest millisat.
		{0.15, 0.6, 0, 1, 1, 1},    // 0.75 msat
		{0.15, 0, 0, 3, 0, 0},      // 0.45
		{0.15, 0, 0, 10, 0, 2},     // 1.5, half up
		{0.15, 0, 0, 1000, 0, 150}, // 150
		{2.25, 0, 0, 1, 0, 2},      // 2.25
		{2.25, 0, 0, 2, 0, 5},      // 4.5, half up
		{0, 2.25, 0, 0, 3, 7},      // 6.75
		{2.25, 2.25, 0, 1000, 1000, 4500},
		{0.4, 0.4, 0, 1, 1, 1}, // 0.8: the sum is rounded, not each term
		{0.001, 0, 0, 499, 0, 0},
		{0.001, 0, 0, 500, 0, 1},
		{0.15, 0.6, 0.25, 1234, 567, 775}, // 185.1 + 340.2 = 525.3, + 250
		// The largest rates and a request of max_body_bytes still fit.
		{1e6, 1e6, 1e6, 4 << 20, 4 << 20, 8388608000000 + 1e9},
		// And so do the most tokens an estimate or a usage may hold
		// (maxEstTokens).
		{1e6, 1e6, 1e6, 1 << 31, 1 << 31, 4294967296000000 + 1e9},
	}
	for _, tt := range tests {
		p := newProvider(ProviderConfig{Name: "p", URL: "https://p.example", InputRate: tt.in, OutputRate: tt.out, BaseFee: tt.fee})
		if got := p.price.cost(tt.inTok, tt.outTok); got != tt.want {
			t.Errorf("price{%v, %v, %v}.cost(%d, %d) = %d; want %d", tt.in, tt.out, tt.fee, tt.inTok, tt.outTok, got, tt.want)
		}
	}
	for _, tt := range []struct {
		msat int64
		want float64
	}{{0, 0}, {1, 0.001}, {26000, 26}, {775, 0.775}} {
		if got := msatToSats(tt.msat); got != tt.want {
			t.Errorf("msatToSats(%d) = %v; want %v", tt.msat, got, tt.want)
		}
	}
}

func TestPriceForModelRates(t *testing.T) {
	p := newProvider(ProviderConfig{Name: "p", URL: "https://p.example", InputRate: 10, OutputRate: 30, BaseFee: 2,
		ModelRates: map[string]Rates{"big": {InputRate: 60, OutputRate: 120}, "frac": {InputRate: 0.15, OutputRate: 0.6}}})
	for _, tt := range []struct {
		model string
		want  price
	}{
		{"big", price{60000, 120000, 2000}},
		{"frac", price{150, 600, 2000}}, // model_rates keep the provider's base_fee
		{"other", price{10000, 30000, 2000}},
		{"Big", price{10000, 30000, 2000}},
	} {
		if got := p.priceFor(tt.model); got != tt.want {
			t.Errorf("priceFor(%q) = %+v; want %+v", tt.model, got, tt.want)
		}
	}

	// Route prices each candidate for the requested model.
	rt := newRouter(routerConfig(nil, p.ProviderConfig), nil)
	for _, tt := range []struct {
		model string
		want  int64
	}{
		{"big", 60000 + 60000 + 2000},
		{"frac", 150 + 300 + 2000},
		{"other", 10000 + 15000 + 2000},
	} {
		r, aerr := rt.Route(&chatRequest{Model: tt.model, TextBytes: 4000, MaxTokens: 500}, "", routerNow, 0)
		if aerr != nil || len(r.ordered) != 1 || r.ordered[0].estMsat != tt.want {
			t.Errorf("Route(%q) = %s, estimate %v; want %d msat", tt.model, routeString(r, aerr), r.ordered, tt.want)
		}
	}
}

func TestRouteBaseline(t *testing.T) {
	pc := routerProv("mr", 1, 1)
	pc.BaseFee = 1
	pc.ModelRates = map[string]Rates{"m": {InputRate: 40, OutputRate: 25}}
	cfg := routerConfig([]PolicyRule{{Name: "cap30", Strategy: "cheapest", MaxSatsPer1kOutput: new(30.0), Keywords: []string{"cap"}}},
		routerProv("cheap", 1, 1),
		routerProv("pricey", 10, 20),
		routerProv("over", 50, 100), // dearest of all, but over cap30
		pc,                          // 40/25 for m, plus 1 sat
	)
	rt := newRouter(cfg, nil)
	openCircuitUntil(rt.byName["pricey"], routerNow.Add(time.Minute))

	tests := []struct {
		lastUser, model string
		in, out         int64
		want            int64
	}{
		// Qualified is cheap, pricey (open, but qualified) and mr: mr costs
		// 40000 + 12500 + 1000.
		{"cap", "m", 1000, 500, 53500},
		{"cap", "m", 0, 0, 1000},
		// With another model mr is at its own 1/1 rates: pricey is dearest.
		{"cap", "n", 1000, 500, 20000},
		// No policy: over qualifies, 50000 + 50000.
		{"", "m", 1000, 500, 100000},
		{"", "m", 1, 1, 1065}, // mr: 40 + 25 µsat·1000, rounded, plus its base fee
	}
	for _, tt := range tests {
		r, aerr := rt.Route(&chatRequest{Model: tt.model, TextBytes: 4000, LastUser: tt.lastUser}, "", routerNow, 0)
		if aerr != nil {
			t.Errorf("Route(%q, last user %q) = %s", tt.model, tt.lastUser, routeString(r, aerr))
			continue
		}
		if got := r.baseline(tt.in, tt.out); got != tt.want {
			t.Errorf("Route(%q, last user %q).baseline(%d, %d) = %d; want %d (qualified %v)",
				tt.model, tt.lastUser, tt.in, tt.out, got, tt.want, qualifiedNames(r))
		}
	}
}

func TestRouteEstimate(t *testing.T) {
	type ratio struct {
		avg float64
		n   int64
	}
	cfg := routerConfig([]PolicyRule{{Name: "code", Strategy: "cheapest", Keywords: []string{"code"}}},
		routerProv("cheapin", 1, 50), routerProv("cheapout", 20, 10))
	tests := []struct {
		name           string
		ratios         map[string]ratio // nil: no ratio func
		lastUser       string
		header         string
		textBytes      int64
		maxTokens      int64
		wantIn         int64
		wantOut        int64
		wantFirst      string
		wantAskedAbout string
	}{
		{"no ledger", nil, "", "", 4000, 0, 1000, 1000, "cheapout", ""},
		{"four samples are not enough", map[string]ratio{"": {3, 4}}, "", "", 4000, 0, 1000, 1000, "cheapout", ""},
		{"five samples are", map[string]ratio{"": {3, 5}}, "", "", 4000, 0, 1000, 3000, "cheapout", ""},
		{"a short-answer ratio", map[string]ratio{"": {0.1, 5}}, "", "", 4000, 0, 1000, 100, "cheapin", ""},
		{"a short-answer ratio not yet learned", map[string]ratio{"": {0.1, 4}}, "", "", 4000, 0, 1000, 1000, "cheapout", ""},
		{"max_tokens beats the ratio", map[string]ratio{"": {3, 100}}, "", "", 4000, 7, 1000, 7, "cheapin", ""},
		{"the policy's own ratio", map[string]ratio{"": {5, 10}, "code": {2, 10}}, "code this", "", 4000, 0, 1000, 2000, "cheapout", "code"},
		{"the policy's ratio by header", map[string]ratio{"": {5, 10}, "code": {0.1, 10}}, "", "code", 4000, 0, 1000, 100, "cheapin", "code"},
		{"a policy without samples", map[string]ratio{"": {0.1, 10}}, "code this", "", 4000, 0, 1000, 1000, "cheapout", "code"},
		// Input tokens are the text bytes over 4, rounded up.
		{"no text", nil, "", "", 0, 0, 0, 0, "cheapin", ""},
		{"one byte", nil, "", "", 1, 0, 1, 1, "cheapout", ""},
		{"four bytes", nil, "", "", 4, 0, 1, 1, "cheapout", ""},
		{"five bytes", nil, "", "", 5, 0, 2, 2, "cheapout", ""},
		{"4001 bytes", nil, "", "", 4001, 0, 1001, 1001, "cheapout", ""},
		// Output tokens from a ratio are rounded up.
		{"a fractional estimate", map[string]ratio{"": {0.5, 5}}, "", "", 12, 0, 3, 2, "cheapout", ""},
	}
	for _, tt := range tests {
		var asked []string
		var ratioFunc func(string) (float64, int64)
		if tt.ratios != nil {
			ratioFunc = func(policy string) (float64, int64) {
				asked = append(asked, policy)
				r := tt.ratios[policy]
				return r.avg, r.n
			}
		}
		rt := newRouter(cfg, ratioFunc)
		r, aerr := rt.Route(&chatRequest{Model: "m", TextBytes: tt.textBytes, MaxTokens: tt.maxTokens, LastUser: tt.lastUser}, tt.header, routerNow, 0)
		if aerr != nil {
			t.Errorf("%s: Route = %s", tt.name, routeString(r, aerr))
			continue
		}
		if r.estIn != tt.wantIn || r.estOut != tt.wantOut || r.ordered[0].p.Name != tt.wantFirst {
			t.Errorf("%s: Route(%d bytes, max_tokens %d) = estimate %d in, %d out, %s; want %d, %d, %s first",
				tt.name, tt.textBytes, tt.maxTokens, r.estIn, r.estOut, routeString(r, aerr), tt.wantIn, tt.wantOut, tt.wantFirst)
		}
		for _, c := range r.ordered {
			if want := c.price.cost(tt.wantIn, tt.wantOut); c.estMsat != want {
				t.Errorf("%s: Route estimate at %s = %d msat; want %d", tt.name, c.p.Name, c.estMsat, want)
			}
		}
		var wantAsked []string
		if tt.ratios != nil && tt.maxTokens == 0 {
			wantAsked = []string{tt.wantAskedAbout}
		}
		if !slices.Equal(asked, wantAsked) {
			t.Errorf("%s: Route asked the ratio of %q; want %q", tt.name, asked, wantAsked)
		}
	}
}

// Word boundaries and case in scripts other than Latin. Keywords match
// case-insensitively on word boundaries; a router that only lower-cased
// with strings.ToLower and took any letter, digit or _ of any script as part
// of a word would get these wrong.
func TestMatchKeywordsUnicodeBoundaries(t *testing.T) {
	rt := newRouter(routerConfig([]PolicyRule{
		{Name: "debug", Keywords: []string{"debug"}},
		{Name: "cafe", Keywords: []string{"cafe"}},
		{Name: "logos", Keywords: []string{"λόγος"}},
	}), nil)
	tests := []struct {
		text string
		want string
	}{
		// Chinese and Japanese put no spaces between words: a Latin word
		// inside them is still a word (Unicode UAX #29 breaks between Han
		// or kana and Latin letters).
		{"请帮我debug这个函数", "debug"},
		{"このコードをdebugしてください", "debug"},
		// A combining accent belongs to the letter before it: "cafe" +
		// U+0301 is "café", another word than "cafe".
		{"un café noir", ""},
		// Upper-case Σ lower-cases to σ, never to the final ς; the two fold
		// to the same letter (strings.EqualFold("ΛΌΓΟΣ", "λόγος") is true).
		{"ΛΌΓΟΣ", "logos"},
		{"ο λόγος", "logos"},
		{"un cafe noir", "cafe"},
		{"decafe", ""},
	}
	for _, tt := range tests {
		var got string
		if pol := rt.matchKeywords(tt.text, nil); pol != nil {
			got = pol.Name
		}
		if got != tt.want {
			t.Errorf("matchKeywords(%q) = %q; want %q", tt.text, got, tt.want)
		}
	}
}

// A client chooses max_tokens, so the estimate must hold up with absurd
// values: the order of the candidates may not flip nor the estimate turn
// negative because a product overflowed int64.
func TestRouteEstimateHugeMaxTokens(t *testing.T) {
	rt := newRouter(routerConfig(nil, routerProv("a", 1, 30), routerProv("b", 1, 20), routerProv("c", 1, 40)), nil)
	for _, maxTokens := range []int64{1e12, 1e15, 1e18, math.MaxInt64} {
		r, aerr := rt.Route(&chatRequest{Model: "m", TextBytes: 4, MaxTokens: maxTokens}, "", routerNow, 0)
		if aerr != nil {
			t.Errorf("Route(max_tokens %d) = %s", maxTokens, routeString(r, aerr))
			continue
		}
		var ests []int64
		for _, c := range r.ordered {
			ests = append(ests, c.estMsat)
		}
		if want := []string{"b", "a", "c"}; !slices.Equal(candidateNames(r.ordered), want) || slices.ContainsFunc(ests, func(e int64) bool { return e < 0 }) {
			t.Errorf("Route(max_tokens %d) = order %v, estimates %v msat; want order %v, no negative estimate",
				maxTokens, candidateNames(r.ordered), ests, want)
		}
	}
}

// routerBenchText is the last user message of the routing benchmarks, about
// 800 bytes of an ordinary coding question. %s is where a keyword goes.
const routerBenchText = `I have a Go HTTP handler that reads a JSON body, validates the fields, ` +
	`looks the user up in a SQLite database and writes a response. It has grown to about two hundred ` +
	`lines and mixes parsing, validation, storage and error handling in one function. Could you help me ` +
	`%s it into smaller pieces? I would like the parsing to return a typed struct with clear error ` +
	`messages, the validation to be table-driven so that I can test each rule on its own, and the ` +
	`storage calls to go through a small interface so that the tests can use a fake. Please keep the ` +
	`public behaviour exactly the same, including the status codes and the shape of the error responses, ` +
	`because other services depend on them. Show the new code and explain the main decisions briefly, ` +
	`then list the tests you would add first and why. Thanks a lot!`

// routerBenchSystem is the system message; with the user message, the
// request holds about 1 KB of text.
const routerBenchSystem = `You are a careful senior engineer. Answer with working code and short explanations. ` +
	`Prefer the standard library, small functions and table-driven tests.`

// routerBenchConfig is a large config: 1,000 providers, three in four of
// which serve gpt-4o (half of those by listing it, half with empty models),
// at varied prices, some with model_rates; and 50 policies of 3 to 5
// keywords, of which only the 40th has a keyword in routerBenchText
// ("refactor").
func routerBenchConfig() *Config {
	cfg := defaultConfig()
	models := []string{"gpt-4o", "gpt-4o-mini", "claude-3.5-sonnet", "llama-3.1-70b", "mistral-large"}
	for i := range 1000 {
		pc := ProviderConfig{
			Name:       fmt.Sprintf("provider-%04d", i),
			URL:        fmt.Sprintf("https://p%d.example/v1", i),
			InputRate:  float64(1+i*37%100) / 10, // 0.1 to 10 sats per 1k
			OutputRate: float64(2+i*53%300) / 10, // 0.2 to 30.1
		}
		switch i % 4 {
		case 0: // empty models: every model
		case 1, 2:
			pc.Models = models[:2+i%4]
		case 3:
			pc.Models = models[2:]
		}
		if i%5 == 0 {
			pc.BaseFee = float64(i%3) / 2
		}
		if i%7 == 0 {
			pc.ModelRates = map[string]Rates{
				"gpt-4o":      {InputRate: pc.InputRate * 1.5, OutputRate: pc.OutputRate * 0.75},
				"gpt-4o-mini": {InputRate: 0.15, OutputRate: 0.6},
			}
		}
		cfg.Providers = append(cfg.Providers, pc)
	}
	// Made-up keywords that no English text holds, from syllables that
	// start with varied letters, some of them two words.
	syllables := []string{"ka", "lo", "mi", "zu", "te", "rav", "no", "vi", "sha", "qu", "bre", "dax", "fo", "gul", "hem", "jy"}
	word := func(n int) string {
		return syllables[n%16] + syllables[n/16%16] + syllables[n/256%16] + "x"
	}
	n := 0
	for j := range 50 {
		r := PolicyRule{Name: fmt.Sprintf("policy-%02d", j+1), Strategy: "cheapest"}
		for k := range 3 + j%3 {
			kw := word(n)
			if k == 2 && j%4 == 0 {
				kw += " " + word(n+1000)
			}
			r.Keywords = append(r.Keywords, kw)
			n++
		}
		switch j % 5 {
		case 1:
			r.Strategy = "lowest_latency"
		case 2:
			r.AllowedModels = []string{"gpt-4o", "gpt-4o-mini", "claude-3.5-sonnet"}
		}
		cfg.Policies.Rules = append(cfg.Policies.Rules, r)
	}
	// The 40th policy: code work, with an output cap that drops some
	// providers.
	forty := &cfg.Policies.Rules[39]
	forty.Name, forty.Strategy = "code", "cheapest"
	forty.Keywords = append(forty.Keywords[:2], "refactor", "unit test")
	forty.AllowedModels = []string{"gpt-4o", "claude-3.5-sonnet"}
	forty.MaxSatsPer1kOutput = new(25.0)
	return cfg
}

// benchmarkRoute routes one ~1 KB request whose last user message holds
// keyword, and checks the policy it gets.
func benchmarkRoute(b *testing.B, keyword, wantPolicy string, limit int) {
	rt := newRouter(routerBenchConfig(), func(string) (float64, int64) { return 1.4, 20 })
	for i, p := range rt.providers {
		if i%2 == 0 {
			p.observe(time.Duration(20+i%97) * time.Millisecond)
		}
	}
	last := fmt.Sprintf(routerBenchText, keyword)
	req := &chatRequest{Model: "gpt-4o", TextBytes: int64(len(routerBenchSystem) + len(last)), LastUser: last}
	r, aerr := rt.Route(req, "", routerNow, 0)
	if aerr != nil || r.policyName() != wantPolicy || len(r.ordered) == 0 {
		b.Fatalf("Route = %s; want policy %q", routeString(r, aerr), wantPolicy)
	}
	b.Logf("%d bytes of text, policy %q, %d candidates, %d excluded", req.TextBytes, wantPolicy, len(r.ordered), len(r.excluded))
	b.ReportAllocs()
	for b.Loop() {
		rt.Route(req, "", routerNow, limit)
	}
}

// BenchmarkRoute is the routing of one request with a large config; the
// target is under 50 µs per route.
// A chat request orders the first max_attempts (3) candidates.
func BenchmarkRoute(b *testing.B) { benchmarkRoute(b, "refactor", "code", 3) }

// BenchmarkRouteExplain is the same routing as /v1/cost does it: every
// candidate ordered, every exclusion explained.
func BenchmarkRouteExplain(b *testing.B) { benchmarkRoute(b, "refactor", "code", 0) }

// BenchmarkRouteNoPolicy is BenchmarkRoute with no keyword matching: every
// keyword of every policy is looked for in the whole text.
func BenchmarkRouteNoPolicy(b *testing.B) { benchmarkRoute(b, "restructure", "", 3) }

// BenchmarkMatchKeywords is the keyword step of BenchmarkRoute alone: the
// 50 policies of routerBenchConfig against the ~1 KB message, matching the
// 40th policy and none.
func BenchmarkMatchKeywords(b *testing.B) {
	rt := newRouter(routerBenchConfig(), nil)
	for _, tt := range []struct{ keyword, want string }{{"refactor", "code"}, {"restructure", ""}} {
		text := fmt.Sprintf(routerBenchText, tt.keyword)
		b.Run(tt.keyword, func(b *testing.B) {
			if pol := rt.matchKeywords(text, nil); (pol == nil && tt.want != "") || (pol != nil && pol.Name != tt.want) {
				b.Fatalf("matchKeywords = %v; want %q", pol, tt.want)
			}
			b.ReportAllocs()
			for b.Loop() {
				rt.matchKeywords(text, nil)
			}
		})
	}
}

// TestRouteLimitIsPrefix checks that the short route of a chat request
// (limit > 0) is exactly the head of the full order that /v1/cost shows.
func TestRouteLimitIsPrefix(t *testing.T) {
	cfg := routerBenchConfig()
	for i := range cfg.Policies.Rules {
		cfg.Policies.Rules[i].Strategy = []string{"cheapest", "lowest_latency"}[i%2]
	}
	rt := newRouter(cfg, nil)
	for i, p := range rt.providers {
		if i%3 == 0 {
			p.observe(time.Duration(5+i%13) * time.Millisecond)
		}
	}
	checked := 0
	for _, policy := range []string{"", "policy-01", "policy-02", "policy-40"} {
		for _, model := range []string{"gpt-4o", "gpt-4o-mini", "mistral-large", "unknown"} {
			req := &chatRequest{Model: model, TextBytes: 4000, MaxTokens: 300}
			full, aerr := rt.Route(req, policy, routerNow, 0)
			if aerr != nil {
				continue // a policy that does not allow the model
			}
			for _, limit := range []int{1, 2, 3, 7} {
				short, aerr := rt.Route(req, policy, routerNow, limit)
				want := candidateNames(full.ordered[:min(limit, len(full.ordered))])
				if aerr != nil || !slices.Equal(candidateNames(short.ordered), want) {
					t.Errorf("Route(%q, %q, limit %d) = %v; want %v", model, policy, limit, candidateNames(short.ordered), want)
				}
				checked++
			}
		}
	}
	if checked < 20 {
		t.Fatalf("only %d routes compared", checked)
	}
}

// qualifiedNames lists the providers that passed the model and the
// policy's constraints (the model and the output price cap), open circuits
// or not.
func qualifiedNames(r *route) []string {
	var names []string
	for _, mc := range r.cands {
		if r.allows(mc.price) {
			names = append(names, mc.p.Name)
		}
	}
	return names
}

// TestReadmeTOMLMatchesExample: the README shows config.example.json in
// TOML; both must decode to the same configuration.
func TestReadmeTOMLMatchesExample(t *testing.T) {
	t.Setenv("ROUTSTR_ALPHA_KEY", "alpha-key")
	t.Setenv("ROUTSTR_BETA_KEY", "beta-key")
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(readme), "```toml\n")
	block, _, ok2 := strings.Cut(rest, "```")
	if !ok || !ok2 {
		t.Fatal("README.md has no ```toml block")
	}
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(block), 0o600); err != nil {
		t.Fatal(err)
	}
	fromTOML, _, err := loadConfig(path)
	if err != nil {
		t.Fatalf("README's TOML: %v", err)
	}
	fromJSON, _, err := loadConfig("config.example.json")
	if err != nil {
		t.Fatalf("config.example.json: %v", err)
	}
	if !reflect.DeepEqual(fromTOML, fromJSON) {
		t.Errorf("README's TOML = %+v\nconfig.example.json = %+v", fromTOML, fromJSON)
	}
}

// ---- The live market and rate units ----

// A config in sats per 1M prices exactly as the same rates per 1k divided by
// 1000: 10000 and 30000 per 1M with a fee of 1 sat make 100 input and 200
// output tokens cost 8 sats.
func TestRateUnitCost(t *testing.T) {
	for _, tt := range []struct {
		unit    string
		in, out float64
	}{
		{rateUnitPer1m, 10000, 30000},
		{rateUnitPer1k, 10, 30},
		{"", 10, 30}, // the default unit
	} {
		pc := routerProv("a", tt.in, tt.out)
		pc.BaseFee = 1
		cfg := routerConfig(nil, pc)
		cfg.RateUnit = tt.unit
		r, aerr := newRouter(cfg, nil).Route(&chatRequest{Model: "m", TextBytes: 400, MaxTokens: 200}, "", routerNow, 1)
		if aerr != nil {
			t.Fatalf("%q: Route = %s", tt.unit, routeString(r, aerr))
		}
		if got := r.ordered[0].estMsat; got != 8000 {
			t.Errorf("%q: cost of 100 in, 200 out at %v/%v = %d msat; want 8000", tt.unit, tt.in, tt.out, got)
		}
	}
}

func TestRateInUnit(t *testing.T) {
	for _, tt := range []struct {
		micro int64
		unit  string
		want  float64
	}{
		{303, rateUnitPer1k, 0.303},
		{303, rateUnitPer1m, 303},
		{30000, rateUnitPer1k, 30},
		{30000, rateUnitPer1m, 30000},
		{0, rateUnitPer1m, 0},
	} {
		if got := rateInUnit(tt.micro, tt.unit); got != tt.want {
			t.Errorf("rateInUnit(%d, %q) = %v; want %v", tt.micro, tt.unit, got, tt.want)
		}
		if back := unitMicroRate(tt.want, tt.unit); back != tt.micro {
			t.Errorf("unitMicroRate(%v, %q) = %d; want %d", tt.want, tt.unit, back, tt.micro)
		}
	}
}

// Each output price cap means what its key says, whatever rate_unit is, and
// the exclusion names that unit.
func TestPolicyCapUnits(t *testing.T) {
	for _, tt := range []struct {
		unit       string
		rule       PolicyRule
		wantReason string
	}{
		{rateUnitPer1m, PolicyRule{Name: "p", MaxSatsPer1mOutput: new(25000.0)},
			"output rate 30000 sats/1M exceeds the policy's max_sats_per_1m_output 25000"},
		{rateUnitPer1m, PolicyRule{Name: "p", MaxSatsPer1kOutput: new(25.0)},
			"output rate 30 sats/1k exceeds the policy's max_sats_per_1k_output 25"},
		{rateUnitPer1k, PolicyRule{Name: "p", MaxSatsPer1mOutput: new(25000.0)},
			"output rate 30000 sats/1M exceeds the policy's max_sats_per_1m_output 25000"},
	} {
		cheap, dear := routerProv("cheap", 1, 20), routerProv("dear", 1, 30)
		if tt.unit == rateUnitPer1m {
			cheap.OutputRate, dear.OutputRate = 20000, 30000
		}
		cfg := routerConfig([]PolicyRule{tt.rule}, cheap, dear)
		cfg.RateUnit = tt.unit
		r, aerr := newRouter(cfg, nil).Route(&chatRequest{Model: "m", TextBytes: 40}, "p", routerNow, 0)
		if aerr != nil {
			t.Fatalf("%q: Route = %s", tt.unit, routeString(r, aerr))
		}
		want := []exclusion{{"dear", tt.wantReason}}
		if !reflect.DeepEqual(r.excluded, want) {
			t.Errorf("%q, %+v: excluded = %v; want %v", tt.unit, tt.rule, r.excluded, want)
		}
	}
}

// routstrListing is the listing of testdata/routstr-models.json, the shape
// a Routstr provider serves at GET /v1/models.
func routstrListing(t testing.TB) string {
	b, err := os.ReadFile("testdata/routstr-models.json")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestParseListing(t *testing.T) {
	l, bad, err := parseListing([]byte(routstrListing(t)), routerNow)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"google/gemini-2.5-flash", "openai/gpt-4o-mini"}; !slices.Equal(l.models, want) {
		t.Errorf("models = %v; want %v (retired/model is enabled:false)", l.models, want)
	}
	if len(bad) != 0 {
		t.Errorf("bad fields = %v; want none", bad)
	}
	// 0.000303 sats per token is 303 µsat per token; 0.001 sats is 1 msat;
	// max_cost 463.34 sats is 463340 msat.
	want := map[string]listedPrice{
		"google/gemini-2.5-flash": {303, 2525, 1, 463340},
		"openai/gpt-4o-mini":      {150, 600, 0, 29030},
	}
	if !maps.Equal(l.prices, want) {
		t.Errorf("prices = %v; want %v", l.prices, want)
	}
}

func TestParseListingFields(t *testing.T) {
	body := `{"data":[
		{"id":"no-pricing"},
		{"id":"bad","sats_pricing":{"prompt":"0.1","completion":-0.002,"request":null,"max_cost":1e300}},
		{"id":"half","sats_pricing":{"prompt":0.0004,"completion":0.0015}},
		{"id":42,"sats_pricing":{"prompt":0.1}},
		{"id":"","enabled":true},
		{"id":"off","enabled":false},
		{"id":"half","sats_pricing":{"prompt":9}},
		"not an object"]}`
	l, bad, err := parseListing([]byte(body), routerNow)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"no-pricing", "bad", "half"}; !slices.Equal(l.models, want) {
		t.Errorf("models = %v; want %v", l.models, want)
	}
	want := map[string]listedPrice{
		"no-pricing": {-1, -1, -1, -1},
		"bad":        {-1, -1, -1, -1},
		"half":       {400, 1500, -1, -1},
	}
	if !maps.Equal(l.prices, want) {
		t.Errorf("prices = %v; want %v", l.prices, want)
	}
	wantBad := []string{"bad: prompt", "bad: completion", "bad: request", "bad: max_cost", "half: request", "half: max_cost"}
	if !slices.Equal(bad, wantBad) {
		t.Errorf("bad fields = %v; want %v", bad, wantBad)
	}
	// A field the listing does not give keeps the configured price.
	p := newProvider(ProviderConfig{Name: "a", InputRate: 10, OutputRate: 30, BaseFee: 2})
	for _, tt := range []struct {
		model string
		want  price
		live  bool
	}{
		{"half", price{400, 1500, 2000}, true},
		{"bad", price{10000, 30000, 2000}, false},
		{"unlisted", price{10000, 30000, 2000}, false},
	} {
		got, _, live := p.priceAt(tt.model, l)
		if got != tt.want {
			t.Errorf("priceAt(%q) = %v; want %v", tt.model, got, tt.want)
		}
		if live != tt.live {
			t.Errorf("priceAt(%q) live = %v; want %v", tt.model, live, tt.live)
		}
	}
}

func TestParseListingErrors(t *testing.T) {
	for _, body := range []string{``, `<html>`, `{"object":"list"}`, `{"data":{}}`, `[]`, `{"data":null}`} {
		if _, _, err := parseListing([]byte(body), routerNow); err == nil {
			t.Errorf("parseListing(%q) = nil error; want one", body)
		}
	}
}

// fakeRoutstr is a provider that serves a listing and a balance the way
// routstr-core does, under /v1.
type fakeRoutstr struct {
	mu         sync.Mutex
	listing    string // body of GET /v1/models
	listStatus int    // 0: 200
	balance    string // body of GET /v1/balance/info
	balStatus  int    // 0: 200
	hang       bool   // GET /v1/models waits for the client to give up
	auth       []string
	listReads  int
	balReads   int
}

func (f *fakeRoutstr) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.auth = append(f.auth, r.Header.Get("Authorization"))
	var body string
	status := 0
	hang := false
	switch r.URL.Path {
	case "/v1/models":
		f.listReads++
		body, status, hang = f.listing, f.listStatus, f.hang
	case "/v1/balance/info":
		f.balReads++
		body, status = f.balance, f.balStatus
	default:
		status = http.StatusNotFound
	}
	f.mu.Unlock()
	if hang {
		<-r.Context().Done()
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(cmp.Or(status, http.StatusOK))
	io.WriteString(w, body)
}

func (f *fakeRoutstr) set(fn func(f *fakeRoutstr)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

// marketLog is a logger whose text the test reads back.
type marketLog struct{ syncBuffer }

func (m *marketLog) count(msg string) int {
	return strings.Count(m.String(), fmt.Sprintf("msg=%q", msg))
}

func (m *marketLog) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(m, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// discoveringProv is a discovering provider config for a fake provider.
func discoveringProv(name, url, key string, models ...string) ProviderConfig {
	return ProviderConfig{Name: name, URL: url, APIKey: key, Discover: true, Models: models, InputRate: 10, OutputRate: 30}
}

// routeFor routes a request of 400 bytes of text and 100 output tokens.
func routeFor(t *testing.T, rt *Router, model string) (*route, *apiError) {
	t.Helper()
	return rt.Route(&chatRequest{Model: model, TextBytes: 400, MaxTokens: 100}, "", routerNow, 0)
}

// A discovering provider serves its listing's models at its listing's
// prices, and a second refresh that changes them is what the next route
// sees.
func TestMarketRefreshPrices(t *testing.T) {
	fake := &fakeRoutstr{listing: routstrListing(t), balance: `{"api_key":"sk-x","balance":900000,"reserved":0}`}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	cfg := routerConfig(nil, discoveringProv("live", srv.URL, "sk-live", "configured-only"), routerProv("typed", 0.5, 3, "google/gemini-2.5-flash"))
	rt := newRouter(cfg, nil)
	log := &marketLog{}

	// Before the first listing, the configured models are served.
	if r, aerr := routeFor(t, rt, "configured-only"); aerr != nil {
		t.Errorf("before the first listing: Route(configured-only) = %s; want served", routeString(r, aerr))
	}
	rt.RefreshMarket(t.Context(), srv.Client(), log.logger())
	if r, aerr := routeFor(t, rt, "configured-only"); aerr == nil {
		t.Errorf("after the listing: Route(configured-only) = %s; want refused", routeString(r, aerr))
	}
	r, aerr := routeFor(t, rt, "google/gemini-2.5-flash")
	if aerr != nil {
		t.Fatalf("Route = %s", routeString(r, aerr))
	}
	if got := candidateNames(r.ordered); !slices.Equal(got, []string{"live", "typed"}) {
		t.Errorf("order = %v; want [live typed]", got)
	}
	if got, want := r.ordered[0].price, (price{303, 2525, 1}); got != want {
		t.Errorf("live price = %v; want %v", got, want)
	}
	if got := r.ordered[0].maxMsat; got != 463340 {
		t.Errorf("live max cost = %d msat; want 463340", got)
	}
	for _, a := range fake.auth {
		if a != "Bearer sk-live" {
			t.Errorf("Authorization = %q; want the provider's key", a)
		}
	}

	// The market moves: the provider now asks ten times as much.
	fake.set(func(f *fakeRoutstr) {
		f.listing = strings.NewReplacer(`"prompt":0.000303`, `"prompt":0.00303`, `"completion":0.002525`, `"completion":0.02525`).Replace(f.listing)
	})
	rt.RefreshMarket(t.Context(), srv.Client(), log.logger())
	r, aerr = routeFor(t, rt, "google/gemini-2.5-flash")
	if aerr != nil {
		t.Fatalf("Route = %s", routeString(r, aerr))
	}
	if got := candidateNames(r.ordered); !slices.Equal(got, []string{"typed", "live"}) {
		t.Errorf("after the price change: order = %v; want [typed live]", got)
	}
	if got, want := r.ordered[1].price, (price{3030, 25250, 1}); got != want {
		t.Errorf("after the price change: live price = %v; want %v", got, want)
	}
	if r, aerr := routeFor(t, rt, "retired/model"); aerr == nil {
		t.Errorf("Route(retired/model), enabled:false = %s; want refused", routeString(r, aerr))
	}
}

// A listing that fails keeps the last good one; the log says so once when
// it starts failing and once when it recovers.
func TestMarketListingFailure(t *testing.T) {
	fake := &fakeRoutstr{listing: routstrListing(t), balStatus: http.StatusNotFound}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	rt := newRouter(routerConfig(nil, discoveringProv("live", srv.URL, "")), nil)
	log := &marketLog{}
	refresh := func() { rt.RefreshMarket(t.Context(), srv.Client(), log.logger()) }
	refresh()
	for _, fail := range []func(f *fakeRoutstr){
		func(f *fakeRoutstr) { f.listStatus = http.StatusBadGateway },
		func(f *fakeRoutstr) { f.listStatus, f.listing = 0, `<html>maintenance</html>` },
		func(f *fakeRoutstr) { f.listing = `{"error":"rate limited"}` },
	} {
		fake.set(fail)
		refresh()
		r, aerr := routeFor(t, rt, "openai/gpt-4o-mini")
		if aerr != nil {
			t.Fatalf("with a failing listing: Route = %s; want the last good listing", routeString(r, aerr))
		}
		if got, want := r.ordered[0].price, (price{150, 600, 0}); got != want {
			t.Errorf("with a failing listing: price = %v; want the last good listing's %v", got, want)
		}
	}
	info := rt.ProviderMarket(routerNow)[0]
	if want := "listing has no data array"; info.ListingError != want {
		t.Errorf("listing_error = %q; want %q", info.ListingError, want)
	}
	if info.ListingErrAt == nil {
		t.Errorf("listing_error_at missing")
	}
	if info.PriceSource != "live" {
		t.Errorf("price_source = %q; want live", info.PriceSource)
	}
	if info.ListingAge == nil {
		t.Errorf("listing_age_secs missing")
	}
	fake.set(func(f *fakeRoutstr) { f.listing = routstrListing(t) })
	refresh()
	refresh()
	if n := log.count("provider listing failing"); n != 1 {
		t.Errorf("logged %d listing failures over three failing polls; want 1", n)
	}
	if n := log.count("provider listing recovered"); n != 1 {
		t.Errorf("logged %d recoveries over two good polls; want 1", n)
	}
	if info := rt.ProviderMarket(routerNow)[0]; info.ListingError != "" {
		t.Errorf("after recovery: listing error = %q; want none", info.ListingError)
	}
}

// A discovering provider with no configured models serves nothing, not any
// model, until its listing has been read; /providers says why.
func TestMarketDiscoverWithoutModels(t *testing.T) {
	fake := &fakeRoutstr{listStatus: http.StatusInternalServerError}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	rt := newRouter(routerConfig(nil, discoveringProv("live", srv.URL, "")), nil)
	rt.RefreshMarket(t.Context(), srv.Client(), (&marketLog{}).logger())
	if r, aerr := routeFor(t, rt, "anything"); !isAPIError(aerr, http.StatusBadRequest, "no_provider") {
		t.Errorf("Route = %s; want 400 no_provider", routeString(r, aerr))
	}
	info := rt.ProviderMarket(routerNow)[0]
	if info.ServesNothing == "" {
		t.Errorf("serves_nothing is empty; want why the provider serves no model")
	}
	if info.AnyModel {
		t.Errorf("any_model = true; want false")
	}
	if len(info.ModelsServed) != 0 {
		t.Errorf("models_served = %v; want none", info.ModelsServed)
	}
}

// A unusable price field is warned about once per listing, not at every
// poll, and again only when the listing changes.
func TestMarketBadFieldWarnsOnce(t *testing.T) {
	fake := &fakeRoutstr{listing: `{"data":[{"id":"m","sats_pricing":{"prompt":"cheap","completion":0.002,"request":0,"max_cost":5}}]}`}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	rt := newRouter(routerConfig(nil, discoveringProv("live", srv.URL, "")), nil)
	log := &marketLog{}
	for range 3 {
		rt.RefreshMarket(t.Context(), srv.Client(), log.logger())
	}
	if n := log.count("provider listing has unusable prices; configured prices kept for them"); n != 1 {
		t.Errorf("warned %d times over three polls of one bad listing; want 1", n)
	}
	r, aerr := routeFor(t, rt, "m")
	if aerr != nil {
		t.Fatalf("Route = %s", routeString(r, aerr))
	}
	if got, want := r.ordered[0].price, (price{10000, 2000, 0}); got != want {
		t.Errorf("price = %v; want the configured input rate beside the listed output rate, %v", got, want)
	}
}

// StartMarket waits for the first listings at most its bound, so a hanging
// provider does not hold the start; the others are in force when it returns.
func TestStartMarketHangingProvider(t *testing.T) {
	good := &fakeRoutstr{listing: routstrListing(t), balStatus: http.StatusNotFound}
	hung := &fakeRoutstr{hang: true}
	goodSrv, hungSrv := httptest.NewServer(good), httptest.NewServer(hung)
	defer goodSrv.Close()
	defer hungSrv.Close()
	cfg := routerConfig(nil, discoveringProv("good", goodSrv.URL, "k"), discoveringProv("hung", hungSrv.URL, "", "m"))
	cfg.Market.RefreshSecs = 3600
	rt := newRouter(cfg, nil)
	// Shorter than the 5 s of a real start, long enough for a local read.
	rt.startWait = 2 * time.Second
	ctx, cancel := context.WithCancel(t.Context())
	returned := make(chan struct{})
	go func() {
		rt.StartMarket(ctx, http.DefaultClient, (&marketLog{}).logger())
		close(returned)
	}()
	select {
	case <-returned:
	case <-time.After(10 * time.Second):
		t.Fatal("StartMarket still waiting on a hanging provider after 10 s")
	}
	if r, aerr := routeFor(t, rt, "openai/gpt-4o-mini"); aerr != nil {
		t.Errorf("after StartMarket: Route = %s; want the good provider's listing in force", routeString(r, aerr))
	}
	if r, aerr := routeFor(t, rt, "m"); aerr != nil {
		t.Errorf("Route(m) = %s; want the hanging provider's configured model served", routeString(r, aerr))
	}
	cancel()
	rt.WaitMarket()
}

// A known balance below a request's estimated cost sets the provider aside
// with the reason "balance too low"; a 402 empties it until the next read.
func TestMarketBalance(t *testing.T) {
	fake := &fakeRoutstr{listing: routstrListing(t), balance: `{"api_key":"sk-x","balance":5000,"reserved":1000}`}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	cfg := routerConfig(nil, discoveringProv("live", srv.URL, "sk-live"), routerProv("typed", 100, 300, "openai/gpt-4o-mini"))
	cfg.Market.LowBalanceSats = 10
	rt := newRouter(cfg, nil)
	log := &marketLog{}
	refresh := func() { rt.RefreshMarket(t.Context(), srv.Client(), log.logger()) }
	refresh()
	live := rt.byName["live"]
	info := rt.ProviderMarket(routerNow)[0]
	if want := 5.0; !reflect.DeepEqual(info.BalanceSats, &want) {
		t.Errorf("balance_sats = %v; want 5", info.BalanceSats)
	}
	if info.BalanceAge == nil {
		t.Errorf("balance_age_secs missing")
	}
	// 100 input and 100 output tokens at 150 and 600 µsat: 75 msat.
	small := &chatRequest{Model: "openai/gpt-4o-mini", TextBytes: 400, MaxTokens: 100}
	if r, aerr := rt.Route(small, "", routerNow, 0); !slices.Equal(candidateNames(r.ordered), []string{"live", "typed"}) {
		t.Errorf("Route(75 msat) with 5000 msat = %s; want [live typed]", routeString(r, aerr))
	}
	// 40000 input and 1000 output tokens: 6600 msat, more than the balance.
	big := &chatRequest{Model: "openai/gpt-4o-mini", TextBytes: 160000, MaxTokens: 1000}
	r, aerr := rt.Route(big, "", routerNow, 0)
	if aerr != nil {
		t.Fatalf("Route = %s", routeString(r, aerr))
	}
	if want := []exclusion{{"live", "balance too low"}}; !reflect.DeepEqual(r.excluded, want) {
		t.Errorf("Route(6600 msat) with 5000 msat: excluded = %v; want %v", r.excluded, want)
	}
	if n := log.count("provider balance low"); n != 1 {
		t.Errorf("logged %d low-balance warnings; want 1", n)
	}

	live.paymentRequired(routerNow)
	if r, aerr := rt.Route(small, "", routerNow, 0); !reflect.DeepEqual(r.excluded, []exclusion{{"live", "balance too low"}}) {
		t.Errorf("after a 402: Route = %s; want live set aside", routeString(r, aerr))
	}
	fake.set(func(f *fakeRoutstr) { f.balance = `{"balance":20000000,"reserved":0}` })
	refresh()
	if r, aerr := rt.Route(big, "", routerNow, 0); !slices.Equal(candidateNames(r.ordered), []string{"live", "typed"}) {
		t.Errorf("after a top-up: Route = %s; want [live typed]", routeString(r, aerr))
	}
	fake.set(func(f *fakeRoutstr) { f.balance = `{"balance":1000,"reserved":0}` })
	refresh()
	refresh()
	if n := log.count("provider balance low"); n != 2 {
		t.Errorf("logged %d low-balance warnings over low, high, low, low; want 2", n)
	}
}

// Every provider set aside for its balance or circuit: a 503 that says so.
func TestMarketBalanceNoneLeft(t *testing.T) {
	pc := routerProv("a", 1, 1, "m")
	pc.Discover, pc.APIKey = true, "sk-a" // a provider whose balance is read
	rt := newRouter(routerConfig(nil, pc), nil)
	rt.byName["a"].paymentRequired(routerNow)
	r, aerr := routeFor(t, rt, "m")
	if !isAPIError(aerr, http.StatusServiceUnavailable, "no_provider_available", "balance") {
		t.Errorf("Route = %s; want 503 naming the balance", routeString(r, aerr))
	}
}

// A provider without a balance API (404, as for an older routstr-core) is
// not asked again.
func TestMarketNoBalanceAPI(t *testing.T) {
	for _, status := range []int{http.StatusUnauthorized, http.StatusNotFound, http.StatusMethodNotAllowed} {
		fake := &fakeRoutstr{listing: routstrListing(t), balStatus: status}
		srv := httptest.NewServer(fake)
		rt := newRouter(routerConfig(nil, discoveringProv("live", srv.URL, "sk-live")), nil)
		for range 3 {
			rt.RefreshMarket(t.Context(), srv.Client(), (&marketLog{}).logger())
		}
		srv.Close()
		if fake.balReads != 1 {
			t.Errorf("balance answered %d: read %d times over three refreshes; want 1", status, fake.balReads)
		}
		if fake.listReads != 3 {
			t.Errorf("balance answered %d: listing read %d times over three refreshes; want 3", status, fake.listReads)
		}
		if info := rt.ProviderMarket(routerNow)[0]; info.BalanceSats != nil {
			t.Errorf("balance answered %d: balance_sats = %v; want none", status, *info.BalanceSats)
		}
	}
	// Without a key there is no balance to ask for.
	fake := &fakeRoutstr{listing: routstrListing(t), balance: `{"balance":1}`}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	newRouter(routerConfig(nil, discoveringProv("live", srv.URL, "")), nil).RefreshMarket(t.Context(), srv.Client(), (&marketLog{}).logger())
	if fake.balReads != 0 {
		t.Errorf("keyless provider: balance read %d times; want 0", fake.balReads)
	}
}

func TestRecordCharge(t *testing.T) {
	p := newProvider(routerProv("a", 1, 1))
	for i, want := range []float64{1, 1, 1, 1, 1.1} {
		p.recordCharge(1100, 1000)
		if got := p.chargeRatio(); math.Abs(got-want) > 1e-12 {
			t.Errorf("ratio after %d reports of 1.1 = %v; want %v", i+1, got, want)
		}
	}
	// The window holds the last 20 reports: 20 honest ones forget the rest.
	for range 20 {
		p.recordCharge(1000, 1000)
	}
	if got := p.chargeRatio(); got != 1 {
		t.Errorf("ratio after 20 honest reports = %v; want 1", got)
	}
	p.recordCharge(5000, 0) // a free quote teaches nothing
	if got := p.chargeRatio(); got != 1 {
		t.Errorf("ratio after a report on a free quote = %v; want 1", got)
	}
}

// A provider that advertises low and bills 15% more stops winning against
// one 10% pricier once it has enough reports; /v1/cost sees the ratio.
func TestRouteChargeRatio(t *testing.T) {
	rt := newRouter(routerConfig(nil, routerProv("lowball", 10, 10), routerProv("honest", 11, 11)), nil)
	lowball := rt.byName["lowball"]
	first := func() string {
		r, aerr := routeFor(t, rt, "m")
		if aerr != nil {
			t.Fatalf("Route = %s", routeString(r, aerr))
		}
		return r.ordered[0].p.Name
	}
	for i := range 4 {
		if got := first(); got != "lowball" {
			t.Errorf("after %d reports: first = %q; want lowball", i, got)
		}
		lowball.recordCharge(1150, 1000)
	}
	lowball.recordCharge(1150, 1000)
	if got := first(); got != "honest" {
		t.Errorf("after 5 reports of 1.15: first = %q; want honest", got)
	}
	r, _ := routeFor(t, rt, "m")
	got := r.ordered[1]
	if got.ratio != 1.15 {
		t.Errorf("lowball candidate: ratio = %v; want 1.15", got.ratio)
	}
	if want := int64(math.Round(float64(got.estMsat) * 1.15)); got.rankMsat != want {
		t.Errorf("lowball candidate: rank = %d msat; want estimate %d × 1.15 = %d", got.rankMsat, got.estMsat, want)
	}
}

func TestParseReportedCost(t *testing.T) {
	for _, tt := range []struct {
		name   string
		header string
		body   string
		want   int64
		ok     bool
	}{
		{"total_msats", "", `{"usage":{"cost":{"total_msats":1234}}}`, 1234, true},
		{"total_msats decimal", "", `{"usage":{"cost":{"total_msats":1234.5}}}`, 1235, true},
		{"total_msats first", "999", `{"usage":{"cost":{"total_msats":1234},"cost_sats":5}}`, 1234, true},
		{"header second", "999", `{"usage":{"cost_sats":5}}`, 999, true},
		{"header decimal", " 12.4 ", `not json`, 12, true},
		{"cost_sats", "", `{"usage":{"cost_sats":0.0015}}`, 2, true},
		{"cost_sats exponent", "", `{"usage":{"cost_sats":1.5e-3}}`, 2, true},
		{"cost_sats integer", "", `{"usage":{"cost_sats":3}}`, 3000, true},
		{"bad total_msats falls through", "", `{"usage":{"cost":{"total_msats":"12"},"cost_sats":1}}`, 1000, true},
		{"bad header falls through", "lots", `{"usage":{"cost_sats":1}}`, 1000, true},
		{"cost as a number (USD) is not msats", "", `{"usage":{"cost":0.002}}`, 0, false},
		{"negative", "-5", `{"usage":{"cost_sats":-1}}`, 0, false},
		{"NaN header", "NaN", ``, 0, false},
		{"Inf header", "Inf", ``, 0, false},
		{"hex header", "0x10", ``, 0, false},
		{"huge", "", `{"usage":{"cost_sats":1e300}}`, 0, false},
		{"null", "", `{"usage":{"cost_sats":null}}`, 0, false},
		{"none", "", `{"usage":{"prompt_tokens":3}}`, 0, false},
		{"empty", "", ``, 0, false},
	} {
		h := http.Header{}
		if tt.header != "" {
			h.Set("X-Routstr-Cost-Msats", tt.header)
		}
		got, ok := parseReportedCost(h, []byte(tt.body))
		if got != tt.want {
			t.Errorf("%s: parseReportedCost(%q, %q) = %d; want %d", tt.name, tt.header, tt.body, got, tt.want)
		}
		if ok != tt.ok {
			t.Errorf("%s: parseReportedCost(%q, %q) ok = %v; want %v", tt.name, tt.header, tt.body, ok, tt.ok)
		}
	}
}

func FuzzParseReportedCost(f *testing.F) {
	f.Add("12.5", []byte(`{"usage":{"cost":{"total_msats":1234}}}`))
	f.Add("", []byte(`{"usage":{"cost_sats":1e-3}}`))
	f.Add("1e400", []byte(`{"usage":{"cost_sats":-0}}`))
	f.Fuzz(func(t *testing.T, header string, body []byte) {
		h := http.Header{"X-Routstr-Cost-Msats": {header}}
		if msat, ok := parseReportedCost(h, body); msat < 0 || (!ok && msat != 0) {
			t.Errorf("parseReportedCost(%q, %q) = %d, %v", header, body, msat, ok)
		}
	})
}

func TestMarketView(t *testing.T) {
	fake := &fakeRoutstr{listing: routstrListing(t), balance: `{"balance":7000,"reserved":0}`}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	typed := routerProv("typed", 600, 5000, "google/gemini-2.5-flash") // sats per 1M
	typed.BaseFee = 0.5
	cfg := routerConfig(nil, typed, discoveringProv("live", srv.URL, "sk-live"))
	cfg.RateUnit = rateUnitPer1m
	cfg.Market.StaleAfterSecs = 900
	rt := newRouter(cfg, nil)
	rt.RefreshMarket(t.Context(), srv.Client(), (&marketLog{}).logger())
	now := time.Now().Add(1000 * time.Second) // past stale_after_secs
	v := rt.Market(now)
	if v.RateUnit != rateUnitPer1m {
		t.Errorf("rate_unit = %q; want %q", v.RateUnit, rateUnitPer1m)
	}
	var ids []string
	for _, m := range v.Models {
		ids = append(ids, m.ID)
	}
	if want := []string{"google/gemini-2.5-flash", "openai/gpt-4o-mini"}; !slices.Equal(ids, want) {
		t.Fatalf("models = %v; want %v", ids, want)
	}
	gem := v.Models[0]
	// live: 1000·303 + 1000·2525 µsat + 1 msat = 2829 msat;
	// typed: 1000·600 + 1000·5000 µsat + 500 msat = 6100 msat.
	if len(gem.Providers) != 2 {
		t.Fatalf("providers of %s = %+v; want 2", gem.ID, gem.Providers)
	}
	live := gem.Providers[0]
	if live.AgeSecs == nil {
		t.Errorf("live offer has no age_secs")
	}
	live.AgeSecs = nil // the age depends on the clock; the rest does not
	want := []marketOffer{
		{Provider: "live", InputRate: 303, OutputRate: 2525, RequestFeeSats: 0.001, ReferenceCostSats: 2.829,
			Source: "live", Stale: true, Circuit: stateClosed, ChargeRatio: 1, BalanceSats: new(7.0), refMsat: 2829},
		{Provider: "typed", InputRate: 600, OutputRate: 5000, RequestFeeSats: 0.5, ReferenceCostSats: 6.1,
			Source: "config", Circuit: stateClosed, ChargeRatio: 1, refMsat: 6100},
	}
	if got := []marketOffer{live, gem.Providers[1]}; !reflect.DeepEqual(got, want) {
		t.Errorf("offers for %s = %+v; want %+v", gem.ID, got, want)
	}
	// (6100 - 2829) / 2829 = 115.62%.
	if gem.SpreadPct != 115.62 {
		t.Errorf("spread_pct = %v; want 115.62", gem.SpreadPct)
	}
	if _, err := json.Marshal(v); err != nil {
		t.Errorf("json.Marshal(market) = %v", err)
	}
}

// Routing sees a refresh at once and whole: while a listing keeps changing
// a provider's prices (input and output always equal), no route sees half of
// one listing and half of another, and -race finds nothing.
func TestMarketSwapIsAtomic(t *testing.T) {
	pc := discoveringProv("live", "https://live.example", "", "m")
	pc.OutputRate = pc.InputRate // so that the configured price is whole too
	rt := newRouter(routerConfig(nil, pc, routerProv("typed", 1, 1)), nil)
	p := rt.byName["live"]
	log := slog.New(slog.DiscardHandler)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		defer close(done)
		for i := range 500 {
			rate := float64(i+1) / 1e6
			l, bad, err := parseListing(fmt.Appendf(nil, `{"data":[{"id":"m","sats_pricing":{"prompt":%g,"completion":%g,"request":0,"max_cost":1}}]}`, rate, rate), routerNow)
			if p.applyListing(l, bad, err, routerNow, log) {
				rt.rebuild()
			}
		}
	})
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-done:
					return
				default:
				}
				r, aerr := routeFor(t, rt, "m")
				if aerr != nil {
					t.Errorf("Route = %s", routeString(r, aerr))
					return
				}
				for _, c := range r.ordered {
					if c.price.InMicro != c.price.OutMicro {
						t.Errorf("%s: price %v mixes two listings", c.p.Name, c.price)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	if r, _ := routeFor(t, rt, "m"); r.cands[0].price != (price{500, 500, 0}) {
		t.Errorf("after the last refresh: price = %v; want {500 500 0}", r.cands[0].price)
	}
}

// BenchmarkRouteDiscovering is BenchmarkRoute with half of the providers
// discovering: their models and prices come from listings, swapped in as
// one table.
func BenchmarkRouteDiscovering(b *testing.B) {
	cfg := routerBenchConfig()
	for i := range cfg.Providers {
		cfg.Providers[i].Discover = i%2 == 1
	}
	rt := newRouter(cfg, func(string) (float64, int64) { return 1.4, 20 })
	log := slog.New(slog.DiscardHandler)
	models := []string{"gpt-4o", "gpt-4o-mini", "claude-3.5-sonnet", "llama-3.1-70b", "mistral-large"}
	for i, p := range rt.providers {
		if i%2 == 0 {
			p.observe(time.Duration(20+i%97) * time.Millisecond)
		}
		if !p.Discover {
			continue
		}
		var entries []string
		for j, m := range models[i%3:] {
			entries = append(entries, fmt.Sprintf(`{"id":%q,"sats_pricing":{"prompt":%g,"completion":%g,"request":0.001,"max_cost":50}}`,
				m, float64(1+(i+j)*37%100)/1e5, float64(2+(i+j)*53%300)/1e5))
		}
		l, bad, err := parseListing([]byte(`{"data":[`+strings.Join(entries, ",")+`]}`), routerNow)
		p.applyListing(l, bad, err, routerNow, log)
		p.market.balance.Store(int64(1e9))
		if i%5 == 0 {
			p.recordCharge(1, 1)
		}
	}
	rt.rebuild()
	last := fmt.Sprintf(routerBenchText, "refactor")
	req := &chatRequest{Model: "gpt-4o", TextBytes: int64(len(routerBenchSystem) + len(last)), LastUser: last}
	r, aerr := rt.Route(req, "", routerNow, 0)
	if aerr != nil || r.policyName() != "code" {
		b.Fatalf("Route = %s; want policy code", routeString(r, aerr))
	}
	b.Logf("%d candidates, %d excluded", len(r.ordered), len(r.excluded))
	b.ReportAllocs()
	for b.Loop() {
		rt.Route(req, "", routerNow, 3)
	}
}

// A listing that cannot be read says why in /providers without the URL's
// credentials or the key.
func TestMarketErrorHoldsNoSecret(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	addr := srv.Listener.Addr().String()
	srv.Close() // nothing listens there now
	rt := newRouter(routerConfig(nil, discoveringProv("live", "http://user:url-secret@"+addr, "key-secret")), nil)
	log := &marketLog{}
	rt.RefreshMarket(t.Context(), http.DefaultClient, log.logger())
	info := rt.ProviderMarket(routerNow)[0]
	if info.ListingError == "" {
		t.Fatal("listing_error is empty; want the failure")
	}
	for _, secret := range []string{"url-secret", "key-secret"} {
		if strings.Contains(info.ListingError, secret) {
			t.Errorf("listing_error = %q; holds %q", info.ListingError, secret)
		}
		if strings.Contains(log.String(), secret) {
			t.Errorf("log holds %q", secret)
		}
	}
}

// checkWarnings loads text as a TOML config file and compares its warnings
// with want, each given after the file's path ("path:line: ...").
func checkWarnings(t *testing.T, text string, want []string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	_, warnings, err := loadConfig(path)
	if err != nil {
		t.Errorf("loadConfig(%q): %v", text, err)
		return
	}
	var full []string
	for _, w := range want {
		full = append(full, path+w)
	}
	if !reflect.DeepEqual(warnings, full) {
		t.Errorf("loadConfig(%q) warnings = %q; want %q", text, warnings, full)
	}
}

// TestAdoptOnReload: a reload carries a provider's learned state only when
// its name, URL and key stay; a provider that stops discovering stops using
// its old listing's prices.
func TestAdoptOnReload(t *testing.T) {
	fake := &fakeRoutstr{listing: routstrListing(t), balance: `{"balance":900000,"reserved":0}`}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	const model = "google/gemini-2.5-flash"
	live := discoveringProv("live", srv.URL, "sk-live", model)
	old := newRouter(routerConfig(nil, live), nil)
	old.RefreshMarket(t.Context(), srv.Client(), (&marketLog{}).logger())
	old.byName["live"].observe(42 * time.Millisecond)

	tests := []struct {
		name        string
		change      func(pc *ProviderConfig)
		wantLatency bool
		wantPrice   price
	}{
		{"unchanged", func(pc *ProviderConfig) {}, true, price{303, 2525, 1}},
		{"discovery off", func(pc *ProviderConfig) { pc.Discover = false }, true, price{10000, 30000, 0}},
		{"another key", func(pc *ProviderConfig) { pc.APIKey = "sk-other" }, false, price{10000, 30000, 0}},
		{"another URL", func(pc *ProviderConfig) { pc.URL = "https://elsewhere.example/v1" }, false, price{10000, 30000, 0}},
	}
	for _, tc := range tests {
		pc := live
		tc.change(&pc)
		rt := newRouter(routerConfig(nil, pc), nil)
		rt.adopt(old)
		_, seen := rt.byName["live"].observedLatency()
		if seen != tc.wantLatency {
			t.Errorf("%s: latency carried over = %v; want %v", tc.name, seen, tc.wantLatency)
		}
		r, aerr := routeFor(t, rt, model)
		if aerr != nil {
			t.Errorf("%s: Route = %s", tc.name, routeString(r, aerr))
			continue
		}
		if got := r.ordered[0].price; got != tc.wantPrice {
			t.Errorf("%s: price = %v; want %v", tc.name, got, tc.wantPrice)
		}
	}
}

// TestWorstCaseAtChargeRatio: a provider known to bill above its list
// reserves its worst case times that ratio.
func TestWorstCaseAtChargeRatio(t *testing.T) {
	rt := newRouter(routerConfig(nil, routerProv("a", 1, 1, "m")), nil) // 1 sat per 1k tokens
	req := &chatRequest{Model: "m", TextBytes: 4000, MaxTokens: 1000}   // 1000 in, 1000 out
	r, aerr := rt.Route(req, "", routerNow, 3)
	if aerr != nil {
		t.Fatal(aerr)
	}
	if got := r.worstCase(req, 4096); got != 2000 {
		t.Errorf("worst case at ratio 1 = %d msat; want 2000", got)
	}
	for range chargeMinReports {
		rt.byName["a"].recordCharge(1500, 1000)
	}
	if got := r.worstCase(req, 4096); got != 3000 {
		t.Errorf("worst case at ratio 1.5 = %d msat; want 3000", got)
	}
}

// TestChargeRatioAfterPriceMove: charges reported between two listing
// reads, at a price that moved meanwhile, are quoted again at the new
// listing; an honest provider is not left ranked as an overcharger, while
// one that bills above both prices still is.
func TestChargeRatioAfterPriceMove(t *testing.T) {
	listingAt := func(at time.Time, in int64) *listing {
		return &listing{at: at, models: []string{"m"}, prices: map[string]listedPrice{"m": {in: in, out: in, fee: -1, max: -1}}}
	}
	log := (&marketLog{}).logger()
	t0 := routerNow
	for _, tc := range []struct {
		name   string
		factor float64 // what it bills, times the new price
		want   float64
	}{
		{"honest, price rose 10%", 1, 1},
		{"overcharger, price rose 10%", 1.15, 1.15},
	} {
		p := newProvider(discoveringProv("p", "https://p.example", "sk", "m"))
		p.applyListing(listingAt(t0, 1000), nil, nil, t0, log) // 1 msat a token
		// The price rose to 1.1 msat at t0+5s; arbstr still quotes 1.
		for i := range 5 {
			reported := int64(math.Round(2000 * 1.1 * tc.factor)) // 1000 in, 1000 out
			p.recordChargeOf(chargeSample{reported: reported, quoted: 2000, model: "m", in: 1000, out: 1000,
				at: t0.Add(time.Duration(6+i) * time.Second)})
		}
		p.applyListing(listingAt(t0.Add(10*time.Second), 1100), nil, nil, t0.Add(10*time.Second), log)
		if got := p.chargeRatio(); math.Abs(got-tc.want) > 0.001 {
			t.Errorf("%s: charge ratio = %.4f; want %.4f", tc.name, got, tc.want)
		}
	}
}

// ---- Helpers the tests share ----

// newProvider builds a provider whose rates are in sats per 1k tokens.
func newProvider(pc ProviderConfig) *provider { return newProviderIn(pc, rateUnitPer1k) }

// RefreshMarket reads every discovering provider's listing and balance
// once, concurrently, and returns when all are done.
func (rt *Router) RefreshMarket(ctx context.Context, client *http.Client, log *slog.Logger) {
	var wg sync.WaitGroup
	for _, p := range rt.discovering {
		wg.Go(func() { rt.refresh(ctx, client, p, log) })
	}
	wg.Wait()
}

// recordCharge learns from one reported charge, reportedMsat against
// quotedMsat.
func (p *provider) recordCharge(reportedMsat, quotedMsat int64) {
	p.recordChargeOf(chargeSample{reported: reportedMsat, quoted: quotedMsat})
}

// parseReportedCost reads what a provider says a response cost, in msat,
// from its headers and its body (a whole answer or a stream's usage
// chunk), as arbstr reads it: the usage through usageOf, then charge.
func parseReportedCost(header http.Header, body []byte) (msat int64, ok bool) {
	var u reportedUsage
	jsonMembers(body, func(key, value []byte) {
		if string(key) == "usage" {
			u = reportedUsage{}
			if got := usageOf(value); got != nil {
				u = got.reportedUsage
			}
		}
	})
	return u.charge(header)
}
