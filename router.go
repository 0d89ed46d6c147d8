package main

import (
	"cmp"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"
)

// This file decides where a request goes: the policy, the candidates, their
// order, and what they are estimated to cost. It also keeps each provider's
// health (the circuit breaker and the observed latency) and reads the live
// market (providers' listings, balances and what they charged), because
// routing is what reads them.

// chatRequest is what routing needs to know of a chat body. proxy.go decodes
// it; the body itself is forwarded untouched.
type chatRequest struct {
	Model     string
	Stream    bool
	MaxTokens int64  // max_tokens or max_completion_tokens; 0 when absent
	TextBytes int64  // UTF-8 bytes of all message text, for the estimate
	LastUser  string // text of the last user message, for keywords
	// StreamOptions is the body's stream_options as sent, which the
	// upstream request extends to ask for usage in a stream.
	StreamOptions json.RawMessage
	// NoOutput: the answer has no output tokens (embeddings).
	NoOutput bool
	// Policies are those the client may use; nil: any. Keyword matching
	// skips the others, and when no keyword matches, FallbackPolicy is the
	// policy: a client limited to policies always runs under one of them,
	// with its price caps and budgets.
	Policies       map[string]bool
	FallbackPolicy string
}

// price is a provider's price for one model in exact units: micro-sats per
// token for the rates (a rate of R sats per 1000 tokens is R·1000 µsat per
// token, exact to three decimals of R) and millisats for the base fee.
type price struct {
	InMicro, OutMicro int64
	BaseMsat          int64
}

// maxEstTokens bounds estimated token counts. With rates of at most 10^6
// sats per 1k tokens (the config's limit), 2·2^31 tokens cost under 2^63 µsat.
const maxEstTokens = 1 << 31

func microRate(satsPer1k float64) int64 { return int64(math.Round(satsPer1k * 1000)) }

// unitMicroRate converts a configured rate in the config's rate unit into
// µsat per token: R sats per 1k tokens is R·1000 µsat per token, and R sats
// per 1M tokens is exactly R µsat per token.
func unitMicroRate(rate float64, unit string) int64 {
	if unit == rateUnitPer1m {
		return int64(math.Round(rate))
	}
	return microRate(rate)
}

// rateInUnit shows a rate of µsat per token in the config's rate unit, the
// unit every rate that users see is printed in.
func rateInUnit(micro int64, unit string) float64 {
	if unit == rateUnitPer1m {
		return float64(micro)
	}
	return float64(micro) / 1000
}

// displayRate shows a rate of µsat per token in the router's rate unit, for
// /providers, /v1/cost and the market view.
func (rt *Router) displayRate(micro int64) float64 { return rateInUnit(micro, rt.rateUnit) }

// RateUnit is the unit displayRate prints rates in: "sats_per_1k" or
// "sats_per_1m".
func (rt *Router) RateUnit() string { return rt.rateUnit }

// unitLabel is the short name of a rate unit in messages: "sats/1k".
func unitLabel(unit string) string {
	if unit == rateUnitPer1m {
		return "sats/1M"
	}
	return "sats/1k"
}

// cost returns the cost in millisats of a request with these token counts,
// rounded to the nearest millisat: tokens times rates, plus the request fee.
func (p price) cost(in, out int64) int64 {
	return (in*p.InMicro+out*p.OutMicro+500)/1000 + p.BaseMsat
}

// msatToSats reports millisats as sats, the unit users see.
func msatToSats(msat int64) float64 { return float64(msat) / 1000 }

// provider is one configured upstream and what arbstr has learned about it.
type provider struct {
	ProviderConfig
	endpoint   string // the full chat-completions URL
	base       string // the upstream base ending in /v1, for listings and balances
	authHeader string // "Bearer KEY", or "" for none
	bodyField  []byte // `"arbstr_provider":"NAME",`, spliced into answers
	price      price
	modelPrice map[string]price // model_rates, resolved

	// learned lives apart from the configuration, so that a reload that
	// keeps the provider's name keeps what arbstr learned about it.
	*learned
}

// learned is what arbstr has learned about a provider: its circuit, its
// latency and its part of the live market.
type learned struct {
	mu        sync.Mutex // guards the fields below
	failures  int        // consecutive failures since the last success
	openUntil time.Time  // zero while the circuit is closed
	openFor   time.Duration
	probing   bool // a half-open probe is in flight

	// tripped mirrors !openUntil.IsZero(), so that routing reads a closed
	// circuit, the usual case, without taking mu.
	tripped atomic.Bool
	// latency is the moving average of time to first byte in ms, as
	// math.Float64bits; 0 until the first observation.
	latency atomic.Uint64

	// market is what the live market taught about the provider: its
	// listing, balance and charge ratio.
	market marketState
}

// Circuit states as they appear in /health and /providers.
const (
	stateClosed   = "closed"
	stateOpen     = "open"
	stateHalfOpen = "half_open"
)

// The breaker's constants: a circuit opens after breakerThreshold failures
// in a row, for breakerOpenFor, doubled after each failed probe up to
// breakerMaxOpen.
const (
	breakerThreshold = 3
	breakerOpenFor   = 30 * time.Second
	breakerMaxOpen   = 5 * time.Minute
)

// newProviderIn builds a provider whose rates are in the given rate unit.
func newProviderIn(pc ProviderConfig, unit string) *provider {
	p := &provider{ProviderConfig: pc, endpoint: chatURL(pc.URL), base: apiBase(pc.URL), learned: &learned{}}
	name, _ := json.Marshal(pc.Name)
	p.bodyField = fmt.Appendf(nil, `"arbstr_provider":%s,`, name)
	if pc.APIKey != "" {
		p.authHeader = "Bearer " + pc.APIKey
	}
	// base_fee is sats per request whatever the rate unit.
	p.price = price{unitMicroRate(pc.InputRate, unit), unitMicroRate(pc.OutputRate, unit), microRate(pc.BaseFee)}
	if len(pc.ModelRates) > 0 {
		p.modelPrice = make(map[string]price, len(pc.ModelRates))
		for m, r := range pc.ModelRates {
			p.modelPrice[m] = price{unitMicroRate(r.InputRate, unit), unitMicroRate(r.OutputRate, unit), p.price.BaseMsat}
		}
	}
	p.market.balance.Store(-1)
	p.market.ratio.Store(math.Float64bits(1))
	return p
}

// apiBase is the upstream base of a provider's url: a url ending in /v1 as
// it is, any other with /v1 added.
func apiBase(url string) string {
	url = strings.TrimRight(url, "/")
	if strings.HasSuffix(url, "/v1") {
		return url
	}
	return url + "/v1"
}

// chatURL builds the upstream chat-completions URL from a provider's url.
func chatURL(base string) string { return apiBase(base) + "/chat/completions" }

// priceFor returns the provider's price for a model, model_rates first.
func (p *provider) priceFor(model string) price {
	if mp, ok := p.modelPrice[model]; ok {
		return mp
	}
	return p.price
}

// state reports the circuit state at now.
func (p *provider) state(now time.Time) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stateLocked(now)
}

func (p *provider) stateLocked(now time.Time) string {
	switch {
	case p.openUntil.IsZero():
		return stateClosed
	case now.Before(p.openUntil):
		return stateOpen
	default:
		return stateHalfOpen
	}
}

