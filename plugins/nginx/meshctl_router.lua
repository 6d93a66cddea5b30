-- meshctl L7 router for nginx http outbounds (Consul's discovery chain, compiled).
--
-- The route table is data, never nginx syntax: meshctl renders it as base64
-- JSON into init_by_lua (init), so every worker of a config generation holds
-- the table that generation's named locations were rendered for.
--
-- route(outbound) runs in the access phase of an outbound's `location /`:
--   1. first route whose match holds (path exact/prefix/regex, headers, query
--      parameters, methods), with Envoy's semantics;
--   2. split by weight (one draw per request);
--   3. failover: the first of the split's cluster and its failover clusters
--      that has endpoints;
--   4. request header changes (split, then route), prefix rewrite, hash key;
--   5. the action of that cluster: its upstream block, TLS name, tries,
--      section and labels into variables, then ngx.exec to the named location
--      of its literal settings (timeouts, retry conditions), which the
--      caller's actions with the same settings share.
-- respond() runs in that location's header filter: response header changes.
--
-- Document:
-- {"outbounds": {"<key>": {"routes": [{"match": {...}, "splits": [{"upto": 9000,
--   "cluster": id, "failover": [ids], "actions": {id: name}, "req": ops,
--   "resp": ops}], "rewrite": {"strip": n, "to": "/"}, "req": ops, "resp": ops}]}},
--  "actions": {name: {"loc": location, "up": upstream block, "tls": TLS name,
--   "tries": n, "section": section or "", "peer": service, "subset": subset}},
--  "clusters": {id: {"lb": "ring_hash", "ring": 1024, "hash": [...], "choices": 2}}}
-- ops: {"remove": [names], "set": [[name, value]], "add": [[name, value]]}
local cjson = require("cjson.safe")
local balancer = require("meshctl_balancer")
local header_value = require("meshctl_headers").value

local _M = {}
local DOC = { outbounds = {}, clusters = {} }

local function anchored(rx)
    return "^(?:" .. rx .. ")$"
end

-- Every regex is compiled once here with nginx's own PCRE: a pattern it cannot
-- read fails the (re)load, and the previous generation keeps serving.
local function check_regex(rx, where)
    if type(rx) ~= "string" then
        error("meshctl router: " .. where .. ": regex must be a string")
    end
    local _, err = ngx.re.find("", anchored(rx), "jo")
    if err then
        error("meshctl router: " .. where .. ": bad regex: " .. err)
    end
end

local function check_doc(doc)
    if type(doc) ~= "table" or type(doc.outbounds) ~= "table" or type(doc.clusters) ~= "table"
        or type(doc.actions) ~= "table" then
        error("meshctl router: route table needs outbounds, actions and clusters")
    end
    for key, o in pairs(doc.outbounds) do
        for i, r in ipairs(o.routes or {}) do
            local m = r.match or {}
            local where = key .. " route " .. i
            if m.regex then
                check_regex(m.regex, where .. " path")
            end
            for _, h in ipairs(m.headers or {}) do
                if h.regex then
                    check_regex(h.regex, where .. " header " .. tostring(h.name))
                end
            end
            for _, q in ipairs(m.query or {}) do
                if q.regex then
                    check_regex(q.regex, where .. " query " .. tostring(q.name))
                end
            end
            if type(r.splits) ~= "table" or #r.splits == 0 then
                error("meshctl router: " .. where .. " has no destination")
            end
            for _, sp in ipairs(r.splits) do
                for cluster, name in pairs(sp.actions or {}) do
                    if type(doc.actions[name]) ~= "table" then
                        error("meshctl router: " .. where .. ": cluster " .. cluster
                            .. " has no action " .. tostring(name))
                    end
                end
            end
        end
    end
end

-- init_by_lua: the route table of this config generation.
function _M.init(chunks)
    local raw = ngx.decode_base64(table.concat(chunks))
    if not raw then
        error("meshctl router: route table is not base64")
    end
    local doc, err = cjson.decode(raw)
    if not doc then
        error("meshctl router: route table is not JSON: " .. tostring(err))
    end
    check_doc(doc)
    DOC = doc
    balancer.configure(doc.clusters)
    math.randomseed(ngx.now() * 1000)
end

function _M.init_worker()
    math.randomseed(ngx.now() * 1000 + ngx.worker.pid())
end

-- ------------------------------------------------------------------ matching

local function lower(s, ci)
    if ci then
        return s:lower()
    end
    return s
end

local function header_ok(h, headers)
    local v = header_value(headers, h.name)
    if v == nil then
        -- As in Envoy: a missing header never matches, inverted or not,
        -- except an inverted "present".
        return h.present == true and h.invert == true
    end
    local ok
    if h.present then
        ok = true
    elseif h.exact ~= nil then
        ok = v == h.exact
    elseif h.prefix ~= nil then
        ok = v:sub(1, #h.prefix) == h.prefix
    elseif h.suffix ~= nil then
        ok = #v >= #h.suffix and v:sub(-#h.suffix) == h.suffix
    elseif h.regex ~= nil then
        ok = ngx.re.find(v, anchored(h.regex), "jo") ~= nil
    else
        ok = false
    end
    if h.invert then
        return not ok
    end
    return ok
end

-- Query parameters as sent (not decoded, case-sensitive), like Envoy and HAProxy.
local function query_args(query)
    local args = {}
    if not query then
        return args
    end
    for pair in query:gmatch("[^&]+") do
        local eq = pair:find("=", 1, true)
        local name = eq and pair:sub(1, eq - 1) or pair
        if args[name] == nil then
            args[name] = eq and pair:sub(eq + 1) or ""
        end
    end
    return args
end

-- A value computed on first use, at most once per request: most routes match
-- on the path only, and building the table of every request header (or query
-- argument) for each request costs more than all the rest of the routing.
local function lazy(compute)
    local value
    return function()
        if value == nil then
            value = compute()
        end
        return value
    end
end

-- args, headers: lazy getters (see lazy) of the query arguments and headers.
local function matches(m, path, args, headers, method)
    local p = lower(path, m.ci)
    if m.exact and p ~= lower(m.exact, m.ci) then
        return false
    end
    if m.prefix then
        local prefix = lower(m.prefix, m.ci)
        if p:sub(1, #prefix) ~= prefix then
            return false
        end
    end
    if m.regex and not ngx.re.find(path, anchored(m.regex), m.ci and "joi" or "jo") then
        return false
    end
    for _, h in ipairs(m.headers or {}) do
        if not header_ok(h, headers()) then
            return false
        end
    end
    for _, q in ipairs(m.query or {}) do
        local v = args()[q.name]
        if v == nil then
            return false
        end
        if q.exact and v ~= q.exact then
            return false
        end
        if q.regex and not ngx.re.find(v, anchored(q.regex), "jo") then
            return false
        end
    end
    if m.methods then
        local found = false
        for _, x in ipairs(m.methods) do
            if x == method then
                found = true
                break
            end
        end
        if not found then
            return false
        end
    end
    return true
end

-- ------------------------------------------------------------------ changes

local function request_ops(ops)
    if type(ops) ~= "table" then
        return
    end
    for _, name in ipairs(ops.remove) do
        ngx.req.clear_header(name)
    end
    for _, kv in ipairs(ops.set) do
        ngx.req.set_header(kv[1], kv[2])
    end
    for _, kv in ipairs(ops.add) do
        local cur = ngx.req.get_headers()[kv[1]]
        if cur == nil then
            ngx.req.set_header(kv[1], kv[2])
        else
            if type(cur) ~= "table" then
                cur = { cur }
            end
            cur[#cur + 1] = kv[2]
            ngx.req.set_header(kv[1], cur)
        end
    end
end

local function response_ops(ops)
    if type(ops) ~= "table" then
        return
    end
    for _, name in ipairs(ops.remove) do
        ngx.header[name] = nil
    end
    for _, kv in ipairs(ops.set) do
        ngx.header[kv[1]] = kv[2]
    end
    for _, kv in ipairs(ops.add) do
        local cur = ngx.header[kv[1]]
        if cur == nil then
            ngx.header[kv[1]] = kv[2]
        else
            if type(cur) ~= "table" then
                cur = { cur }
            end
            cur[#cur + 1] = kv[2]
            ngx.header[kv[1]] = cur
        end
    end
end

-- The load-balancing hash key of a cluster for this request ("" if none);
-- headers, args: lazy getters.
local function hash_key(conf, headers, args)
    if not conf or conf.lb ~= "ring_hash" then
        return ""
    end
    local parts = {}
    for _, h in ipairs(conf.hash or {}) do
        local v
        if h.kind == "header" then
            v = header_value(headers(), h.name)
        elseif h.kind == "cookie" then
            v = ngx.var["cookie_" .. h.name]
        elseif h.kind == "query_parameter" then
            v = args()[h.name]
        elseif h.kind == "source_ip" then
            v = ngx.var.remote_addr
        end
        if v ~= nil then
            parts[#parts + 1] = v
            if h.terminal then
                break
            end
        end
    end
    return table.concat(parts, "\0")
end

-- ------------------------------------------------------------------ entry points

function _M.route(key)
    local o = DOC.outbounds[key]
    if not o then
        ngx.log(ngx.ERR, "meshctl router: no routes for ", key)
        return ngx.exit(500)
    end
    local uri = ngx.var.request_uri
    local qpos = uri:find("?", 1, true)
    local path = qpos and uri:sub(1, qpos - 1) or uri
    local query = qpos and uri:sub(qpos + 1) or nil
    local args = lazy(function()
        return query_args(query)
    end)
    local headers = lazy(function()
        return ngx.req.get_headers(200)
    end)
    local method = ngx.req.get_method()
    for i, r in ipairs(o.routes) do
        if matches(r.match or {}, path, args, headers, method) then
            local draw = math.random(0, 9999)
            local split = r.splits[#r.splits]
            for j, s in ipairs(r.splits) do
                if draw < s.upto then
                    split = s
                    ngx.var.meshctl_pick = key .. ":" .. i .. ":" .. j
                    break
                end
            end
            if ngx.var.meshctl_pick == "" then
                ngx.var.meshctl_pick = key .. ":" .. i .. ":" .. #r.splits
            end
            local cluster = split.cluster
            if balancer.count(cluster) == 0 then
                for _, f in ipairs(split.failover or {}) do
                    if balancer.count(f) > 0 then
                        cluster = f
                        break
                    end
                end
            end
            if balancer.count(cluster) == 0 then
                ngx.log(ngx.WARN, "meshctl router: no healthy endpoint for ", cluster)
                return ngx.exit(503)
            end
            request_ops(split.req)
            request_ops(r.req)
            if type(r.rewrite) == "table" then
                if r.rewrite.strip < 0 then
                    path = r.rewrite.to
                else
                    path = r.rewrite.to .. path:sub(r.rewrite.strip + 1)
                end
            end
            local var = ngx.var
            var.meshctl_uri = query and (path .. "?" .. query) or path
            var.meshctl_hash = hash_key(DOC.clusters[cluster], headers, args)
            local a = DOC.actions[split.actions[cluster]]
            var.meshctl_block = a.up
            var.meshctl_tls_name = a.tls
            var.meshctl_tries = a.tries
            var.meshctl_section = a.section
            var.meshctl_peer = a.peer
            var.meshctl_subset = a.subset
            return ngx.exec("@" .. a.loc)
        end
    end
    return ngx.exit(404)
end

function _M.respond()
    local pick = ngx.var.meshctl_pick
    if not pick or pick == "" then
        return
    end
    local key, i, j = pick:match("^([^:]+):(%d+):(%d+)$")
    local o = key and DOC.outbounds[key]
    local r = o and o.routes[tonumber(i)]
    if not r then
        return
    end
    local s = r.splits[tonumber(j)]
    response_ops(s and s.resp)
    response_ops(r.resp)
end

return _M
