-- meshctl data-plane metrics in HAProxy (lua-load: one Lua state shared by
-- the threads, so one table holds the counters). Nothing is written anywhere
-- per request; the agent reads the table at scrape time.
--
-- The keys and their meaning are those of plugins/nginx/meshctl_metrics.lua
-- (meshctl/dataplane.py owns the naming): "<kind>|<direction>|<local>|<peer>|
-- <upstream>|<subset>|<route>|<code>", kinds r (requests), s (duration sum,
-- seconds), b<i> (requests in duration bucket i, not cumulative), d (intention
-- denials), l (rate-limit 429s), c (circuit-breaker 503s) and e (outlier
-- ejections of the servers of a backend with PassiveHealthCheck, counted by
-- meshctl_outlier.lua and read from it at scrape time).
--
-- Actions (the template calls them):
--   http-response lua.meshctl_metrics_in <service>         an inbound's answers
--   http-request  lua.meshctl_metrics_in_denied <service>  before its 403
--   http-response lua.meshctl_metrics_out <caller>
--   http-request  lua.meshctl_metrics_in_limited <service> before its 429
--   http-request  lua.meshctl_metrics_out_refused <caller> before a circuit
--                                                          breaker's 503
--   http-request  lua.meshctl_metrics_outlier <caller>     in a backend with
--                                                          PassiveHealthCheck: its labels
--   http-request  lua.meshctl_metrics_out_local <caller> <code>
--                                                          before an answer HAProxy
--                                                          gives itself (no route,
--                                                          over capacity)
-- txn.meshctl_t0 (date(0,us), set by the frontend's first rule) is the start,
-- txn.meshctl_up the outbound's upstream (set there too); txn.meshctl_peer and txn.meshctl_subset are set by the backend a request
-- went to, txn.meshctl_r (the route) by the outbound's route rules.
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

core.register_action("meshctl_metrics_in", { "http-res" }, function(txn, service)
    count(txn, "inbound|" .. service .. "|" .. var(txn, "txn.meshctl_caller") .. "||||"
        .. tostring(txn.sf:status()))
end, 1)

core.register_action("meshctl_metrics_in_denied", { "http-req" }, function(txn, service)
    local peer = var(txn, "txn.meshctl_caller")
    count(txn, "inbound|" .. service .. "|" .. peer .. "||||403")
    add("d|inbound|" .. service .. "|" .. peer .. "||||", 1)
end, 1)

core.register_action("meshctl_metrics_in_limited", { "http-req" }, function(txn, service)
    local peer = var(txn, "txn.meshctl_caller")
    count(txn, "inbound|" .. service .. "|" .. peer .. "||||429")
    add("l|inbound|" .. service .. "|" .. peer .. "||||", 1)
end, 1)

local function out(txn, caller, code)
    -- HAProxy numbers routes from 0, the nginx router from 1: the label is 1-based.
    local r = tonumber(txn:get_var("txn.meshctl_r"))
    local route = r and tostring(r + 1) or ""
    count(txn, "outbound|" .. caller .. "|" .. var(txn, "txn.meshctl_peer") .. "|"
        .. var(txn, "txn.meshctl_up") .. "|" .. var(txn, "txn.meshctl_subset") .. "|" .. route .. "|" .. code)
end

core.register_action("meshctl_metrics_out", { "http-res" }, function(txn, caller)
    out(txn, caller, tostring(txn.sf:status()))
end, 1)

core.register_action("meshctl_metrics_out_local", { "http-req" }, function(txn, caller, code)
    out(txn, caller, code)
end, 2)

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
    out(txn, caller, "503")
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