// available says whether routing may consider the provider: its circuit is
// closed, or half-open with the probe slot free.
func (p *provider) available(now time.Time) bool {
	if !p.tripped.Load() {
		return true
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	switch p.stateLocked(now) {
	case stateClosed:
		return true
	case stateHalfOpen:
		return !p.probing
	}
	return false
}

// acquire is called right before an attempt. It admits the request when the
// circuit is closed, or takes the single probe slot of a half-open circuit;
// other requests skip the provider meanwhile, they never wait. A
// caller that got probe=true must call release with it.
func (p *provider) acquire(now time.Time) (ok, probe bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch p.stateLocked(now) {
	case stateClosed:
		return true, false
	case stateHalfOpen:
		if !p.probing {
			p.probing = true
			return true, true
		}
	}
	return false, false
}

// outcome is how an attempt ended, for the breaker.
type outcome int

const (
	outcomeSuccess outcome = iota
	outcomeFailure         // a failure that falls back to the next provider
	outcomeNeutral         // neither: the client left, or the request was the client's fault
)

// release records the end of an attempt. Every acquire is paired with one
// release, so a probe always gives its slot back, whatever happened.
func (p *provider) release(now time.Time, probe bool, o outcome, retryAfter time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if probe {
		p.probing = false
	}
	defer func() { p.tripped.Store(!p.openUntil.IsZero()) }()
	switch o {
	case outcomeSuccess:
		p.failures, p.openUntil, p.openFor = 0, time.Time{}, 0
	case outcomeFailure:
		p.failures++
		switch {
		case probe:
			// Doubled from at least the base: a request admitted before the
			// circuit opened may have succeeded meanwhile and reset openFor.
			p.openFor = min(max(2*p.openFor, breakerOpenFor), breakerMaxOpen)
			p.openUntil = now.Add(max(p.openFor, retryAfter))
		case p.openUntil.IsZero() && p.failures >= breakerThreshold:
			p.openFor = breakerOpenFor
			p.openUntil = now.Add(max(p.openFor, retryAfter))
		}
	}
}

// observe feeds one time-to-first-byte into the moving average that
// lowest_latency orders by. Concurrent observations may race
// and lose one; an average of latencies can afford it.
func (p *provider) observe(ttfb time.Duration) {
	ms := max(float64(ttfb)/float64(time.Millisecond), 1e-6)
	if old := p.latency.Load(); old != 0 {
		ms = 0.8*math.Float64frombits(old) + 0.2*ms
	}
	p.latency.Store(math.Float64bits(ms))
}

// observedLatency returns the moving average in ms, and whether there is one.
func (p *provider) observedLatency() (float64, bool) {
	bits := p.latency.Load()
	return math.Float64frombits(bits), bits != 0
}

// policy is a compiled policies.rules entry.
type policy struct {
	PolicyRule
	allowed map[string]bool
	maxOut  int64 // the output price cap in µsat per token; -1 for none
	// maxOutKey names the cap's key, and so its unit, in exclusions.
	maxOutKey string
	rr        atomic.Uint64
}

// Strategies of policies.default_strategy and of rules. lowest_cost is
// folded into cheapest by the config loader.
const (
	strategyCheapest      = "cheapest"
	strategyLowestLatency = "lowest_latency"
	strategyRoundRobin    = "round_robin"
)

// Router holds the providers and policies and picks, per request, the order
// in which providers are tried. Everything a request can share is computed
// once here, so that routing over a thousand providers stays in the tens of
// microseconds.
type Router struct {
	providers []*provider
	byName    map[string]*provider
	// table is who serves which model at what price. It is rebuilt whole
	// when a listing changes and swapped in at once, so that a request is
	// routed on one consistent snapshot; the providers (circuits, latency,
	// balances) and policies (round-robin positions) outlive every table.
	table   atomic.Pointer[routeTable]
	buildMu sync.Mutex // serializes rebuilds, so that the newest one wins

	rateUnit string
	market   MarketConfig
	// discovering are the providers whose listings are read.
	discovering []*provider
	// startWait bounds how long StartMarket waits for the first listings;
	// listingTimeout bounds one listing or balance read.
	startWait      time.Duration
	listingTimeout time.Duration
	marketWG       sync.WaitGroup // the polling goroutines

	policies     []*policy
	policyByName map[string]*policy
	policyNames  string // for the unknown-policy error
	// wordRule maps a keyword that is one word to the rules having it, in
	// config order (a client may not use the first);
	// phrases are the other keywords ("unit test", "c++"), in rule order.
	wordRule        map[string][]int
	phrases         []phrase
	defaultStrategy string
	defaultRR       atomic.Uint64
	// ratio returns the learned output/input ratio of a policy and its
	// sample count; nil means no ledger.
	ratio func(policy string) (float64, int64)
}

// routeTable is an immutable snapshot of who serves which model at what
// price. byModel lists, per model, the providers that serve it, in config
// order and with their price for the model; anyModel is the list for a
// model no provider names (the providers with an empty models list that do
// not discover theirs).
type routeTable struct {
	byModel  map[string][]modelCand
	anyModel []modelCand
	// served is, per provider in config order, the models it serves now;
	// nil with anyServed for any model.
	served    [][]string
	anyServed []bool
}

// modelCand is a provider that serves a model, at its price for the model.
type modelCand struct {
	p     *provider
	price price
	// maxMsat is the most one request may cost there, from the listing's
	// max_cost; 0 when unknown.
	maxMsat int64
	// live says the price comes, at least in part, from a listing.
	live bool
}

// phrase is a keyword that is not a single word, and its rule's index.
type phrase struct {
	text string
	rule int
}

func newRouter(cfg *Config, ratio func(string) (float64, int64)) *Router {
	rt := &Router{
		byName:          make(map[string]*provider),
		policyByName:    make(map[string]*policy),
		wordRule:        make(map[string][]int),
		defaultStrategy: cfg.Policies.DefaultStrategy,
		ratio:           ratio,
		rateUnit:        cfg.RateUnit,
		market:          cfg.Market,
		startWait:       5 * time.Second,
		listingTimeout:  10 * time.Second,
	}
	if rt.rateUnit == "" {
		rt.rateUnit = rateUnitPer1k
	}
	for _, pc := range cfg.Providers {
		p := newProviderIn(pc, rt.rateUnit)
		rt.providers = append(rt.providers, p)
		rt.byName[p.Name] = p
		if pc.Discover {
			rt.discovering = append(rt.discovering, p)
		}
	}
	rt.rebuild()
	var names []string
	for i, r := range cfg.Policies.Rules {
		pol := &policy{PolicyRule: r, maxOut: -1}
		for _, k := range r.Keywords {
			k = foldCase(strings.TrimSpace(k))
			switch {
			case k == "":
			case isOneWord(k):
				if rules := rt.wordRule[k]; len(rules) == 0 || rules[len(rules)-1] != i {
					rt.wordRule[k] = append(rules, i)
				}
			default:
				rt.phrases = append(rt.phrases, phrase{k, i})
			}
		}
		if len(r.AllowedModels) > 0 {
			pol.allowed = make(map[string]bool)
			for _, m := range r.AllowedModels {
				pol.allowed[m] = true
			}
		}
		switch {
		case r.MaxSatsPer1kOutput != nil:
			pol.maxOut, pol.maxOutKey = microRate(*r.MaxSatsPer1kOutput), "max_sats_per_1k_output"
		case r.MaxSatsPer1mOutput != nil:
			pol.maxOut, pol.maxOutKey = int64(math.Round(*r.MaxSatsPer1mOutput)), "max_sats_per_1m_output"
		}
		rt.policies = append(rt.policies, pol)
		rt.policyByName[r.Name] = pol
		names = append(names, fmt.Sprintf("%q", r.Name))
	}
	rt.policyNames = strings.Join(names, ", ")
	if rt.policyNames == "" {
		rt.policyNames = "none configured"
	}
	return rt
}

// candidate is a provider that may serve a request, with its price for the
// model and the estimated cost of this request there.
type candidate struct {
	p       *provider
	price   price
	estMsat int64 // the estimate at the price list in force (the quote)
	// rankMsat is estMsat times the provider's charge ratio, what cheapest
	// ranks by; ratio is that charge ratio at routing time.
	rankMsat int64
	ratio    float64
	maxMsat  int64   // the listing's max_cost for the model in msat; 0 unknown
	latency  float64 // observed latency in ms at routing time
	seen     bool    // latency is an observation
}

// exclusion is a provider that cannot serve a request, and why (/v1/cost).
type exclusion struct {
	Provider string `json:"provider"`
	Reason   string `json:"reason"`
}

// route is the routing decision for one request.
type route struct {
	policy   *policy // nil when no policy matched
	strategy string
	estIn    int64
	estOut   int64
	cands    []modelCand // the providers serving the model (shared, read-only)
	ordered  []candidate // qualified and available, in the order to try
	excluded []exclusion // filled only when Route explains itself (limit 0, for /v1/cost)
}

// policyName is the matched policy's name, "" for none (or no route yet).
func (r *route) policyName() string {
	if r == nil || r.policy == nil {
		return ""
	}
	return r.policy.Name
}

// allows reports whether the policy's output price cap lets a provider in.
func (r *route) allows(pr price) bool {
	return r.policy == nil || r.policy.maxOut < 0 || pr.OutMicro <= r.policy.maxOut
}

// baseline returns what the given tokens would have cost at the priciest
// qualified candidate, the ledger's baseline_cost_sats; an open circuit or a
// low balance does not disqualify.
func (r *route) baseline(in, out int64) int64 {
	var most int64
	for _, mc := range r.cands {
		if r.allows(mc.price) {
			most = max(most, mc.price.cost(in, out))
		}
	}
	return most
}

// Route picks the policy, the candidates that serve the model within it,
// sets aside those with an open circuit or too low a balance, and orders
// the rest by the strategy. policyHeader is X-Arbstr-Policy. With
// limit > 0 only the first limit candidates are ordered, which is all a chat
// request can use (it makes at most server.max_attempts attempts, walking
// the list from its start on every pass); limit 0 orders every candidate and
// records why each excluded provider was left out, for /v1/cost.
//
// A refusal comes back as the API error the client gets; the route is still
// returned, with what was decided before the refusal, for the ledger row.
func (rt *Router) Route(req *chatRequest, policyHeader string, now time.Time, limit int) (*route, *apiError) {
	r := &route{strategy: rt.defaultStrategy}
	explain := limit <= 0
	table := rt.table.Load() // one snapshot for the whole decision

	// The policy, by header or by keyword.
	if policyHeader != "" {
		pol, ok := rt.policyByName[policyHeader]
		if !ok {
			return r, apiErrorf(http.StatusBadRequest, "invalid_request_error", "unknown_policy",
				"unknown policy %q in X-Arbstr-Policy; configured policies: %s", policyHeader, rt.policyNames)
		}
		r.policy = pol
	} else {
		r.policy = rt.matchKeywords(req.LastUser, req.Policies)
		if r.policy == nil && req.FallbackPolicy != "" {
			r.policy = rt.policyByName[req.FallbackPolicy]
		}
	}
	if r.policy != nil {
		r.strategy = r.policy.Strategy
		if r.strategy == "" {
			r.strategy = strategyCheapest
		}
	}

	r.estIn, r.estOut = rt.estimate(req, r.policyName())

	// The candidates serving the model.
	r.cands = table.byModel[req.Model]
	if r.cands == nil {
		r.cands = table.anyModel
	}
	if len(r.cands) == 0 {
		return r, apiErrorf(http.StatusBadRequest, "invalid_request_error", "no_provider",
			"no provider serves model %q", req.Model)
	}

	// The policy's constraints, then open circuits and low balances set
	// aside, then the strategy's order, kept as the candidates come.
	if r.policy != nil && r.policy.allowed != nil && !r.policy.allowed[req.Model] {
		return r, apiErrorf(http.StatusBadRequest, "invalid_request_error", "model_not_allowed",
			"model %q is not allowed by policy %q", req.Model, r.policy.Name)
	}
	compare := compareCheapest
	switch r.strategy {
	case strategyLowestLatency:
		compare = compareLatency
	case strategyRoundRobin:
		compare = nil // config order, rotated below
	}
	qualified, broke := 0, 0
	for _, mc := range r.cands {
		if !r.allows(mc.price) {
			if explain {
				r.excluded = append(r.excluded, r.capExclusion(mc))
			}
			continue
		}
		qualified++
		// The per-candidate work stays inline: this loop runs for every
		// provider serving the model, and a call per candidate shows.
		c := candidate{p: mc.p, price: mc.price, estMsat: mc.price.cost(r.estIn, r.estOut), maxMsat: mc.maxMsat}
		reason := ""
		if !mc.p.available(now) {
			reason = reasonCircuit
		} else if b := mc.p.market.balance.Load(); b >= 0 && c.estMsat > b {
			reason, broke = reasonBalance, broke+1
		}
		if reason != "" {
			if explain {
				r.excluded = append(r.excluded, exclusion{mc.p.Name, reason})
			}
			continue
		}
		c.ratio = mc.p.chargeRatio()
		c.rankMsat = c.estMsat
		if c.ratio != 1 {
			c.rankMsat = int64(math.Round(float64(c.estMsat) * c.ratio))
		}
		c.latency, c.seen = mc.p.observedLatency()
		if limit > 0 && compare != nil {
			r.ordered = insertOrdered(r.ordered, c, compare, limit)
		} else {
			r.ordered = append(r.ordered, c)
		}
	}
	if qualified == 0 {
		return r, apiErrorf(http.StatusBadRequest, "invalid_request_error", "no_provider",
			"no provider serves model %q within policy %q", req.Model, r.policy.Name)
	}
	if len(r.ordered) == 0 {
		return r, errNoProviderAvailable(req.Model, broke > 0)
	}
	if limit <= 0 && compare != nil {
		slices.SortStableFunc(r.ordered, compare)
	}
	if compare == nil {
		counter := &rt.defaultRR
		if r.policy != nil {
			counter = &r.policy.rr
		}
		n := int((counter.Add(1) - 1) % uint64(len(r.ordered)))
		r.ordered = append(r.ordered[n:], r.ordered[:n]...)
		if limit > 0 {
			r.ordered = r.ordered[:min(limit, len(r.ordered))]
		}
	}
	return r, nil
}

// worstCase is the most a request may cost, which its budgets reserve
// before it starts: its input estimate at the highest input rate among the
// qualified candidates; its output (max_tokens, else the model's max_cost
// where a listing gives one, which then stands for the whole output part,
// else reserveTokens) at the highest output rate; and the highest
// per-request fee. An embedding has no output.
func (r *route) worstCase(req *chatRequest, reserveTokens int64) int64 {
	var in, out, fee int64
	for _, mc := range r.cands {
		if !r.allows(mc.price) {
			continue
		}
		// A provider known to bill above its list may bill this much above
		// it again.
		ratio := max(1, mc.p.chargeRatio())
		scaled := func(v int64) int64 { return int64(math.Ceil(float64(v) * ratio)) }
		in = max(in, scaled(r.estIn*mc.price.InMicro))
		fee = max(fee, scaled(mc.price.BaseMsat))
		switch {
		case req.NoOutput:
		case req.MaxTokens > 0:
			out = max(out, scaled(min(req.MaxTokens, maxEstTokens)*mc.price.OutMicro))
		case mc.maxMsat > 0:
			out = max(out, scaled(mc.maxMsat*1000))
		default:
			out = max(out, scaled(reserveTokens*mc.price.OutMicro))
		}
	}
	return (in+out+999)/1000 + fee
}

// estimate returns the token counts a request is ranked and shown by: a
// quarter token per byte of text in, and out max_tokens, or else in times
// the policy's learned output/input ratio once it has 5 samples.
func (rt *Router) estimate(req *chatRequest, policy string) (in, out int64) {
	in, out = estimateTokens(req.TextBytes), req.MaxTokens
	if req.NoOutput {
		out = 0
	} else if out <= 0 {
		ratio := 1.0
		if rt.ratio != nil {
			if avg, n := rt.ratio(policy); n >= 5 {
				ratio = avg
			}
		}
		out = int64(math.Ceil(float64(in) * ratio))
	}
	// No model reads or writes 2^31 tokens; the bound keeps cost in int64.
	return min(in, maxEstTokens), min(out, maxEstTokens)
}

// Why Route sets a qualified provider aside, as /v1/cost shows it.
const (
	reasonCircuit = "circuit open"
	reasonBalance = "balance too low"
)

// insertOrdered adds c to a list ordered by compare that keeps only the
// first limit candidates; ties keep arrival order. Insertion into a short
// list is what makes limit pay: a request needs a few providers out of
// possibly a thousand, and most are turned away by one comparison.
func insertOrdered(list []candidate, c candidate, compare func(a, b candidate) int, limit int) []candidate {
	i := len(list)
	for i > 0 && compare(c, list[i-1]) < 0 {
		i--
	}
	if i >= limit {
		return list
	}
	if len(list) < limit {
		list = append(list, candidate{})
	}
	copy(list[i+1:], list[i:])
	list[i] = c
	return list
}

// compareCheapest orders by estimated cost times the charge ratio, then by
// lower observed latency (an unobserved provider counts as 0), then by name.
func compareCheapest(a, b candidate) int {
	if a.rankMsat != b.rankMsat {
		return cmp.Compare(a.rankMsat, b.rankMsat)
	}
	if a.latency != b.latency {
		return cmp.Compare(a.latency, b.latency)
	}
	return strings.Compare(a.p.Name, b.p.Name)
}

// compareLatency puts providers without observations first, so that they
// get observed, then orders by latency and cost; ties keep config order.
func compareLatency(a, b candidate) int {
	if a.seen != b.seen {
		if !a.seen {
			return -1
		}
		return 1
	}
	if a.latency != b.latency {
		return cmp.Compare(a.latency, b.latency)
	}
	return cmp.Compare(a.rankMsat, b.rankMsat)
}

// capExclusion explains why the policy's output price cap leaves a provider
// out, with both prices in the unit of the cap's key.
func (r *route) capExclusion(mc modelCand) exclusion {
	unit := rateUnitPer1k
	if r.policy.maxOutKey == "max_sats_per_1m_output" {
		unit = rateUnitPer1m
	}
	msg := append(make([]byte, 0, 96), "output rate "...)
	msg = strconv.AppendFloat(msg, rateInUnit(mc.price.OutMicro, unit), 'g', -1, 64)
	msg = append(append(append(append(msg, ' '), unitLabel(unit)...), " exceeds the policy's "...), r.policy.maxOutKey...)
	msg = strconv.AppendFloat(append(msg, ' '), rateInUnit(r.policy.maxOut, unit), 'g', -1, 64)
	return exclusion{mc.p.Name, string(msg)}
}

// matchKeywords returns the first rule, in config order, with a keyword in
// the text: case-insensitive, on word boundaries. The text is
// cut into words once, each looked up among the one-word keywords; only
// keywords of several words, or with other characters, are searched for.
func (rt *Router) matchKeywords(text string, allowed map[string]bool) *policy {
	if text == "" || len(rt.policies) == 0 {
		return nil
	}
	lower := foldCase(text)
	best := len(rt.policies)
	for i := 0; i < len(lower); {
		r, size := utf8.DecodeRuneInString(lower[i:])
		if !isWordRune(r) {
			i += size
			continue
		}
		j := i + size
		for j < len(lower) {
			r, size := utf8.DecodeRuneInString(lower[j:])
			if !isWordRune(r) {
				break
			}
			j += size
		}
		for _, rule := range rt.wordRule[lower[i:j]] {
			if rule >= best {
				break
			}
			if allowed == nil || allowed[rt.policies[rule].Name] {
				best = rule
				break
			}
		}
		i = j
	}
	for _, ph := range rt.phrases {
		if ph.rule >= best {
			break
		}
		if allowed != nil && !allowed[rt.policies[ph.rule].Name] {
			continue
		}
		if containsWord(lower, ph.text) {
			best = ph.rule
			break
		}
	}
	if best == len(rt.policies) {
		return nil
	}
	return rt.policies[best]
}

// isOneWord reports whether s is made of word runes only, so that it
// matches exactly the words of a text that equal it.
func isOneWord(s string) bool {
	for _, r := range s {
		if !isWordRune(r) {
			return false
		}
	}
	return s != ""
}

// containsWord reports whether word occurs in text with no letter, digit or
// underscore right before or after it, so that "code" matches "code this"
// but not "encode".
func containsWord(text, word string) bool {
	for start := 0; ; {
		i := strings.Index(text[start:], word)
		if i < 0 {
			return false
		}
		i += start
		end := i + len(word)
		before, _ := utf8.DecodeLastRuneInString(text[:i])
		after, _ := utf8.DecodeRuneInString(text[end:])
		if !isWordRune(before) && !isWordRune(after) {
			return true
		}
		_, size := utf8.DecodeRuneInString(text[i:])
		start = i + size
	}
}

// isWordRune says what a word is made of: letters, digits, underscores, and
// the combining marks that belong to the letter before them ("cafe" plus an
// acute accent is "café", not "cafe"). Han, kana and Hangul letters count as
// breaks: Chinese and Japanese put no spaces between words, so "debug" in
// "请帮我debug这个" is a word of its own (as Unicode's UAX #29 has it).
func isWordRune(r rune) bool {
	switch {
	case r == utf8.RuneError:
		return false
	case r < utf8.RuneSelf:
		return r == '_' || 'a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9'
	case unicode.In(r, unicode.Han, unicode.Hiragana, unicode.Katakana, unicode.Hangul):
		return false
	}
	return unicode.IsLetter(r) || unicode.IsDigit(r) || unicode.Is(unicode.Mn, r)
}

// foldCase lower-cases text for keyword matching, with Greek final sigma
// folded into σ, since upper-case Σ lower-cases to σ wherever it stands.
func foldCase(s string) string {
	return strings.ReplaceAll(strings.ToLower(s), "ς", "σ")
}

// ---- The live market ----

// Routstr providers publish their prices in sats and change them as bitcoin
// moves, so arbstr reads each discovering provider's listing and balance
// from time to time, and learns from what each provider says it charged.

// marketState is one provider's part of the live market.
type marketState struct {
	// listing is the last listing read successfully; nil before the first.
	listing atomic.Pointer[listing]
	// balance is the known spendable balance in msat; -1 when unknown.
	// Routing reads it on every request, so it is an atomic.
	balance atomic.Int64
	// ratio is the charge ratio (reported over quoted) as math.Float64bits.
	ratio atomic.Uint64

	mu           sync.Mutex // guards the fields below
	listErr      string     // the last listing failure, "" after a success
	listErrAt    time.Time
	badFields    string // the unusable price fields last warned about
	balanceAt    time.Time
	noBalanceAPI bool // the provider answered 401, 404 or 405 for its balance
	lowWarned    bool // the low-balance warning was logged and still holds
	charges      [chargeWindow]chargeSample
	nCharges     int // reports recorded, all time
}

// chargeSample is one charge a provider reported, and what it was quoted.
// Model and tokens let a later listing quote it again.
type chargeSample struct {
	reported, quoted int64 // msat
	model            string
	in, out          int64
	at               time.Time // when it was reported
}

// A provider's charge ratio is the mean over its last chargeWindow reports,
// and 1 until it has chargeMinReports: a single odd report says little.
const (
	chargeWindow     = 20
	chargeMinReports = 5
)

// listing is one successful read of a provider's GET /models.
type listing struct {
	at     time.Time
	models []string // served models, in listing order, without duplicates
	prices map[string]listedPrice
}

// listedPrice is a listing's price for one model: rates in µsat per token,
// the request fee and max_cost in msat; -1 for a field the listing did not
// give usably, which keeps the configured price for it.
type listedPrice struct {
	in, out, fee, max int64
}

// Limits of a listing: one read may take listingTimeout and its body at
// most maxListingBytes. A price above maxListedRate sats per token (the
// config's own limit on rates) or a fee above maxListedFee sats is taken as
// garbage, which also keeps costs far from int64 overflow.
const (
	maxListingBytes = 8 << 20
	maxListedRate   = 1000
	maxListedFee    = 1e9
)

// priceAt returns the provider's price for a model with a listing's prices
// over the configured ones, field by field, and whether the listing gave
// any of them.
func (p *provider) priceAt(model string, l *listing) (pr price, maxMsat int64, live bool) {
	pr = p.priceFor(model)
	if l == nil {
		return pr, 0, false
	}
	lp, ok := l.prices[model]
	if !ok {
		return pr, 0, false
	}
	for _, f := range []struct {
		from int64
		to   *int64
	}{{lp.in, &pr.InMicro}, {lp.out, &pr.OutMicro}, {lp.fee, &pr.BaseMsat}, {lp.max, &maxMsat}} {
		if f.from >= 0 {
			*f.to, live = f.from, true
		}
	}
	return pr, maxMsat, live
}

// servedModels returns the models the provider serves given its listing,
// or any when it serves every model. A discovering provider serves its
// listing's models once it has one, its configured models before, and
// nothing rather than everything when it has neither.
func (p *provider) servedModels(l *listing) (models []string, any bool) {
	switch {
	case !p.Discover:
		return p.Models, len(p.Models) == 0
	case l != nil:
		return l.models, false
	}
	return p.Models, false
}

// adopt carries over, from the router a reload replaces, what was learned
// about each provider that keeps its name, its URL and its key: its
// circuit, its latency, its listing, balance and charge ratio. A provider
// whose URL or key changed is another account, or another host, and starts
// afresh. A provider that had no balance API is asked again.
func (rt *Router) adopt(old *Router) {
	for _, p := range rt.providers {
		op := old.byName[p.Name]
		if op == nil || op.URL != p.URL || op.APIKey != p.APIKey {
			continue
		}
		p.learned = op.learned
		p.market.mu.Lock()
		p.market.noBalanceAPI = false
		p.market.mu.Unlock()
	}
	rt.rebuild()
}

// rebuild builds the routing table from every provider's configuration and
// current listing, and swaps it in.
func (rt *Router) rebuild() {
	rt.buildMu.Lock()
	defer rt.buildMu.Unlock()
	t := &routeTable{
		byModel:   make(map[string][]modelCand),
		served:    make([][]string, len(rt.providers)),
		anyServed: make([]bool, len(rt.providers)),
	}
	lists := make([]*listing, len(rt.providers))
	// Every model named anywhere gets its own list: served by a provider,
	// or priced by a provider's model_rates (one serving any model).
	for i, p := range rt.providers {
		if p.Discover { // a listing kept from before a reload that stopped discovery is not the price
			lists[i] = p.market.listing.Load()
		}
		t.served[i], t.anyServed[i] = p.servedModels(lists[i])
		for _, m := range t.served[i] {
			t.byModel[m] = nil
		}
		for m := range p.ModelRates {
			t.byModel[m] = nil
		}
	}
	for i, p := range rt.providers {
		add := func(m string) {
			if l := t.byModel[m]; len(l) > 0 && l[len(l)-1].p == p {
				return // a model listed twice
			}
			pr, maxMsat, live := p.priceAt(m, lists[i])
			t.byModel[m] = append(t.byModel[m], modelCand{p, pr, maxMsat, live})
		}
		if t.anyServed[i] {
			t.anyModel = append(t.anyModel, modelCand{p: p, price: p.price})
			for m := range t.byModel {
				add(m)
			}
			continue
		}
		for _, m := range t.served[i] {
			add(m)
		}
	}
	rt.table.Store(t)
}

// getJSON reads GET {base}{path} of a provider with its key, within the
// listing timeout and the size limit, and returns the status and body.
func (rt *Router) getJSON(ctx context.Context, client *http.Client, p *provider, path string) (int, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, rt.listingTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.base+path, nil)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Accept", "application/json")
	if p.authHeader != "" {
		req.Header.Set("Authorization", p.authHeader)
	}
	resp, err := client.Do(req)
	if err != nil {
		// The URL may hold credentials; what failed is enough for a log
		// and for /providers.
		if ue, ok := errors.AsType[*url.Error](err); ok {
			err = ue.Err
		}
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxListingBytes+1))
	if err != nil {
		return resp.StatusCode, nil, err
	}
	if len(body) > maxListingBytes {
		return resp.StatusCode, nil, fmt.Errorf("body larger than %d bytes", maxListingBytes)
	}
	return resp.StatusCode, body, nil
}

