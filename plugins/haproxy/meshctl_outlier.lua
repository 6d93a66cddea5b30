-- meshctl outlier detection for HAProxy http backends (Consul's
-- PassiveHealthCheck), with Envoy's consecutive_5xx semantics, as
-- plugins/nginx/meshctl_resilience.lua has them on nginx.
--
-- lua-load (not lua-load-per-thread): one Lua state shared by every thread,
-- and HAProxy runs one thread at a time in it, so the table below is the one
-- view of the backend's failures and ejections. A reload starts a new worker
-- with a new state: its servers start in rotation and their ejection counts at
-- zero (the old worker keeps its own until it exits).
--
-- Hook (the template puts it in a backend with PassiveHealthCheck):
--   http-after-response set-var(txn.meshctl_od) lua.meshctl_outlier(<MaxFailures>,
--       <Interval ms>,<EnforcingConsecutive5xx>,<MaxEjectionPercent>,<BaseEjectionTime ms>)
-- a sample fetch, since HAProxy 2.6 has no Lua action for http-after-response;
-- it runs for every answer of the backend, the server's own and the ones
-- HAProxy gives after a connect failure, a reset or a timeout of the server it
-- chose (502/503/504, with that server's name), so all of them count. Answers
-- without a server (a circuit breaker's 503) count for nobody. A try that
-- failed and was retried on another server (retry-on: a connect failure, an
-- empty response, a route's retried 5xx) never reaches a rule: the template's
-- "option redispatch 1" moves every retry elsewhere, and the server counts it
-- in its own "wredis", which the task reads every SCAN s and counts as that
-- server's failures.
--
-- A 5xx counts as a failure of the server that gave it, any other answer
-- resets its run. At MaxFailures in a row the server is ejected (with
-- EnforcingConsecutive5xx % probability) for BaseEjectionTime x the number of
-- its ejections (at most 300 s, Envoy's max_ejection_time; the number goes down
-- by one per Interval spent in rotation), unless that would eject more than
-- MaxEjectionPercent of the backend's servers (one may always be ejected).
-- Unlike Envoy, a server returns when its time is up (a task looks every
-- TICK ms), not at the next Interval sweep.
--
-- Ejecting sets the server's operational state DOWN (check_force_down) and
-- never its administrative state, which belongs to the agent: a slot the agent
-- empties (Consul says critical, or the instance left) is in maintenance, and
-- maintenance wins over an UP operational state, so returning a server
-- (check_force_up) can never bring back what Consul took out; the agent's
-- "set server ... state ready" of a slot already in rotation does not end an
-- ejection either. A slot that leaves maintenance starts UP, a new host for
-- HAProxy as for Envoy: its record here starts afresh (the address is part of
-- the record).
--
-- The metrics module reads ejections(backend) (meshctl_outlier_ejections_total):
-- exported through package.loaded["meshctl_outlier"].
local M = {}

local MAX_EJECTION = 300
local TICK = 50
-- seconds between two reads of the backends' redispatch counters (a read of
-- the backend's, then of its servers' only when it moved)
local SCAN = 0.25

-- backend name -> {cfg = {failures, interval, enforcing, max_percent, base},
--                  ejections = n, capped = n, redispatched = n (last read),
--                  hosts = {server name -> host}}
-- host: {addr, fails, times (ejection multiplier), until_ (ejected until),
--        back (when it last came back), redispatched (its last read)}
local B = {}

math.randomseed(core.now().usec + 1000000 * (core.now().sec % 1000))

local function now()
    local t = core.now()
    return t.sec + t.usec / 1e6
end

local function backend(name, failures, interval_ms, enforcing, max_percent, base_ms)
    local b = B[name]
    if b == nil then
        b = { ejections = 0, capped = 0, redispatched = 0, hosts = {}, cfg = {
            failures = tonumber(failures), interval = tonumber(interval_ms) / 1000,
            enforcing = tonumber(enforcing), max_percent = tonumber(max_percent),
            base = tonumber(base_ms) / 1000 } }
        B[name] = b
    end
    return b
end

local function host(b, sname, srv)
    local addr = srv:get_addr()
    local h = b.hosts[sname]
    if h == nil or h.addr ~= addr then
        -- A slot filled with another endpoint is another host (the slot's
        -- counters go on: so does their last read).
        h = { addr = addr, fails = 0, times = 0, redispatched = h and h.redispatched or 0 }
        b.hosts[sname] = h
    end
    return h
end

-- Servers of the backend ejected now (by us, still DOWN) and servers in the
-- backend at all (not in maintenance: an empty slot or one Consul took out).
local function census(b, be, t)
    local ejected, total = 0, 0
    for sname, srv in pairs(be.servers) do
        local status = srv:get_stats().status or ""
        if not status:find("^MAINT") then
            total = total + 1
            local h = b.hosts[sname]
            if h and h.until_ and h.until_ > t and status:find("^DOWN") then
                ejected = ejected + 1
            end
        end
    end
    return ejected, total
end

local function eject(bname, b, be, sname, srv, h)
    local cfg = b.cfg
    local max_percent, interval, base = cfg.max_percent, cfg.interval, cfg.base
    h.fails = 0
    if math.random(100) > cfg.enforcing then
        return
    end
    local t = now()
    local active, total = census(b, be, t)
    if total == 0 or (active > 0 and 100 * (active + 1) / total > max_percent) then
        b.capped = b.capped + 1
        return
    end
    -- Envoy: the multiplier drops by one for each Interval spent in rotation.
    local times = h.times
    if h.back and times > 0 then
        times = math.max(0, times - math.floor((t - h.back) / interval))
    end
    times = times + 1
    local length = math.min(base * times, math.max(base, MAX_EJECTION))
    h.times = times
    h.until_ = t + length
    b.ejections = b.ejections + 1
    srv:check_force_down()
    core.Warning("meshctl: ejected " .. sname .. " (" .. tostring(h.addr) .. ") from " .. bname
        .. " for " .. string.format("%.3f", length) .. " s (ejection " .. times .. ")")
end

core.register_fetches("meshctl_outlier", function(txn, failures, interval_ms, enforcing,
                                                  max_percent, base_ms)
    local sname = txn.sf:srv_name()
    if sname == nil or sname == "" then
        return nil
    end
    local bname = txn.f:be_name()
    local b = backend(bname, failures, interval_ms, enforcing, max_percent, base_ms)
    local failed = (tonumber(txn.sf:status()) or 0) >= 500
    if not failed then
        -- Only a write when there was a run to end: the healthy path reads.
        local h = b.hosts[sname]
        if h and h.fails ~= 0 then
            h.fails = 0
        end
        return nil
    end
    local be = core.backends[bname]
    local srv = be and be.servers[sname]
    if srv == nil then
        return nil
    end
    local h = host(b, sname, srv)
    if h.until_ then
        -- Already out: a request that was on its way when it went.
        return nil
    end
    h.fails = h.fails + 1
    if h.fails >= b.cfg.failures then
        eject(bname, b, be, sname, srv, h)
    end
    return nil
end)

-- The tries of a backend that failed and were retried elsewhere since the last
-- read: each server's new redispatches are failures of that server.
local function scan(bname, b)
    local be = core.backends[bname]
    if be == nil then
        return
    end
    local n = tonumber(be:get_stats().wredis) or 0
    if n == b.redispatched then
        return
    end
    b.redispatched = n
    for sname, srv in pairs(be.servers) do
        local m = tonumber(srv:get_stats().wredis) or 0
        local h = b.hosts[sname]
        if m ~= (h and h.redispatched or 0) then
            h = host(b, sname, srv)
            local new = m - h.redispatched
            h.redispatched = m
            if new > 0 and not h.until_ then
                h.fails = h.fails + new
                if h.fails >= b.cfg.failures then
                    eject(bname, b, be, sname, srv, h)
                end
            end
        end
    end
end

core.register_task(function()
    local scanned = 0
    while true do
        local t = now()
        if t - scanned >= SCAN then
            scanned = t
            for bname, b in pairs(B) do
                scan(bname, b)
            end
        end
        for bname, b in pairs(B) do
            for sname, h in pairs(b.hosts) do
                if h.until_ and h.until_ <= t then
                    local be = core.backends[bname]
                    local srv = be and be.servers[sname]
                    -- Operational state only: a slot in maintenance stays out.
                    if srv then
                        srv:check_force_up()
                    end
                    h.until_ = nil
                    h.back = t
                    h.fails = 0
                    core.Info("meshctl: " .. sname .. " (" .. tostring(h.addr) .. ") back in "
                        .. bname .. " after ejection " .. h.times)
                end
            end
        end
        core.msleep(TICK)
    end
end)

-- Ejections of a backend since this worker started (meshctl_outlier_ejections_total).
function M.ejections(bname)
    local b = B[bname]
    return b and b.ejections or 0
end

-- Ejections MaxEjectionPercent prevented.
function M.capped(bname)
    local b = B[bname]
    return b and b.capped or 0
end

package.loaded["meshctl_outlier"] = M
