package main

import (
	"bytes"
	"cmp"
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

// This file loads the configuration of SPEC §3. A JSON file and a TOML file
// are each parsed into the same generic tree (map[string]any of strings,
// int64, float64, bool, []any and map[string]any) and one walker, the
// configDecoder, turns that tree into a Config. The two formats therefore
// cannot drift apart: types, defaults, ${VAR} expansion, validation and
// warnings are written once.

// Config is arbstr's configuration (SPEC §3). JSON and TOML files decode into
// the same structure; defaultConfig holds the defaults of the §3 table.
type Config struct {
	Server    ServerConfig     `json:"server"`
	Database  DatabaseConfig   `json:"database"`
	Providers []ProviderConfig `json:"providers"`
	Policies  PoliciesConfig   `json:"policies"`
	Logging   LoggingConfig    `json:"logging"`
}

type ServerConfig struct {
	Listen              string `json:"listen"`
	AuthToken           string `json:"auth_token"`
	MaxBodyBytes        int64  `json:"max_body_bytes"`
	UpstreamTimeoutSecs int    `json:"upstream_timeout_secs"`
	MaxAttempts         int    `json:"max_attempts"`
	ShutdownTimeoutSecs int    `json:"shutdown_timeout_secs"`
}

type DatabaseConfig struct {
	Path string `json:"path"`
}

type ProviderConfig struct {
	Name       string           `json:"name"`
	URL        string           `json:"url"`
	APIKey     string           `json:"-"` // never serialized anywhere (SPEC §9)
	Models     []string         `json:"models"`
	InputRate  float64          `json:"input_rate"`
	OutputRate float64          `json:"output_rate"`
	BaseFee    float64          `json:"base_fee"`
	ModelRates map[string]Rates `json:"model_rates,omitempty"`
	// KeySource says where APIKey came from, for `providers` and warnings:
	// "config", "env ARBSTR_X_API_KEY", or "" when there is no key.
	KeySource string `json:"-"`
}

type Rates struct {
	InputRate  float64 `json:"input_rate"`
	OutputRate float64 `json:"output_rate"`
}

type PoliciesConfig struct {
	DefaultStrategy string       `json:"default_strategy"`
	Rules           []PolicyRule `json:"rules"`
}

type PolicyRule struct {
	Name               string   `json:"name"`
	AllowedModels      []string `json:"allowed_models"`
	Strategy           string   `json:"strategy"`
	MaxSatsPer1kOutput *float64 `json:"max_sats_per_1k_output,omitempty"`
	Keywords           []string `json:"keywords"`
}

type LoggingConfig struct {
	Level       string `json:"level"`
	LogRequests bool   `json:"log_requests"`
}

func defaultConfig() *Config {
	return &Config{
		Server: ServerConfig{
			Listen:              "127.0.0.1:8080",
			MaxBodyBytes:        16 << 20,
			UpstreamTimeoutSecs: 300,
			MaxAttempts:         3,
			ShutdownTimeoutSecs: 30,
		},
		Database: DatabaseConfig{Path: "./arbstr.db"},
		Policies: PoliciesConfig{DefaultStrategy: "cheapest"},
		Logging:  LoggingConfig{Level: "info", LogRequests: true},
	}
}

// findConfig returns the config file to load, the first that exists of the
// -config flag, $ARBSTR_CONFIG, ./config.json and ./config.toml (SPEC §2). It
// returns "" and no error when there is none; the caller then serves in mock
// mode. A file named by the flag or the variable must exist: a typo there
// should stop arbstr, not quietly start it with mock providers.
func findConfig(flagPath string) (string, error) {
	if flagPath != "" {
		if err := configMustExist("-config", flagPath); err != nil {
			return "", err
		}
		return flagPath, nil
	}
	if p := os.Getenv("ARBSTR_CONFIG"); p != "" {
		if err := configMustExist("ARBSTR_CONFIG", p); err != nil {
			return "", err
		}
		return p, nil
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

// configMustExist checks a config file named by the user; from says where
// the name came from.
func configMustExist(from, path string) error {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%s %s: no such file", from, path)
	case err != nil:
		return fmt.Errorf("%s: %w", from, err)
	case fi.IsDir():
		return fmt.Errorf("%s %s: is a directory", from, path)
	}
	return nil
}

// loadConfig reads, decodes and validates the config file at path (SPEC §3).
// The format follows the extension. Errors name the file and, when the
// parser knows it, the line ("config.toml:12: providers[1].input_rate: want
// a number, got string"). Warnings are returned for the caller to show, each
// in the same "file:line: " form. With an error from the walker, the
// warnings found before it come too. No message ever holds an API key.
func loadConfig(path string) (cfg *Config, warnings []string, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read config: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, fmt.Errorf("read config: %w", err)
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, nil, fmt.Errorf("read config: %w", err)
	}
	// Editors on Windows may start a UTF-8 file with a byte order mark, which
	// neither parser expects.
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))

	var (
		tree  map[string]any
		lines map[string]int
	)
	switch ext := strings.ToLower(filepath.Ext(path)); ext {
	case ".json":
		tree, lines, err = parseJSON(data)
	case ".toml":
		tree, lines, err = parseTOML(data)
	default:
		return nil, nil, fmt.Errorf("%s: unknown config format %q: want .json or .toml", path, ext)
	}
	if err != nil {
		var se *configSyntaxError
		if errors.As(err, &se) {
			return nil, nil, fmt.Errorf("%s:%d: %s", path, se.line, se.msg)
		}
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}

	d := &configDecoder{file: path, lines: lines}
	// Mode bits mean little on Windows, where every file would look open to
	// everyone.
	if perm := fi.Mode().Perm(); perm&0o077 != 0 && runtime.GOOS != "windows" {
		d.warnf("", "file is readable by group or others (mode %04o); it may hold API keys: chmod 600 %s", perm, path)
	}
	cfg, err = d.decode(tree)
	return cfg, d.warnings, err
}

