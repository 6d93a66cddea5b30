-- W3C Trace Context: the one traceparent parser of both drivers' meshctl_trace.
local _M = {}

-- (trace id, parent id, flags) of a valid version-00-shaped traceparent, lower
-- case; nil for anything else (bad length or hex, version ff, all-zero ids),
-- which the caller treats as no trace at all, as the spec says.
function _M.parse(tp)
    if not tp or #tp ~= 55 then
        return nil
    end
    local version, trace, parent, flags = tp:match("^(%x%x)%-(%x+)%-(%x+)%-(%x%x)$")
    if not version or version == "ff" or #trace ~= 32 or #parent ~= 16 then
        return nil
    end
    trace, parent = trace:lower(), parent:lower()
    if trace == "00000000000000000000000000000000" or parent == "0000000000000000" then
        return nil
    end
    return trace, parent, tonumber(flags, 16)
end

return _M