// readListing reads a provider's listing. It returns the listing, and the
// price fields it could not use ("model: completion").
func (rt *Router) readListing(ctx context.Context, client *http.Client, p *provider, now time.Time) (*listing, []string, error) {
	status, body, err := rt.getJSON(ctx, client, p, "/models")
	if err != nil {
		return nil, nil, fmt.Errorf("GET /models: %w", err)
	}
	if status < 200 || status > 299 {
		return nil, nil, fmt.Errorf("GET /models: status %d", status)
	}
	return parseListing(body, now)
}

// listingEntry is the part of a listing entry arbstr reads. The Routstr API
// gives sats_pricing in sats per token for prompt and completion, and in
// sats per request for request and max_cost; pricing (USD) is not used.
type listingEntry struct {
	ID          json.RawMessage            `json:"id"`
	Enabled     *bool                      `json:"enabled"`
	SatsPricing map[string]json.RawMessage `json:"sats_pricing"`
}

// parseListing reads the body of GET /models: {"data":[...]}.
func parseListing(body []byte, now time.Time) (*listing, []string, error) {
	var doc struct {
		Data *[]json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, nil, fmt.Errorf("listing is not JSON: %w", err)
	}
	if doc.Data == nil {
		return nil, nil, errors.New("listing has no data array")
	}
	l := &listing{at: now, prices: make(map[string]listedPrice)}
	var bad []string
	for _, raw := range *doc.Data {
		var e listingEntry
		var id string
		if json.Unmarshal(raw, &e) != nil || json.Unmarshal(e.ID, &id) != nil || id == "" {
			continue
		}
		if e.Enabled != nil && !*e.Enabled {
			continue
		}
		if _, dup := l.prices[id]; dup {
			continue
		}
		lp := listedPrice{-1, -1, -1, -1}
		if e.SatsPricing != nil {
			for _, f := range []struct {
				key   string
				scale float64 // to µsat per token, or to msat
				limit float64
				to    *int64
			}{
				{"prompt", 1e6, maxListedRate, &lp.in},
				{"completion", 1e6, maxListedRate, &lp.out},
				{"request", 1e3, maxListedFee, &lp.fee},
				{"max_cost", 1e3, maxListedFee, &lp.max},
			} {
				v, ok := listedNumber(e.SatsPricing[f.key], f.limit)
				if !ok {
					bad = append(bad, id+": "+f.key)
					continue
				}
				*f.to = int64(math.Round(v * f.scale))
			}
		}
		l.models = append(l.models, id)
		l.prices[id] = lp
	}
	return l, bad, nil
}