// isLoopbackListen reports whether addr, a host:port, serves only this
// machine: the host is "localhost" or a loopback IP (127.0.0.0/8, ::1). An
// empty host and 0.0.0.0 listen on every interface.
func isLoopbackListen(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// providerKeyEnv is the environment variable that holds the key of a provider
// without api_key (SPEC §3): ARBSTR_<NAME>_API_KEY, NAME upper-cased with every
// character outside A-Z and 0-9 made "_". Only ASCII letters are upper-cased,
// so that the name of the variable never depends on Unicode case tables.
func providerKeyEnv(name string) string {
	var b strings.Builder
	b.WriteString("ARBSTR_")
	for _, r := range name {
		switch {
		case 'a' <= r && r <= 'z':
			b.WriteRune(r - 'a' + 'A')
		case 'A' <= r && r <= 'Z', '0' <= r && r <= '9':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
	}
	b.WriteString("_API_KEY")
	return b.String()
}

// configSyntaxError is a parse error at a line of the file. loadConfig turns
// it into "config.toml:12: msg". Its message never quotes the text it failed
// on: that text may be an API key pasted in the wrong place (SPEC §9).
type configSyntaxError struct {
	line int
	msg  string
}

func (e *configSyntaxError) Error() string { return fmt.Sprintf("line %d: %s", e.line, e.msg) }

// configPath appends key to the path of its parent table, the way errors and
// the parsers' line tables spell keys: server.listen, providers[1].url,
// providers[0].model_rates."claude-3.5-sonnet". Keys that are not bare TOML
// keys are quoted, so that a dot inside a model name reads as one key.
func configPath(parent, key string) string {
	if !isBareKey(key) {
		key = strconv.Quote(key)
	}
	if parent == "" {
		return key
	}
	return parent + "." + key
}

// parentPath drops the last key or index of a configPath: providers[1].url
// gives providers[1], which gives providers.
func parentPath(p string) string {
	last, quoted := 0, false
	for i := 0; i < len(p); i++ {
		switch c := p[i]; {
		case quoted && c == '\\':
			i++
		case c == '"':
			quoted = !quoted
		case !quoted && (c == '.' || c == '['):
			last = i
		}
	}
	return p[:last]
}

func isBareKey(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isBareKeyByte(s[i]) {
			return false
		}
	}
	return true
}

func isBareKeyByte(c byte) bool {
	return 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '_' || c == '-'
}

// maxNesting bounds how deep arrays and tables may nest in either format. A
// config needs four levels; the bound keeps a hostile file from exhausting
// the stack.
const maxNesting = 64

// maxRate bounds every price (sats per 1000 tokens, or per request). The
// router computes costs in integer micro-sats (SPEC §4.1): at this bound, the
// largest request body of the default max_body_bytes still costs far less
// than int64 holds, and no real price comes near it (it is 1000 sats a
// token).
const maxRate = 1e6

// ---- JSON ----

// parseJSON reads a JSON config into the tree the walker expects. It goes
// token by token instead of through json.Unmarshal to keep what Unmarshal
// throws away: the line of each key, for error messages, and duplicate keys,
// which Unmarshal silently resolves to the last one where TOML rejects them.
// Keys starting with "//" are comments (config.example.json annotates
// itself with them) and are dropped here, at any depth and as often as
// wanted.
func parseJSON(data []byte) (tree map[string]any, lines map[string]int, err error) {
	p := &jsonParser{data: data, line: 1, lines: make(map[string]int)}
	p.dec = json.NewDecoder(bytes.NewReader(data))
	p.dec.UseNumber()
	tok, err := p.dec.Token()
	if err == io.EOF {
		return nil, nil, &configSyntaxError{1, "empty file: want a JSON object"}
	}
	if err != nil {
		return nil, nil, p.syntaxError(err)
	}
	if tok != json.Delim('{') {
		return nil, nil, p.errorf("the top level must be a JSON object")
	}
	tree, err = p.object("", 1)
	if err != nil {
		return nil, nil, err
	}
	if _, err := p.dec.Token(); err != io.EOF {
		return nil, nil, p.errorf("unexpected text after the top-level object")
	}
	return tree, p.lines, nil
}

type jsonParser struct {
	data  []byte
	dec   *json.Decoder
	lines map[string]int

	// lineAt counts newlines incrementally: offset, line is the last answer.
	offset int64
	line   int
}

// lineAt returns the line of the byte at off.
func (p *jsonParser) lineAt(off int64) int {
	off = min(max(off, 0), int64(len(p.data)))
	if off < p.offset {
		p.offset, p.line = 0, 1
	}
	p.line += bytes.Count(p.data[p.offset:off], []byte("\n"))
	p.offset = off
	return p.line
}

// nextLine returns the line where the next value starts: the decoder's
// offset is the end of the previous token, which may be lines above.
func (p *jsonParser) nextLine() int {
	off := p.dec.InputOffset()
	for off < int64(len(p.data)) && strings.IndexByte(" \t\r\n,:", p.data[off]) >= 0 {
		off++
	}
	return p.lineAt(off)
}

func (p *jsonParser) errorf(format string, args ...any) error {
	return &configSyntaxError{p.lineAt(p.dec.InputOffset()), fmt.Sprintf(format, args...)}
}

// jsonQuotedChar matches the character that encoding/json quotes in its
// syntax errors ("invalid character 's' looking for beginning of value").
var jsonQuotedChar = regexp.MustCompile(` '(?:[^'\\]|\\.)*'`)

// syntaxError places an error of the JSON decoder on its line. The decoder
// quotes the offending character; it is kept only when it is JSON
// punctuation, since a letter or digit may belong to a key pasted unquoted.
func (p *jsonParser) syntaxError(err error) error {
	var se *json.SyntaxError
	switch {
	case errors.As(err, &se):
		msg := jsonQuotedChar.ReplaceAllStringFunc(se.Error(), func(q string) string {
			if len(q) == 4 && strings.IndexByte("{}[]:,", q[2]) >= 0 {
				return q
			}
			return ""
		})
		return &configSyntaxError{p.lineAt(se.Offset), msg}
	case err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF):
		return &configSyntaxError{p.lineAt(int64(len(p.data))), "unexpected end of file"}
	}
	return p.errorf("%v", err)
}

