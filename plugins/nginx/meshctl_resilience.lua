-- meshctl resilience for nginx http outbounds: outlier detection (Consul's
-- PassiveHealthCheck), circuit breaking (Limits) and a retry budget, per
-- section (one caller's upstream block of one cluster, "<caller>.<cluster id>").
--
-- All state lives in the shared dict `meshctl_resilience`, so every worker
-- (and, for a moment after a reload, the previous generation's workers) sees
-- the same ejections, in-flight counts and budgets: a worker-local table would
-- let each of N workers send its own MaxFailures failures and its own
-- MaxConcurrentRequests requests.
--
-- Hooks (small on purpose; the router and balancer own the request path):
--   configure(sections)       router init: {section: {cluster, outlier, limit, budget}}
--   admit(section)            router, before ngx.exec: false -> answer 503 now
--   usable(section, key)      balancer: false while the peer is ejected
--   retry_allowed(section)    balancer, on a retry: false when the budget is spent
--   done()                    log phase of the action: release, record results
--
-- Outlier detection follows Envoy's consecutive_5xx detector (Consul configures
-- Envoy's outlier_detection from PassiveHealthCheck): a 5xx, a connect failure
-- or a timeout of an attempt counts as a failure of the peer it went to; a
-- success resets the count. At MaxFailures in a row the peer is ejected (with
-- EnforcingConsecutive5xx % probability) for BaseEjectionTime x the number of
-- its ejections (at most 300 s, Envoy's max_ejection_time; the number goes
-- down by one per Interval spent in rotation), unless that would eject more
-- than MaxEjectionPercent of the cluster's peers (one may always be ejected).
-- Unlike Envoy, a peer returns when its time is up, not at the next Interval
-- sweep, so an ejection never lasts up to one Interval longer than asked.
local _M = {}
local DICT = "meshctl_resilience"
local MAX_EJECTION = 300
-- seconds of history the retry budget looks at (Finagle's and Linkerd's ttl)
local BUDGET_WINDOW = 10
local sections = {}
-- inbound index -> its rate-limit path prefixes, longest first
local rates = {}

function _M.configure(conf)
    sections = conf or {}
end

-- init_by_lua: this generation's sections, base64 JSON (rendered by meshctl).
function _M.init(chunks)
    local raw = ngx.decode_base64(table.concat(chunks))
    local whole = raw and require("cjson.safe").decode(raw)
    if type(whole) ~= "table" or type(whole.sections) ~= "table" then
        error("meshctl resilience: the section document is not base64 JSON")
    end
    local doc = whole.sections
    rates = type(whole.rate) == "table" and whole.rate or {}
    for name, s in pairs(doc) do
        if type(name) ~= "string" or type(s) ~= "table" or type(s.cluster) ~= "string" then
            error("meshctl resilience: bad section " .. tostring(name))
        end
        -- Outlier state belongs to one PassiveHealthCheck: a changed one starts
        -- afresh, as Envoy's outlier detector does when its cluster is rebuilt.
        if s.outlier then
            s.okey = name .. "#" .. tostring(s.outlier.epoch)
        end
    end
    sections = doc
end

local function dict()
    return ngx.shared[DICT]
end

-- The peer key nginx writes in $upstream_addr ("198.18.0.1:21000", "[::1]:21000").
function _M.peer_key(address, port)
    if address:find(":", 1, true) then
        return "[" .. address .. "]:" .. port
    end
    return address .. ":" .. port
end

-- ---------------------------------------------------------------- circuit breaking

-- Access phase (router), once per request: take one of the section's in-flight
-- slots, or tell the caller to answer 503 at once. The slot is given back in
-- the log phase of the request (done), which nginx runs for every request,
-- also when the client goes away.
function _M.admit(section)
    local s = sections[section]
    if not s then
        return true
    end
    local d = dict()
    if s.budget then
        -- one request of the retry budget's window
        d:incr("rq:" .. section .. ":" .. math.floor(ngx.now()), 1, 0, BUDGET_WINDOW + 1)
    end
    if not s.limit then
        return true
    end
    local n = d:incr("bi:" .. section, 1, 0)
    if n and n > s.limit then
        d:incr("bi:" .. section, -1, 0)
        d:incr("bo:" .. section, 1, 0)
        return false, s.limit
    end
    ngx.var.meshctl_admitted = section
    return true
end

-- Access phase of an action: admit, or answer 503 naming the limit.
function _M.admit_or_refuse()
    local ok, limit = _M.admit(ngx.var.meshctl_section)
    if ok then
        return
    end
    -- meshctl_circuit_breaker_rejections_total, counted in the log phase.
    ngx.ctx.meshctl_overloaded = true
    ngx.status = 503
    ngx.header["X-Mesh-Reason"] = "upstream circuit open: " .. limit
        .. " requests in flight (Limits.MaxConcurrentRequests/MaxConnections)"
    ngx.header["x-envoy-overloaded"] = "true"
    ngx.header["Content-Type"] = "text/plain"
    ngx.say("meshctl: circuit open, too many requests in flight")
    return ngx.exit(503)
end

-- ---------------------------------------------------------------- rate limits

-- Rewrite phase of an inbound's `location /`: the key of the limit_req zone of
-- the longest rate-limit prefix the path matches ("1"); the other zones' keys
-- stay empty, and nginx does not count a request under an empty key. The
-- zones (limit_req: a leaky bucket with burst, in shared memory, so every
-- worker counts against one bucket) are in the config.
function _M.rate_key(index)
    local prefixes = rates[tostring(index)]
    if not prefixes then
        return
    end
    local uri = ngx.var.uri
    for j, prefix in ipairs(prefixes) do
        if uri:sub(1, #prefix) == prefix then
            ngx.var["meshctl_rl_" .. index .. "_" .. (j - 1)] = "1"
            return
        end
    end
end

-- ---------------------------------------------------------------- outlier detection

function _M.usable(section, key)
    local s = sections[section]
    if not s or not s.outlier then
        return true
    end
    local until_ = dict():get("oe:" .. s.okey .. "|" .. key)
    return until_ == nil or until_ <= ngx.now()
end

local function ejected_count(okey, peers, now)
    local d = dict()
    local n = 0
    for _, p in ipairs(peers) do
        local until_ = d:get("oe:" .. okey .. "|" .. _M.peer_key(p[1], p[2]))
        if until_ and until_ > now then
            n = n + 1
        end
    end
    return n
end

local function eject(section, s, key)
    local d = dict()
    local o = s.outlier
    local now = ngx.now()
    local id = s.okey .. "|" .. key
    d:set("of:" .. id, 0)
    if math.random(100) > (o.enforcing or 100) then
        return
    end
    local peers = require("meshctl_balancer").peers(s.cluster)
    local active = ejected_count(s.okey, peers, now)
    local total = #peers
    if total == 0 or (active > 0 and 100 * (active + 1) / total > (o.max_percent or 10)) then
        d:incr("oc:" .. section, 1, 0) -- ejections the cap prevented
        return
    end
    -- Envoy: the multiplier drops by one for each Interval spent in rotation.
    local times = d:get("on:" .. id) or 0
    local back = d:get("ou:" .. id)
    if back and times > 0 then
        times = math.max(0, times - math.floor((now - back) / (o.interval or 10)))
    end
    times = times + 1
    local base = o.base or 30
    local length = math.min(base * times, math.max(base, MAX_EJECTION))
    local until_ = now + length
    -- A worker that saw the same run of failures may get here too: eject once.
    if not d:add("ol:" .. id, true, 0.05) then
        return
    end
    d:set("oe:" .. id, until_, length + 1)
    d:set("on:" .. id, times)
    d:set("ou:" .. id, until_)
    d:incr("ox:" .. section, 1, 0)
    -- meshctl_outlier_ejections_total: counted by the metrics hook of this
    -- request's log phase (it runs after done() and knows the labels).
    ngx.ctx.meshctl_ejections = (ngx.ctx.meshctl_ejections or 0) + 1
    ngx.log(ngx.WARN, "meshctl: ejected ", key, " from ", section, " for ", length,
        " s (ejection ", times, ")")
end

local function record(section, s, key, failed)
    local d = dict()
    local id = "of:" .. s.okey .. "|" .. key
    if not failed then
        -- Only a write when there was a run to end: the healthy path reads.
        if (d:get(id) or 0) ~= 0 then
            d:set(id, 0)
        end
        return
    end
    local n = d:incr(id, 1, 0)
    if n and n >= s.outlier.failures then
        eject(section, s, key)
    end
end

-- ---------------------------------------------------------------- retry budget

-- Balancer, before a retry: retries within the window may be at most
-- percent % of the requests in it, plus min_per_second x window (the floor, so
-- that a quiet caller can still retry).
function _M.retry_allowed(section)
    local s = sections[section]
    if not s or not s.budget then
        return true
    end
    local d = dict()
    local now = math.floor(ngx.now())
    local requests, retries = 0, 0
    for t = now - BUDGET_WINDOW + 1, now do
        requests = requests + (d:get("rq:" .. section .. ":" .. t) or 0)
        retries = retries + (d:get("rr:" .. section .. ":" .. t) or 0)
    end
    local b = s.budget
    if retries >= requests * b.percent / 100 + b.min_per_second * BUDGET_WINDOW then
        d:incr("rx:" .. section, 1, 0)
        return false
    end
    d:incr("rr:" .. section .. ":" .. now, 1, 0, BUDGET_WINDOW + 1)
    return true
end

-- ---------------------------------------------------------------- balancing

-- Requests in flight to a peer ("address:port") from this sidecar, all workers.
function _M.inflight(key)
    return dict():get("lr:" .. key) or 0
end

function _M.inflight_add(key, delta)
    local v = dict():incr("lr:" .. key, delta, 0)
    if v and v < 0 then
        dict():set("lr:" .. key, 0)
    end
end

function _M.latency_aware(section)
    local s = sections[section]
    return s ~= nil and s.balancer == "peak_ewma"
end

-- Peak EWMA (Finagle's PeakEwma, Linkerd's tower peak_ewma): each peer's
-- estimate of its response time, pulled up at once by a slower answer and
-- moved towards a faster one with weight 1 - exp(-dt/TAU) (dt: since the
-- peer's previous answer); cost = estimate x (requests in flight + 1), over
-- every worker (the shared dict); the cheaper of two usable peers drawn at
-- random wins.
--
-- Unlike Finagle and tower, an estimate does not also decay towards zero
-- while its peer is not picked. There that decay is what brings a slow peer
-- back, after TAU x ln(its cost / the others' cost) (about 40 s for 50 ms
-- against 1 ms at their TAU of 10 s), and it makes the pick depend on how
-- long ago a peer was measured rather than on what it answered. Here a peer
-- that loses the comparisons gets one probe per PROBE_INTERVAL instead (one
-- over all workers): a slow peer costs the callers one slow answer per
-- interval, and a recovered one is measured again within one interval.
--
-- TAU is one second, not ten: at a few hundred requests a second a fast
-- peer's single hiccup (a GC pause, a busy core) otherwise holds its estimate
-- up for tens of seconds, during which the slow peer wins the comparisons.
local TAU = 1.0
local PROBE_INTERVAL = 1.0
-- An estimate this old (s) was made under other conditions: measure again.
local STALE = 30
-- nginx measures response times in milliseconds ("0.000": under one): a
-- floor keeps the in-flight factor of a sub-millisecond peer's cost.
local MIN_RTT = 0.0005
-- Finagle's penalty: a peer without an estimate that already has a request
-- in flight costs this much (s) per request, so that it is tried once, not
-- flooded before its first answer is measured.
local PENALTY = 1e6

local function estimate(d, key, now)
    local v = d:get("ew:" .. key)
    if v == nil then
        return nil
    end
    local t = d:get("et:" .. key)
    if t == nil or now - t > STALE then
        return nil
    end
    return v
end

-- cost, in flight
local function cost(d, key, now)
    local load = d:get("lr:" .. key) or 0
    local e = estimate(d, key, now)
    if e == nil then
        -- never measured (or long ago): free while nothing is in flight to it
        return load > 0 and PENALTY * load or 0, load
    end
    return e * (load + 1), load
end

-- Power of two choices by cost over the peers not ejected (all ejected: all,
-- as Envoy's panic mode) and, on a retry, not tried by this request when
-- others are left. Ties: fewer in flight, then the first drawn (random).
function _M.pick_ewma(section, peers, tried)
    local n = #peers
    if n == 1 then
        return 1
    end
    local cand, m = {}, 0
    for i = 1, n do
        local p = peers[i]
        local key = p[1] .. ":" .. p[2]
        if not (tried and tried[key]) and _M.usable(section, _M.peer_key(p[1], p[2])) then
            m = m + 1
            cand[m] = i
        end
    end
    if m == 0 then
        for i = 1, n do
            cand[i] = i
        end
        m = n
    end
    if m == 1 then
        return cand[1]
    end
    local a = math.random(m)
    local b = math.random(m - 1)
    if b >= a then
        b = b + 1
    end
    a, b = cand[a], cand[b]
    local pa, pb = peers[a], peers[b]
    local ka, kb = pa[1] .. ":" .. pa[2], pb[1] .. ":" .. pb[2]
    local d = dict()
    local now = ngx.now()
    local ca, la = cost(d, ka, now)
    local cb, lb = cost(d, kb, now)
    local win, lose, lose_key = a, b, kb
    if cb < ca or (cb == ca and lb < la) then
        win, lose, lose_key = b, a, ka
    end
    -- The loser's probe: the first request of each PROBE_INTERVAL (over all
    -- workers) that draws it and would pass it by goes to it.
    if d:add("pr:" .. lose_key, true, PROBE_INTERVAL) then
        return lose
    end
    return win
end

local function observe(key, rtt, now)
    local d = dict()
    if rtt < MIN_RTT then
        rtt = MIN_RTT
    end
    local v = estimate(d, key, now)
    local new = rtt
    if v ~= nil and rtt < v then
        local t = d:get("et:" .. key) or now
        local w = math.exp(-math.max(0, now - t) / TAU)
        new = v * w + rtt * (1 - w)
    end
    d:set("ew:" .. key, new)
    d:set("et:" .. key, now)
end

-- What the balancer knows of a peer now: estimate (s, nil if none), in flight.
function _M.ewma_state(address, port)
    local d = dict()
    local key = address .. ":" .. port
    return estimate(d, key, ngx.now()), d:get("lr:" .. key) or 0
end

local function peer_from_addr(addr)
    -- $upstream_addr: "198.18.0.1:21000" or "[::1]:21000"; the balancer's keys
    -- are address .. ":" .. port without brackets.
    return (addr:gsub("^%[(.*)%]:(%d+)$", "%1:%2"))
end

-- Each attempt's response time ($upstream_addr, $upstream_response_time: one
-- entry per attempt) into its peer's estimate (the log phase; bench/ewma_lua.py).
function _M.observe_attempts(addrs, times, now)
    local t = {}
    for item in times:gmatch("[^,%s]+") do
        t[#t + 1] = tonumber(item)
    end
    local k = 0
    for item in addrs:gmatch("[^,%s]+") do
        k = k + 1
        if t[k] then
            observe(peer_from_addr(item), t[k], now)
        end
    end
end

-- ---------------------------------------------------------------- log phase

function _M.done()
    local admitted = ngx.var.meshctl_admitted
    if admitted and admitted ~= "" then
        dict():incr("bi:" .. admitted, -1, 0)
    end
    local section = ngx.var.meshctl_section
    local s = section and sections[section]
    if not s then
        return
    end
    if s.balancer == "peak_ewma" then
        require("meshctl_balancer").done()
        local addrs, times = ngx.var.upstream_addr, ngx.var.upstream_response_time
        if addrs and times then
            _M.observe_attempts(addrs, times, ngx.now())
        end
    end
    if not s.outlier then
        return
    end
    local addrs = ngx.var.upstream_addr
    if not addrs then
        return
    end
    local statuses = ngx.var.upstream_status or ""
    if not addrs:find(",", 1, true) then
        local code = tonumber(statuses) or 502
        return record(section, s, addrs, code >= 500)
    end
    local a, st = {}, {}
    for item in addrs:gmatch("[^,%s]+") do
        a[#a + 1] = item
    end
    for item in statuses:gmatch("[^,%s]+") do
        st[#st + 1] = item
    end
    for i, key in ipairs(a) do
        local code = tonumber(st[i] or "") or 502
        record(section, s, key, code >= 500)
    end
end

-- ---------------------------------------------------------------- status

-- GET on the control socket: what `meshctl status` shows, as it happens.
function _M.status()
    local d = dict()
    local now = ngx.now()
    local out = {}
    for section, s in pairs(sections) do
        local entry = { cluster = s.cluster, ejected = {} }
        if s.limit then
            entry.limit = s.limit
            entry.in_flight = d:get("bi:" .. section) or 0
            entry.overflowed = d:get("bo:" .. section) or 0
        end
        if s.outlier then
            entry.ejections = d:get("ox:" .. section) or 0
            entry.ejections_capped = d:get("oc:" .. section) or 0
            for _, p in ipairs(require("meshctl_balancer").peers(s.cluster)) do
                local key = _M.peer_key(p[1], p[2])
                local until_ = d:get("oe:" .. s.okey .. "|" .. key)
                if until_ and until_ > now then
                    entry.ejected[#entry.ejected + 1] = {
                        peer = key, seconds_left = math.ceil(until_ - now),
                        ejections = d:get("on:" .. s.okey .. "|" .. key) or 1 }
                end
            end
        end
        if s.budget then
            entry.retries_refused = d:get("rx:" .. section) or 0
        end
        if s.balancer == "peak_ewma" then
            -- each peer's response time estimate (ms; none: not measured) and load
            entry.balancer = s.balancer
            entry.peers = {}
            for _, p in ipairs(require("meshctl_balancer").peers(s.cluster)) do
                local e, load = _M.ewma_state(p[1], p[2])
                entry.peers[#entry.peers + 1] = {
                    peer = _M.peer_key(p[1], p[2]), in_flight = load,
                    ewma_ms = e and math.floor(e * 1e5 + 0.5) / 100 or nil }
            end
        end
        out[section] = entry
    end
    ngx.header["Content-Type"] = "application/json"
    ngx.say(require("cjson.safe").encode(out))
end

return _M
