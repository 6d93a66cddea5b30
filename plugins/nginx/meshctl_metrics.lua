-- meshctl data-plane metrics in nginx: counted by the log phase in a
-- worker-local table, added to the shared dict meshctl_metrics every FLUSH
-- seconds (and when the worker exits), never written anywhere per request.
--
-- Why not the shared dict per request: the log phase runs in LuaJIT's
-- interpreter (a new environment per handler call), where each shared-dict
-- incr, ngx.var read or write costs 0.5-1.3 us; three incrs and the start
-- time kept in an nginx variable were two thirds of the counting's cost
-- (bench.metrics_lua measures it). A table increment costs 0.05 us.
--
-- Hooks (the templates call them; each is one line):
--   start()                               access phase of an inbound or outbound
--                                         server, before anything else: the
--                                         request's start on a monotonic clock
--   inbound(service, logged)              log phase of an http inbound
--   outbound(caller, upstream, peer, subset, logged)
--                                         log phase of an http outbound (peer and
--                                         subset: the cluster the request went to,
--                                         "" when it reached none)
--                                         logged: the server writes an access-log
--                                         line, which gets the request's start
--                                         (wall clock) and duration in
--                                         $meshctl_start and $meshctl_duration
--   init_worker()                         init_worker_by_lua: starts the flush timer
--   control()                             GET on the control socket: every counter
--                                         as JSON ({"<key>": value}), read by the
--                                         agent at scrape time; it first adds its
--                                         own worker's counts and, with several
--                                         workers, waits out one flush, so a
--                                         request answered before the GET began
--                                         is in the answer
--
-- Keys: "<kind>|<direction>|<local>|<peer>|<upstream>|<subset>|<route>|<code>"
-- with kind r (requests), s (duration sum, seconds), b<i> (requests whose
-- duration fell in bucket i, not cumulative: the agent adds them up), t
-- (retries), d (intention denials) and x (requests whose client certificate
-- failed verification, answered 400 by nginx before any location), l
-- (requests a rate limit answered 429), e (outlier ejections the request's
-- results caused) and c (requests a circuit breaker refused with 503; e and c
-- are noted in ngx.ctx by meshctl_resilience.done/admit_or_refuse, which run
-- before outbound() in the same log phase). Every label value is a service
-- name (the grammar of the config), a route number or a status code, so the
-- set of keys stays bounded. meshctl/dataplane.py owns the naming.
local ffi = require("ffi")

local _M = {}

local buckets = require("meshctl_buckets")
_M.BOUNDS = buckets.BOUNDS

ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } meshctl_timespec;
int clock_gettime(int clk_id, meshctl_timespec *tp);
]]
local ts = ffi.new("meshctl_timespec")
local CLOCK_REALTIME, CLOCK_MONOTONIC = 0, 1

-- nginx's own clock (ngx.now, $request_time) ticks in milliseconds: too
-- coarse for a mesh hop that takes a fraction of one, so the request's start
-- and end are read from the kernel's monotonic clock.
local function now(clock)
    ffi.C.clock_gettime(clock or CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
_M.now = now

local DICT = ngx.shared.meshctl_metrics
local incr_errors = 0

-- Seconds between two additions of a worker's counts to the shared dict.
local FLUSH = 0.1

-- This worker's counts not yet in the shared dict: key -> value.
local pending = {}
local dirty = false
-- Set once the worker exits: its flush timer has run for the last time, so
-- the requests it still finishes count straight into the shared dict.
local exiting = false

local function incr(key, value)
    local _, err = DICT:incr(key, value, 0)
    if err and incr_errors == 0 then
        -- "no memory": the dict is full (a label set far beyond the expected
        -- size). Said once per worker; the request itself is unaffected.
        ngx.log(ngx.ERR, "meshctl metrics: cannot count ", key, ": ", err)
        incr_errors = 1
    end
end

local function add(key, value)
    if exiting then
        return incr(key, value)
    end
    pending[key] = (pending[key] or 0) + value
    dirty = true
end

local function flush()
    if not dirty then
        return
    end
    local counts = pending
    pending, dirty = {}, false
    for key, value in pairs(counts) do
        incr(key, value)
    end
end

local function on_timer(premature)
    if premature then
        exiting = true
    end
    flush()
end

function _M.init_worker()
    local ok, err = ngx.timer.every(FLUSH, on_timer)
    if not ok then
        -- Without the timer (no free timer: lua_max_running_timers) every
        -- request counts straight into the shared dict: slower, still exact.
        ngx.log(ngx.ERR, "meshctl metrics: no flush timer (", err, "); counting in shared memory")
        exiting = true
    end
end

local bucket = buckets.bucket
local get_request = require("resty.core.base").get_request
local uintptr = ffi.typeof("uintptr_t")

-- The request's address as a number: a table key (the cdata pointer
-- get_request returns is a new object at every call).
local function request_key()
    local r = get_request()
    return r and tonumber(ffi.cast(uintptr, r))
