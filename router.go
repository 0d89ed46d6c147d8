package main

import (
	"cmp"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"
)

// This file decides where a request goes (SPEC §4): the policy, the
// candidates, their order, and what they are estimated to cost. It also keeps
// each provider's health, the circuit breaker of §6.3 and the observed
// latency, because routing is what reads them.

// chatRequest is what routing needs to know of a chat body. proxy.go decodes
// it; the body itself is forwarded untouched.
type chatRequest struct {
	Model     string
	Stream    bool
	MaxTokens int64  // max_tokens or max_completion_tokens; 0 when absent
	TextBytes int64  // UTF-8 bytes of all message text (§4.1)
	LastUser  string // text of the last user message, for keywords (§4)
	// StreamOptions is the body's stream_options as sent, for §5.1.
	StreamOptions json.RawMessage
	// NoOutput: the answer has no output tokens (embeddings).
	NoOutput bool
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

// cost returns the cost in millisats of a request with these token counts
// (§4.1), rounded to the nearest millisat.
func (p price) cost(in, out int64) int64 {
	return (in*p.InMicro+out*p.OutMicro+500)/1000 + p.BaseMsat
}

// msatToSats reports millisats as sats, the unit users see.
func msatToSats(msat int64) float64 { return float64(msat) / 1000 }

// provider is one configured upstream and what arbstr has learned about it.
type provider struct {
	ProviderConfig
	endpoint   string // the full chat-completions URL (§5.1)
	authHeader string // "Bearer KEY", or "" for none
	bodyField  []byte // `"arbstr_provider":"NAME",`, spliced into answers (§5.2)
	price      price
	modelPrice map[string]price // model_rates, resolved

	mu        sync.Mutex // guards the fields below
	failures  int        // consecutive failures (§6.3)
	openUntil time.Time  // zero while the circuit is closed
	openFor   time.Duration
	probing   bool // a half-open probe is in flight

	// tripped mirrors !openUntil.IsZero(), so that routing reads a closed
	// circuit, the usual case, without taking mu.
	tripped atomic.Bool
	// latency is the moving average of time to first byte in ms, as
	// math.Float64bits; 0 until the first observation.
	latency atomic.Uint64
}

// Circuit states as they appear in /health and /providers.
const (
	stateClosed   = "closed"
	stateOpen     = "open"
	stateHalfOpen = "half_open"
)

// The breaker's constants (§6.3).
const (
	breakerThreshold = 3
	breakerOpenFor   = 30 * time.Second
	breakerMaxOpen   = 5 * time.Minute
)

func newProvider(pc ProviderConfig) *provider {
	p := &provider{ProviderConfig: pc, endpoint: chatURL(pc.URL)}
	name, _ := json.Marshal(pc.Name)
	p.bodyField = fmt.Appendf(nil, `"arbstr_provider":%s,`, name)
	if pc.APIKey != "" {
		p.authHeader = "Bearer " + pc.APIKey
	}
	p.price = price{microRate(pc.InputRate), microRate(pc.OutputRate), microRate(pc.BaseFee)}
	if len(pc.ModelRates) > 0 {
		p.modelPrice = make(map[string]price, len(pc.ModelRates))
		for m, r := range pc.ModelRates {
			p.modelPrice[m] = price{microRate(r.InputRate), microRate(r.OutputRate), p.price.BaseMsat}
		}
	}
	return p
}

// chatURL builds the upstream URL of §5.1: a base ending in /v1 gets
// /chat/completions, any other base gets /v1/chat/completions.
func chatURL(base string) string {
	base = strings.TrimRight(base, "/")
	if strings.HasSuffix(base, "/v1") {
		return base + "/chat/completions"
	}
	return base + "/v1/chat/completions"
}

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
// closed, or half-open with the probe slot free (§4 step 5).
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
// other requests skip the provider meanwhile, they never wait (§6.3). A
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
	outcomeFailure         // a §6.1 failure
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
// lowest_latency orders by (§4 step 6). Concurrent observations may race
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
	maxOut  int64 // max_sats_per_1k_output in µsat per token; -1 for none
	rr      atomic.Uint64
}

// Strategies (§3). lowest_cost is folded into cheapest by the config loader.
const (
	strategyCheapest      = "cheapest"
	strategyLowestLatency = "lowest_latency"
	strategyRoundRobin    = "round_robin"
)

