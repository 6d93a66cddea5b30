-- meshctl data-plane metrics in HAProxy (lua-load: one Lua state shared by
-- the threads, so one table holds the counters). Nothing is written anywhere
-- per request; the agent reads the table at scrape time.
--
-- The keys and their meaning are those of plugins/nginx/meshctl_metrics.lua
-- (meshctl/dataplane.py owns the naming): "<kind>|<direction>|<local>|<peer>|
-- <upstream>|<subset>|<route>|<code>", kinds r (requests), s (duration sum,
-- seconds), b<i> (requests in duration bucket i, not cumulative), d (intention
-- denials), l (rate-limit 429s), c (circuit-breaker 503s), and read from
-- HAProxy's own counters at scrape time: t (retries: the tries its servers
-- counted beyond the backend's requests, see snapshot()); e (outlier ejections
-- of the servers of a backend with PassiveHealthCheck) is read from
-- meshctl_outlier.lua's count at scrape time.
--
-- Requests are counted once, at their final answer (templates/haproxy/count.j2).
-- An answer a server gave passes the frontend's `http-response` rules, which
-- count it with no Lua at all, in the meshctl_requests stick table (the agent
-- reads it with "show table"; here only its keys are read, for the backends of
-- the retries). An answer HAProxy gives itself (403, 404, 429, 503 of a return
-- rule, and the 502/503/504 of a failed connection, a reset or a timeout after
-- forwarding) passes no http-response rule; a Lua converter in
-- `http-after-response set-var(...)` counts it here (HAProxy 2.6 registers no
-- Lua action there, but a converter runs anywhere a sample does). HAProxy builds
-- its key natively (set-var-fmt) and the converter only splits off the duration
-- and adds: a converter gets no txn object (a sample fetch's costs HAProxy some
-- 5 us to build), and a key seen before costs no string building in Lua.
--
--   http-after-response set-var-fmt(txn.meshctl_j) <labels>|<backend>|<served>|<us>
--   http-after-response set-var(txn.meshctl_n) var(txn.meshctl_j),lua.meshctl_count
-- <labels> are the 7 label fields of a request (direction|local|peer|upstream|
-- subset|route|code, the route 1-based), <backend> the outbound backend the
-- request went to and <served> "1" when a server answered it ("" inbound).
--
-- Actions (the template calls them), for the kinds beside r:
--   http-request  lua.meshctl_metrics_in_denied <service>  before its 403
--   http-request  lua.meshctl_metrics_in_limited <service> before its 429
--   http-request  lua.meshctl_metrics_out_refused <caller> before a circuit
--                                                          breaker's 503
--   http-request  lua.meshctl_metrics_outlier <caller>     in a backend with
--                                                          PassiveHealthCheck: its labels
--   tcp-request content lua.meshctl_metrics_tcp <dir> <service> <upstream>
-- txn.meshctl_t0 (date(0,us), set by the frontend's first rule) is the start,
-- txn.meshctl_up the outbound's upstream (set there too); txn.meshctl_peer and
-- txn.meshctl_subset are set by the backend a request went to, txn.meshctl_r
-- (the route, 0-based) by the outbound's route rules.
-- Service on the status socket: lua.meshctl_metrics_control (GET: JSON).
local cjson = require("cjson.safe")

local buckets = require("meshctl_buckets")

local C = {}

local function add(key, v)
    C[key] = (C[key] or 0) + v
end

local BOUNDS = buckets.BOUNDS
local NB = #BOUNDS + 1

-- Requests by their key (labels|backend|served): { labels, backend, served,
-- requests, duration sum (seconds), the NB bucket counts }.
local E = {}

local function entry(key)
    local labels, be, served = key:match("^(.*)|([^|]*)|([^|]*)$")
    local e = { labels or key, be or "", served or "", 0, 0 }
    for i = 1, NB do
        e[5 + i] = 0
    end
    E[key] = e
    return e
end

core.register_converters("meshctl_count", function(v)
    local key, d = v:match("^(.*)|(%d*)$")
    if key == nil then
        return 0
    end
    local e = E[key] or entry(key)
    e[4] = e[4] + 1
    d = tonumber(d)
    if d then
        d = d / 1e6
        e[5] = e[5] + d
        local i = 1
        while i < NB and d > BOUNDS[i] do
            i = i + 1
        end
        e[5 + i] = e[5 + i] + 1
    end
    return 1
end)

local function var(txn, name)
    local v = txn:get_var(name)
    if v == nil then
        return ""
    end
    return tostring(v)
end

core.register_action("meshctl_metrics_in_denied", { "http-req" }, function(txn, service)
    add("d|inbound|" .. service .. "|" .. var(txn, "txn.meshctl_caller") .. "||||", 1)
end, 1)

core.register_action("meshctl_metrics_in_limited", { "http-req" }, function(txn, service)
    add("l|inbound|" .. service .. "|" .. var(txn, "txn.meshctl_caller") .. "||||", 1)
end, 1)

-- The retries last reported, by backend.
local RETRIED = {}

-- Backends with outlier detection -> the labels of their ejections (the first
-- request's: a backend is one caller's view of one cluster).
local OUTLIER = {}

core.register_action("meshctl_metrics_outlier", { "http-req" }, function(txn, caller)
    local name = txn.f:be_name()
    if OUTLIER[name] == nil then
        OUTLIER[name] = "outbound|" .. caller .. "|" .. var(txn, "txn.meshctl_peer") .. "|"
            .. var(txn, "txn.meshctl_up") .. "|" .. var(txn, "txn.meshctl_subset") .. "||"
    end
end, 1)

core.register_action("meshctl_metrics_out_refused", { "http-req" }, function(txn, caller)
    add("c|outbound|" .. caller .. "|" .. var(txn, "txn.meshctl_peer") .. "|"
        .. var(txn, "txn.meshctl_up") .. "|" .. var(txn, "txn.meshctl_subset") .. "||", 1)
end, 1)

-- TCP: one connection of a tcp frontend (after the intention check), by
-- direction, local service, peer (inbound: the verified caller; outbound: the
-- upstream) and upstream ("-": none). Bytes come from the frontend's own
-- counters at scrape time (per frontend, so without a peer).
local FRONTENDS = {}

core.register_action("meshctl_metrics_tcp", { "tcp-req" }, function(txn, dir, service, upstream)
    if upstream == "-" then
        upstream = ""
    end
    local peer = dir == "inbound" and var(txn, "txn.meshctl_caller") or upstream
    add("k|" .. dir .. "|" .. service .. "|" .. peer .. "|" .. upstream .. "|||", 1)
    if txn:get_var("txn.meshctl_deny") ~= nil then
        add("d|" .. dir .. "|" .. service .. "|" .. peer .. "||||", 1)
    end
    FRONTENDS[txn.f:fe_name()] = dir .. "|" .. service .. "||" .. upstream .. "|||"
end, 3)

local function snapshot()
    local out = {}
    for k, v in pairs(C) do
        out[k] = v
    end
    -- HTTP backends requests went to -> the labels of their retries (an
    -- entry's cluster: a backend is one caller's view of one cluster), and the
    -- requests of each that reached no server (circuit open, over capacity,
    -- none up).
    local backends, unserved = {}, {}
    for _, e in pairs(E) do
        local labels = e[1]
        out["r|" .. labels] = (out["r|" .. labels] or 0) + e[4]
        out["s|" .. labels] = (out["s|" .. labels] or 0) + e[5]
        for i = 1, NB do
            if e[5 + i] > 0 then
                local k = "b" .. i .. "|" .. labels
                out[k] = (out[k] or 0) + e[5 + i]
            end
        end
        local be = e[2]
        if be ~= "" then
            -- direction|caller|peer|upstream|subset: the cluster, "" route and code.
            local cluster, peer = labels:match("^(outbound|[^|]*|([^|]*)|[^|]*|[^|]*)|")
            if cluster and peer ~= "" then
                backends[be] = backends[be] or (cluster .. "||")
                if e[3] == "" then
                    unserved[be] = (unserved[be] or 0) + e[4]
                end
            end
        end
    end
    -- The requests servers answered are HAProxy's own counters (templates/
    -- haproxy/count.j2; the agent reads them with "show table"): only their
    -- backends are learnt here, from the keys (labels|backend|bucket).
    local requests = core.backends["meshctl_requests"]
    if requests and requests.stktable then
        for key in pairs(requests.stktable:dump()) do
            local cluster, peer, be = key:match("^(outbound|[^|]*|([^|]*)|[^|]*|[^|]*)|[^|]*|[^|]*|([^|]*)|")
            if cluster and peer ~= "" and be ~= "" then
                backends[be] = backends[be] or (cluster .. "||")
            end
        end
    end
    for name, labels in pairs(FRONTENDS) do
        local fe = core.frontends[name]
        if fe then
            local st = fe:get_stats()
            out["o|" .. labels] = tonumber(st.bout) or 0
            out["i|" .. labels] = tonumber(st.bin) or 0
        end
    end
    -- Ejections are meshctl_outlier.lua's (lua-loaded with any http backend
    -- with PassiveHealthCheck, which is where OUTLIER entries come from).
    local od = package.loaded["meshctl_outlier"]
    for name, labels in pairs(OUTLIER) do
        out["e|" .. labels] = od and od.ejections(name) or 0
    end
    for name, labels in pairs(backends) do
        local be = core.backends[name]
        if be then
            -- Retries: every try is a stream its server counts ("stot"), every request
            -- one the backend counts, so tries - requests, plus the requests that
            -- had no try at all. (HAProxy 2.6's own "wretr" counts an L7 retry on a
            -- backend's only server twice.) A request waiting for its first server
            -- counts -1 until it gets one: a counter never goes down, so the value
            -- reported is never below the last.
            local tries = 0
            for _, srv in pairs(be.servers) do
                tries = tries + (tonumber(srv:get_stats().stot) or 0)
            end
            local n = tries - (tonumber(be:get_stats().stot) or 0) + (unserved[name] or 0)
            if n < (RETRIED[name] or 0) then
                n = RETRIED[name]
            end
            RETRIED[name] = n
            out["t|" .. labels] = n
        end
    end
    return out
end

core.register_service("meshctl_metrics_control", "http", function(applet)
    local body = cjson.encode(snapshot())
    applet:set_status(200)
    applet:add_header("content-type", "application/json")
    applet:add_header("content-length", tostring(#body))
    applet:start_response()
    applet:send(body)
end)
