package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// The ledger (SPEC §8) is one SQLite file. Request handlers hand rows to
// Record, which only queues them; one writer goroutine owns every write and
// commits the queue in batches, so that no request waits on the disk (§8.2).
// Reads (§8.3, /v1/requests) go through the same pool, which WAL lets run
// beside the writer.

// ledgerTimeFormat is how timestamps are stored: UTC, RFC 3339, fixed width,
// milliseconds (§8.1). Fixed width makes string order time order, so every
// time comparison in SQL formats its parameter with the same layout.
const ledgerTimeFormat = "2006-01-02T15:04:05.000Z"

func ledgerTime(t time.Time) string { return t.UTC().Format(ledgerTimeFormat) }

const (
	// ledgerQueueSize is how many rows may wait for the writer. Beyond it
	// Record blocks: a full queue slows requests down, it never loses rows
	// (§8.2).
	ledgerQueueSize = 4096
	// ledgerBatchSize caps the rows committed in one transaction, so that a
	// burst does not hold the write lock for long.
	ledgerBatchSize = 512
	// ledgerLinger is how long the writer waits for more rows before it
	// commits a batch. A commit costs far more than a row; on a small
	// machine, committing each row alone took CPU from the requests
	// themselves (issue 3 asks that logging cost no measurable latency).
	// Readers do not wait it out: Sync asks for the commit at once.
	ledgerLinger = 20 * time.Millisecond
	// ledgerBusyTimeoutMs is how long a statement waits for a lock held by
	// another connection (a backup, the sqlite3 shell) before failing.
	ledgerBusyTimeoutMs = 5000
)

// ledgerRetryDelays are the pauses between attempts to commit a batch that
// failed for a reason that may pass (a lock held past busy_timeout, a full
// disk being cleaned up). They are bounded so that a broken disk cannot stop
// shutdown; after the last, each row of the batch is logged, with its
// request_id, as not written.
var ledgerRetryDelays = []time.Duration{50 * time.Millisecond, 250 * time.Millisecond, time.Second, 2 * time.Second}

// ledgerMigrations takes the schema from version i to version i+1; the
// version is kept in the file as PRAGMA user_version. Each runs in its own
// transaction, so that a later arbstr migrates an existing file in place
// without losing rows (§8.1). Append only: never edit a released step.
var ledgerMigrations = []string{
	// 1: the §8.1 schema. IF NOT EXISTS lets a ledger written by the
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
	// writer's rows per second matter more than a filtered read (issue 5).
	`CREATE INDEX IF NOT EXISTS requests_timestamp ON requests (timestamp);`,
}

// ledgerColumns are the columns of requests that a ledgerRow holds, in the
// order of ledgerRow.insertArgs and scanLedgerRow.
const ledgerColumns = `request_id, timestamp, policy, model, provider, streaming,
	input_tokens, output_tokens, usage_estimated, cost_sats, baseline_cost_sats,
	latency_ms, ttft_ms, attempts, success, status, error`

// ledgerRow is one request (SPEC §8.1). Costs are integer millisats, as the
// router computes them (§4.1); the table stores sats as REAL.
type ledgerRow struct {
	RequestID      string
	Time           time.Time // when the request arrived
	Policy         string    // "" → NULL
	Model          string
	Provider       string // provider of the last attempt, "" if none
	Streaming      bool
	HasUsage       bool // false: input/output tokens, cost and baseline are NULL (no upstream answer)
	InputTokens    int64
	OutputTokens   int64
	UsageEstimated bool
	CostMsat       int64
	BaselineMsat   int64
	LatencyMs      int64
	TTFTMs         int64 // streaming only; stored NULL when !Streaming
	Attempts       int
	Success        bool
	Status         int
	Error          string // "" → NULL
}

func (r *ledgerRow) insertArgs() []any {
	var in, out, cost, baseline, ttft any // nil is NULL
	if r.HasUsage {
		in, out = r.InputTokens, r.OutputTokens
		cost, baseline = float64(r.CostMsat)/1000, float64(r.BaselineMsat)/1000
	}
	if r.Streaming {
		ttft = r.TTFTMs
	}
	return []any{
		r.RequestID, ledgerTime(r.Time), ledgerNullString(r.Policy), r.Model, r.Provider, r.Streaming,
		in, out, r.UsageEstimated, cost, baseline,
		r.LatencyMs, ttft, r.Attempts, r.Success, r.Status, ledgerNullString(r.Error),
	}
}