// Router holds the providers and policies and picks, per request, the order
// in which providers are tried. Everything a request can share is computed
// once here, so that routing over a thousand providers stays in the tens of
// microseconds (issue 5).
type Router struct {
	providers []*provider
	byName    map[string]*provider
	// byModel lists, per model, the providers that serve it, those with an
	// empty models list included, in config order and with their price for
	// the model; anyModel is the list for a model no provider names.
	byModel  map[string][]modelCand
	anyModel []modelCand

	policies     []*policy
	policyByName map[string]*policy
	policyNames  string // for the unknown-policy error
	// wordRule maps a keyword that is one word to the first rule having it;
	// phrases are the other keywords ("unit test", "c++"), in rule order.
	wordRule        map[string]int
	phrases         []phrase
	defaultStrategy string
	defaultRR       atomic.Uint64
	// ratio returns the learned output/input ratio of a policy and its
	// sample count (§4.1); nil means no ledger.
	ratio func(policy string) (float64, int64)
}

// modelCand is a provider that serves a model, at its price for the model.
type modelCand struct {
	p     *provider
	price price
}

// phrase is a keyword that is not a single word, and its rule's index.
type phrase struct {
	text string
	rule int
}

func newRouter(cfg *Config, ratio func(string) (float64, int64)) *Router {
	rt := &Router{
		byName:          make(map[string]*provider),
		byModel:         make(map[string][]modelCand),
		policyByName:    make(map[string]*policy),
		wordRule:        make(map[string]int),
		defaultStrategy: cfg.Policies.DefaultStrategy,
		ratio:           ratio,
	}
	for _, pc := range cfg.Providers {
		p := newProvider(pc)
		rt.providers = append(rt.providers, p)
		rt.byName[p.Name] = p
		if len(pc.Models) == 0 {
			rt.anyModel = append(rt.anyModel, modelCand{p, p.price})
		}
	}
	// Every model named anywhere gets its own list: listed by a provider,
	// or priced by a provider's model_rates (one serving any model).
	models := map[string]bool{}
	for _, p := range rt.providers {
		for _, m := range p.Models {
			models[m] = true
		}
		for m := range p.ModelRates {
			models[m] = true
		}
	}
	for m := range models {
		var list []modelCand
		for _, p := range rt.providers {
			if len(p.Models) == 0 || slices.Contains(p.Models, m) {
				list = append(list, modelCand{p, p.priceFor(m)})
			}
		}
		rt.byModel[m] = list
	}
	var names []string
	for i, r := range cfg.Policies.Rules {
		pol := &policy{PolicyRule: r, maxOut: -1}
		for _, k := range r.Keywords {
			k = foldCase(strings.TrimSpace(k))
			switch {
			case k == "":
			case isOneWord(k):
				if _, ok := rt.wordRule[k]; !ok {
					rt.wordRule[k] = i
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
		if r.MaxSatsPer1kOutput != nil {
			pol.maxOut = microRate(*r.MaxSatsPer1kOutput)
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
	estMsat int64
	latency float64 // observed latency in ms at routing time
	seen    bool    // latency is an observation
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

// policyName is the matched policy's name, "" for none.
func (r *route) policyName() string {
	if r.policy == nil {
		return ""
	}
	return r.policy.Name
}

// allows reports whether the policy's price cap lets a provider in (§4 step 4).
func (r *route) allows(pr price) bool {
	return r.policy == nil || r.policy.maxOut < 0 || pr.OutMicro <= r.policy.maxOut
}

// baseline returns what the given tokens would have cost at the priciest
// qualified candidate (§8.1 baseline_cost_sats); an open circuit does not
// disqualify.
func (r *route) baseline(in, out int64) int64 {
	var most int64
	for _, mc := range r.cands {
		if r.allows(mc.price) {
			most = max(most, mc.price.cost(in, out))
		}
	}
	return most
}

// Route applies SPEC §4 steps 2–6. policyHeader is X-Arbstr-Policy. With
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

	// Step 2: the policy, by header or by keyword.
	if policyHeader != "" {
		pol, ok := rt.policyByName[policyHeader]
		if !ok {
			return r, errorf(http.StatusBadRequest, "invalid_request_error", "unknown_policy",
				"unknown policy %q in X-Arbstr-Policy; configured policies: %s", policyHeader, rt.policyNames)
		}
		r.policy = pol
	} else {
		r.policy = rt.matchKeywords(req.LastUser)
	}
	if r.policy != nil {
		r.strategy = r.policy.Strategy
		if r.strategy == "" {
			r.strategy = strategyCheapest
		}
	}

	// §4.1: the estimate used for ranking and by /v1/cost.
	r.estIn = (req.TextBytes + 3) / 4
	r.estOut = req.MaxTokens
	if req.NoOutput {
		r.estOut = 0
	} else if r.estOut <= 0 {
		ratio := 1.0
		if rt.ratio != nil {
			if avg, n := rt.ratio(r.policyName()); n >= 5 {
				ratio = avg
			}
		}
		r.estOut = int64(math.Ceil(float64(r.estIn) * ratio))
	}
	// No model reads or writes 2^31 tokens; the bound keeps cost in int64.
	r.estIn, r.estOut = min(r.estIn, maxEstTokens), min(r.estOut, maxEstTokens)

	// Step 3: candidates serving the model.
	r.cands = rt.byModel[req.Model]
	if r.cands == nil {
		r.cands = rt.anyModel
	}
	if len(r.cands) == 0 {
		return r, errorf(http.StatusBadRequest, "invalid_request_error", "no_provider",
			"no provider serves model %q", req.Model)
	}

	// Step 4: the policy's constraints; step 5: open circuits set aside;
	// step 6: the strategy's order, kept as the candidates come.
	if r.policy != nil && r.policy.allowed != nil && !r.policy.allowed[req.Model] {
		return r, errorf(http.StatusBadRequest, "invalid_request_error", "model_not_allowed",
			"model %q is not allowed by policy %q", req.Model, r.policy.Name)
	}
	compare := compareCheapest
	switch r.strategy {
	case strategyLowestLatency:
		compare = compareLatency
	case strategyRoundRobin:
		compare = nil // config order, rotated below
	}
	qualified := 0
	for _, mc := range r.cands {
		if !r.allows(mc.price) {
			if explain {
				r.excluded = append(r.excluded, exclusion{mc.p.Name, fmt.Sprintf(
					"output rate %g sats/1k exceeds the policy's max_sats_per_1k_output %g",
					float64(mc.price.OutMicro)/1000, float64(r.policy.maxOut)/1000)})
			}
			continue
		}
		qualified++
		c := candidate{p: mc.p, price: mc.price, estMsat: mc.price.cost(r.estIn, r.estOut)}
		if !mc.p.available(now) {
			if explain {
				r.excluded = append(r.excluded, exclusion{mc.p.Name, "circuit open"})
			}
			continue
		}
		c.latency, c.seen = mc.p.observedLatency()
		if limit > 0 && compare != nil {
			r.ordered = insertOrdered(r.ordered, c, compare, limit)
		} else {
			r.ordered = append(r.ordered, c)
		}
	}
	if qualified == 0 {
		return r, errorf(http.StatusBadRequest, "invalid_request_error", "no_provider",
			"no provider serves model %q within policy %q", req.Model, r.policy.Name)
	}
	if len(r.ordered) == 0 {
		return r, errorf(http.StatusServiceUnavailable, "service_unavailable", "no_provider_available",
			"every provider that serves model %q has an open circuit; retry later", req.Model)
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

// compareCheapest orders by estimated cost, then by lower observed latency
// (an unobserved provider counts as 0), then by name (§4 step 6).
func compareCheapest(a, b candidate) int {
	if a.estMsat != b.estMsat {
		return cmp.Compare(a.estMsat, b.estMsat)
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
	return cmp.Compare(a.estMsat, b.estMsat)
}

// matchKeywords returns the first rule, in config order, with a keyword in
// the text (§4 step 2): case-insensitive, on word boundaries. The text is
// cut into words once, each looked up among the one-word keywords; only
// keywords of several words, or with other characters, are searched for.
func (rt *Router) matchKeywords(text string) *policy {
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
		if rule, ok := rt.wordRule[lower[i:j]]; ok && rule < best {
			best = rule
		}
		i = j
	}
	for _, ph := range rt.phrases {
		if ph.rule >= best {
			break
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
