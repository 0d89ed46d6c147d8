package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver
)

// The ledger is one SQLite file. Request handlers hand rows to Record, which
// appends each to a journal file and queues it; one writer goroutine owns
// every write and commits the queue in batches, so that no request waits on
// a commit. Reads (/v1/stats, /v1/requests) go through the same pool, which
// WAL lets run beside the writer.

// ledgerTimeFormat is how timestamps are stored: UTC, RFC 3339, fixed width,
// milliseconds. Fixed width makes string order time order, so every time
// comparison in SQL formats its parameter with the same layout.
const ledgerTimeFormat = "2006-01-02T15:04:05.000Z"

func ledgerTime(t time.Time) string { return t.UTC().Format(ledgerTimeFormat) }

const (
	// ledgerQueueSize is how many rows may wait for the writer before new
	// requests are held at admission (Admit). Record itself never blocks and
	// never refuses: the row of an admitted request is always taken.
	ledgerQueueSize = 4096
	// ledgerBatchSize caps the rows committed in one transaction, so that a
	// burst does not hold the write lock for long.
	ledgerBatchSize = 512
	// ledgerLinger is how long the writer waits for more rows before it
	// commits a batch. A commit costs far more than a row; on a small
	// machine, committing each row alone took CPU from the requests
	// themselves. Readers do not wait it out: Sync asks for the commit at
	// once.
	ledgerLinger = 20 * time.Millisecond
	// ledgerBusyTimeoutMs is how long a statement waits for a lock held by
	// another connection (a backup, the sqlite3 shell) before failing.
	ledgerBusyTimeoutMs = 5000
	// ledgerSyncWait bounds how long Sync waits for a commit to end, so that
	// a read endpoint answers with what is committed rather than hang behind
	// a writer that waits for a lock.
	ledgerSyncWait = 2 * time.Second
)

var (
	// ledgerRetryFirst and ledgerRetryMax bound the pause between attempts
	// to commit a batch that failed (a lock held past busy_timeout, a full
	// disk, a read-only file): it doubles from the first to the max, and
	// the batch is retried until it is written.
	ledgerRetryFirst = 50 * time.Millisecond
	ledgerRetryMax   = 3 * time.Second
	// ledgerCloseTimeout is how long Close keeps retrying rows that cannot
	// be written before it gives up on them (they stay in the journal, and
	// the next start writes them).
	ledgerCloseTimeout = 10 * time.Second
	// ledgerFileCheckInterval is how often the writer checks that the
	// database path still names the file it opened, so that a file deleted
	// or replaced under a running arbstr is noticed. Tests shorten it.
	ledgerFileCheckInterval = 15 * time.Second
)

// ErrLedgerUnavailable is Admit's answer when the queue is full because the
// ledger cannot write: a request admitted now could not be recorded, so it
// must be refused before anything is spent on it.
var ErrLedgerUnavailable = errors.New("the ledger cannot be written and its queue is full")

// ledgerMigrations takes the schema from version i to version i+1; the
// version is kept in the file as PRAGMA user_version. Each runs in its own
// transaction, so that a later arbstr migrates an existing file in place
// without losing rows. Append only: never edit a released step.
var ledgerMigrations = []string{
	// 1: the first schema. IF NOT EXISTS lets a ledger written by the
	// original arbstr, which has these tables and user_version 0, be adopted
	// as it is.
	`CREATE TABLE IF NOT EXISTS requests (
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
	CREATE TABLE IF NOT EXISTS token_ratios (
		policy TEXT PRIMARY KEY,
		avg_ratio REAL,
		sample_count INTEGER
	);`,
	// 2: an index for the reads. Stats windows and the newest-first listing
	// scan by timestamp, and filter the window's rows. One index, not one
	// per filter column: every index is paid for on every insert, and the
	// writer's rows per second matter more than a filtered read.
	`CREATE INDEX IF NOT EXISTS requests_timestamp ON requests (timestamp);`,
	// 3: the client that sent the request, what the provider charged
	// beside what its price list quoted, and the API endpoint. Rows written
	// before have no client and were all chat completions.
	`ALTER TABLE requests ADD COLUMN client TEXT NOT NULL DEFAULT '';
	ALTER TABLE requests ADD COLUMN quoted_cost_sats REAL;
	ALTER TABLE requests ADD COLUMN cost_source TEXT;
	ALTER TABLE requests ADD COLUMN endpoint TEXT NOT NULL DEFAULT 'chat';`,
}

// ledgerShapes are the column lists, in order, that the requests table of
// an arbstr ledger has from a schema version on, oldest first. A file whose
// table has another shape, or a shape its version does not match, belongs
// to another program (or was edited by hand) and is not touched.
var ledgerShapes = []struct {
	since   int // the first user_version with these columns
	columns []string
}{
	{0, strings.Fields(`id request_id timestamp policy model provider streaming
		input_tokens output_tokens usage_estimated cost_sats baseline_cost_sats
		latency_ms ttft_ms attempts success status error`)},
	{3, strings.Fields(`id request_id timestamp policy model provider streaming
		input_tokens output_tokens usage_estimated cost_sats baseline_cost_sats
		latency_ms ttft_ms attempts success status error
		client quoted_cost_sats cost_source endpoint`)},
}

// ledgerRatioColumns are the columns of token_ratios, which no step changes.
var ledgerRatioColumns = []string{"policy", "avg_ratio", "sample_count"}

// ledgerColumns are the columns of requests that a ledgerRow holds, in the
// order of ledgerRow.fields. Adding a column means a migration step, an
// entry in ledgerShapes, a field, and its place here and in fields.
const ledgerColumns = `request_id, timestamp, policy, model, provider, streaming,
	input_tokens, output_tokens, usage_estimated, cost_sats, baseline_cost_sats,
	latency_ms, ttft_ms, attempts, success, status, error,
	client, quoted_cost_sats, cost_source, endpoint`

// ledgerRow is one request, as the requests table holds it and as
// /v1/requests shows it: a nil pointer is a NULL column and a JSON null.
// Costs are integer millisats (msats), stored and shown as sats.
type ledgerRow struct {
	RequestID      string      `json:"request_id"`
	Time           ledgerStamp `json:"timestamp"` // when the request arrived
	Policy         *string     `json:"policy"`
	Model          string      `json:"model"`
	Provider       string      `json:"provider"` // provider of the last attempt, "" if none
	Streaming      bool        `json:"streaming"`
	InputTokens    *int64      `json:"input_tokens"` // nil without an upstream answer
	OutputTokens   *int64      `json:"output_tokens"`
	UsageEstimated bool        `json:"usage_estimated"`
	Cost           *msats      `json:"cost_sats"`          // what the request cost
	BaselineCost   *msats      `json:"baseline_cost_sats"` // the same tokens at the priciest qualified candidate
	LatencyMs      *int64      `json:"latency_ms"`
	TTFTMs         *int64      `json:"ttft_ms"` // streaming only
	Attempts       int         `json:"attempts"`
	Success        bool        `json:"success"`
	Status         int         `json:"status"`
	Error          *string     `json:"error"`
	Client         string      `json:"client"`           // "" without one
	QuotedCost     *msats      `json:"quoted_cost_sats"` // the same tokens at the price list in force
	CostSource     *string     `json:"cost_source"`      // "provider", "rates" or "estimate"
	Endpoint       string      `json:"endpoint"`         // "chat" (also ""), "responses", "embeddings"
}

