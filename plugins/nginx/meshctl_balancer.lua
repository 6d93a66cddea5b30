-- meshctl endpoint balancer for nginx http upstreams.
--
-- Endpoints live in the shared dict `meshctl_endpoints`, so endpoint churn
-- never reloads nginx: the agent posts a new endpoint document to the control
-- socket (post_endpoints), every worker notices the bumped version and
-- rebuilds its local peer list on the next request.
--
-- Document: {"clusters": {"<cluster id>": [["198.18.0.12", 21000], ...]}}
-- Addresses are validated here again (IP literals and ports only) even though
-- compile() already refused anything else: this is the last gate.
--
-- Endpoints are per cluster, upstream blocks per (caller, cluster): every
-- caller's block of a cluster calls balance(<cluster id>) and picks from the
-- same peers, while each block keeps its own keep-alive pool, so a connection
-- opened with one caller's certificate never carries another caller's request.
--
-- Load balancing per cluster (configure(), from the router's table):
-- round_robin (default), random, least_request (power of N choices over the
-- requests this worker has in flight), ring_hash (a consistent-hash ring over
-- the peers, keyed by $meshctl_hash, which the router computed from the
-- cluster's hash policies; without a key a random peer, as in Envoy).
local cjson = require("cjson.safe")
local resilience = require("meshctl_resilience")

local _M = {}
local DICT = "meshctl_endpoints"
-- seconds a cluster no longer named stays readable (> worker_shutdown_timeout)
local RETIRED_TTL = 30
local cache = {}
local conf = {}

local function valid_peer(p)
    if type(p) ~= "table" or type(p[1]) ~= "string" or type(p[2]) ~= "number" then
        return false
    end
    if p[2] < 1 or p[2] > 65535 or p[2] % 1 ~= 0 then
        return false
    end
    return p[1]:match("^%d+%.%d+%.%d+%.%d+$") ~= nil or p[1]:match("^[%x:]+$") ~= nil
end

-- Store a decoded document; returns nil, err when any part of it is invalid.
local function store(doc)
    if type(doc) ~= "table" or type(doc.clusters) ~= "table" then
        return nil, "document needs a clusters table"
    end
    for id, peers in pairs(doc.clusters) do
        if type(id) ~= "string" or not id:match("^[%w_.-]+$") or type(peers) ~= "table" then
            return nil, "bad cluster entry"
        end
        for _, p in ipairs(peers) do
            if not valid_peer(p) then
                return nil, "bad peer in cluster " .. id
            end
        end
    end
    -- The document is the whole state: clusters it does not name are gone, but
    -- only after a grace period. The dict outlives a reload, and the workers of
    -- the previous generation (which still accept connections for a moment after
    -- nginx starts the new ones, then finish their requests) may still route to
    -- a cluster the new generation renamed or dropped.
    local dict = ngx.shared[DICT]
    for _, key in ipairs(dict:get_keys(0)) do
        if key:sub(1, 2) == "c:" and doc.clusters[key:sub(3)] == nil then
            local ttl = dict:ttl(key)
            if ttl == 0 then
                dict:expire(key, RETIRED_TTL)
            end
        end
    end
    for id, peers in pairs(doc.clusters) do
        dict:set("c:" .. id, cjson.encode(peers))
    end
    dict:incr("version", 1, 0)
    return true
end

-- init_by_lua: load the endpoints of `state`, the agent's runtime state file
-- (read by meshctl_state, nil when there is none), written before this (re)load.
function _M.init(state, path)
    if not state then
        return
    end
    local ok, err = store(state)
    if not ok then
        ngx.log(ngx.ERR, "meshctl: ignoring ", path, ": ", err)
    end
end

local function peers_of(id)
    local dict = ngx.shared[DICT]
    local version = dict:get("version") or 0
    local c = cache[id]
    if c and c.version == version then
        return c
    end
    local raw = dict:get("c:" .. id)
    if c and c.raw == raw then
        -- Every push bumps the version (intention changes too): a cluster whose
        -- endpoints did not change keeps its peers, and its hash ring (up to
        -- 65536 points, built and sorted again otherwise).
        c.version = version
        return c
    end
    local peers = raw and cjson.decode(raw) or {}
    c = { version = version, raw = raw, peers = peers, rr = c and c.rr or 0 }
    cache[id] = c
    return c
end

-- The cluster settings of this config generation (called by the router's init).
function _M.configure(clusters)
    conf = clusters or {}
end

-- How many endpoints a cluster has now (the router's failover decision).
function _M.count(id)
    return #peers_of(id).peers
end

-- The endpoints of a cluster now ({{address, port}, ...}; meshctl_resilience).
function _M.peers(id)
    return peers_of(id).peers
end

-- Outlier detection: the picked peer, or the next one not ejected (all
-- ejected: the picked one, as Envoy's panic mode routes to all).
local function avoid_ejected(section, peers, i)
    local n = #peers
    for k = 0, n - 1 do
        local j = (i - 1 + k) % n + 1
        local p = peers[j]
        if resilience.usable(section, resilience.peer_key(p[1], p[2])) then
            return j
        end
    end
    return i
end

local function ring_of(c, size)
    if c.ring and c.ring_size == size then
        return c.ring
    end
    local n = #c.peers
    local per = math.max(1, math.ceil(size / n))
    local ring = {}
    for i, p in ipairs(c.peers) do
        local key = p[1] .. ":" .. p[2]
        for k = 1, per do
            ring[#ring + 1] = { ngx.crc32_long(key .. "#" .. k), i }
        end
    end
    table.sort(ring, function(a, b)
        return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
    end)
    c.ring, c.ring_size = ring, size
    return ring
end

-- The ring position of a key: the first point at or after its hash.
local function ring_start(ring, h)
    local lo, hi = 1, #ring
    if h > ring[hi][1] then
        return 1
    end
    while lo < hi do
        local mid = math.floor((lo + hi) / 2)
        if ring[mid][1] < h then
            lo = mid + 1
        else
            hi = mid
        end
    end
    return lo
end

local function pick(id, c, settings, attempt)
    local n = #c.peers
    local lb = settings and settings.lb or "round_robin"
    if lb == "random" then
        return math.random(n)
    end
    if lb == "least_request" then
        local best, best_load
        for _ = 1, math.min(settings.choices or 2, n) do
            local i = math.random(n)
            local p = c.peers[i]
            -- in flight from every worker (shared memory), not this one's only
            local load = resilience.inflight(p[1] .. ":" .. p[2])
            if best == nil or load < best_load then
                best, best_load = i, load
            end
        end
        return best
    end
    if lb == "ring_hash" then
        local key = ngx.var.meshctl_hash
        if not key or key == "" then
            return math.random(n)
        end
        local ring = ring_of(c, settings.ring or 1024)
        local pos = ring_start(ring, ngx.crc32_long(key))
        -- A retry walks on along the ring to the next distinct peer.
        local seen, tried = {}, 0
        for k = 0, #ring - 1 do
            local i = ring[(pos - 1 + k) % #ring + 1][2]
            if not seen[i] then
                seen[i] = true
                if tried == attempt then
                    return i
                end
                tried = tried + 1
            end
        end
        return ring[pos][2]
    end
    -- A retry walks on from the request's own first pick without moving the
    -- rotation: else, with one failing peer, every request would start on it
    -- (its retry advanced the rotation past the healthy one), and each would
    -- need a retry (a share of the retry budget) to succeed.
    if attempt > 0 and ngx.ctx.meshctl_first then
        return (ngx.ctx.meshctl_first - 1 + attempt) % n + 1
    end
    c.rr = c.rr % n + 1
    ngx.ctx.meshctl_first = c.rr  -- other requests move c.rr meanwhile
    return c.rr
end

-- log_by_lua of the outbound locations: the request is no longer in flight.
function _M.done()
    local picked = ngx.ctx.meshctl_picked
    if not picked then
        return
    end
    -- Once per request (meshctl_resilience.done may call this too).
    ngx.ctx.meshctl_picked = nil
    for _, key in ipairs(picked) do
        resilience.inflight_add(key, -1)
    end
end

-- balancer_by_lua of each caller's upstream block of cluster `id`: pick a peer
-- of the cluster by its policy; on a retry (proxy_next_upstream) another one.
function _M.balance(id)
    local balancer = require("ngx.balancer")
    local c = peers_of(id)
    local n = #c.peers
    if n == 0 then
        ngx.log(ngx.WARN, "meshctl: no passing endpoint in ", id)
        return ngx.exit(502)
    end
    local attempt = ngx.ctx.meshctl_attempt
    if attempt == nil then
        attempt = 0
        -- The route's retries ($meshctl_tries, set by the router), else
        -- connection failures move on to up to two more peers.
        local tries = tonumber(ngx.var.meshctl_tries or "")
        if tries == nil or tries < 0 then
            tries = math.min(n - 1, 2)
        end
        if tries > 0 then
            balancer.set_more_tries(tries)
        end
    else
        attempt = attempt + 1
    end
    ngx.ctx.meshctl_attempt = attempt
    local section = ngx.var.meshctl_section
    if section == "" then
        section = nil
    end
    if section and attempt > 0 and not resilience.retry_allowed(section) then
        -- The retry budget is spent: end here (the location answers 503).
        ngx.var.meshctl_budget_spent = "1"
        return ngx.exit(ngx.ERROR)
    end
    local settings = conf[id]
    local ewma = section and resilience.latency_aware(section)
    local i
    if ewma then
        -- meshctl_balancer "peak_ewma": the cheaper of two usable peers by
        -- latency x load; a retry goes to a peer this request has not tried
        local tried
        if attempt > 0 and ngx.ctx.meshctl_picked then
            tried = {}
            for _, key in ipairs(ngx.ctx.meshctl_picked) do
                tried[key] = true
            end
        end
        i = resilience.pick_ewma(section, c.peers, tried)
    else
        i = pick(id, c, settings, attempt)
    end
    if section then
        i = avoid_ejected(section, c.peers, i)
    end
    local p = c.peers[i]
    if ewma or (settings and settings.lb == "least_request") then
        local key = p[1] .. ":" .. p[2]
        resilience.inflight_add(key, 1)
        local picked = ngx.ctx.meshctl_picked or {}
        picked[#picked + 1] = key
        ngx.ctx.meshctl_picked = picked
    end
    local ok, err = balancer.set_current_peer(p[1], p[2])
    if not ok then
        ngx.log(ngx.ERR, "meshctl: set_current_peer failed: ", err)
        return ngx.exit(502)
    end
end

-- content_by_lua on the control socket: POST a document, GET the current one.
function _M.control()
    require("meshctl_control").serve(DICT, store, function()
        local dict = ngx.shared[DICT]
        local out = { version = dict:get("version") or 0, clusters = {} }
        for _, key in ipairs(dict:get_keys(0)) do
            if key:sub(1, 2) == "c:" then
                out.clusters[key:sub(3)] = cjson.decode(dict:get(key))
            end
        end
        return out
    end)
end

return _M