func ledgerNullString(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// teachesRatio reports whether the row counts toward its policy's learned
// output/input ratio (§4.1, §8.2): a success whose usage the provider
// reported. Estimated usage would teach the estimator its own guess.
func (r *ledgerRow) teachesRatio() bool {
	return r.Success && r.HasUsage && !r.UsageEstimated && r.InputTokens > 0
}

func scanLedgerRow(sc interface{ Scan(...any) error }) (ledgerRow, error) {
	var (
		r                      ledgerRow
		timestamp              string
		policy, errText        sql.NullString
		in, out, latency, ttft sql.NullInt64
		cost, baseline         sql.NullFloat64
	)
	err := sc.Scan(&r.RequestID, &timestamp, &policy, &r.Model, &r.Provider, &r.Streaming,
		&in, &out, &r.UsageEstimated, &cost, &baseline,
		&latency, &ttft, &r.Attempts, &r.Success, &r.Status, &errText)
	if err != nil {
		return ledgerRow{}, err
	}
	if r.Time, err = time.Parse(ledgerTimeFormat, timestamp); err != nil {
		// A row written by another tool may use another RFC 3339 form.
		if r.Time, err = time.Parse(time.RFC3339Nano, timestamp); err != nil {
			return ledgerRow{}, fmt.Errorf("request %s: timestamp %q: %w", r.RequestID, timestamp, err)
		}
		r.Time = r.Time.UTC()
	}
	r.Policy, r.Error = policy.String, errText.String
	r.HasUsage = in.Valid
	r.InputTokens, r.OutputTokens = in.Int64, out.Int64
	r.CostMsat = int64(math.Round(cost.Float64 * 1000))
	r.BaselineMsat = int64(math.Round(baseline.Float64 * 1000))
	r.LatencyMs, r.TTFTMs = latency.Int64, ttft.Int64
	return r, nil
}

// ledgerRowJSON is a ledgerRow as /v1/requests shows it: the §8.1 column
// names, sats as numbers, and null where the column is NULL.
type ledgerRowJSON struct {
	RequestID        string   `json:"request_id"`
	Timestamp        string   `json:"timestamp"`
	Policy           *string  `json:"policy"`
	Model            string   `json:"model"`
	Provider         string   `json:"provider"`
	Streaming        bool     `json:"streaming"`
	InputTokens      *int64   `json:"input_tokens"`
	OutputTokens     *int64   `json:"output_tokens"`
	UsageEstimated   bool     `json:"usage_estimated"`
	CostSats         *float64 `json:"cost_sats"`
	BaselineCostSats *float64 `json:"baseline_cost_sats"`
	LatencyMs        int64    `json:"latency_ms"`
	TTFTMs           *int64   `json:"ttft_ms"`
	Attempts         int      `json:"attempts"`
	Success          bool     `json:"success"`
	Status           int      `json:"status"`
	Error            *string  `json:"error"`
}

func (r ledgerRow) MarshalJSON() ([]byte, error) {
	j := ledgerRowJSON{
		RequestID:      r.RequestID,
		Timestamp:      ledgerTime(r.Time),
		Model:          r.Model,
		Provider:       r.Provider,
		Streaming:      r.Streaming,
		UsageEstimated: r.UsageEstimated,
		LatencyMs:      r.LatencyMs,
		Attempts:       r.Attempts,
		Success:        r.Success,
		Status:         r.Status,
	}
	if r.Policy != "" {
		j.Policy = &r.Policy
	}
	if r.HasUsage {
		cost, baseline := float64(r.CostMsat)/1000, float64(r.BaselineMsat)/1000
		j.InputTokens, j.OutputTokens = &r.InputTokens, &r.OutputTokens
		j.CostSats, j.BaselineCostSats = &cost, &baseline
	}
	if r.Streaming {
		j.TTFTMs = &r.TTFTMs
	}
	if r.Error != "" {
		j.Error = &r.Error
	}
	return json.Marshal(j)
}

// tokenRatio is a policy's learned output/input ratio (§4.1): the plain
// running mean of n per-request ratios.
type tokenRatio struct {
	avg float64
	n   int64
}

func (t tokenRatio) add(r float64) tokenRatio {
	return tokenRatio{avg: (t.avg*float64(t.n) + r) / float64(t.n+1), n: t.n + 1}
}

// Store is the ledger. Record queues rows for the writer goroutine; the read
// methods query the database directly.
type Store struct {
	db     *sql.DB
	logger *slog.Logger

	insertRow   *sql.Stmt
	upsertRatio *sql.Stmt

	mu     sync.RWMutex // guards closed and the open state of queue
	closed bool
	queue  chan ledgerRow

	// enqueued counts rows handed to the queue, counted before the send;
	// handled counts rows the writer has committed (or given up on). Sync
	// waits for handled to reach enqueued as it was when Sync was called.
	enqueued   atomic.Int64
	progressMu sync.Mutex // guards handled and progress
	handled    int64
	progress   chan struct{} // closed, and replaced, whenever handled grows

	writerDone  chan struct{}   // closed when the writer has drained the queue and exited
	flushNow    chan struct{}   // Sync's request to commit without lingering
	retryDelays []time.Duration // ledgerRetryDelays; shortened by tests

	ratiosMu sync.RWMutex // guards ratios
	ratios   map[string]tokenRatio

	closeOnce sync.Once
	closeErr  error
}

// openStore opens (creating and migrating as needed) the ledger at path, a
// file path or ":memory:", and starts its writer. Close stops it.
func openStore(path string, logger *slog.Logger) (*Store, error) {
	memory := path == ":memory:"
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
		// are plenty, and each costs memory on a small machine (§10).
		db.SetMaxOpenConns(8)
	}
	s, err := newStore(db, memory, logger)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open ledger: %w", err)
	}
	return s, nil
}

