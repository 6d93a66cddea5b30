-- The request-duration histogram both drivers' counters share (meshctl_metrics):
-- upper bounds in seconds, as meshctl/dataplane.py BOUNDS and docs/metrics.md
-- list them, and the bucket a duration falls in (#BOUNDS + 1: +Inf).
local _M = {}

local BOUNDS = { 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                 0.1, 0.25, 0.5, 1, 2.5, 5, 10 }
_M.BOUNDS = BOUNDS

function _M.bucket(d)
    for i = 1, #BOUNDS do
        if d <= BOUNDS[i] then
            return i
        end
    end
    return #BOUNDS + 1
end

return _M