// appendJSON appends r as json.Marshal writes it, field for field and byte
// for byte, without reflection: Record journals every row, on the request's
// path and under the store's lock, where json.Marshal cost 4 to 6 µs and
// 10 allocations. A field added to ledgerRow must be added here too, in
// the same place; TestJournalLine fails until it is.
func (r *ledgerRow) appendJSON(b []byte) []byte {
	b = append(b, `{"request_id":`...)
	b = appendJSONString(b, r.RequestID)
	b = append(b, `,"timestamp":`...)
	b = appendJSONString(b, ledgerTime(r.Time.Time))
	b = append(b, `,"policy":`...)
	b = appendJSONStringPtr(b, r.Policy)
	b = append(b, `,"model":`...)
	b = appendJSONString(b, r.Model)
	b = append(b, `,"provider":`...)
	b = appendJSONString(b, r.Provider)
	b = append(b, `,"streaming":`...)
	b = strconv.AppendBool(b, r.Streaming)
	b = append(b, `,"input_tokens":`...)
	b = appendJSONInt(b, r.InputTokens)
	b = append(b, `,"output_tokens":`...)
	b = appendJSONInt(b, r.OutputTokens)
	b = append(b, `,"usage_estimated":`...)
	b = strconv.AppendBool(b, r.UsageEstimated)
	b = append(b, `,"cost_sats":`...)
	b = appendJSONMsats(b, r.Cost)
	b = append(b, `,"baseline_cost_sats":`...)
	b = appendJSONMsats(b, r.BaselineCost)
	b = append(b, `,"latency_ms":`...)
	b = appendJSONInt(b, r.LatencyMs)
	b = append(b, `,"ttft_ms":`...)
	b = appendJSONInt(b, r.TTFTMs)
	b = append(b, `,"attempts":`...)
	b = strconv.AppendInt(b, int64(r.Attempts), 10)
	b = append(b, `,"success":`...)
	b = strconv.AppendBool(b, r.Success)
	b = append(b, `,"status":`...)
	b = strconv.AppendInt(b, int64(r.Status), 10)
	b = append(b, `,"error":`...)
	b = appendJSONStringPtr(b, r.Error)
	b = append(b, `,"client":`...)
	b = appendJSONString(b, r.Client)
	b = append(b, `,"quoted_cost_sats":`...)
	b = appendJSONMsats(b, r.QuotedCost)
	b = append(b, `,"cost_source":`...)
	b = appendJSONStringPtr(b, r.CostSource)
	b = append(b, `,"endpoint":`...)
	b = appendJSONString(b, r.Endpoint)
	return append(b, '}')
}

// appendJSONString appends s as a JSON string. A string of printable ASCII
// that encoding/json would not escape is copied as it is; any other goes
// through json.Marshal, so that escaping stays encoding/json's.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			q, _ := json.Marshal(s) // a string always marshals
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

func appendJSONStringPtr(b []byte, s *string) []byte {
	if s == nil {
		return append(b, "null"...)
	}
	return appendJSONString(b, *s)
}

func appendJSONInt(b []byte, n *int64) []byte {
	if n == nil {
		return append(b, "null"...)
	}
	return strconv.AppendInt(b, *n, 10)
}

// appendJSONMsats appends m in sats, as msats.MarshalJSON does.
func appendJSONMsats(b []byte, m *msats) []byte {
	if m == nil {
		return append(b, "null"...)
	}
	if f := math.Abs(m.sats()); f == 0 || f >= 1e-6 && f < 1e21 {
		// encoding/json's form of a float64 in this range.
		return strconv.AppendFloat(b, m.sats(), 'f', -1, 64)
	}
	v, _ := m.MarshalJSON() // a finite float always marshals
	return append(b, v...)
}

// fields points at the fields of r in the order of ledgerColumns, for
// Scan to fill.
func (r *ledgerRow) fields() []any {
	return []any{
		&r.RequestID, &r.Time, &r.Policy, &r.Model, &r.Provider, &r.Streaming,
		&r.InputTokens, &r.OutputTokens, &r.UsageEstimated, &r.Cost, &r.BaselineCost,
		&r.LatencyMs, &r.TTFTMs, &r.Attempts, &r.Success, &r.Status, &r.Error,
		&r.Client, &r.QuotedCost, &r.CostSource, &r.Endpoint,
	}
}

// values appends r's column values, in the order of ledgerColumns, as
// plain values that the driver takes without reflection (nil is NULL).
func (r *ledgerRow) values(dst []any) []any {
	return append(dst, r.RequestID, ledgerTime(r.Time.Time), optional(r.Policy), r.Model, r.Provider, r.Streaming,
		optional(r.InputTokens), optional(r.OutputTokens), r.UsageEstimated, optionalSats(r.Cost), optionalSats(r.BaselineCost),
		optional(r.LatencyMs), optional(r.TTFTMs), int64(r.Attempts), r.Success, int64(r.Status), optional(r.Error),
		r.Client, optionalSats(r.QuotedCost), optional(r.CostSource), r.Endpoint)
}

func optional[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

func optionalSats(m *msats) any {
	if m == nil {
		return nil
	}
	return m.sats()
}

// ledgerChunk is how many rows one INSERT writes at most. A statement per
// row cost the writer most of its time; 32 rows of 21 values stay far below
// SQLite's limit on parameters. The rest of a batch is written in halves
// (16, 8, ... 1 rows), so that the writer keeps six prepared statements
// rather than one for each length.
const ledgerChunk = 32

// ledgerInsert is the INSERT of n rows. OR IGNORE: a request_id already in
// the ledger (a journal replayed twice) is not written again.
func ledgerInsert(n int) string {
	row := "(?" + strings.Repeat(", ?", strings.Count(ledgerColumns, ",")) + ")"
	return "INSERT OR IGNORE INTO requests (" + ledgerColumns + ") VALUES " +
		strings.TrimSuffix(strings.Repeat(row+", ", n), ", ")
}

// errChunkDuplicate says that a chunk of rows held one already in the
// ledger: the batch is written again row by row, to know which.
var errChunkDuplicate = errors.New("a row of the chunk is already in the ledger")

// teachesRatio reports whether the row counts toward its policy's learned
// output/input ratio: a success whose usage the provider reported.
// Estimated usage would teach the estimator its own guess.
func (r *ledgerRow) teachesRatio() bool {
	return r.Success && r.InputTokens != nil && r.OutputTokens != nil && !r.UsageEstimated && *r.InputTokens > 0
}

// policyKey is the row's policy as token_ratios keys it: "" for none.
func (r *ledgerRow) policyKey() string {
	if r.Policy == nil {
		return ""
	}
	return *r.Policy
}

// msats is an amount in millisats. Amounts are computed and summed as
// integers, so that they are exact; the table and the JSON show sats, and
// reading a REAL back rounds to the millisat it was written from.
type msats int64

func (m msats) sats() float64 { return float64(m) / 1000 }

func satsToMsats(sats float64) msats { return msats(math.Round(sats * 1000)) }

func (m *msats) Scan(src any) error {
	switch v := src.(type) {
	case float64:
		*m = satsToMsats(v)
	case int64:
		*m = msats(v * 1000)
	default:
		return fmt.Errorf("cost: %T is not a number", src)
	}
	return nil
}

func (m msats) MarshalJSON() ([]byte, error) { return json.Marshal(m.sats()) }

func (m *msats) UnmarshalJSON(b []byte) error {
	var f float64
	if err := json.Unmarshal(b, &f); err != nil {
		return err
	}
	*m = satsToMsats(f)
	return nil
}

// ledgerStamp is a request's time as the ledger keeps it: ledgerTimeFormat
// in the table and in JSON, so that it is UTC with fixed-width milliseconds.
type ledgerStamp struct{ time.Time }

func (t *ledgerStamp) Scan(src any) error {
	switch v := src.(type) {
	case string:
		return t.parse(v)
	case []byte:
		return t.parse(string(v))
	case time.Time:
		t.Time = v.UTC()
		return nil
	}
	return fmt.Errorf("timestamp: %T is not a time", src)
}

func (t *ledgerStamp) parse(s string) error {
	v, err := time.Parse(ledgerTimeFormat, s)
	if err != nil {
		// A row written by another tool may use another RFC 3339 form.
		if v, err = time.Parse(time.RFC3339Nano, s); err != nil {
			return fmt.Errorf("timestamp %q: %w", s, err)
		}
	}
	t.Time = v.UTC()
	return nil
}

func (t ledgerStamp) MarshalJSON() ([]byte, error) { return json.Marshal(ledgerTime(t.Time)) }

func (t *ledgerStamp) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	return t.parse(s)
}