func (p *jsonParser) object(path string, depth int) (map[string]any, error) {
	m := make(map[string]any)
	for p.dec.More() {
		tok, err := p.dec.Token()
		if err != nil {
			return nil, p.syntaxError(err)
		}
		key, ok := tok.(string)
		if !ok {
			return nil, p.errorf("want an object key")
		}
		kp := configPath(path, key)
		line := p.lineAt(p.dec.InputOffset())
		comment := strings.HasPrefix(key, "//")
		if _, dup := m[key]; dup && !comment {
			return nil, &configSyntaxError{line, fmt.Sprintf("key %q is defined twice", kp)}
		}
		if !comment {
			p.lines[kp] = line
		}
		v, err := p.value(kp, depth)
		if err != nil {
			return nil, err
		}
		if !comment {
			m[key] = v
		}
	}
	if _, err := p.dec.Token(); err != nil { // the closing '}'
		return nil, p.syntaxError(err)
	}
	return m, nil
}

func (p *jsonParser) array(path string, depth int) ([]any, error) {
	a := []any{}
	for p.dec.More() {
		ep := fmt.Sprintf("%s[%d]", path, len(a))
		p.lines[ep] = p.nextLine()
		v, err := p.value(ep, depth)
		if err != nil {
			return nil, err
		}
		a = append(a, v)
	}
	if _, err := p.dec.Token(); err != nil { // the closing ']'
		return nil, p.syntaxError(err)
	}
	return a, nil
}

// value reads the next value. Numbers become int64 when written without a
// fraction or exponent and float64 otherwise, as TOML has them, so that
// "3.0" is a float to the walker in both formats.
func (p *jsonParser) value(path string, depth int) (any, error) {
	if depth > maxNesting {
		return nil, p.errorf("nested too deeply")
	}
	tok, err := p.dec.Token()
	if err != nil {
		return nil, p.syntaxError(err)
	}
	switch t := tok.(type) {
	case json.Delim:
		switch t {
		case '{':
			return p.object(path, depth+1)
		case '[':
			return p.array(path, depth+1)
		}
	case json.Number:
		if !strings.ContainsAny(string(t), ".eE") {
			n, err := strconv.ParseInt(string(t), 10, 64)
			if err != nil {
				return nil, p.errorf("integer out of range")
			}
			return n, nil
		}
		f, err := strconv.ParseFloat(string(t), 64)
		if err != nil {
			return nil, p.errorf("number out of range")
		}
		return f, nil
	case string, bool, nil:
		return t, nil
	}
	return nil, p.errorf("want a value")
}

// ---- TOML ----

// parseTOML parses the TOML subset of SPEC §3: comments, bare, quoted and
// dotted keys, [tables], [[arrays of tables]], basic and literal strings,
// decimal integers and floats, booleans, arrays and inline tables, all as
// TOML 1.0 defines them. Everything else in TOML (multi-line strings, dates,
// hex, octal and binary integers, inf and nan) is an error, as are
// redefinitions, so that no file is ever misread. lines maps the
// configPath of every key, table header and array element to its line.
func parseTOML(data []byte) (tree map[string]any, lines map[string]int, err error) {
	p := &tomlParser{data: data, line: 1, lines: make(map[string]int)}
	if err := p.checkUTF8(); err != nil {
		return nil, nil, err
	}
	root := &tomlTable{values: make(map[string]any)}
	cur, curPath := root, ""
	for {
		p.skipSpace()
		if p.eof() {
			return root.tree(), p.lines, nil
		}
		switch p.peek() {
		case '#', '\n', '\r':
			err = p.endOfLine("")
		case '[':
			cur, curPath, err = p.header(root)
		default:
			err = p.keyValue(cur, curPath)
		}
		if err != nil {
			return nil, nil, err
		}
	}
}

// tomlTable is a table while the file is read; tree turns it into a map.
// The flags carry the TOML 1.0 rules on defining a table only once.
type tomlTable struct {
	values  map[string]any // leaves, []any, *tomlTable and *tomlArray
	defined bool           // by a [header]: another [header] is an error
	dotted  bool           // created by a dotted key: no [header] may define it
	inline  bool           // an inline table: nothing may be added to it
}

// tomlArray is an [[array of tables]]; a static array is an []any and cannot
// be appended to by a header.
type tomlArray struct {
	tables []*tomlTable
}

func (t *tomlTable) tree() map[string]any {
	m := make(map[string]any, len(t.values))
	for k, v := range t.values {
		m[k] = tomlTreeValue(v)
	}
	return m
}

func tomlTreeValue(v any) any {
	switch x := v.(type) {
	case *tomlTable:
		return x.tree()
	case *tomlArray:
		a := make([]any, len(x.tables))
		for i, t := range x.tables {
			a[i] = t.tree()
		}
		return a
	case []any:
		a := make([]any, len(x))
		for i, e := range x {
			a[i] = tomlTreeValue(e)
		}
		return a
	}
	return v
}

type tomlParser struct {
	data  []byte
	pos   int
	line  int
	lines map[string]int
}

func (p *tomlParser) errorf(line int, format string, args ...any) error {
	return &configSyntaxError{line, fmt.Sprintf(format, args...)}
}

func (p *tomlParser) eof() bool { return p.pos >= len(p.data) }

// peek returns the byte at the cursor, or 0 at the end of the file.
func (p *tomlParser) peek() byte {
	if p.eof() {
		return 0
	}
	return p.data[p.pos]
}

// checkUTF8 rejects a file that is not UTF-8, as TOML requires.
func (p *tomlParser) checkUTF8() error {
	line := 1
	for i := 0; i < len(p.data); {
		r, n := utf8.DecodeRune(p.data[i:])
		if r == utf8.RuneError && n == 1 {
			return p.errorf(line, "invalid UTF-8")
		}
		if r == '\n' {
			line++
		}
		i += n
	}
	return nil
}

// isControl reports the ASCII control characters that TOML allows neither
// in strings nor in comments: all but tab.
func isControl(c byte) bool { return c < 0x20 && c != '\t' || c == 0x7f }

func (p *tomlParser) skipSpace() {
	for !p.eof() && (p.data[p.pos] == ' ' || p.data[p.pos] == '\t') {
		p.pos++
	}
}

// newline consumes "\n" or "\r\n" and reports whether there was one.
func (p *tomlParser) newline() bool {
	switch {
	case p.peek() == '\n':
		p.pos++
	case p.peek() == '\r' && p.pos+1 < len(p.data) && p.data[p.pos+1] == '\n':
		p.pos += 2
	default:
		return false
	}
	p.line++
	return true
}

