-- meshctl latency-aware choice (meshctl_balancer = "peak_ewma") for HAProxy
-- http backends, as plugins/nginx/meshctl_resilience.lua makes it on nginx.
--
-- lua-load (not lua-load-per-thread): one Lua state shared by every thread,
-- so the table below is the one view of the backend's answers.
--
-- Hooks (the template puts them in a backend with peak_ewma):
--   http-request set-var(txn.meshctl_ew0) date(0,us)
--   http-after-response set-var(txn.meshctl_ew) lua.meshctl_ewma
-- (HAProxy 2.6 has no res.timer.* fetches: the time is measured here, from
-- the backend's http-request to the answer, queue and connect included, on
-- the date's clock at both ends. Its own variable: txn.meshctl_t0 is the
-- frontend's start, which the metrics and the access log time the request
-- from.)
--
-- Each server keeps a peak EWMA of its response time (a slower answer is
-- taken at once, a faster one with weight 1 - exp(-dt/TAU)). A task sets,
-- every TICK ms, each server's weight from its cost, ewma + 1 ms (the
-- in-flight factor nginx uses flickers at a 100 ms sampling, and roundrobin
-- already spreads what is in flight): the cheapest gets 256, the others 256 x (cheapest/cost)^2,
-- never below 1, so a slow server still gets probes under roundrobin (which
-- follows weights at run time) and its estimate follows them back down. An
-- estimate without new answers ages towards the backend's cheapest (AGE), so
-- an instance that was slow once is not shunned for ever. Servers in
-- maintenance (the agent's) or DOWN (an outlier ejection) are left alone.
-- A first answer or one at least twice the estimate weighs the backend at
-- once (a server that just turned slow loses its share before the tick).
local M = {}

local TAU = 1.0
local AGE = 10.0
local TICK = 100
local MAX_WEIGHT = 256

-- backend name -> {server name -> {ewma = ms, t = last answer (s)}}
local B = {}
-- backends with answers since the last tick (an idle one is not weighed: its
-- weights choose nothing), and when each last aged its estimates
local ANSWERED = {}
local AGED = {}

local weigh

local function now()
    local t = core.now()
    return t.sec + t.usec / 1e6
end

core.register_fetches("meshctl_ewma", function(txn)
    local sname = txn.sf:srv_name()
    if sname == nil or sname == "" then
        return nil
    end
    local t0 = tonumber(txn:get_var("txn.meshctl_ew0"))
    if t0 == nil then
        return nil
    end
    local ms = math.max(0, (tonumber(txn.f:date(0, "us")) - t0) / 1000)
    local t = now()
    local bname = txn.f:be_name()
    ANSWERED[bname] = true
    local b = B[bname]
    if b == nil then
        b = {}
        B[bname] = b
    end
    local h = b[sname]
    if h == nil then
        b[sname] = { ewma = ms, t = t }
        weigh(bname, b)
        return nil
    end
    if ms > h.ewma then
        local jump = ms > 2 * h.ewma + 1
        h.ewma = ms
        h.t = t
        if jump then
            -- a server that just turned slow loses its share now, not at the tick
            weigh(bname, b)
        end
        return nil
    else
        local w = 1 - math.exp(-math.max(t - h.t, 0) / TAU)
        h.ewma = h.ewma + w * (ms - h.ewma)
    end
    h.t = t
    return nil
end)

weigh = function(bname, b)
    local be = core.backends[bname]
    if be == nil then
        return
    end
    local t = now()
    local aging = 1 - math.exp(-math.max(t - (AGED[bname] or t), 0) / AGE)
    AGED[bname] = t
    local costs, cheapest, lowest = {}, nil, nil
    for sname, srv in pairs(be.servers) do
        local st = srv:get_stats()
        local status = st.status or ""
        if not status:find("^MAINT") and not status:find("^DOWN") then
            local h = b[sname]
            if h then
                if lowest == nil or h.ewma < lowest then
                    lowest = h.ewma
                end
            end
            costs[sname] = { srv = srv, h = h, weight = tonumber(st.weight) or -1 }
        end
    end
    for sname, c in pairs(costs) do
        local h = c.h
        if h and lowest and t - h.t > TAU then
            -- no answers for a while: age towards the backend's best
            h.ewma = h.ewma + aging * (lowest - h.ewma)
        end
        -- an unmeasured server costs the best's (it gets measured soon)
        local ewma = h and h.ewma or lowest or 0
        c.cost = ewma + 1
        if cheapest == nil or c.cost < cheapest then
            cheapest = c.cost
        end
    end
    for _, c in pairs(costs) do
        local r = cheapest / c.cost
        local weight = math.max(1, math.floor(MAX_WEIGHT * r * r + 0.5))
        if weight ~= c.weight then
            c.srv:set_weight(tostring(weight))
        end
    end
end

core.register_task(function()
    while true do
        for bname in pairs(ANSWERED) do
            weigh(bname, B[bname])
        end
        ANSWERED = {}
        core.msleep(TICK)
    end
end)

-- {server name -> ewma ms} of a backend (meshctl status)
function M.estimates(bname)
    local out = {}
    for sname, h in pairs(B[bname] or {}) do
        out[sname] = h.ewma
    end
    return out
end

-- "meshctl ewma" on the CLI (the agent reads it through the master for
-- `meshctl status`): one line per measured server, "<backend> <addr> <ms>".
core.register_cli({ "meshctl", "ewma" }, "meshctl: per-server peak EWMA (ms)", function(applet)
    for bname, b in pairs(B) do
        local be = core.backends[bname]
        for sname, h in pairs(b) do
            local srv = be and be.servers[sname]
            local addr = srv and srv:get_addr() or sname
            applet:send(string.format("%s %s %.3f\n", bname, addr, h.ewma))
        end
    end
end)

package.loaded["meshctl_ewma"] = M
