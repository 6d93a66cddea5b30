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
-- Requests are counted once, at their final answer, by sample fetches in
-- `http-after-response set-var(...)` (HAProxy 2.6 registers no Lua action
-- there, but a fetch runs anywhere a sample does): those rules run for every
-- answer, the server's and those HAProxy gives itself (403, 404, 429, 503 of
-- a return rule, and the 502/503/504 of a failed connection, a reset or a
-- timeout after forwarding), which `http-response` rules never see.
--
--   http-after-response set-var(txn.meshctl_n) lua.meshctl_count_in(<service>)
--   http-after-response set-var(txn.meshctl_n) lua.meshctl_count_out(<caller>)
-- Actions (the template calls them), for the kinds beside r:
--   http-request  lua.meshctl_metrics_in_denied <service>  before its 403
--   http-request  lua.meshctl_metrics_in_limited <service> before its 429
--   http-request  lua.meshctl_metrics_out_refused <caller> before a circuit
--                                                          breaker's 503
--   http-request  lua.meshctl_metrics_outlier <caller>     in a backend with
--                                                          PassiveHealthCheck: its labels
--   tcp-request content lua.meshctl_metrics_tcp <dir> <service> <upstream>
-- and the duration of a TCP connection for its access-log record, at log time:
--   log-format ... %[lua.meshctl_tcp_duration]
-- sess.meshctl_t0 (tcp-request connection) is a TCP connection's start;
-- txn.meshctl_t0 (date(0,us), set by the frontend's first rule) is the start,
-- txn.meshctl_up the outbound's upstream (set there too); txn.meshctl_peer and
-- txn.meshctl_subset are set by the backend a request went to, txn.meshctl_r
-- (the route) by the outbound's route rules.
-- Service on the status socket: lua.meshctl_metrics_control (GET: JSON).
local cjson = require("cjson.safe")

local buckets = require("meshctl_buckets")

local C = {}
-- Set when the frontends log (see the template): only then are the timing
-- variables of the access-log record worth their cost.
local LOGGED = os.getenv("MESHCTL_METRICS_LOG") == "1"

local function add(key, v)
    C[key] = (C[key] or 0) + v
end

local bucket = buckets.bucket

local function count(txn, labels)
    add("r|" .. labels, 1)
    local t0 = tonumber(txn:get_var("txn.meshctl_t0"))
    if t0 then
        -- The same clock as t0 (date(0,us)): core.now() is HAProxy's corrected
        -- internal time, which drifts from the date after a detected clock jump.
        local d = (tonumber(txn.f:date(0, "us")) - t0) / 1e6
        if d < 0 then
            d = 0
        end
        add("s|" .. labels, d)
        add("b" .. bucket(d) .. "|" .. labels, 1)
        if LOGGED then
            txn:set_var("txn.meshctl_duration", string.format("%.6f", d))
            txn:set_var("txn.meshctl_start", string.format("%.6f", t0 / 1e6))
        end
    end
end

local function var(txn, name)
    local v = txn:get_var(name)
    if v == nil then
        return ""
    end
    return tostring(v)
end

core.register_fetches("meshctl_count_in", function(txn, service)
    count(txn, "inbound|" .. service .. "|" .. var(txn, "txn.meshctl_caller") .. "||||"
        .. tostring(txn.sf:status()))
    return 1
end)

core.register_action("meshctl_metrics_in_denied", { "http-req" }, function(txn, service)
    add("d|inbound|" .. service .. "|" .. var(txn, "txn.meshctl_caller") .. "||||", 1)
end, 1)

core.register_action("meshctl_metrics_in_limited", { "http-req" }, function(txn, service)
    add("l|inbound|" .. service .. "|" .. var(txn, "txn.meshctl_caller") .. "||||", 1)
end, 1)

-- HTTP backends a request went to -> the labels of their retries (the first
-- request's: a backend is one caller's view of one cluster); the requests of
-- each that reached no server (circuit open, over capacity, none up); the
-- retries last reported.
local BACKENDS = {}
local UNSERVED = {}
local RETRIED = {}

core.register_fetches("meshctl_count_out", function(txn, caller)
    -- HAProxy numbers routes from 0, the nginx router from 1: the label is 1-based.
    local r = tonumber(txn:get_var("txn.meshctl_r"))
    local route = r and tostring(r + 1) or ""
    local cluster = "outbound|" .. caller .. "|" .. var(txn, "txn.meshctl_peer") .. "|"
        .. var(txn, "txn.meshctl_up") .. "|" .. var(txn, "txn.meshctl_subset") .. "|"
    count(txn, cluster .. route .. "|" .. tostring(txn.sf:status()))
    if txn:get_var("txn.meshctl_peer") ~= nil then
        local be = txn.f:be_name()
        if be then
            if BACKENDS[be] == nil then
                BACKENDS[be] = cluster .. "|"
            end
            local srv = txn.f:srv_name()
            if srv == nil or srv == "" then
                UNSERVED[be] = (UNSERVED[be] or 0) + 1
            end
        end
    end
    return 1
end)

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

-- The seconds since sess.meshctl_t0 (date(0,us) at the connection's accept),
-- for the record a tcp frontend logs at the connection's end ("" when the
-- frontend did not start the clock).
core.register_fetches("meshctl_tcp_duration", function(txn)
    local t0 = tonumber(txn:get_var("sess.meshctl_t0"))
    if not t0 then
        return ""
    end
    local d = (tonumber(txn.f:date(0, "us")) - t0) / 1e6
    return string.format("%.6f", d < 0 and 0 or d)
end)

local function snapshot()
    local out = {}
    for k, v in pairs(C) do
        out[k] = v
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
    for name, labels in pairs(BACKENDS) do
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
            local n = tries - (tonumber(be:get_stats().stot) or 0) + (UNSERVED[name] or 0)
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
