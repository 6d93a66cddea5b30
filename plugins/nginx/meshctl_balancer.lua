-- meshctl endpoint balancer for nginx http upstreams.
--
-- Endpoints live in the shared dict `meshctl_endpoints`, so endpoint churn
-- never reloads nginx: the agent posts a new endpoint document to the control
-- socket (post_endpoints), every worker notices the bumped version and
-- rebuilds its local peer list on the next request.
--
-- Document: {"clusters": {"<cluster id>": [["198.18.0.12", 21000], ...]}}
-- Addresses are validated here again (IP literals and ports only) even though
-- compile() already refused anything else: this is the last gate.
local cjson = require("cjson.safe")

local _M = {}
local DICT = "meshctl_endpoints"
local cache = {}

local function valid_peer(p)
    if type(p) ~= "table" or type(p[1]) ~= "string" or type(p[2]) ~= "number" then
        return false
    end
    if p[2] < 1 or p[2] > 65535 or p[2] % 1 ~= 0 then
        return false
    end
    return p[1]:match("^%d+%.%d+%.%d+%.%d+$") ~= nil or p[1]:match("^[%x:]+$") ~= nil
end

-- Store a decoded document; returns nil, err when any part of it is invalid.
local function store(doc)
    if type(doc) ~= "table" or type(doc.clusters) ~= "table" then
        return nil, "document needs a clusters table"
    end
    for id, peers in pairs(doc.clusters) do
        if type(id) ~= "string" or not id:match("^[%w_.-]+$") or type(peers) ~= "table" then
            return nil, "bad cluster entry"
        end
        for _, p in ipairs(peers) do
            if not valid_peer(p) then
                return nil, "bad peer in cluster " .. id
            end
        end
    end
    -- The document is the whole state: clusters it does not name are gone.
    local dict = ngx.shared[DICT]
    for _, key in ipairs(dict:get_keys(0)) do
        if key:sub(1, 2) == "c:" and doc.clusters[key:sub(3)] == nil then
            dict:delete(key)
        end
    end
    for id, peers in pairs(doc.clusters) do
        dict:set("c:" .. id, cjson.encode(peers))
    end
    dict:incr("version", 1, 0)
    return true
end

-- init_by_lua: load the endpoints the agent wrote before this (re)load.
function _M.init(path)
    local f = io.open(path, "rb")
    if not f then
        return
    end
    local data = f:read("*a")
    f:close()
    local ok, err = store(cjson.decode(data))
    if not ok then
        ngx.log(ngx.ERR, "meshctl: ignoring ", path, ": ", err)
    end
end

local function peers_of(id)
    local dict = ngx.shared[DICT]
    local version = dict:get("version") or 0
    local c = cache[id]
    if c and c.version == version then
        return c
    end
    local raw = dict:get("c:" .. id)
    local peers = raw and cjson.decode(raw) or {}
    c = { version = version, peers = peers, rr = c and c.rr or 0 }
    cache[id] = c
    return c
end

-- balancer_by_lua: round robin over the cluster's passing peers; on a retry
-- (proxy_next_upstream) the next peer is tried.
function _M.balance(id)
    local balancer = require("ngx.balancer")
    local c = peers_of(id)
    local n = #c.peers
    if n == 0 then
        ngx.log(ngx.WARN, "meshctl: no passing endpoint in ", id)
        return ngx.exit(502)
    end
    if not ngx.ctx.meshctl_tried then
        ngx.ctx.meshctl_tried = true
        if n > 1 then
            balancer.set_more_tries(math.min(n - 1, 2))
        end
    end
    c.rr = c.rr % n + 1
    local p = c.peers[c.rr]
    local ok, err = balancer.set_current_peer(p[1], p[2])
    if not ok then
        ngx.log(ngx.ERR, "meshctl: set_current_peer failed: ", err)
        return ngx.exit(502)
    end
end

-- content_by_lua on the control socket: POST a document, GET the current one.
function _M.control()
    if ngx.req.get_method() == "POST" then
        ngx.req.read_body()
        local ok, err = store(cjson.decode(ngx.req.get_body_data() or ""))
        if not ok then
            ngx.status = 400
            ngx.say(err)
            return
        end
        ngx.say(ngx.shared[DICT]:get("version"))
        return
    end
    local dict = ngx.shared[DICT]
    local out = { version = dict:get("version") or 0, clusters = {} }
    for _, key in ipairs(dict:get_keys(0)) do
        if key:sub(1, 2) == "c:" then
            out.clusters[key:sub(3)] = cjson.decode(dict:get(key))
        end
    end
    ngx.say(cjson.encode(out))
end

return _M