// tokenRatio is a policy's learned output/input ratio: the plain running
// mean of n per-request ratios.
type tokenRatio struct {
	avg float64
	n   int64
}

func (t tokenRatio) add(r float64) tokenRatio {
	return tokenRatio{avg: (t.avg*float64(t.n) + r) / float64(t.n+1), n: t.n + 1}
}

// Store is the ledger. Record journals and queues rows for the writer
// goroutine; the read methods query the database directly.
type Store struct {
	db     *sql.DB
	logger *slog.Logger
	path   string      // the database file; "" for ":memory:"
	file   os.FileInfo // the database file as opened, to notice it replaced

	inserts     [ledgerChunk + 1]*sql.Stmt // the INSERT of n rows, n = ledgerChunk or one of its halves
	upsertRatio *sql.Stmt

	mu          sync.Mutex    // guards the fields up to progress, and appends to journal
	queue       []ledgerRow   // rows recorded and not yet taken by the writer
	writing     int           // rows taken by the writer and not yet committed
	closed      bool          // Close was called; Record takes no more rows
	closeBy     time.Time     // after Close, when the writer gives up on rows it cannot write
	journal     *os.File      // path+".pending"; nil for ":memory:"
	journalSize int64         // bytes appended to journal since it was last emptied
	rewriteAt   int64         // the journalSize at which trimJournal rewrites a journal it cannot empty
	journalErr  error         // the last failed append to journal, nil once one succeeds
	writeErr    error         // the last failed commit while rows wait to be retried; nil when writing works
	fileErr     error         // the database file was deleted or replaced
	recorded    int64         // rows taken by Record, ever
	handled     int64         // rows committed (or given up on), ever; the writer takes rows in order
	progress    chan struct{} // closed, and replaced, when handled or writeErr changes

	wake       chan struct{} // rows arrived, a batch is full, or Close was called
	flushNow   chan struct{} // Sync's request to commit without lingering
	writerDone chan struct{} // closed when the writer has exited

	// Tunables, copied from the package defaults at open; tests shorten them.
	queueSize      int
	retryFirst     time.Duration
	retryMax       time.Duration
	closeTimeout   time.Duration
	fileCheckEvery time.Duration

	ratiosMu sync.RWMutex // guards ratios
	ratios   map[string]tokenRatio

	closeOnce sync.Once
	closeErr  error
}

// openStore opens (creating and migrating as needed) the ledger at path, a
// file path or ":memory:", writes the rows its journal holds from a previous
// run, and starts its writer. Close stops it.
func openStore(path string, logger *slog.Logger) (*Store, error) {
	memory := path == ":memory:"
	if !memory {
		// Before the DSN's pragmas switch the file to WAL: a file that
		// belongs to another program must be left exactly as it is.
		if err := checkLedgerShape(path); err != nil {
			return nil, fmt.Errorf("open ledger: %w", err)
		}
	}
	db, err := sql.Open("sqlite", ledgerDSN(path))
	if err != nil {
		return nil, fmt.Errorf("open ledger: %w", err)
	}
	if memory {
		// Every connection to ":memory:" is a database of its own, so the
		// writer and the readers must share one connection. It must also
		// never be closed while idle, or the data goes with it.
		db.SetMaxOpenConns(1)
		db.SetConnMaxIdleTime(0)
		db.SetConnMaxLifetime(0)
	} else {
		// WAL lets readers run beside the one writer; a few connections
		// are plenty, and each costs memory on a small machine.
		db.SetMaxOpenConns(8)
	}
	s, err := newStore(db, path, memory, logger)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open ledger: %w", err)
	}
	return s, nil
}

// ledgerDSN sets busy_timeout first, so that the pragmas after it wait for a
// lock rather than fail, then WAL and synchronous=NORMAL: durable across a
// crash of arbstr, at most the last transactions lost on a power cut, and
// no fsync per commit. cache_size(-500) gives each connection 500 KiB of
// page cache instead of SQLite's 2,000: the writer appends to the end of
// its table and indexes and needs few pages, a read of a long window
// reads each page once anyway (8% slower over 100,000 rows), and up to
// eight connections stay within 4 MiB on a small machine.
// _txlock=immediate takes the write lock at BEGIN,
// where busy_timeout applies, rather than on the first write of a
// transaction, where a lock upgrade can fail at once with SQLITE_BUSY.
func ledgerDSN(path string) string {
	if path == ":memory:" {
		return ":memory:?_txlock=immediate"
	}
	return ledgerFileURI(path) + "&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_pragma=cache_size(-500)&_txlock=immediate"
}

// ledgerFileURI is a file: URI for path with busy_timeout set, so that a '?'
// or '#' in the path is escaped rather than read as the start of the
// parameters. Clean turns a leading "//", which a URI would read as an
// authority, into "/".
func ledgerFileURI(path string) string {
	u := url.URL{Path: filepath.ToSlash(filepath.Clean(path))}
	return "file:" + u.EscapedPath() + fmt.Sprintf("?_pragma=busy_timeout(%d)", ledgerBusyTimeoutMs)
}

// checkLedgerShape refuses a file that arbstr did not write, or that a newer
// arbstr did, reading it only: no pragma that writes, no migration, so that
// the file is left exactly as it was. A file that does not exist yet is
// fine.
func checkLedgerShape(path string) error {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	db, err := sql.Open("sqlite", ledgerFileURI(path))
	if err != nil {
		return err
	}
	defer db.Close()
	var version int
	if err := db.QueryRow("PRAGMA user_version").Scan(&version); err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	if version > len(ledgerMigrations) {
		return fmt.Errorf("%s: schema version %d is newer than this arbstr knows (%d)", path, version, len(ledgerMigrations))
	}
	want := ledgerShapes[0].columns
	for _, shape := range ledgerShapes {
		if shape.since <= version {
			want = shape.columns
		}
	}
	for _, t := range []struct {
		name string
		want []string
	}{{"requests", want}, {"token_ratios", ledgerRatioColumns}} {
		cols, err := tableColumns(db, t.name)
		if err != nil {
			return fmt.Errorf("read %s: %w", path, err)
		}
		if len(cols) > 0 && !slices.Equal(cols, t.want) {
			return foreignTableError(path, t.name, version, cols, t.want)
		}
	}
	return nil
}

