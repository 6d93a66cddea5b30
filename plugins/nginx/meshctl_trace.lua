-- W3C Trace Context at the nginx sidecar (access phase, before routing or
-- authorization). Each listener a request enters is one span: the outbound's
-- is the client span, the inbound's the server span. The request goes on with
-- `traceparent` naming this span as the parent, so the next hop (or the app,
-- when it forwards the header) becomes its child; `tracestate` passes through
-- untouched.
--
--   outbound(share)  continue an incoming trace, honouring its sampled flag, or
--                    start one, sampled with probability `share`
--   inbound(share)   the same at an inbound (a caller that sent no context)
--
-- The span's ids and sampled flag go to $meshctl_trace, $meshctl_span,
-- $meshctl_parent and $meshctl_sampled ("1" or ""), which the access-log line
-- carries to the agent; the agent exports sampled spans over OTLP.
local _M = {}

local parse = require("meshctl_w3c").parse
_M.parse = parse

local function begin(share)
    -- $request_id: 16 random bytes per request, from nginx.
    local rid = ngx.var.request_id
    local trace, parent, flags = parse(ngx.var.http_traceparent)
    local span
    if trace then
        span = rid:sub(1, 16)
    else
        trace, parent = rid, ""
        span = rid:sub(17, 32)
        flags = (share > 0 and math.random() < share) and 1 or 0
    end
    local sampled = flags % 2 == 1
    ngx.var.meshctl_trace = trace
    ngx.var.meshctl_span = span
    ngx.var.meshctl_parent = parent
    ngx.var.meshctl_sampled = sampled and "1" or ""
    ngx.req.set_header("traceparent", "00-" .. trace .. "-" .. span .. (sampled and "-01" or "-00"))
end

_M.outbound = begin
_M.inbound = begin

return _M
