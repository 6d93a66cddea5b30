-- meshctl retry budget in HAProxy (meshctl_retry_budget; Finagle's and
-- Linkerd's, as nginx's meshctl_resilience.retry_allowed): over the last
-- WINDOW seconds, a backend's retries stay below percent % of its requests
-- plus min_per_second per second of the window.
--
-- HAProxy decides a retry inside the stream, where no Lua runs, so the budget
-- decides once per request, before it is sent: a backend whose routes retry
-- renders
--   http-request disable-l7-retry unless { lua.meshctl_retry_ok(P,M) -m int 1 }
-- and a request the budget refuses is sent once and answered as it comes back
-- (a connection failure is still tried again: disable-l7-retry leaves those).
-- lua.meshctl_retry_ok counts the request. Retries are HAProxy's own counts,
-- as meshctl_metrics.lua reads them: the tries the backend's servers count
-- ("stot") less the requests the backend counts, read every POLL seconds by
-- a task. So the budget can be passed by the retries of the requests admitted
-- within one read interval (at most their NumRetries each): what one 0.05 s
-- of traffic retries. (Counting each admitted request as all its retries
-- until the next read closes that gap but refuses retries the budget has room
-- for: a burst of fast requests, half of them failing once, ran out of it.)
--
-- One table for all threads (lua-load, not lua-load-per-thread); a reload
-- starts the window afresh.
local WINDOW = 10
local POLL = 0.05

-- backend name -> { rq = {[slot] = n}, rr = {[slot] = n}, at = {[slot] = second},
-- tries = the retries HAProxy had counted at the last read, asked = a request
-- came since then (an idle backend's counters are not read) }
local state = {}

local function slot(s, now)
    local i = now % WINDOW
    if s.at[i] ~= now then
        s.at[i], s.rq[i], s.rr[i] = now, 0, 0
    end
    return i
end

local function retried(be)
    local tries = 0
    for _, srv in pairs(be.servers) do
        tries = tries + (tonumber(srv:get_stats().stot) or 0)
    end
    return tries - (tonumber(be:get_stats().stot) or 0)
end

local function sums(s, now)
    local requests, retries = 0, 0
    for i = 0, WINDOW - 1 do
        local t = s.at[i]
        if t and t > now - WINDOW then
            requests, retries = requests + s.rq[i], retries + s.rr[i]
        end
    end
    return requests, retries
end

core.register_fetches("meshctl_retry_ok", function(txn, percent, min_per_second)
    local name = txn.f:be_name()
    local s = state[name]
    if s == nil then
        local be = core.backends[name]
        s = { rq = {}, rr = {}, at = {}, tries = be and retried(be) or 0 }
        state[name] = s
    end
    local now = core.now().sec
    local i = slot(s, now)
    s.rq[i] = s.rq[i] + 1
    s.asked = true
    local requests, retries = sums(s, now)
    local allowed = requests * (tonumber(percent) or 20) / 100
        + (tonumber(min_per_second) or 10) * WINDOW
    if retries >= allowed then
        return 0
    end
    return 1
end)

core.register_task(function()
    while true do
        local now = core.now().sec
        for name, s in pairs(state) do
            local be = s.asked and core.backends[name]
            if be then
                s.asked = false
                -- A request waiting for its first server counts -1 until it has
                -- one: the count never goes below the last read.
                local n = retried(be)
                if n > s.tries then
                    local i = slot(s, now)
                    s.rr[i] = s.rr[i] + (n - s.tries)
                    s.tries = n
                end
            end
        end
        core.msleep(math.floor(POLL * 1000))
    end
end)