// listedNumber reads one sats_pricing field: a JSON number from 0 to limit.
func listedNumber(raw json.RawMessage, limit float64) (float64, bool) {
	var v float64
	if !isJSONNumber(raw) || json.Unmarshal(raw, &v) != nil {
		return 0, false
	}
	return v, v >= 0 && v <= limit
}

// isJSONNumber reports whether raw starts as a JSON number does, which
// sets null, strings and booleans apart before decoding.
func isJSONNumber(raw json.RawMessage) bool {
	return len(raw) > 0 && (raw[0] == '-' || '0' <= raw[0] && raw[0] <= '9')
}

// readBalance reads a provider's GET /balance/info: the Routstr API answers
// {"balance": msats, "reserved": msats}, balance being what can be spent.
// noAPI is true for a 401, 404 or 405: the provider has no such API.
func (rt *Router) readBalance(ctx context.Context, client *http.Client, p *provider) (msat int64, noAPI bool, err error) {
	status, body, err := rt.getJSON(ctx, client, p, "/balance/info")
	switch {
	case err != nil:
		return 0, false, fmt.Errorf("GET /balance/info: %w", err)
	case status == http.StatusUnauthorized || status == http.StatusNotFound || status == http.StatusMethodNotAllowed:
		return 0, true, nil
	case status < 200 || status > 299:
		return 0, false, fmt.Errorf("GET /balance/info: status %d", status)
	}
	var doc struct {
		Balance json.RawMessage `json:"balance"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return 0, false, fmt.Errorf("GET /balance/info: %w", err)
	}
	v, ok := listedNumber(doc.Balance, math.MaxInt64/2)
	if !ok {
		return 0, false, errors.New("GET /balance/info: no usable balance")
	}
	return int64(math.Round(v)), false, nil
}

// refresh reads one provider's listing and balance and applies what they
// say; a changed listing rebuilds the routing table.
func (rt *Router) refresh(ctx context.Context, client *http.Client, p *provider, log *slog.Logger) {
	now := time.Now()
	l, bad, err := rt.readListing(ctx, client, p, now)
	if ctx.Err() != nil {
		return // shutting down: not a failure of the provider
	}
	if p.applyListing(l, bad, err, now, log) {
		rt.rebuild()
	}
	if p.authHeader == "" {
		return
	}
	p.market.mu.Lock()
	noAPI := p.market.noBalanceAPI
	p.market.mu.Unlock()
	if noAPI {
		return
	}
	msat, noAPI, err := rt.readBalance(ctx, client, p)
	if ctx.Err() == nil {
		p.applyBalance(msat, noAPI, err, time.Now(), rt.market.LowBalanceSats, log)
	}
}

// applyListing records the outcome of a listing read and reports whether
// the provider's models or prices changed. A failure keeps the last good
// listing; the log says when listings start failing and when they recover,
// not at every poll.
func (p *provider) applyListing(l *listing, bad []string, err error, now time.Time, log *slog.Logger) bool {
	m := &p.market
	m.mu.Lock()
	defer m.mu.Unlock()
	if err != nil {
		if m.listErr == "" {
			log.Warn("provider listing failing", "provider", p.Name, "err", err)
		}
		m.listErr, m.listErrAt = err.Error(), now
		return false
	}
	if m.listErr != "" {
		log.Info("provider listing recovered", "provider", p.Name, "models", len(l.models))
		m.listErr = ""
	}
	if b := strings.Join(bad, ", "); b != m.badFields {
		m.badFields = b
		if b != "" {
			log.Warn("provider listing has unusable prices; configured prices kept for them",
				"provider", p.Name, "fields", len(bad), "first", bad[0])
		}
	}
	old := m.listing.Swap(l)
	changed := old == nil || !slices.Equal(old.models, l.models) || !maps.Equal(old.prices, l.prices)
	if changed {
		var since time.Time // before the first listing, every quote was the config's
		if old != nil {
			since = old.at
		}
		p.requoteLocked(l, since)
	}
	return changed
}

// applyBalance records the outcome of a balance read. A failure keeps the
// last known balance. The low-balance warning is logged when the balance
// falls below the threshold, and again only after it has been above.
func (p *provider) applyBalance(msat int64, noAPI bool, err error, now time.Time, lowSats float64, log *slog.Logger) {
	m := &p.market
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case noAPI:
		m.noBalanceAPI = true
		log.Info("provider has no balance API; not asked again", "provider", p.Name)
		return
	case err != nil:
		log.Debug("provider balance not read", "provider", p.Name, "err", err)
		return
	}
	m.balance.Store(msat)
	m.balanceAt = now
	if lowSats <= 0 {
		return
	}
	low := msat < int64(math.Round(lowSats*1000))
	if low && !m.lowWarned {
		log.Warn("provider balance low", "provider", p.Name, "balance_sats", msatToSats(msat), "low_balance_sats", lowSats)
	}
	m.lowWarned = low
}

// paymentRequired is what the proxy calls when a provider answered 402: its
// known balance becomes 0 until the next successful read, so routing skips
// it for every request that costs anything.
func (p *provider) paymentRequired(now time.Time) {
	p.market.mu.Lock()
	defer p.market.mu.Unlock()
	if !p.Discover || p.APIKey == "" || p.market.noBalanceAPI {
		// Its balance is never read again, so a 0 would stand for ever;
		// the circuit breaker counts the 402 as a failure instead.
		return
	}
	p.market.balance.Store(0)
	p.market.balanceAt = now
}

// StartMarket reads the first listings and balances of all discovering
// providers concurrently and returns when they are all read, or after 5 s
// at most, so that a hanging provider does not delay the start. Each
// provider is then read again on its own timer, every market.refresh_secs
// with ±10% jitter, in the background, until ctx is done; requests never
// wait for a listing. WaitMarket waits for those goroutines to end.
func (rt *Router) StartMarket(ctx context.Context, client *http.Client, log *slog.Logger) {
	if len(rt.discovering) == 0 {
		return
	}
	var first sync.WaitGroup
	for _, p := range rt.discovering {
		first.Add(1)
		rt.marketWG.Go(func() {
			rt.refresh(ctx, client, p, log)
			first.Done()
			rt.poll(ctx, client, p, log)
		})
	}
	ready := make(chan struct{})
	go func() { first.Wait(); close(ready) }()
	wait := time.NewTimer(rt.startWait)
	defer wait.Stop()
	select {
	case <-ready:
	case <-wait.C:
		log.Warn("some provider listings not read yet; serving meanwhile", "waited", rt.startWait)
	case <-ctx.Done():
	}
}

// WaitMarket returns when the polling goroutines of StartMarket have ended,
// after its ctx is done.
func (rt *Router) WaitMarket() { rt.marketWG.Wait() }

// poll reads a provider again every refresh interval, with ±10% jitter so
// that providers are not all read at the same instant, until ctx is done.
func (rt *Router) poll(ctx context.Context, client *http.Client, p *provider, log *slog.Logger) {
	every := float64(max(rt.market.RefreshSecs, 10)) * float64(time.Second)
	next := func() time.Duration { return time.Duration(every * (0.9 + 0.2*rand.Float64())) }
	t := time.NewTimer(next())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			rt.refresh(ctx, client, p, log)
			t.Reset(next())
		}
	}
}

// recordChargeOf learns from one reported charge.
func (p *provider) recordChargeOf(s chargeSample) {
	if s.reported < 0 || s.quoted <= 0 {
		return // nothing to learn from a free request
	}
	m := &p.market
	m.mu.Lock()
	defer m.mu.Unlock()
	m.charges[m.nCharges%chargeWindow] = s
	m.nCharges++
	p.learnRatioLocked()
}

// learnRatioLocked sets the charge ratio from the samples; m.mu is held.
func (p *provider) learnRatioLocked() {
	m := &p.market
	if m.nCharges < chargeMinReports {
		return
	}
	n := min(m.nCharges, chargeWindow)
	var sum float64
	for _, s := range m.charges[:n] {
		sum += float64(s.reported) / float64(s.quoted)
	}
	m.ratio.Store(math.Float64bits(sum / float64(n)))
}

// requoteLocked quotes again, at a new listing's prices, the charge
// samples reported since the listing before it was read (since), keeping
// for each the quote its charge is nearer to. A provider bills at its price
// of the moment, which may have moved since arbstr last read its listing:
// a charge that matches the new price was no overcharge, and should not
// keep the provider ranked as one once nothing corrects it. m.mu is held.
func (p *provider) requoteLocked(l *listing, since time.Time) {
	m := &p.market
	for i := range min(m.nCharges, chargeWindow) {
		s := &m.charges[i]
		if s.model == "" || s.at.Before(since) {
			continue
		}
		pr, _, _ := p.priceAt(s.model, l)
		q := pr.cost(s.in, s.out)
		if q > 0 && math.Abs(float64(s.reported)/float64(q)-1) < math.Abs(float64(s.reported)/float64(s.quoted)-1) {
			s.quoted = q
		}
	}
	p.learnRatioLocked()
}

// chargeRatio is the provider's charge ratio, read without a lock on the
// routing path.
func (p *provider) chargeRatio() float64 { return math.Float64frombits(p.market.ratio.Load()) }

// reportedUsage is what a usage object may say of the charge: Routstr's
// usage.cost.total_msats, or usage.cost_sats.
type reportedUsage struct {
	Cost     json.RawMessage `json:"cost"`
	CostSats json.RawMessage `json:"cost_sats"`
}

// charge returns the charge a provider reported, in msat: the first of
// usage.cost.total_msats, the X-Routstr-Cost-Msats header, and
// usage.cost_sats.
func (u reportedUsage) charge(header http.Header) (msat int64, ok bool) {
	if len(u.Cost) > 0 && u.Cost[0] == '{' {
		var cost struct {
			TotalMsats json.RawMessage `json:"total_msats"`
		}
		if json.Unmarshal(u.Cost, &cost) == nil {
			if v, ok := reportedNumber(cost.TotalMsats, 0); ok {
				return v, true
			}
		}
	}
	if h := strings.TrimSpace(header.Get("X-Routstr-Cost-Msats")); h != "" {
		if v, ok := reportedNumber(json.RawMessage(h), 0); ok {
			return v, true
		}
	}
	return reportedNumber(u.CostSats, 3)
}

// maxReportedMsat bounds a reported cost: more than all bitcoin is garbage.
const maxReportedMsat = 2.1e18

// reportedNumber reads a JSON number, times 10^shift, rounded to an
// integer. The shift is done on the decimal text, so that 0.0015 sats is
// exactly 1.5 msat before rounding.
func reportedNumber(raw json.RawMessage, shift int) (int64, bool) {
	var n json.Number
	if !isJSONNumber(raw) || json.Unmarshal(raw, &n) != nil {
		return 0, false
	}
	mant, exp, _ := strings.Cut(strings.ToLower(n.String()), "e")
	e := 0
	if exp != "" {
		var err error
		if e, err = strconv.Atoi(exp); err != nil || e < -400 || e > 400 {
			return 0, false
		}
	}
	v, err := strconv.ParseFloat(mant+"e"+strconv.Itoa(e+shift), 64)
	if err != nil || math.IsNaN(v) || v < 0 || v > maxReportedMsat {
		return 0, false
	}
	return int64(math.Round(v)), true
}

// marketView is the live market as GET /v1/market shows it: every model,
// sorted by id, with the providers serving it, cheapest first.
type marketView struct {
	RateUnit string        `json:"rate_unit"`
	Models   []marketModel `json:"models"`
}

// marketModel is one model's offers. SpreadPct is how much the priciest
// reference request costs above the cheapest, in percent of the cheapest.
type marketModel struct {
	ID        string        `json:"id"`
	SpreadPct float64       `json:"spread_pct"`
	Providers []marketOffer `json:"providers"`
}

// marketOffer is one provider's price for a model. Rates are in the
// config's rate unit; the reference cost is that of 1,000 input and 1,000
// output tokens.
type marketOffer struct {
	Provider          string   `json:"provider"`
	InputRate         float64  `json:"input_rate"`
	OutputRate        float64  `json:"output_rate"`
	RequestFeeSats    float64  `json:"request_fee_sats"`
	ReferenceCostSats float64  `json:"reference_cost_sats"`
	Source            string   `json:"source"` // "live" or "config"
	AgeSecs           *int64   `json:"age_secs,omitempty"`
	Stale             bool     `json:"stale"`
	Circuit           string   `json:"circuit"`
	ChargeRatio       float64  `json:"charge_ratio"`
	BalanceSats       *float64 `json:"balance_sats,omitempty"`
	refMsat           int64
}

// Market returns the live market at now.
func (rt *Router) Market(now time.Time) marketView {
	t := rt.table.Load()
	v := marketView{RateUnit: rt.rateUnit, Models: make([]marketModel, 0, len(t.byModel))}
	for id, cands := range t.byModel {
		if len(cands) == 0 {
			continue
		}
		mm := marketModel{ID: id, Providers: make([]marketOffer, 0, len(cands))}
		for _, mc := range cands {
			mm.Providers = append(mm.Providers, rt.offer(mc, now))
		}
		slices.SortStableFunc(mm.Providers, func(a, b marketOffer) int {
			return cmp.Or(cmp.Compare(a.refMsat, b.refMsat), strings.Compare(a.Provider, b.Provider))
		})
		lo, hi := mm.Providers[0].refMsat, mm.Providers[len(mm.Providers)-1].refMsat
		if lo > 0 {
			mm.SpreadPct = math.Round(float64(hi-lo)/float64(lo)*10000) / 100
		}
		v.Models = append(v.Models, mm)
	}
	slices.SortFunc(v.Models, func(a, b marketModel) int { return strings.Compare(a.ID, b.ID) })
	return v
}

// offer describes one provider's price for a model, for the market view.
func (rt *Router) offer(mc modelCand, now time.Time) marketOffer {
	ref := mc.price.cost(1000, 1000)
	o := marketOffer{
		Provider: mc.p.Name, InputRate: rt.displayRate(mc.price.InMicro),
		OutputRate: rt.displayRate(mc.price.OutMicro), RequestFeeSats: msatToSats(mc.price.BaseMsat),
		ReferenceCostSats: msatToSats(ref), Source: "config", Circuit: mc.p.state(now),
		ChargeRatio: mc.p.chargeRatio(), refMsat: ref,
	}
	if l := mc.p.market.listing.Load(); mc.live && l != nil {
		age := int64(now.Sub(l.at) / time.Second)
		o.Source, o.AgeSecs, o.Stale = "live", &age, rt.stale(l, now)
	}
	if b := mc.p.market.balance.Load(); b >= 0 {
		sats := msatToSats(b)
		o.BalanceSats = &sats
	}
	return o
}

// stale reports whether a listing is older than market.stale_after_secs.
// A stale listing's prices stay in force: an old market price is still
// nearer the truth than a typed one.
func (rt *Router) stale(l *listing, now time.Time) bool {
	return rt.market.StaleAfterSecs > 0 && now.Sub(l.at) > time.Duration(rt.market.StaleAfterSecs)*time.Second
}

// providerMarket is what GET /providers shows of a provider's part in the
// live market.
type providerMarket struct {
	// ModelsServed are the models it serves now; AnyModel is true (and
	// ModelsServed empty) when it serves any model.
	ModelsServed []string `json:"models_served"`
	AnyModel     bool     `json:"any_model"`
	// ServesNothing says why a provider serves no model, "" otherwise.
	ServesNothing string   `json:"serves_nothing,omitempty"`
	Discover      bool     `json:"discover"`
	PriceSource   string   `json:"price_source"` // "live" or "config"
	ListingAge    *int64   `json:"listing_age_secs,omitempty"`
	ListingStale  bool     `json:"listing_stale"`
	ListingError  string   `json:"listing_error,omitempty"`
	ListingErrAt  *string  `json:"listing_error_at,omitempty"` // RFC 3339, UTC
	BalanceSats   *float64 `json:"balance_sats,omitempty"`
	BalanceAge    *int64   `json:"balance_age_secs,omitempty"`
	ChargeRatio   float64  `json:"charge_ratio"`
	RateUnit      string   `json:"rate_unit"`
}

// ProviderMarket returns the live-market part of every provider, in config
// order, as GET /providers shows it.
func (rt *Router) ProviderMarket(now time.Time) []providerMarket {
	t := rt.table.Load()
	out := make([]providerMarket, len(rt.providers))
	for i, p := range rt.providers {
		pm := providerMarket{
			ModelsServed: slices.Clone(t.served[i]), AnyModel: t.anyServed[i], Discover: p.Discover,
			PriceSource: "config", ChargeRatio: p.chargeRatio(), RateUnit: rt.rateUnit,
		}
		if pm.ModelsServed == nil {
			pm.ModelsServed = []string{}
		}
		l := p.market.listing.Load()
		if !p.Discover {
			l = nil
		}
		if l != nil {
			age := int64(now.Sub(l.at) / time.Second)
			pm.PriceSource, pm.ListingAge, pm.ListingStale = "live", &age, rt.stale(l, now)
		}
		m := &p.market
		m.mu.Lock()
		if m.listErr != "" {
			at := m.listErrAt.UTC().Format(time.RFC3339)
			pm.ListingError, pm.ListingErrAt = m.listErr, &at
		}
		if b := m.balance.Load(); b >= 0 {
			sats, age := msatToSats(b), int64(now.Sub(m.balanceAt)/time.Second)
			pm.BalanceSats, pm.BalanceAge = &sats, &age
		}
		m.mu.Unlock()
		switch {
		case len(pm.ModelsServed) > 0 || pm.AnyModel:
		case l != nil:
			pm.ServesNothing = "its listing has no enabled model"
		case p.Discover:
			pm.ServesNothing = "its listing has not been read yet and no models are configured"
		}
		out[i] = pm
	}
	return out
}

// ---- Spend control: clients, rate limits and budgets ----

// client is one app or agent with its own token (server.auth_token's
// holder is no client). Its requests are its own in the ledger, limited to
// its policies, its rate and its budgets.
type client struct {
	ClientConfig
	tokenHash [32]byte
	allowed   map[string]bool // the policies it may use; nil: any
	limiter   *rateLimiter    // nil: no rate limit
	budgets   []*budget
}

// limit confines a request to the client's policies: a named one it may
// not use is a 403, keyword matching skips the others, and with no keyword
// match the request runs under the client's first policy. A nil client
// (the operator) is not confined.
func (c *client) limit(req *chatRequest, header string) *apiError {
	if c == nil || c.allowed == nil {
		return nil
	}
	if header != "" && !c.allowed[header] {
		return apiErrorf(http.StatusForbidden, "permission_error", "policy_not_allowed",
			"client %q may not use policy %q; its policies: %s", c.Name, header, strings.Join(c.Policies, ", "))
	}
	req.Policies, req.FallbackPolicy = c.allowed, c.Policies[0]
	return nil
}

// rateLimiter is a token bucket: it holds up to rate_limit_rpm requests and
// refills at rate_limit_rpm per minute, so a client may burst its whole
// minute at once and then goes at the steady rate.
type rateLimiter struct {
	mu       sync.Mutex // guards tokens and last
	capacity float64
	perSec   float64
	tokens   float64
	last     time.Time
}

func newRateLimiter(rpm int, now time.Time) *rateLimiter {
	return &rateLimiter{capacity: float64(rpm), perSec: float64(rpm) / 60, tokens: float64(rpm), last: now}
}

// allow takes a token, or says how long until there is one.
func (l *rateLimiter) allow(now time.Time) (ok bool, wait time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if elapsed := now.Sub(l.last).Seconds(); elapsed > 0 {
		l.tokens = min(l.capacity, l.tokens+elapsed*l.perSec)
		l.last = now
	}
	if l.tokens >= 1 {
		l.tokens--
		return true, 0
	}
	return false, time.Duration((1 - l.tokens) / l.perSec * float64(time.Second))
}

// Budget periods: UTC calendar days and months.
const (
	periodDay   = "day"
	periodMonth = "month"
)

// periodBounds returns the start and end of the period holding t.
func periodBounds(period string, t time.Time) (start, end time.Time) {
	t = t.UTC()
	if period == periodDay {
		start = time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, time.UTC)
		return start, start.AddDate(0, 0, 1)
	}
	start = time.Date(t.Year(), t.Month(), 1, 0, 0, 0, 0, time.UTC)
	return start, start.AddDate(0, 1, 0)
}

// budget is a limit on what a client or a policy spends in a day or a
// month. Spent is what the ledger recorded in the current period; reserved
// is the worst case of the requests in flight, so that concurrent requests
// can never together overspend it.
type budget struct {
	scope, name, period string // scope: "client" or "policy"
	limit               int64  // millisats
	start               time.Time
	spent, reserved     int64 // millisats, in the period that began at start
}

// roll starts a new period when now is past the current one.
func (b *budget) roll(now time.Time) {
	if start, _ := periodBounds(b.period, now); !start.Equal(b.start) {
		b.start, b.spent, b.reserved = start, 0, 0
	}
}

// spendControl holds the clients and every budget. One mutex guards all
// budgets, so that a request reserves in all its budgets at once or in none;
// only requests under a budget take it.
type spendControl struct {
	clients []*client
	budgets []*budget
	byName  map[string]*budget // "client/NAME/day" and the like

	// mu guards the limit, spent, reserved and start of every budget. It
	// is shared with the spend controls that reloads put in its place.
	mu *sync.Mutex
}

func budgetKey(scope, name, period string) string { return scope + "/" + name + "/" + period }

// budget returns the budget of a key; nil on a nil spend control.
func (sc *spendControl) budget(key string) *budget {
	if sc == nil {
		return nil
	}
	return sc.byName[key]
}

// limiter returns a client's rate limiter, with the new rate, when the
// client had one of the same rate; nil otherwise.
func (sc *spendControl) limiter(name string, rpm int) *rateLimiter {
	if sc == nil {
		return nil
	}
	for _, c := range sc.clients {
		if c.Name == name && c.limiter != nil && c.RateLimitRPM == rpm {
			return c.limiter
		}
	}
	return nil
}

// newSpendControl builds the clients and budgets of cfg. old is the spend
// control a reload replaces, or nil: a budget that keeps its scope, name
// and period is the same budget, with what it spent and what requests in
// flight reserved, under its new limit, and a client that keeps its name
// keeps its rate limiter's bucket.
func newSpendControl(cfg *Config, now time.Time, old *spendControl) *spendControl {
	sc := &spendControl{byName: make(map[string]*budget), mu: new(sync.Mutex)}
	if old != nil {
		sc.mu = old.mu // one lock over old and new budgets: reservations in flight settle into both
	}
	add := func(scope, name string, day, month float64) []*budget {
		var list []*budget
		for _, l := range []struct {
			period string
			sats   float64
		}{{periodDay, day}, {periodMonth, month}} {
			if l.sats <= 0 {
				continue
			}
			limit := int64(math.Round(l.sats * 1000))
			b := old.budget(budgetKey(scope, name, l.period))
			if b != nil {
				sc.mu.Lock()
				b.limit = limit
				sc.mu.Unlock()
			} else {
				b = &budget{scope: scope, name: name, period: l.period, limit: limit}
				b.start, _ = periodBounds(l.period, now)
			}
			sc.budgets = append(sc.budgets, b)
			sc.byName[budgetKey(scope, name, l.period)] = b
			list = append(list, b)
		}
		return list
	}
	for _, cc := range cfg.Clients {
		c := &client{ClientConfig: cc, tokenHash: sha256.Sum256([]byte(cc.Token))}
		if len(cc.Policies) > 0 {
			c.allowed = make(map[string]bool)
			for _, p := range cc.Policies {
				c.allowed[p] = true
			}
		}
		if cc.RateLimitRPM > 0 {
			c.limiter = old.limiter(cc.Name, cc.RateLimitRPM)
			if c.limiter == nil {
				c.limiter = newRateLimiter(cc.RateLimitRPM, now)
			}
		}
		c.budgets = add("client", cc.Name, cc.BudgetSatsPerDay, cc.BudgetSatsPerMonth)
		sc.clients = append(sc.clients, c)
	}
	for _, r := range cfg.Policies.Rules {
		add("policy", r.Name, r.BudgetSatsPerDay, r.BudgetSatsPerMonth)
	}
	return sc
}

// clientFor returns the client whose token has the SHA-256 hash h,
// comparing against every client's in constant time, so that neither a
// token nor which client holds it can be learned from timing.
func (sc *spendControl) clientFor(h [32]byte) *client {
	var found *client
	for _, c := range sc.clients {
		if subtle.ConstantTimeCompare(h[:], c.tokenHash[:]) == 1 {
			found = c
		}
	}
	return found
}

// budgetsFor lists the budgets a request falls under: its client's and its
// policy's.
func (sc *spendControl) budgetsFor(c *client, policy string) []*budget {
	var list []*budget
	if c != nil {
		list = append(list, c.budgets...)
	}
	if policy != "" {
		for _, period := range []string{periodDay, periodMonth} {
			if b := sc.byName[budgetKey("policy", policy, period)]; b != nil {
				list = append(list, b)
			}
		}
	}
	return list
}

// reservation is what a request holds in its budgets while it runs.
type reservation struct {
	sc      *spendControl
	budgets []*budget
	starts  []time.Time // the period each was reserved in
	msat    int64
}

// reserve takes worst, the most the request can cost, from every budget in
// list, or refuses the request with the first budget it would overspend.
func (sc *spendControl) reserve(list []*budget, worst int64, now time.Time) (*reservation, *apiError) {
	if len(list) == 0 {
		return nil, nil
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	for _, b := range list {
		b.roll(now)
		if b.spent+b.reserved+worst > b.limit {
			_, end := periodBounds(b.period, now)
			return nil, budgetExceeded(b, worst, end.Sub(now))
		}
	}
	res := &reservation{sc: sc, budgets: list, msat: worst}
	for _, b := range list {
		b.reserved += worst
		res.starts = append(res.starts, b.start)
	}
	return res, nil
}

func budgetExceeded(b *budget, worst int64, untilReset time.Duration) *apiError {
	adjective := "monthly"
	if b.period == periodDay {
		adjective = "daily"
	}
	e := apiErrorf(http.StatusTooManyRequests, "insufficient_quota", "budget_exceeded",
		"the %s budget of %s %q is spent: %g of %g sats this %s, %g sats reserved by requests in flight, and this request may cost up to %g sats",
		adjective, b.scope, b.name, msatToSats(b.spent), msatToSats(b.limit), b.period,
		msatToSats(b.reserved), msatToSats(worst))
	e.retryAfter = untilReset
	return e
}

// settle replaces the reservation by what the request cost (0 for one that
// failed), in each budget whose period has not ended meanwhile.
func (r *reservation) settle(costMsat int64) {
	if r == nil {
		return
	}
	r.sc.mu.Lock()
	defer r.sc.mu.Unlock()
	for i, b := range r.budgets {
		if b.start.Equal(r.starts[i]) {
			b.reserved -= r.msat
			b.spent += costMsat
		}
	}
}

// budgetView is a budget as GET /v1/budgets shows it.
type budgetView struct {
	Scope     string  `json:"scope"`
	Name      string  `json:"name"`
	Period    string  `json:"period"`
	Limit     float64 `json:"limit_sats"`
	Spent     float64 `json:"spent_sats"`
	Reserved  float64 `json:"reserved_sats"`
	Remaining float64 `json:"remaining_sats"`
	ResetsAt  string  `json:"resets_at"`
}

// view returns the budgets that show selects, as they stand at now.
func (sc *spendControl) view(now time.Time, show func(*budget) bool) []budgetView {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	list := []budgetView{}
	for _, b := range sc.budgets {
		if !show(b) {
			continue
		}
		b.roll(now)
		_, end := periodBounds(b.period, now)
		list = append(list, budgetView{
			Scope: b.scope, Name: b.name, Period: b.period,
			Limit: msatToSats(b.limit), Spent: msatToSats(b.spent), Reserved: msatToSats(b.reserved),
			Remaining: msatToSats(max(b.limit-b.spent-b.reserved, 0)), ResetsAt: end.Format(time.RFC3339),
		})
	}
	return list
}

// restore sets what the budgets that only selects have spent in their
// current period, as the ledger recorded it, so that neither a restart nor
// a reload that adds a budget starts it at 0. spent returns the millisats
// recorded since a time, by "client/NAME" and "policy/NAME".
func (sc *spendControl) restore(now time.Time, spent func(since time.Time) (map[string]int64, error), only func(*budget) bool) error {
	if !slices.ContainsFunc(sc.budgets, only) {
		return nil
	}
	for _, period := range []string{periodDay, periodMonth} {
		start, _ := periodBounds(period, now)
		sums, err := spent(start)
		if err != nil {
			return err
		}
		sc.mu.Lock()
		for _, b := range sc.budgets {
			if b.period == period && only(b) {
				b.roll(now)
				b.spent = sums[b.scope+"/"+b.name]
			}
		}
		sc.mu.Unlock()
	}
	return nil
}