// comment consumes a comment up to, not including, its newline.
func (p *tomlParser) comment() error {
	for !p.eof() && p.data[p.pos] != '\n' && p.data[p.pos] != '\r' {
		if isControl(p.data[p.pos]) {
			return p.errorf(p.line, "control character in comment")
		}
		p.pos++
	}
	return nil
}

// endOfLine consumes what may follow a statement: spaces, a comment, and
// the newline or the end of the file. Anything else is an error, so that
// `a = 1 2` or `a = "x"y` is not read as something it is not.
func (p *tomlParser) endOfLine(after string) error {
	p.skipSpace()
	if p.peek() == '#' {
		if err := p.comment(); err != nil {
			return err
		}
	}
	if p.eof() || p.newline() {
		return nil
	}
	if p.peek() == '\r' {
		return p.errorf(p.line, "carriage return without a newline")
	}
	return p.errorf(p.line, "unexpected text after the %s", after)
}

// skipBlank skips spaces, newlines and comments, as allowed between the
// elements of an array.
func (p *tomlParser) skipBlank() error {
	for {
		p.skipSpace()
		switch {
		case p.peek() == '#':
			if err := p.comment(); err != nil {
				return err
			}
		case p.newline():
		case p.peek() == '\r':
			return p.errorf(p.line, "carriage return without a newline")
		default:
			return nil
		}
	}
}