// ledgerDSN sets busy_timeout first, so that the pragmas after it wait for a
// lock rather than fail, then WAL and synchronous=NORMAL (§8.1): durable
// across a crash of arbstr, at most the last transactions lost on a power
// cut, and no fsync per commit. _txlock=immediate takes the write lock at
// BEGIN, where busy_timeout applies, rather than on the first write of a
// transaction, where a lock upgrade can fail at once with SQLITE_BUSY.
func ledgerDSN(path string) string {
	if path == ":memory:" {
		return ":memory:?_txlock=immediate"
	}
	// A file: URI, so that a '?' or '#' in the path is escaped rather than
	// read as the start of the parameters. Clean turns a leading "//",
	// which a URI would read as an authority, into "/".
	u := url.URL{Path: filepath.ToSlash(filepath.Clean(path))}
	return "file:" + u.EscapedPath() +
		fmt.Sprintf("?_pragma=busy_timeout(%d)", ledgerBusyTimeoutMs) +
		"&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_txlock=immediate"
}

func newStore(db *sql.DB, memory bool, logger *slog.Logger) (*Store, error) {
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
		db:          db,
		logger:      logger,
		queue:       make(chan ledgerRow, ledgerQueueSize),
		flushNow:    make(chan struct{}, 1),
		progress:    make(chan struct{}),
		writerDone:  make(chan struct{}),
		ratios:      ratios,
		retryDelays: ledgerRetryDelays,
	}
	s.insertRow, err = db.PrepareContext(ctx,
		"INSERT INTO requests ("+ledgerColumns+") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
	if err != nil {
		return nil, err
	}
	s.upsertRatio, err = db.PrepareContext(ctx, `INSERT INTO token_ratios (policy, avg_ratio, sample_count) VALUES (?, ?, ?)
		ON CONFLICT (policy) DO UPDATE SET avg_ratio = excluded.avg_ratio, sample_count = excluded.sample_count`)
	if err != nil {
		s.insertRow.Close()
		return nil, err
	}
	go s.write()
	return s, nil
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

// Record queues row for the writer. It never touches the disk on the
// caller's goroutine; it blocks only while the queue is full (§8.2). A zero
// Time is taken as now.
//
// Record after Close cannot write: the database is closed. main closes the
// store only after the HTTP server has drained (§2), so no handler is left to
// call it; should one, the row is logged with its request_id and Record
// returns, rather than panic on the closed queue.
func (s *Store) Record(row ledgerRow) {
	if row.Time.IsZero() {
		row.Time = time.Now()
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		s.logger.Error("ledger closed, row not written", "request_id", row.RequestID)
		return
	}
	// Counted before the send: see Sync.
	s.enqueued.Add(1)
	s.queue <- row
}

// Sync returns once every row whose Record returned before Sync was called
// is committed (or, for a row that cannot be written at all, given up on and
// logged), so that the read endpoints count a request made a moment ago
// (§8.3).
//
// Why counting works: Record counts a row before sending it, so every row
// ahead of it in the queue was counted before it too. A row recorded before
// the call therefore sits within the first `target` rows of the queue, and the
// writer takes the queue in order.
func (s *Store) Sync(ctx context.Context) error {
	target := s.enqueued.Load()
	select {
	case s.flushNow <- struct{}{}:
	default: // a request is already pending
	}
	for {
		s.progressMu.Lock()
		handled, progress := s.handled, s.progress
		s.progressMu.Unlock()
		if handled >= target {
			return nil
		}
		select {
		case <-progress:
		case <-s.writerDone:
			return nil // the queue is drained
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Close writes every pending row, stops the writer and closes the database
// (§2: SIGINT/SIGTERM). It waits for Records blocked on a full queue. Calls
// after the first return the first's result.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		close(s.queue)
		s.mu.Unlock()
		<-s.writerDone
		s.insertRow.Close()
		s.upsertRatio.Close()
		s.closeErr = s.db.Close()
	})
	return s.closeErr
}

// Ratio returns the learned output/input token ratio of a policy ("" for no
// policy) and the number of requests it was learned from (§4.1). It reads an
// in-memory copy, updated when the writer commits, so it is cheap enough for
// the routing path and always equals the token_ratios table.
func (s *Store) Ratio(policy string) (avg float64, n int64) {
	s.ratiosMu.RLock()
	r := s.ratios[policy]
	s.ratiosMu.RUnlock()
	return r.avg, r.n
}

// write is the writer goroutine: it takes what is queued, lingering a
// moment for more, up to a batch; commits it in one transaction; and repeats
// until Close closes the queue and it is drained.
func (s *Store) write() {
	defer close(s.writerDone)
	batch := make([]ledgerRow, 0, ledgerBatchSize)
	linger := time.NewTimer(ledgerLinger)
	for row := range s.queue {
		batch = append(batch[:0], row)
		linger.Reset(ledgerLinger)
	fill:
		for len(batch) < ledgerBatchSize {
			select {
			case row, ok := <-s.queue:
				if !ok {
					break fill
				}
				batch = append(batch, row)
			case <-s.flushNow:
				batch = s.takeQueued(batch)
				break fill
			case <-linger.C:
				batch = s.takeQueued(batch)
				break fill
			}
		}
		linger.Stop()
		s.writeBatch(batch)
		clear(batch) // drop the strings for the collector
		s.progressMu.Lock()
		s.handled += int64(len(batch))
		close(s.progress)
		s.progress = make(chan struct{})
		s.progressMu.Unlock()
	}
}

// takeQueued adds to batch what is queued now, without waiting, up to a
// full batch.
func (s *Store) takeQueued(batch []ledgerRow) []ledgerRow {
	for len(batch) < ledgerBatchSize {
		select {
		case row, ok := <-s.queue:
			if !ok {
				return batch
			}
			batch = append(batch, row)
		default:
			return batch
		}
	}
	return batch
}

// writeBatch commits rows, retrying rather than losing them (§8.2: none is
// dropped), a bounded number of times so that a broken disk cannot stall
// shutdown for ever. A constraint error (a request_id written twice) will not
// pass on retry and would sink every row batched with it, so the rows are
// then written one by one and only the offending row is lost. A lost row is
// logged with its request_id.
func (s *Store) writeBatch(rows []ledgerRow) {
	var err error
	for attempt := 0; ; attempt++ {
		if err = s.commit(rows); err == nil {
			return
		}
		if isConstraintError(err) {
			if len(rows) == 1 {
				break
			}
			for i := range rows {
				s.writeBatch(rows[i : i+1])
			}
			return
		}
		if attempt == len(s.retryDelays) {
			break
		}
		s.logger.Error("ledger write failed", "err", err, "rows", len(rows), "attempt", attempt+1)
		time.Sleep(s.retryDelays[attempt])
	}
	for i := range rows {
		s.logger.Error("ledger row not written", "request_id", rows[i].RequestID, "err", err)
	}
}

func isConstraintError(err error) bool {
	var e *sqlite.Error
	// Extended result codes carry the primary code in the low byte.
	return errors.As(err, &e) && e.Code()&0xff == sqlite3.SQLITE_CONSTRAINT
}

// commit inserts rows and the token ratios they teach in one transaction
// (§8.2), then, once committed, updates the in-memory ratios to match.
func (s *Store) commit(rows []ledgerRow) error {
	ctx := context.Background() // a write is never abandoned halfway
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() // after Commit, a no-op

	insert := tx.StmtContext(ctx, s.insertRow)
	var learned map[string]tokenRatio // policies whose ratio this batch moves
	for i := range rows {
		r := &rows[i]
		if _, err := insert.ExecContext(ctx, r.insertArgs()...); err != nil {
			return fmt.Errorf("insert request %s: %w", r.RequestID, err)
		}
		if r.teachesRatio() {
			if learned == nil {
				learned = make(map[string]tokenRatio)
			}
			cur, ok := learned[r.Policy]
			if !ok {
				cur.avg, cur.n = s.Ratio(r.Policy)
			}
			learned[r.Policy] = cur.add(float64(r.OutputTokens) / float64(r.InputTokens))
		}
	}
	if len(learned) > 0 {
		upsert := tx.StmtContext(ctx, s.upsertRatio)
		for policy, t := range learned {
			if _, err := upsert.ExecContext(ctx, policy, t.avg, t.n); err != nil {
				return fmt.Errorf("update token ratio: %w", err)
			}
		}
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	if len(learned) > 0 {
		s.ratiosMu.Lock()
		for policy, t := range learned {
			s.ratios[policy] = t
		}
		s.ratiosMu.Unlock()
	}
	return nil
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

func (f *ledgerFilter) where() string {
	if len(f.conds) == 0 {
		return ""
	}
	return " WHERE " + strings.Join(f.conds, " AND ")
}

type statsQuery struct {
	Since, Until            time.Time // Until zero = now; Since zero = all time
	GroupBy                 string    // "provider" (also ""), "model" or "policy"
	Provider, Model, Policy string    // optional filters, "" = any
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
}

// statsGroup is one group of a stats answer; its JSON is the key beside the
// fields of statsTotals (§8.3).
type statsGroup struct {
	Key string `json:"key"`
	statsTotals
}

// statsResult is the §8.3 answer. Since is omitted when the window is all
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
	costMsat, baselineMsat, savedMsat           int64
	latencySum, latencyCount                    int64
}

func (a *statsSums) addSums(b statsSums) {
	a.requests += b.requests
	a.success += b.success
	a.streaming += b.streaming
	a.input += b.input
	a.output += b.output
	a.costMsat += b.costMsat
	a.baselineMsat += b.baselineMsat
	a.savedMsat += b.savedMsat
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
		CostSats:         float64(a.costMsat) / 1000,
		BaselineCostSats: float64(a.baselineMsat) / 1000,
		SavedSats:        float64(a.savedMsat) / 1000,
	}
	if a.latencyCount > 0 {
		// To a tenth of a millisecond: finer is noise.
		t.AvgLatencyMs = math.Round(float64(a.latencySum)/float64(a.latencyCount)*10) / 10
	}
	return t
}

// statsSelect sums a group. Costs are summed as integer millisats
// (ROUND(sats*1000) recovers the integer the row was written from), so sums
// are exact. saved counts only rows with both a cost and a baseline.
const statsSelect = `COUNT(*),
	COALESCE(SUM(success), 0),
	COALESCE(SUM(streaming), 0),
	COALESCE(SUM(input_tokens), 0),
	COALESCE(SUM(output_tokens), 0),
	COALESCE(SUM(CAST(ROUND(cost_sats * 1000) AS INTEGER)), 0),
	COALESCE(SUM(CAST(ROUND(baseline_cost_sats * 1000) AS INTEGER)), 0),
	COALESCE(SUM(CASE WHEN cost_sats IS NOT NULL AND baseline_cost_sats IS NOT NULL
		THEN CAST(ROUND(baseline_cost_sats * 1000) AS INTEGER) - CAST(ROUND(cost_sats * 1000) AS INTEGER) END), 0),
	COALESCE(SUM(latency_ms), 0),
	COUNT(latency_ms)`

// Stats sums the ledger over a window, with filters, grouped (§8.3). The
// window [Since, Until] is inclusive at both ends, at millisecond precision,
// so that a request that arrived in the same millisecond as the query is
// counted. Groups are ordered by key; rows without a policy group under the
// key "", as in token_ratios. The total is the sum of the groups.
func (s *Store) Stats(ctx context.Context, q statsQuery) (*statsResult, error) {
	var column string
	switch q.GroupBy {
	case "", "provider":
		column = "provider"
	case "model":
		column = "model"
	case "policy":
		column = "policy"
	default:
		return nil, fmt.Errorf("stats: unknown group_by %q", q.GroupBy)
	}
	until := q.Until
	if until.IsZero() {
		until = time.Now()
	}
	res := &statsResult{Until: ledgerTime(until), Groups: []statsGroup{}}
	var f ledgerFilter
	if !q.Since.IsZero() {
		res.Since = ledgerTime(q.Since)
		f.add("timestamp >= ?", res.Since)
	}
	f.add("timestamp <= ?", res.Until)
	f.equal("provider", q.Provider)
	f.equal("model", q.Model)
	f.equal("policy", q.Policy)

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
		if err := rows.Scan(&key, &g.requests, &g.success, &g.streaming, &g.input, &g.output,
			&g.costMsat, &g.baselineMsat, &g.savedMsat, &g.latencySum, &g.latencyCount); err != nil {
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

// requestsQuery selects rows for Requests. The §7 bounds of limit (default
// 50, max 1000) are the HTTP handler's to enforce; here Limit ≤ 0 means every
// row, which tests and tools use.
type requestsQuery struct {
	Limit, Offset           int
	Provider, Model, Policy string // "" = any
	Success                 *bool  // nil = any
}

// Requests lists ledger rows newest first (by timestamp, then insertion
// order), filtered and paged (§7, GET /v1/requests). It returns [] rather
// than nil when no row matches.
func (s *Store) Requests(ctx context.Context, q requestsQuery) ([]ledgerRow, error) {
	limit := q.Limit
	if limit <= 0 {
		limit = -1 // SQLite: no limit
	}
	var f ledgerFilter
	f.equal("provider", q.Provider)
	f.equal("model", q.Model)
	f.equal("policy", q.Policy)
	if q.Success != nil {
		f.add("success = ?", *q.Success)
	}
	args := append(f.args, limit, max(q.Offset, 0))
	rows, err := s.db.QueryContext(ctx,
		"SELECT "+ledgerColumns+" FROM requests"+f.where()+" ORDER BY timestamp DESC, id DESC LIMIT ? OFFSET ?",
		args...)
	if err != nil {
		return nil, fmt.Errorf("requests: %w", err)
	}
	defer rows.Close()
	list := []ledgerRow{}
	for rows.Next() {
		r, err := scanLedgerRow(rows)
		if err != nil {
			return nil, fmt.Errorf("requests: %w", err)
		}
		list = append(list, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("requests: %w", err)
	}
	return list, nil
}

// Request returns the row of one request id (§7, GET /v1/requests/{id});
// false when there is none.
func (s *Store) Request(ctx context.Context, requestID string) (ledgerRow, bool, error) {
	r, err := scanLedgerRow(s.db.QueryRowContext(ctx,
		"SELECT "+ledgerColumns+" FROM requests WHERE request_id = ?", requestID))
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
