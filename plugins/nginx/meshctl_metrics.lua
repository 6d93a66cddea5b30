-- meshctl data-plane metrics in nginx: counted in the shared dict
-- meshctl_metrics by the log phase, never written anywhere per request.
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
--   control()                             GET on the control socket: every counter
--                                         as JSON ({"<key>": value}), read by the
--                                         agent at scrape time
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

local function add(key, value)
    local _, err = DICT:incr(key, value, 0)
    if err and incr_errors == 0 then
        -- "no memory": the dict is full (a label set far beyond the expected
        -- size). Said once per worker; the request itself is unaffected.
        ngx.log(ngx.ERR, "meshctl metrics: cannot count ", key, ": ", err)
        incr_errors = 1
    end
end

local bucket = buckets.bucket

function _M.start()
    ngx.var.meshctl_t0 = now()
end

local function count(labels, retries, logged)
    local t0 = tonumber(ngx.var.meshctl_t0)
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
    local out = {}
    for _, key in ipairs(DICT:get_keys(0)) do
        out[key] = DICT:get(key)
    end
    ngx.header["Content-Type"] = "application/json"
    ngx.say(require("cjson.safe").encode(out))
end

return _M