end

-- Each request's start on the monotonic clock, from its access phase to its
-- log phase (an nginx variable costs 1.3 us to write and 0.9 us to read
-- there), by request address. count() takes the entry; a request's address
-- is reused by later ones, so the table stays as big as the requests in
-- flight.
local starts = {}

function _M.start()
    local r = request_key()
    if r then
        starts[r] = now()
    end
end

local function count(labels, retries, logged)
    local r = request_key()
    local t0 = r and starts[r]
    if t0 then
        starts[r] = nil
    end
    add("r|" .. labels, 1)
    if t0 then
        local d = now() - t0
        add("s|" .. labels, d)
        add("b" .. bucket(d) .. "|" .. labels, 1)
        if logged then
            -- Read by the access log (its handler runs after this one).
            ngx.var.meshctl_duration = string.format("%.6f", d)
            ngx.var.meshctl_start = string.format("%.6f", now(CLOCK_REALTIME) - d)
        end
    end
    if retries > 0 then
        add("t|" .. labels, retries)
    end
end

-- Tries beyond the first: $upstream_status lists one status per peer tried
-- ("502, 200"), and ":" separates the upstreams of an internal redirect.
local function retries()
    local s = ngx.var.upstream_status
    if not s then
        return 0
    end
    local _, n = s:gsub("[,:]", "")
    return n
end

function _M.inbound(service, logged)
    local peer = ngx.var.mesh_caller or ""
    local status = ngx.status
    local labels = "inbound|" .. service .. "|" .. peer .. "|||" .. "|" .. status
    count(labels, 0, logged)
    -- A 403 that never reached the app is the intention check's answer.
    if status == 403 and not ngx.var.upstream_status then
        add("d|inbound|" .. service .. "|" .. peer .. "||||", 1)
    end
    -- nginx answers a client certificate that failed verification with 400.
    if status == 400 and ngx.var.ssl_client_verify ~= "SUCCESS" then
        add("x|inbound|" .. service .. "|||||", 1)
    end
    -- A 429 that never reached the app is a rate limit's (limit_req) answer.
    if status == 429 and not ngx.var.upstream_status then
        add("l|inbound|" .. service .. "|" .. peer .. "||||", 1)
    end
end

function _M.outbound(caller, upstream, peer, subset, logged)
    -- The route taken: "<outbound>:<route>:<split>" from the router.
    local route = (ngx.var.meshctl_pick or ""):match("^[^:]*:(%d+):") or ""
    local labels = "outbound|" .. caller .. "|" .. peer .. "|" .. upstream .. "|" .. subset
        .. "|" .. route .. "|" .. ngx.status
    count(labels, retries(), logged)
    local ctx = ngx.ctx
    if ctx.meshctl_ejections or ctx.meshctl_overloaded then
        local cluster = "outbound|" .. caller .. "|" .. peer .. "|" .. upstream .. "|" .. subset .. "||"
        if ctx.meshctl_ejections then
            add("e|" .. cluster, ctx.meshctl_ejections)
        end
        if ctx.meshctl_overloaded then
            add("c|" .. cluster, 1)
        end
    end
end

function _M.control()
    flush()
    if ngx.worker.count() > 1 then
        -- The other workers add theirs within FLUSH.
        ngx.sleep(FLUSH * 1.5)
    end
    local out = {}
    for _, key in ipairs(DICT:get_keys(0)) do
        out[key] = DICT:get(key)
    end
    ngx.header["Content-Type"] = "application/json"
    ngx.say(require("cjson.safe").encode(out))
end

return _M