func foreignTableError(path, table string, version int, cols, want []string) error {
	var missing, extra []string
	for _, c := range want {
		if !slices.Contains(cols, c) {
			missing = append(missing, c)
		}
	}
	for _, c := range cols {
		if !slices.Contains(want, c) {
			extra = append(extra, c)
		}
	}
	return fmt.Errorf("%s is not an arbstr ledger of schema version %d: its table %s has columns (%s), "+
		"missing (%s), unknown (%s); refusing to change it (point database.path at another file)",
		path, version, table, strings.Join(cols, ", "), strings.Join(missing, ", "), strings.Join(extra, ", "))
}

func tableColumns(db *sql.DB, table string) ([]string, error) {
	rows, err := db.Query("SELECT name FROM pragma_table_info(?) ORDER BY cid", table)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var cols []string
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			return nil, err
		}
		cols = append(cols, name)
	}
	return cols, rows.Err()
}

func newStore(db *sql.DB, path string, memory bool, logger *slog.Logger) (*Store, error) {
	ctx := context.Background()
	var mode string
	if err := db.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&mode); err != nil {
		return nil, err
	}
	// SQLite answers a journal_mode it cannot set by keeping the old one,
	// without an error (a VFS without shared memory, some network mounts),
	// so the DSN alone proves nothing.
	if !memory && !strings.EqualFold(mode, "wal") {
		return nil, fmt.Errorf("journal_mode is %q, want wal", mode)
	}
	if err := migrateLedger(ctx, db); err != nil {
		return nil, err
	}
	ratios, err := loadTokenRatios(ctx, db)
	if err != nil {
		return nil, err
	}
	s := &Store{
		db:             db,
		logger:         logger,
		progress:       make(chan struct{}),
		wake:           make(chan struct{}, 1),
		flushNow:       make(chan struct{}, 1),
		writerDone:     make(chan struct{}),
		queueSize:      ledgerQueueSize,
		retryFirst:     ledgerRetryFirst,
		retryMax:       ledgerRetryMax,
		closeTimeout:   ledgerCloseTimeout,
		fileCheckEvery: ledgerFileCheckInterval,
		rewriteAt:      ledgerJournalRewrite,
		ratios:         ratios,
	}
	s.upsertRatio, err = db.PrepareContext(ctx, `INSERT INTO token_ratios (policy, avg_ratio, sample_count) VALUES (?, ?, ?)
		ON CONFLICT (policy) DO UPDATE SET avg_ratio = excluded.avg_ratio, sample_count = excluded.sample_count`)
	if err == nil && !memory {
		s.path = path
		s.file, err = os.Stat(path)
		if err == nil {
			err = s.openJournal()
		}
	}
	if err != nil {
		s.closeStatements()
		return nil, err
	}
	go s.write()
	if !memory {
		go s.watchFile()
	}
	return s, nil
}

func (s *Store) closeStatements() {
	for _, st := range append(s.inserts[:], s.upsertRatio) {
		if st != nil {
			st.Close()
		}
	}
	if s.journal != nil {
		s.journal.Close()
	}
}

// migrateLedger brings the schema to len(ledgerMigrations), one step per
// transaction. The version is read inside each transaction, which holds the
// write lock from BEGIN (_txlock=immediate), so two processes opening the same
// file at once do not both run a step.
func migrateLedger(ctx context.Context, db *sql.DB) error {
	for {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		var version int
		if err := tx.QueryRowContext(ctx, "PRAGMA user_version").Scan(&version); err != nil {
			tx.Rollback()
			return err
		}
		if version >= len(ledgerMigrations) {
			tx.Rollback()
			if version > len(ledgerMigrations) {
				return fmt.Errorf("schema version %d is newer than this arbstr knows (%d)", version, len(ledgerMigrations))
			}
			return nil
		}
		if _, err := tx.ExecContext(ctx, ledgerMigrations[version]); err != nil {
			tx.Rollback()
			return fmt.Errorf("migrate to version %d: %w", version+1, err)
		}
		// PRAGMA takes no parameters; version+1 is an int we computed.
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", version+1)); err != nil {
			tx.Rollback()
			return err
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migrate to version %d: %w", version+1, err)
		}
	}
}

func loadTokenRatios(ctx context.Context, db *sql.DB) (map[string]tokenRatio, error) {
	rows, err := db.QueryContext(ctx, "SELECT policy, avg_ratio, sample_count FROM token_ratios")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	ratios := make(map[string]tokenRatio)
	for rows.Next() {
		var (
			policy string
			avg    sql.NullFloat64
			n      sql.NullInt64
		)
		if err := rows.Scan(&policy, &avg, &n); err != nil {
			return nil, err
		}
		ratios[policy] = tokenRatio{avg: avg.Float64, n: n.Int64}
	}
	return ratios, rows.Err()
}

// The journal, path+".pending", makes a recorded row safe from a crash of
// the process before the writer commits it: Record appends the row as one
// line with a single write(2) before it returns, which the kernel keeps
// whatever happens to the process (a power cut may lose it, as it may lose
// the last commits under synchronous=NORMAL). The writer empties the journal
// whenever everything in it is committed; at open, what it still holds is
// written with INSERT OR IGNORE, so that a row committed just before a crash
// is not written twice.

// ledgerJournalRewrite is the size past which the writer rewrites the
// journal with only the rows not yet committed, should it never find the
// queue empty to truncate it. After a rewrite, the next waits until the
// journal has doubled, so that a queue that stays long is not rewritten on
// every commit.
const ledgerJournalRewrite = 8 << 20

func (s *Store) journalPath() string { return s.path + ".pending" }

// openJournal writes what the journal holds and opens it for appending.
func (s *Store) openJournal() error {
	f, err := os.OpenFile(s.journalPath(), os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open journal: %w", err)
	}
	s.journal = f
	rows, err := s.readJournal(f)
	if err != nil {
		return err
	}
	for len(rows) > 0 {
		n := min(len(rows), ledgerBatchSize)
		if _, err := s.commit(rows[:n]); err != nil {
			return fmt.Errorf("write the rows of %s: %w", s.journalPath(), err)
		}
		rows = rows[n:]
	}
	if err := f.Truncate(0); err != nil {
		return fmt.Errorf("empty journal: %w", err)
	}
	return nil
}

func (s *Store) readJournal(f *os.File) ([]ledgerRow, error) {
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 16<<20)
	var rows []ledgerRow
	for sc.Scan() {
		var r ledgerRow
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			// Only the last line can be cut short, by a crash mid-write.
			s.logger.Warn("ledger journal line unreadable, skipped", "file", s.journalPath(), "err", err)
			continue
		}
		rows = append(rows, r)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read journal: %w", err)
	}
	if len(rows) > 0 {
		s.logger.Info("ledger rows recovered from the journal", "file", s.journalPath(), "rows", len(rows))
	}
	return rows, nil
}

// appendJournal appends line to the journal; s.mu is held.
func (s *Store) appendJournal(line []byte, requestID string) {
	_, err := s.journal.Write(line)
	if err == nil {
		s.journalSize += int64(len(line))
	} else {
		// A short write (a full disk) would glue the next line to half of
		// this one; cut it off.
		s.journal.Truncate(s.journalSize)
	}
	if (err == nil) == (s.journalErr == nil) {
		return // no change to report
	}
	s.journalErr = err
	if err != nil {
		s.logger.Error("ledger journal write failed; rows are not safe from a crash until it works again",
			"file", s.journalPath(), "request_id", requestID, "err", err)
	} else {
		s.logger.Info("ledger journal write works again", "file", s.journalPath())
	}
}

