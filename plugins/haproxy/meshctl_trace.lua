-- W3C Trace Context at the HAProxy sidecar (the frontend's first rules), as
-- plugins/nginx/meshctl_trace.lua does for nginx: each listener a request
-- enters is one span (outbound: client, inbound: server); the request goes on
-- with `traceparent` naming this span as the parent; `tracestate` passes
-- through untouched.
--
--   http-request lua.meshctl_trace <share per 10000>
--
-- Continues an incoming trace (honouring its sampled flag) or starts one,
-- sampled with probability share/10000. The ids go to txn.meshctl_trace,
-- txn.meshctl_span, txn.meshctl_parent, and txn.meshctl_sampled ("1" when
-- sampled), which the access-log record carries to the agent.

local parse = require("meshctl_w3c").parse

local function random_hex(txn)
    -- uuid(): 16 random bytes (a v4 UUID: 6 bits are fixed, fine for ids).
    return (txn.f:uuid(4)):gsub("-", "")
end

core.register_action("meshctl_trace", { "http-req" }, function(txn, share)
    local trace, parent, flags = parse(txn.sf:req_fhdr("traceparent"))
    local rid = random_hex(txn)
    local span
    if trace then
        span = rid:sub(1, 16)
    else
        trace, parent = random_hex(txn), ""
        span = rid:sub(17, 32)
        local n = tonumber(share) or 0
        flags = (n > 0 and txn.f:rand(10000) < n) and 1 or 0
    end
    local sampled = flags % 2 == 1
    txn:set_var("txn.meshctl_trace", trace)
    txn:set_var("txn.meshctl_span", span)
    txn:set_var("txn.meshctl_parent", parent)
    if sampled then
        txn:set_var("txn.meshctl_sampled", "1")
    end
    txn.http:req_set_header("traceparent", "00-" .. trace .. "-" .. span .. (sampled and "-01" or "-00"))
end, 1)