// key reads a possibly dotted key: a.b, "a.b".c, 'x' . y.
func (p *tomlParser) key() ([]string, error) {
	var keys []string
	for {
		p.skipSpace()
		var k string
		var err error
		switch p.peek() {
		case '"':
			k, err = p.basicString()
		case '\'':
			k, err = p.literalString()
		default:
			start := p.pos
			for !p.eof() && isBareKeyByte(p.data[p.pos]) {
				p.pos++
			}
			if p.pos == start {
				return nil, p.errorf(p.line, "want a key")
			}
			k = string(p.data[start:p.pos])
		}
		if err != nil {
			return nil, err
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
// keys go into.
func (p *tomlParser) header(root *tomlTable) (*tomlTable, string, error) {
	line := p.line
	p.pos++ // [
	array := p.peek() == '['
	if array {
		p.pos++
	}
	keys, err := p.key()
	if err != nil {
		return nil, "", err
	}
	if p.peek() != ']' {
		return nil, "", p.errorf(line, "want ] at the end of the table header")
	}
	p.pos++
	if array {
		if p.peek() != ']' {
			return nil, "", p.errorf(line, "want ]] at the end of the array-of-tables header")
		}
		p.pos++
	}

	// Every key but the last names a table on the way, created if need be;
	// through an array of tables, the way goes on in its last table, as in
	// [[providers]] followed by [providers.model_rates].
	t, path := root, ""
	for _, k := range keys[:len(keys)-1] {
		path = configPath(path, k)
		switch x := t.values[k].(type) {
		case nil:
			next := &tomlTable{values: make(map[string]any)}
			t.values[k] = next
			p.lines[path] = line
			t = next
		case *tomlTable:
			if x.inline {
				return nil, "", p.errorf(line, "cannot add to inline table %s", path)
			}
			t = x
		case *tomlArray:
			path = fmt.Sprintf("%s[%d]", path, len(x.tables)-1)
			t = x.tables[len(x.tables)-1]
		default:
			return nil, "", p.errorf(line, "%s is not a table", path)
		}
	}

	k := keys[len(keys)-1]
	path = configPath(path, k)
	if array {
		arr, ok := t.values[k].(*tomlArray)
		if !ok && t.values[k] != nil {
			return nil, "", p.errorf(line, "cannot define [[%s]]: %s is already defined as something else", path, path)
		}
		if arr == nil {
			arr = &tomlArray{}
			t.values[k] = arr
			p.lines[path] = line
		}
		next := &tomlTable{values: make(map[string]any), defined: true}
		arr.tables = append(arr.tables, next)
		path = fmt.Sprintf("%s[%d]", path, len(arr.tables)-1)
		p.lines[path] = line
		return next, path, p.endOfLine("table header")
	}
	switch x := t.values[k].(type) {
	case nil:
		next := &tomlTable{values: make(map[string]any), defined: true}
		t.values[k] = next
		p.lines[path] = line
		return next, path, p.endOfLine("table header")
	case *tomlTable:
		switch {
		case x.defined:
			return nil, "", p.errorf(line, "table [%s] is defined twice", path)
		case x.dotted:
			return nil, "", p.errorf(line, "table [%s] is already defined by dotted keys", path)
		case x.inline:
			return nil, "", p.errorf(line, "table [%s] is already defined as an inline table", path)
		}
		// A table created on the way to [a.b] may be defined once by [a].
		x.defined = true
		p.lines[path] = line
		return x, path, p.endOfLine("table header")
	}
	return nil, "", p.errorf(line, "cannot define table [%s]: %s is already defined as something else", path, path)
}

// keyValue reads `key = value` into table t, whose path is path.
func (p *tomlParser) keyValue(t *tomlTable, path string) error {
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
	if err := p.assign(t, path, keys, line, 0); err != nil {
		return err
	}
	return p.endOfLine("value")
}

// assign reads the value at the cursor into the dotted key keys of table t.
// The keys before the last name tables, created as dotted tables; TOML 1.0
// lets dotted keys add only to tables that dotted keys created.
func (p *tomlParser) assign(t *tomlTable, path string, keys []string, line, depth int) error {
	for _, k := range keys[:len(keys)-1] {
		path = configPath(path, k)
		switch x := t.values[k].(type) {
		case nil:
			next := &tomlTable{values: make(map[string]any), dotted: true}
			t.values[k] = next
			p.lines[path] = line
			t = next
		case *tomlTable:
			if !x.dotted {
				return p.errorf(line, "cannot add to table %s with a dotted key: it is defined elsewhere", path)
			}
			t = x
		default:
			return p.errorf(line, "%s is not a table", path)
		}
	}
	k := keys[len(keys)-1]
	path = configPath(path, k)
	if _, dup := t.values[k]; dup {
		return p.errorf(line, "key %s is defined twice", path)
	}
	p.lines[path] = line
	v, err := p.value(path, depth)
	if err != nil {
		return err
	}
	t.values[k] = v
	return nil
}

func (p *tomlParser) value(path string, depth int) (any, error) {
	if depth > maxNesting {
		return nil, p.errorf(p.line, "nested too deeply")
	}
	switch p.peek() {
	case '"':
		return p.basicString()
	case '\'':
		return p.literalString()
	case '[':
		return p.array(path, depth)
	case '{':
		return p.inlineTable(path, depth)
	}
	return p.scalar()
}

func (p *tomlParser) basicString() (string, error) {
	if bytes.HasPrefix(p.data[p.pos:], []byte(`"""`)) {
		return "", p.errorf(p.line, `multi-line strings (""") are not supported`)
	}
	p.pos++
	var b strings.Builder
	for !p.eof() {
		c := p.data[p.pos]
		switch {
		case c == '"':
			p.pos++
			return b.String(), nil
		case c == '\\':
			r, err := p.escape()
			if err != nil {
				return "", err
			}
			b.WriteRune(r)
		case c == '\n' || c == '\r':
			return "", p.errorf(p.line, "unterminated string")
		case isControl(c):
			return "", p.errorf(p.line, "control character in string: write it as an escape")
		default:
			b.WriteByte(c)
			p.pos++
		}
	}
	return "", p.errorf(p.line, "unterminated string")
}

// escape reads one escape sequence of a basic string. The error messages
// do not quote the sequence: the string may be a key.
func (p *tomlParser) escape() (rune, error) {
	if p.pos+1 >= len(p.data) {
		return 0, p.errorf(p.line, "unterminated string")
	}
	c := p.data[p.pos+1]
	p.pos += 2
	switch c {
	case 'b':
		return '\b', nil
	case 't':
		return '\t', nil
	case 'n':
		return '\n', nil
	case 'f':
		return '\f', nil
	case 'r':
		return '\r', nil
	case '"':
		return '"', nil
	case '\\':
		return '\\', nil
	case 'u', 'U':
		n := 4
		if c == 'U' {
			n = 8
		}
		if p.pos+n > len(p.data) {
			return 0, p.errorf(p.line, "invalid unicode escape")
		}
		hex := string(p.data[p.pos : p.pos+n])
		v, err := strconv.ParseUint(hex, 16, 32)
		if err != nil || strings.ContainsAny(hex, "+-_") || !utf8.ValidRune(rune(v)) {
			return 0, p.errorf(p.line, "invalid unicode escape")
		}
		p.pos += n
		return rune(v), nil
	}
	return 0, p.errorf(p.line, `invalid escape sequence: TOML allows \b \t \n \f \r \" \\ \uXXXX \UXXXXXXXX`)
}

func (p *tomlParser) literalString() (string, error) {
	if bytes.HasPrefix(p.data[p.pos:], []byte(`'''`)) {
		return "", p.errorf(p.line, "multi-line strings (''') are not supported")
	}
	p.pos++
	start := p.pos
	for !p.eof() {
		c := p.data[p.pos]
		switch {
		case c == '\'':
			p.pos++
			return string(p.data[start : p.pos-1]), nil
		case c == '\n' || c == '\r':
			return "", p.errorf(p.line, "unterminated string")
		case isControl(c):
			return "", p.errorf(p.line, "control character in string")
		}
		p.pos++
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
		if p.eof() {
			return nil, p.errorf(start, "unterminated array")
		}
		if p.peek() == ']' {
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
		switch {
		case p.eof():
			return nil, p.errorf(start, "unterminated array")
		case p.peek() == ',':
			p.pos++
		case p.peek() == ']':
			p.pos++
			return a, nil
		default:
			return nil, p.errorf(p.line, "want , or ] after an array element")
		}
	}
}

// inlineTable reads { k = v, ... }. As in TOML 1.0 it must fit on one line
// and has no trailing comma.
func (p *tomlParser) inlineTable(path string, depth int) (*tomlTable, error) {
	line := p.line
	p.pos++ // {
	t := &tomlTable{values: make(map[string]any), inline: true}
	p.skipSpace()
	if p.peek() == '}' {
		p.pos++
		return t, nil
	}
	for {
		keys, err := p.key()
		if err != nil {
			return nil, err
		}
		if p.peek() != '=' {
			return nil, p.errorf(line, "want = after a key")
		}
		p.pos++
		p.skipSpace()
		if err := p.assign(t, path, keys, line, depth+1); err != nil {
			return nil, err
		}
		p.skipSpace()
		switch p.peek() {
		case ',':
			p.pos++
			p.skipSpace()
			switch p.peek() {
			case '}':
				return nil, p.errorf(line, "trailing comma in inline table")
			case '\n', '\r', 0:
				return nil, p.errorf(line, "unterminated inline table: it must close on the line it opens")
			}
		case '}':
			p.pos++
			return t, nil
		case '\n', '\r', 0:
			return nil, p.errorf(line, "unterminated inline table: it must close on the line it opens")
		default:
			return nil, p.errorf(line, "want , or } in inline table")
		}
	}
}

var (
	tomlInteger = regexp.MustCompile(`^[+-]?(?:0|[1-9](?:_?[0-9])*)$`)
	tomlFloat   = regexp.MustCompile(`^[+-]?(?:0|[1-9](?:_?[0-9])*)(?:\.[0-9](?:_?[0-9])*)?(?:[eE][+-]?[0-9](?:_?[0-9])*)?$`)
	tomlDate    = regexp.MustCompile(`^[0-9]{4}-[0-9]{2}-[0-9]{2}|^[0-9]{2}:[0-9]{2}`)
)

// scalar reads a bare value: a boolean, an integer or a float. The token
// runs over every character any TOML bare value may hold, so that a date or
// a hex number is recognised whole and refused, never read in part.
func (p *tomlParser) scalar() (any, error) {
	start := p.pos
	for !p.eof() && (isBareKeyByte(p.data[p.pos]) || strings.IndexByte("+.:", p.data[p.pos]) >= 0) {
		p.pos++
	}
	tok := string(p.data[start:p.pos])
	lower := strings.ToLower(strings.TrimLeft(tok, "+-"))
	switch {
	case tok == "":
		return nil, p.errorf(p.line, "want a value")
	case tok == "true":
		return true, nil
	case tok == "false":
		return false, nil
	case tomlInteger.MatchString(tok):
		n, err := strconv.ParseInt(strings.ReplaceAll(tok, "_", ""), 10, 64)
		if err != nil {
			return nil, p.errorf(p.line, "integer out of range")
		}
		return n, nil
	case tomlFloat.MatchString(tok):
		f, err := strconv.ParseFloat(strings.ReplaceAll(tok, "_", ""), 64)
		if err != nil {
			return nil, p.errorf(p.line, "float out of range")
		}
		return f, nil
	case tomlDate.MatchString(tok):
		return nil, p.errorf(p.line, "dates and times are not supported")
	case strings.HasPrefix(lower, "0x"), strings.HasPrefix(lower, "0o"), strings.HasPrefix(lower, "0b"):
		return nil, p.errorf(p.line, "hexadecimal, octal and binary integers are not supported")
	case lower == "inf" || lower == "nan":
		return nil, p.errorf(p.line, "inf and nan are not supported")
	}
	return nil, p.errorf(p.line, "invalid value (strings need quotes)")
}

// ---- The walker ----

// configDecoder walks the tree of either format into a Config (SPEC §3).
// Single values are checked where they are read, so their errors carry
// their own line; what involves several (required keys, unique names, keys
// from the environment) is checked once all is read.
type configDecoder struct {
	file     string
	lines    map[string]int // configPath → line, from the parser
	warnings []string
}

// configField decodes the value v of the key at path.
type configField func(path string, v any) error

// at returns the "file:line: " prefix for path: the line of the key or,
// for a key that is missing, of the nearest table around it.
func (d *configDecoder) at(path string) string {
	for p := path; p != ""; p = parentPath(p) {
		if line, ok := d.lines[p]; ok {
			return fmt.Sprintf("%s:%d: ", d.file, line)
		}
	}
	return d.file + ": "
}

func (d *configDecoder) errorf(path, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if path != "" {
		msg = path + ": " + msg
	}
	return errors.New(d.at(path) + msg)
}

func (d *configDecoder) warnf(path, format string, args ...any) {
	d.warnings = append(d.warnings, d.at(path)+fmt.Sprintf(format, args...))
}

func typeName(v any) string {
	switch v.(type) {
	case string:
		return "string"
	case int64:
		return "integer"
	case float64:
		return "float"
	case bool:
		return "boolean"
	case []any:
		return "array"
	case map[string]any:
		return "table"
	case nil:
		return "null"
	}
	return fmt.Sprintf("%T", v)
}

func (d *configDecoder) typeError(path, want string, v any) error {
	return d.errorf(path, "want %s, got %s", want, typeName(v))
}

// object decodes the table v with one field per known key. Keys are visited
// in the order of the file, so that the first error reported is the first
// in the file; unknown keys are warnings, so that configs written for other
// arbstr versions still load (SPEC §3).
func (d *configDecoder) object(path string, v any, fields map[string]configField) error {
	m, ok := v.(map[string]any)
	if !ok {
		return d.typeError(path, "a table", v)
	}
	keys := slices.Collect(maps.Keys(m))
	slices.SortFunc(keys, func(a, b string) int {
		return cmp.Or(cmp.Compare(d.lines[configPath(path, a)], d.lines[configPath(path, b)]), strings.Compare(a, b))
	})
	for _, k := range keys {
		kp := configPath(path, k)
		f, ok := fields[k]
		if !ok {
			d.warnf(kp, "unknown key %q", kp)
			continue
		}
		if err := f(kp, m[k]); err != nil {
			return err
		}
	}
	return nil
}

// array decodes the array v, one element at a time.
func (d *configDecoder) array(path string, v any, each configField) error {
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

// expand replaces each ${VAR} in s by the environment variable VAR (SPEC §3).
// $VAR without braces is left alone. An unset variable is an error naming it
// and the key; the message never holds the value, which may be a key.
func (d *configDecoder) expand(path, s string) (string, error) {
	var b strings.Builder
	for {
		i := strings.Index(s, "${")
		if i < 0 {
			b.WriteString(s)
			return b.String(), nil
		}
		b.WriteString(s[:i])
		end := strings.IndexByte(s[i:], '}')
		if end < 0 {
			return "", d.errorf(path, "${ without a closing }")
		}
		name := s[i+2 : i+end]
		if !isEnvName(name) {
			return "", d.errorf(path, "invalid ${...}: want ${NAME}, NAME of letters, digits and _")
		}
		v, ok := os.LookupEnv(name)
		if !ok {
			return "", d.errorf(path, "environment variable %s is not set", name)
		}
		b.WriteString(v)
		s = s[i+end+1:]
	}
}

func isEnvName(s string) bool {
	if s == "" || '0' <= s[0] && s[0] <= '9' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !isBareKeyByte(c) || c == '-' {
			return false
		}
	}
	return true
}

// str decodes a string, with ${VAR} expanded.
func (d *configDecoder) str(dst *string) configField {
	return func(path string, v any) error {
		s, ok := v.(string)
		if !ok {
			return d.typeError(path, "a string", v)
		}
		s, err := d.expand(path, s)
		if err != nil {
			return err
		}
		*dst = s
		return nil
	}
}

// nonEmpty decodes a string that may not be empty.
func (d *configDecoder) nonEmpty(dst *string) configField {
	return func(path string, v any) error {
		if err := d.str(dst)(path, v); err != nil {
			return err
		}
		if *dst == "" {
			return d.errorf(path, "must not be empty")
		}
		return nil
	}
}

// name decodes the name of a provider or a rule. Names travel in response
// headers (x-arbstr-provider, x-arbstr-policy, SPEC §5.2), where a control
// character would break the response.
func (d *configDecoder) name(dst *string) configField {
	return func(path string, v any) error {
		if err := d.nonEmpty(dst)(path, v); err != nil {
			return err
		}
		if strings.ContainsFunc(*dst, unicode.IsControl) {
			return d.errorf(path, "must not contain control characters")
		}
		return nil
	}
}

// strs decodes an array of strings, each with ${VAR} expanded.
func (d *configDecoder) strs(dst *[]string) configField {
	return func(path string, v any) error {
		out := []string{}
		err := d.array(path, v, func(p string, e any) error {
			var s string
			if err := d.str(&s)(p, e); err != nil {
				return err
			}
			out = append(out, s)
			return nil
		})
		if err != nil {
			return err
		}
		*dst = out
		return nil
	}
}

func (d *configDecoder) boolean(dst *bool) configField {
	return func(path string, v any) error {
		b, ok := v.(bool)
		if !ok {
			return d.typeError(path, "a boolean", v)
		}
		*dst = b
		return nil
	}
}

// positive decodes an integer of at least 1. int is 32 bits on linux/arm
// (SPEC §1), so the bound is the same on every platform: a config means the
// same on a Raspberry Pi as on a server, and a number of seconds times
// time.Second cannot overflow.
func (d *configDecoder) positive(dst *int) configField {
	return func(path string, v any) error {
		n, err := d.integer(path, v, math.MaxInt32)
		if err != nil {
			return err
		}
		*dst = int(n)
		return nil
	}
}

func (d *configDecoder) positive64(dst *int64) configField {
	return func(path string, v any) error {
		n, err := d.integer(path, v, math.MaxInt64)
		if err != nil {
			return err
		}
		*dst = n
		return nil
	}
}

func (d *configDecoder) integer(path string, v any, limit int64) (int64, error) {
	n, ok := v.(int64)
	switch {
	case !ok:
		return 0, d.typeError(path, "an integer", v)
	case n < 1:
		return 0, d.errorf(path, "must be at least 1, got %d", n)
	case n > limit:
		return 0, d.errorf(path, "must be at most %d, got %d", limit, n)
	}
	return n, nil
}

// rate decodes a price: a number, integer or float, from 0 to maxRate.
func (d *configDecoder) rate(dst *float64) configField {
	return func(path string, v any) error {
		var f float64
		switch n := v.(type) {
		case int64:
			f = float64(n)
		case float64:
			f = n
		default:
			return d.typeError(path, "a number", v)
		}
		switch {
		case f < 0:
			return d.errorf(path, "must not be negative, got %g", f)
		case f > maxRate:
			return d.errorf(path, "must be at most %g, got %g", maxRate, f)
		}
		*dst = f
		return nil
	}
}

// strategy decodes a routing strategy of SPEC §4, with the alias lowest_cost
// (the name early arbstr configs use) folded into cheapest.
func (d *configDecoder) strategy(dst *string) configField {
	return func(path string, v any) error {
		var s string
		if err := d.str(&s)(path, v); err != nil {
			return err
		}
		switch s {
		case "cheapest", "lowest_cost":
			*dst = "cheapest"
		case "lowest_latency", "round_robin":
			*dst = s
		default:
			return d.errorf(path, "unknown strategy %q: want cheapest, lowest_cost, lowest_latency or round_robin", s)
		}
		return nil
	}
}

// decode turns the tree into a Config, starting from the defaults of the
// SPEC §3 table.
func (d *configDecoder) decode(tree map[string]any) (*Config, error) {
	cfg := defaultConfig()
	// rawKeys holds each provider's api_key as written, before ${VAR}
	// expansion, to tell a literal key from a reference.
	var rawKeys []string
	s, l := &cfg.Server, &cfg.Logging
	err := d.object("", tree, map[string]configField{
		"server": func(path string, v any) error {
			return d.object(path, v, map[string]configField{
				"listen":                d.listen(&s.Listen),
				"auth_token":            d.str(&s.AuthToken),
				"max_body_bytes":        d.positive64(&s.MaxBodyBytes),
				"upstream_timeout_secs": d.positive(&s.UpstreamTimeoutSecs),
				"max_attempts":          d.positive(&s.MaxAttempts),
				"shutdown_timeout_secs": d.positive(&s.ShutdownTimeoutSecs),
			})
		},
		"database": func(path string, v any) error {
			return d.object(path, v, map[string]configField{
				"path": d.nonEmpty(&cfg.Database.Path),
			})
		},
		"providers": func(path string, v any) error {
			return d.array(path, v, func(path string, v any) error {
				pc, raw, err := d.provider(path, v)
				cfg.Providers = append(cfg.Providers, pc)
				rawKeys = append(rawKeys, raw)
				return err
			})
		},
		"policies": func(path string, v any) error {
			return d.object(path, v, map[string]configField{
				"default_strategy": d.strategy(&cfg.Policies.DefaultStrategy),
				"rules": func(path string, v any) error {
					return d.array(path, v, func(path string, v any) error {
						r, err := d.rule(path, v)
						cfg.Policies.Rules = append(cfg.Policies.Rules, r)
						return err
					})
				},
			})
		},
		"logging": func(path string, v any) error {
			return d.object(path, v, map[string]configField{
				"level":        d.level(&l.Level),
				"log_requests": d.boolean(&l.LogRequests),
			})
		},
	})
	if err != nil {
		return nil, err
	}
	if err := d.check(cfg); err != nil {
		return nil, err
	}
	d.resolveKeys(cfg, rawKeys)
	if len(cfg.Providers) == 0 {
		d.warnf("", "no providers configured: every chat request will fail")
	}
	if !isLoopbackListen(s.Listen) && s.AuthToken == "" {
		d.warnf("server.listen", "server.listen %q is not a loopback address and server.auth_token is not set: anyone who reaches it can spend your sats", s.Listen)
	}
	return cfg, nil
}

// listen decodes server.listen, which must be a host:port that net.Listen
// accepts; a mistake here is better told with its line than at start.
func (d *configDecoder) listen(dst *string) configField {
	return func(path string, v any) error {
		if err := d.str(dst)(path, v); err != nil {
			return err
		}
		if _, _, err := net.SplitHostPort(*dst); err != nil {
			return d.errorf(path, "want host:port, such as 127.0.0.1:8080, got %q", *dst)
		}
		return nil
	}
}

// level decodes logging.level: debug, info, warn or error, in any case,
// kept in lower case.
func (d *configDecoder) level(dst *string) configField {
	return func(path string, v any) error {
		var s string
		if err := d.str(&s)(path, v); err != nil {
			return err
		}
		switch lower := strings.ToLower(s); lower {
		case "debug", "info", "warn", "error":
			*dst = lower
			return nil
		}
		return d.errorf(path, "unknown level %q: want debug, info, warn or error", s)
	}
}

// provider decodes one providers[] entry. It also returns the api_key as
// written, for resolveKeys.
func (d *configDecoder) provider(path string, v any) (ProviderConfig, string, error) {
	var (
		pc         ProviderConfig
		rawKey     string
		rates      any
		ratesPath  string
		hasRates   bool
		apiKeyText = d.str(&pc.APIKey)
	)
	err := d.object(path, v, map[string]configField{
		"name": d.name(&pc.Name),
		"url":  d.url(&pc.URL),
		"api_key": func(path string, v any) error {
			rawKey, _ = v.(string)
			return apiKeyText(path, v)
		},
		"models":      d.strs(&pc.Models),
		"input_rate":  d.rate(&pc.InputRate),
		"output_rate": d.rate(&pc.OutputRate),
		"base_fee":    d.rate(&pc.BaseFee),
		// model_rates is read last, below, because a model's entry may
		// leave out a rate that the provider's own rate then fills.
		"model_rates": func(path string, v any) error {
			rates, ratesPath, hasRates = v, path, true
			return nil
		},
	})
	if err == nil && hasRates {
		pc.ModelRates, err = d.modelRates(ratesPath, rates, &pc)
	}
	return pc, rawKey, err
}

// url decodes a provider url: http or https, with a host (SPEC §3). The
// message does not repeat the URL, which may carry credentials.
func (d *configDecoder) url(dst *string) configField {
	return func(path string, v any) error {
		if err := d.nonEmpty(dst)(path, v); err != nil {
			return err
		}
		u, err := url.Parse(*dst)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return d.errorf(path, "want an http:// or https:// URL with a host")
		}
		return nil
	}
}

// modelRates decodes model_rates: model → {input_rate, output_rate}. A rate
// that an entry leaves out is the provider's, so that an entry overrides
// only what it names. Model names get ${VAR} expanded like any string.
func (d *configDecoder) modelRates(path string, v any, pc *ProviderConfig) (map[string]Rates, error) {
	m, ok := v.(map[string]any)
	if !ok {
		return nil, d.typeError(path, "a table", v)
	}
	keys := slices.Sorted(maps.Keys(m))
	rates := make(map[string]Rates, len(m))
	for _, k := range keys {
		kp := configPath(path, k)
		model, err := d.expand(kp, k)
		if err != nil {
			return nil, err
		}
		if _, dup := rates[model]; dup {
			return nil, d.errorf(kp, "model %q is listed twice", model)
		}
		r := Rates{InputRate: pc.InputRate, OutputRate: pc.OutputRate}
		err = d.object(kp, m[k], map[string]configField{
			"input_rate":  d.rate(&r.InputRate),
			"output_rate": d.rate(&r.OutputRate),
		})
		if err != nil {
			return nil, err
		}
		rates[model] = r
	}
	return rates, nil
}

// rule decodes one policies.rules[] entry.
func (d *configDecoder) rule(path string, v any) (PolicyRule, error) {
	r := PolicyRule{Strategy: "cheapest"}
	err := d.object(path, v, map[string]configField{
		"name":           d.name(&r.Name),
		"allowed_models": d.strs(&r.AllowedModels),
		"strategy":       d.strategy(&r.Strategy),
		"max_sats_per_1k_output": func(path string, v any) error {
			var max float64
			if err := d.rate(&max)(path, v); err != nil {
				return err
			}
			r.MaxSatsPer1kOutput = &max
			return nil
		},
		"keywords": func(path string, v any) error {
			if err := d.strs(&r.Keywords)(path, v); err != nil {
				return err
			}
			// An empty keyword matches nothing (SPEC §4 matches on word
			// boundaries), which is surely not what was meant.
			for i, k := range r.Keywords {
				if strings.TrimSpace(k) == "" {
					d.warnf(fmt.Sprintf("%s[%d]", path, i), "%s[%d]: empty keyword is ignored", path, i)
				}
			}
			return nil
		},
	})
	return r, err
}

// check enforces what no single value shows: required names and urls, and
// unique names (SPEC §3).
func (d *configDecoder) check(cfg *Config) error {
	seen := make(map[string]int)
	for i, pc := range cfg.Providers {
		path := fmt.Sprintf("providers[%d]", i)
		if pc.Name == "" {
			return d.errorf(path, "missing name")
		}
		if j, dup := seen[pc.Name]; dup {
			return d.errorf(path+".name", "duplicate provider name %q (also providers[%d])", pc.Name, j)
		}
		seen[pc.Name] = i
		if pc.URL == "" {
			return d.errorf(path, "missing url")
		}
	}
	clear(seen)
	for i, r := range cfg.Policies.Rules {
		path := fmt.Sprintf("policies.rules[%d]", i)
		if r.Name == "" {
			return d.errorf(path, "missing name")
		}
		if j, dup := seen[r.Name]; dup {
			return d.errorf(path+".name", "duplicate rule name %q (also policies.rules[%d])", r.Name, j)
		}
		seen[r.Name] = i
	}
	return nil
}

// resolveKeys gives each provider its key and KeySource (SPEC §3): api_key
// when set, else ARBSTR_<NAME>_API_KEY, else none. An api_key that expands to
// "" counts as unset. It warns of a key written literally in the file, and of
// a provider left with no key; the warnings name the provider, never the key.
func (d *configDecoder) resolveKeys(cfg *Config, rawKeys []string) {
	for i := range cfg.Providers {
		pc := &cfg.Providers[i]
		path := fmt.Sprintf("providers[%d]", i)
		env := providerKeyEnv(pc.Name)
		switch {
		case pc.APIKey != "":
			pc.KeySource = "config"
			if !strings.Contains(rawKeys[i], "${") {
				d.warnf(path+".api_key", "provider %q: api_key is written in the file; prefer \"${VAR}\" or the environment variable %s", pc.Name, env)
			}
		case os.Getenv(env) != "":
			pc.APIKey, pc.KeySource = os.Getenv(env), "env "+env
		default:
			pc.KeySource = ""
			d.warnf(path, "provider %q has no API key (no api_key, %s not set): it is sent no Authorization header", pc.Name, env)
		}
	}
}
