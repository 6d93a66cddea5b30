-- Request header lookups of meshctl's nginx modules: the router's header
-- matches and hash keys, and the intentions' header permissions (authz).
--
-- value(headers, name): the value of exactly the header `name` (lower-case, as
-- the keys of ngx.req.get_headers() are), several values joined by ",".
-- rawget, because the table ngx.req.get_headers() answers has an __index
-- metamethod that, on a miss, lower-cases the name and turns '_' into '-': a
-- plain index for "x_user" would answer the "X-User" header, where HAProxy,
-- Envoy and meshctl.intentions.decide() see no "x_user" header at all.
local _M = {}

function _M.value(headers, name)
    local v = rawget(headers, name)
    if type(v) == "table" then
        return table.concat(v, ",")
    end
    return v
end

-- A header(name) function over every header of the current request (no limit,
-- so a header cannot hide behind a hundred others). The headers are read on
-- the first call only: rules without header criteria never pay for them.
function _M.reader()
    local headers
    return function(name)
        if headers == nil then
            headers = ngx.req.get_headers(0)
        end
        return _M.value(headers, name)
    end
end

return _M