// trimJournal drops what is committed from the journal; s.mu is held. When
// rows are still queued, it rewrites the journal with them only once it has
// grown large, through a new file renamed over the old one, so that a crash
// at any point leaves a journal holding every uncommitted row.
func (s *Store) trimJournal() {
	if s.journal == nil || s.journalSize == 0 {
		return
	}
	if len(s.queue) == 0 {
		if err := s.journal.Truncate(0); err != nil {
			s.logger.Error("ledger journal not emptied", "file", s.journalPath(), "err", err)
			return
		}
		s.journalSize, s.rewriteAt = 0, ledgerJournalRewrite
		return
	}
	if s.journalSize < s.rewriteAt {
		return
	}
	var buf bytes.Buffer
	for i := range s.queue {
		b, _ := json.Marshal(&s.queue[i]) // a ledgerRow always marshals
		buf.Write(append(b, '\n'))
	}
	tmp := s.journalPath() + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err == nil {
		if _, err = f.Write(buf.Bytes()); err == nil {
			err = os.Rename(tmp, s.journalPath())
		}
		if err != nil {
			f.Close()
		}
	}
	if err != nil {
		s.logger.Error("ledger journal not rewritten", "file", s.journalPath(), "err", err)
		return
	}
	s.journal.Close()
	s.journal, s.journalSize = f, int64(buf.Len())
	s.rewriteAt = max(ledgerJournalRewrite, 2*s.journalSize)
}

// Admit is called before a request spends anything upstream. It returns at
// once while the queue has room. When the queue is full because the ledger
// cannot write, it returns ErrLedgerUnavailable: the request should be
// refused, since its row could not be written. When the queue is full of
// rows that are being written, it waits until there is room or ctx ends:
// a slow ledger slows requests down rather than lose their rows.
func (s *Store) Admit(ctx context.Context) error {
	for {
		s.mu.Lock()
		full := len(s.queue)+s.writing >= s.queueSize
		failing := s.writeErr != nil
		progress := s.progress
		s.mu.Unlock()
		switch {
		case !full:
			return nil
		case failing:
			return ErrLedgerUnavailable
		}
		select {
		case <-progress:
		case <-s.writerDone:
			return ErrLedgerUnavailable
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Queued returns how many rows wait to be written.
func (s *Store) Queued() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.queue) + s.writing
}

// Record journals row and queues it for the writer. It never waits for a
// commit, and never refuses a row: the queue's bound is applied by Admit,
// before the request starts. Once Record returns, the row survives a crash
// of the process. A zero Time is taken as now, an empty Endpoint as "chat".
//
// Record after Close cannot write: the database is closed. main closes the
// store only after the HTTP server has drained, so no handler is left to
// call it; should one, the row is logged with its request_id.
func (s *Store) Record(row ledgerRow) {
	if row.Time.IsZero() {
		row.Time.Time = time.Now()
	}
	if row.Endpoint == "" {
		row.Endpoint = "chat"
	}
	var line []byte
	if s.path != "" {
		line = append(row.appendJSON(make([]byte, 0, 512)), '\n')
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.logger.Error("ledger closed, row not written", "request_id", row.RequestID)
		return
	}
	if line != nil {
		s.appendJournal(line, row.RequestID)
	}
	s.queue = append(s.queue, row)
	s.recorded++
	n := len(s.queue)
	s.mu.Unlock()
	if n == 1 || n == ledgerBatchSize {
		s.signal(s.wake)
	}
}

func (s *Store) signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default: // already signalled
	}
}

// broadcast wakes everyone waiting on progress; s.mu is held.
func (s *Store) broadcast() {
	close(s.progress)
	s.progress = make(chan struct{})
}

// Sync returns once every row whose Record returned before Sync was called
// is committed, so that the read endpoints count a request made a moment
// ago. It does not wait behind a ledger that cannot write: while commits
// fail, or once no commit has ended for ledgerSyncWait (the writer waits
// for a lock), it returns and the reader sees what is committed. Rows are
// taken and committed in the order Record queued them, so comparing counts
// is enough.
func (s *Store) Sync(ctx context.Context) error {
	s.mu.Lock()
	target := s.recorded
	s.mu.Unlock()
	s.signal(s.flushNow)
	stalled := time.NewTimer(ledgerSyncWait)
	defer stalled.Stop()
	for {
		s.mu.Lock()
		done := s.handled >= target || s.writeErr != nil
		progress := s.progress
		s.mu.Unlock()
		if done {
			return nil
		}
		select {
		case <-progress:
			stalled.Reset(ledgerSyncWait)
		case <-s.writerDone:
			return nil
		case <-stalled.C:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Health reports what is wrong with the ledger, nil when nothing is: rows
// waiting because commits fail, a journal that cannot be appended to, or a
// database file deleted or replaced since it was opened.
func (s *Store) Health() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	if s.writeErr != nil {
		errs = append(errs, fmt.Errorf("ledger cannot write, %d rows waiting: %w", len(s.queue)+s.writing, s.writeErr))
	}
	if s.journalErr != nil {
		errs = append(errs, fmt.Errorf("ledger journal: %w", s.journalErr))
	}
	if s.fileErr != nil {
		errs = append(errs, s.fileErr)
	}
	return errors.Join(errs...)
}

// Close writes every pending row, stops the writer and closes the database.
// Rows that still cannot be written after closeTimeout are logged with their
// request_id and left in the journal, which the next open writes. Calls
// after the first return the first's result.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.closeBy = time.Now().Add(s.closeTimeout)
		s.mu.Unlock()
		s.signal(s.wake)
		<-s.writerDone
		s.closeStatements()
		s.closeErr = s.db.Close()
	})
	return s.closeErr
}

// Ratio returns the learned output/input token ratio of a policy ("" for no
// policy) and the number of requests it was learned from. It reads an
// in-memory copy, updated when the writer commits, so it is cheap enough for
// the routing path and always equals the token_ratios table.
func (s *Store) Ratio(policy string) (avg float64, n int64) {
	s.ratiosMu.RLock()
	r := s.ratios[policy]
	s.ratiosMu.RUnlock()
	return r.avg, r.n
}

// write is the writer goroutine: it takes what is queued, lingering a
// moment for more, up to a batch; commits it in one transaction, retrying
// until it is written; and repeats until Close is called and the queue is
// drained.
func (s *Store) write() {
	defer close(s.writerDone)
	batch := make([]ledgerRow, 0, ledgerBatchSize)
	for {
		batch = s.take(batch[:0])
		if len(batch) == 0 {
			return
		}
		written := s.writeBatch(batch)
		s.mu.Lock()
		s.handled += int64(len(batch))
		s.writing = 0
		if written {
			s.trimJournal()
		}
		s.broadcast()
		s.mu.Unlock()
		if !written {
			s.abandon(batch)
			return
		}
		clear(batch) // drop the strings for the collector
	}
}

// take waits for rows (see ready) and takes up to a batch of them; none
// once Close was called and the queue is empty.
func (s *Store) take(batch []ledgerRow) []ledgerRow {
	if !s.ready() {
		return batch
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	k := min(len(s.queue), ledgerBatchSize)
	batch = append(batch, s.queue[:k]...)
	// Taken from the front without moving the rest: append reallocates
	// once the end is reached, copying only the rows still queued.
	clear(s.queue[:k])
	s.queue = s.queue[k:]
	s.writing = k
	return batch
}

// ready waits until rows are queued and it is time to commit them: a batch
// is full, Sync asked for a commit, Close was called, or the rows have
// lingered for ledgerLinger. It returns false once Close was called and the
// queue is empty.
func (s *Store) ready() bool {
	var linger <-chan time.Time
	flush := false
	for {
		s.mu.Lock()
		n, closed := len(s.queue), s.closed
		s.mu.Unlock()
		flush = flush && n > 0 // a flush asked when nothing waits is done
		switch {
		case n == 0 && closed:
			return false
		case n >= ledgerBatchSize || (n > 0 && (closed || flush)):
			return true
		case n > 0 && linger == nil:
			t := time.NewTimer(ledgerLinger)
			defer t.Stop()
			linger = t.C
		}
		select {
		case <-s.wake:
		case <-s.flushNow:
			flush = true
		case <-linger:
			return true
		}
	}
}

// writeBatch commits rows, retrying with a growing pause for as long as it
// fails: a lock, a full disk or a read-only file may pass, and a row is
// never dropped for it. Only after Close, and closeTimeout, does it give up
// and return false. The first failure is logged, and the recovery, not each
// retry. A row INSERT OR IGNORE skips (its request_id is already in the
// table) is the one row that may be lost, and is logged.
func (s *Store) writeBatch(rows []ledgerRow) bool {
	pause := s.retryFirst
	for {
		skipped, err := s.commit(rows)
		s.setWriteErr(err, len(rows))
		if err == nil {
			for _, i := range skipped {
				s.logger.Error("ledger row not written", "request_id", rows[i].RequestID,
					"err", "a row with this request_id is already in the ledger")
			}
			return true
		}
		s.mu.Lock()
		closed, giveUp := s.closed, s.closeBy
		s.mu.Unlock()
		if closed {
			if !time.Now().Before(giveUp) {
				return false
			}
			pause = min(pause, time.Until(giveUp))
		}
		time.Sleep(pause)
		pause = min(2*pause, s.retryMax)
	}
}

// setWriteErr records the outcome of a commit, logging a change only.
func (s *Store) setWriteErr(err error, rows int) {
	s.mu.Lock()
	was := s.writeErr
	s.writeErr = err
	waiting := len(s.queue) + s.writing
	if (was == nil) != (err == nil) {
		s.broadcast() // Sync and Admit decide on it
	}
	s.mu.Unlock()
	switch {
	case was == nil && err != nil:
		s.logger.Error("ledger write failing; rows are kept and retried", "err", err, "rows_waiting", waiting)
	case was != nil && err == nil:
		s.logger.Info("ledger write recovered", "rows", rows, "rows_waiting", waiting)
	}
}

// abandon logs the rows that Close could not write, the batch and whatever
// is queued behind it. They stay in the journal, for the next open; an
// in-memory ledger has none, and loses them.
func (s *Store) abandon(batch []ledgerRow) {
	s.mu.Lock()
	rows := append(batch, s.queue...)
	s.handled += int64(len(s.queue))
	s.queue = nil
	err := s.writeErr
	s.broadcast()
	s.mu.Unlock()
	msg, where := "ledger row lost at shutdown: the ledger is in memory", ""
	if s.journal != nil {
		msg, where = "ledger row not written before shutdown; kept in the journal for the next start", s.journalPath()
	}
	for i := range rows {
		s.logger.Error(msg, "request_id", rows[i].RequestID, "journal", where, "err", err)
	}
}

// commit inserts rows and the token ratios they teach in one transaction,
// then, once committed, updates the in-memory ratios to match. It returns
// the indexes of the rows that INSERT OR IGNORE skipped, which teach
// nothing.
func (s *Store) commit(rows []ledgerRow) (skipped []int, err error) {
	skipped, err = s.commitIn(rows, ledgerChunk)
	if errors.Is(err, errChunkDuplicate) {
		return s.commitIn(rows, 1)
	}
	return skipped, err
}

// insertStmt returns the prepared INSERT of n rows.
func (s *Store) insertStmt(ctx context.Context, n int) (*sql.Stmt, error) {
	if n > 0 && s.inserts[n] == nil {
		st, err := s.db.PrepareContext(ctx, ledgerInsert(n))
		if err != nil {
			return nil, err
		}
		s.inserts[n] = st
	}
	return s.inserts[n], nil
}

// commitIn is commit with at most chunk rows an INSERT: chunk, then its
// halves for the rest. In an INSERT of more than one row, a duplicate
// request_id fails the whole transaction with errChunkDuplicate; in an
// INSERT of one row, it skips that row.
func (s *Store) commitIn(rows []ledgerRow, chunk int) (skipped []int, err error) {
	ctx := context.Background() // a write is never abandoned halfway
	// Prepared before the transaction: an in-memory ledger has one
	// connection, which the transaction holds.
	for n := chunk; n > 0; n /= 2 {
		if _, err := s.insertStmt(ctx, n); err != nil {
			return nil, err
		}
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback() // after Commit, a no-op

	var (
		learned map[string]tokenRatio // policies whose ratio this batch moves
		args    []any
	)
	for start, n := 0, chunk; start < len(rows); start += n {
		// The largest of chunk's halves that fits: six statements, of 32
		// to 1 rows, write a batch of any length.
		for n > len(rows)-start {
			n /= 2
		}
		part := rows[start : start+n]
		args = args[:0]
		for i := range part {
			args = part[i].values(args)
		}
		st, err := s.insertStmt(ctx, len(part))
		if err != nil {
			return nil, err
		}
		res, err := tx.StmtContext(ctx, st).ExecContext(ctx, args...)
		if err != nil {
			return nil, fmt.Errorf("insert %d requests from %s: %w", len(part), part[0].RequestID, err)
		}
		if n, err := res.RowsAffected(); err == nil && n < int64(len(part)) {
			if len(part) > 1 {
				return nil, errChunkDuplicate
			}
			skipped = append(skipped, start)
		}
	}
	for i := range rows {
		r := &rows[i]
		if slices.Contains(skipped, i) {
			continue
		}
		if r.teachesRatio() {
			if learned == nil {
				learned = make(map[string]tokenRatio)
			}
			policy := r.policyKey()
			cur, ok := learned[policy]
			if !ok {
				cur.avg, cur.n = s.Ratio(policy)
			}
			learned[policy] = cur.add(float64(*r.OutputTokens) / float64(*r.InputTokens))
		}
	}
	if len(learned) > 0 {
		upsert := tx.StmtContext(ctx, s.upsertRatio)
		for policy, t := range learned {
			if _, err := upsert.ExecContext(ctx, policy, t.avg, t.n); err != nil {
				return nil, fmt.Errorf("update token ratio: %w", err)
			}
		}
	}
	if err := tx.Commit(); err != nil {
		return nil, err
	}
	if len(learned) > 0 {
		s.ratiosMu.Lock()
		for policy, t := range learned {
			s.ratios[policy] = t
		}
		s.ratiosMu.Unlock()
	}
	return skipped, nil
}

// watchFile checks, every fileCheckEvery until the writer exits, that the
// database path still names the file opened at start. A file deleted or
// replaced under a running arbstr (a restore over it, a cleanup) would take
// every later row to a file no one can open.
func (s *Store) watchFile() {
	tick := time.NewTicker(s.fileCheckEvery)
	defer tick.Stop()
	for {
		select {
		case <-s.writerDone:
			return
		case <-tick.C:
			s.checkFile()
		}
	}
}

func (s *Store) checkFile() {
	var problem error
	fi, err := os.Stat(s.path)
	switch {
	case err != nil:
		problem = fmt.Errorf("ledger file %s is gone (%v); rows are written to the deleted file, restart arbstr", s.path, err)
	case !os.SameFile(fi, s.file):
		problem = fmt.Errorf("ledger file %s was replaced; rows are written to the file opened at start, restart arbstr", s.path)
	}
	s.mu.Lock()
	was := s.fileErr
	s.fileErr = problem
	s.mu.Unlock()
	switch {
	case was == nil && problem != nil:
		s.logger.Error("ledger file changed under arbstr", "err", problem)
	case was != nil && problem == nil:
		s.logger.Info("ledger file is back", "path", s.path)
	}
}

// ledgerFilter builds the WHERE clause shared by Stats and Requests. Only
// fixed column names enter the SQL text; values are parameters.
type ledgerFilter struct {
	conds []string
	args  []any
}

func (f *ledgerFilter) add(cond string, arg any) {
	f.conds = append(f.conds, cond)
	f.args = append(f.args, arg)
}

func (f *ledgerFilter) equal(column, value string) {
	if value != "" {
		f.add(column+" = ?", value)
	}
}

// window restricts timestamps to [since, until], inclusive at both ends at
// millisecond precision; a zero bound is open.
func (f *ledgerFilter) window(since, until time.Time) {
	if !since.IsZero() {
		f.add("timestamp >= ?", ledgerTime(since))
	}
	if !until.IsZero() {
		f.add("timestamp <= ?", ledgerTime(until))
	}
}

// match adds the filters that stats and requests share.
func (f *ledgerFilter) match(m ledgerMatch) {
	f.equal("provider", m.Provider)
	f.equal("model", m.Model)
	f.equal("policy", m.Policy)
	f.equal("client", m.Client)
	f.equal("endpoint", m.Endpoint)
	if m.Streaming != nil {
		f.add("streaming = ?", *m.Streaming)
	}
	if m.Success != nil {
		f.add("success = ?", *m.Success)
	}
}

func (f *ledgerFilter) where() string {
	if len(f.conds) == 0 {
		return ""
	}
	return " WHERE " + strings.Join(f.conds, " AND ")
}

// ledgerMatch are the filters of stats and requests: "" and nil match any.
type ledgerMatch struct {
	Provider, Model, Policy string
	Client, Endpoint        string
	Streaming, Success      *bool
}

type statsQuery struct {
	Since, Until time.Time // Until zero = now; Since zero = all time
	GroupBy      string    // "provider" (also ""), "model", "policy", "client" or "endpoint"
	ledgerMatch
}

// statsGroupColumns are the columns a stats answer may be grouped by.
var statsGroupColumns = map[string]string{
	"": "provider", "provider": "provider", "model": "model", "policy": "policy",
	"client": "client", "endpoint": "endpoint",
}

type statsTotals struct {
	Requests         int64   `json:"requests"`
	Success          int64   `json:"success"`
	Errors           int64   `json:"errors"`
	Streaming        int64   `json:"streaming"`
	InputTokens      int64   `json:"input_tokens"`
	OutputTokens     int64   `json:"output_tokens"`
	CostSats         float64 `json:"cost_sats"`
	BaselineCostSats float64 `json:"baseline_cost_sats"`
	SavedSats        float64 `json:"saved_sats"`
	AvgLatencyMs     float64 `json:"avg_latency_ms"`
	QuotedCostSats   float64 `json:"quoted_cost_sats"`
	OverchargeSats   float64 `json:"overcharge_sats"`
}

// statsGroup is one group of a stats answer; its JSON is the key beside the
// fields of statsTotals.
type statsGroup struct {
	Key string `json:"key"`
	statsTotals
}

// statsResult is a stats answer. Since is omitted when the window is all
// time; Groups is [] rather than null when there are none.
type statsResult struct {
	Since  string       `json:"since,omitempty"`
	Until  string       `json:"until"`
	Total  statsTotals  `json:"total"`
	Groups []statsGroup `json:"groups"`
}

// statsSums are the exact sums behind a statsTotals: integer millisats, and
// latency as a sum and a count, so that totals add up from groups.
type statsSums struct {
	requests, success, streaming, input, output int64
	cost, baseline, saved, quoted, overcharge   int64 // millisats
	latencySum, latencyCount                    int64
}

// scanDest points at the sums in the order of statsSelect.
func (a *statsSums) scanDest() []any {
	return []any{&a.requests, &a.success, &a.streaming, &a.input, &a.output,
		&a.cost, &a.baseline, &a.saved, &a.quoted, &a.overcharge, &a.latencySum, &a.latencyCount}
}

func (a *statsSums) addSums(b statsSums) {
	a.requests += b.requests
	a.success += b.success
	a.streaming += b.streaming
	a.input += b.input
	a.output += b.output
	a.cost += b.cost
	a.baseline += b.baseline
	a.saved += b.saved
	a.quoted += b.quoted
	a.overcharge += b.overcharge
	a.latencySum += b.latencySum
	a.latencyCount += b.latencyCount
}

func (a statsSums) totals() statsTotals {
	t := statsTotals{
		Requests:         a.requests,
		Success:          a.success,
		Errors:           a.requests - a.success,
		Streaming:        a.streaming,
		InputTokens:      a.input,
		OutputTokens:     a.output,
		CostSats:         msats(a.cost).sats(),
		BaselineCostSats: msats(a.baseline).sats(),
		SavedSats:        msats(a.saved).sats(),
		QuotedCostSats:   msats(a.quoted).sats(),
		OverchargeSats:   msats(a.overcharge).sats(),
	}
	if a.latencyCount > 0 {
		// To a tenth of a millisecond: finer is noise.
		t.AvgLatencyMs = math.Round(float64(a.latencySum)/float64(a.latencyCount)*10) / 10
	}
	return t
}

// statsSelect sums a group. Costs are summed as integer millisats
// (ROUND(sats*1000) recovers the integer the row was written from), so sums
// are exact. saved counts only rows with both a cost and a baseline;
// overcharge only rows whose provider reported its charge.
const statsSelect = `COUNT(*),
	COALESCE(SUM(success), 0),
	COALESCE(SUM(streaming), 0),
	COALESCE(SUM(input_tokens), 0),
	COALESCE(SUM(output_tokens), 0),
	COALESCE(SUM(CAST(ROUND(cost_sats * 1000) AS INTEGER)), 0),
	COALESCE(SUM(CAST(ROUND(baseline_cost_sats * 1000) AS INTEGER)), 0),
	COALESCE(SUM(CASE WHEN cost_sats IS NOT NULL AND baseline_cost_sats IS NOT NULL
		THEN CAST(ROUND(baseline_cost_sats * 1000) AS INTEGER) - CAST(ROUND(cost_sats * 1000) AS INTEGER) END), 0),
	COALESCE(SUM(CAST(ROUND(quoted_cost_sats * 1000) AS INTEGER)), 0),
	COALESCE(SUM(CASE WHEN cost_source = 'provider' AND cost_sats IS NOT NULL AND quoted_cost_sats IS NOT NULL
		THEN CAST(ROUND(cost_sats * 1000) AS INTEGER) - CAST(ROUND(quoted_cost_sats * 1000) AS INTEGER) END), 0),
	COALESCE(SUM(latency_ms), 0),
	COUNT(latency_ms)`

// Stats sums the ledger over a window, with filters, grouped. The window
// [Since, Until] is inclusive at both ends, at millisecond precision, so
// that a request that arrived in the same millisecond as the query is
// counted. Groups are ordered by key; rows without a policy group under the
// key "", as in token_ratios. The total is the sum of the groups.
func (s *Store) Stats(ctx context.Context, q statsQuery) (*statsResult, error) {
	column, ok := statsGroupColumns[q.GroupBy]
	if !ok {
		return nil, fmt.Errorf("stats: unknown group_by %q", q.GroupBy)
	}
	until := q.Until
	if until.IsZero() {
		until = time.Now()
	}
	res := &statsResult{Until: ledgerTime(until), Groups: []statsGroup{}}
	if !q.Since.IsZero() {
		res.Since = ledgerTime(q.Since)
	}
	var f ledgerFilter
	f.window(q.Since, until)
	f.match(q.ledgerMatch)

	rows, err := s.db.QueryContext(ctx,
		"SELECT COALESCE("+column+", ''), "+statsSelect+" FROM requests"+f.where()+" GROUP BY 1 ORDER BY 1",
		f.args...)
	if err != nil {
		return nil, fmt.Errorf("stats: %w", err)
	}
	defer rows.Close()
	var total statsSums
	for rows.Next() {
		var (
			key string
			g   statsSums
		)
		if err := rows.Scan(append([]any{&key}, g.scanDest()...)...); err != nil {
			return nil, fmt.Errorf("stats: %w", err)
		}
		total.addSums(g)
		res.Groups = append(res.Groups, statsGroup{Key: key, statsTotals: g.totals()})
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("stats: %w", err)
	}
	res.Total = total.totals()
	return res, nil
}

// requestsQuery selects rows for Requests. The bounds of limit are the HTTP
// handler's to enforce; here Limit ≤ 0 means every row, which tests and
// tools use.
type requestsQuery struct {
	Limit, Offset int
	Since, Until  time.Time // zero = open
	Sort          string    // "timestamp" (also ""), "cost_sats" or "latency_ms"
	Order         string    // "desc" (also "") or "asc"
	ledgerMatch
}

// requestsSortColumns are the columns Requests may sort by: a whitelist,
// since the name enters the SQL text.
var requestsSortColumns = map[string]string{
	"": "timestamp", "timestamp": "timestamp", "cost_sats": "cost_sats", "latency_ms": "latency_ms",
}

// Requests lists ledger rows, filtered, sorted and paged; by default newest
// first (by timestamp, then insertion order). Rows that sort equal come in
// insertion order, the same direction. It returns [] rather than nil when no
// row matches.
func (s *Store) Requests(ctx context.Context, q requestsQuery) ([]ledgerRow, error) {
	column, ok := requestsSortColumns[q.Sort]
	if !ok {
		return nil, fmt.Errorf("requests: unknown sort %q", q.Sort)
	}
	var dir string
	switch q.Order {
	case "", "desc":
		dir = "DESC"
	case "asc":
		dir = "ASC"
	default:
		return nil, fmt.Errorf("requests: unknown order %q", q.Order)
	}
	limit := q.Limit
	if limit <= 0 {
		limit = -1 // SQLite: no limit
	}
	var f ledgerFilter
	f.window(q.Since, q.Until)
	f.match(q.ledgerMatch)
	args := append(f.args, limit, max(q.Offset, 0))
	rows, err := s.db.QueryContext(ctx,
		"SELECT "+ledgerColumns+" FROM requests"+f.where()+
			" ORDER BY "+column+" "+dir+", id "+dir+" LIMIT ? OFFSET ?",
		args...)
	if err != nil {
		return nil, fmt.Errorf("requests: %w", err)
	}
	defer rows.Close()
	list := []ledgerRow{}
	for rows.Next() {
		var r ledgerRow
		if err := rows.Scan(r.fields()...); err != nil {
			return nil, fmt.Errorf("requests: %w", err)
		}
		list = append(list, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("requests: %w", err)
	}
	return list, nil
}

// Request returns the row of one request id (GET /v1/requests/{id}); false
// when there is none.
func (s *Store) Request(ctx context.Context, requestID string) (ledgerRow, bool, error) {
	var r ledgerRow
	err := s.db.QueryRowContext(ctx,
		"SELECT "+ledgerColumns+" FROM requests WHERE request_id = ?", requestID).Scan(r.fields()...)
	if errors.Is(err, sql.ErrNoRows) {
		return ledgerRow{}, false, nil
	}
	if err != nil {
		return ledgerRow{}, false, fmt.Errorf("request %s: %w", requestID, err)
	}
	return r, true, nil
}

// dayTotals is what one UTC day cost, and what it would have cost at the
// priciest qualified provider.
type dayTotals struct {
	Day                    string // 2006-01-02
	CostMsat, BaselineMsat int64
}

// Daily sums cost and baseline per UTC day from since on, oldest first;
// days without requests are absent.
func (s *Store) Daily(ctx context.Context, since time.Time) ([]dayTotals, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT substr(timestamp, 1, 10),
		COALESCE(SUM(CAST(ROUND(cost_sats * 1000) AS INTEGER)), 0),
		COALESCE(SUM(CAST(ROUND(baseline_cost_sats * 1000) AS INTEGER)), 0)
		FROM requests WHERE timestamp >= ? GROUP BY 1 ORDER BY 1`, ledgerTime(since))
	if err != nil {
		return nil, fmt.Errorf("daily: %w", err)
	}
	defer rows.Close()
	var days []dayTotals
	for rows.Next() {
		var d dayTotals
		if err := rows.Scan(&d.Day, &d.CostMsat, &d.BaselineMsat); err != nil {
			return nil, fmt.Errorf("daily: %w", err)
		}
		days = append(days, d)
	}
	return days, rows.Err()
}

// Spent sums the recorded cost of each client and of each policy since t,
// in millisats, so that budgets survive a restart. Keys are "client/NAME"
// and "policy/NAME".
func (s *Store) Spent(ctx context.Context, since time.Time) (map[string]int64, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT 'client/' || client, SUM(CAST(ROUND(cost_sats * 1000) AS INTEGER))
		FROM requests WHERE timestamp >= ?1 AND client != '' AND cost_sats IS NOT NULL GROUP BY client
		UNION ALL
		SELECT 'policy/' || policy, SUM(CAST(ROUND(cost_sats * 1000) AS INTEGER))
		FROM requests WHERE timestamp >= ?1 AND policy IS NOT NULL AND cost_sats IS NOT NULL GROUP BY policy`,
		ledgerTime(since))
	if err != nil {
		return nil, fmt.Errorf("spent: %w", err)
	}
	defer rows.Close()
	spent := make(map[string]int64)
	for rows.Next() {
		var (
			key  string
			msat int64
		)
		if err := rows.Scan(&key, &msat); err != nil {
			return nil, fmt.Errorf("spent: %w", err)
		}
		spent[key] = msat
	}
	return spent, rows.Err()
}
