-- meshctl authorization at nginx's http inbound listeners (access_by_lua).
--
-- The rules document (see meshctl_authz_rules) lives in the shared dict
-- `meshctl_authz`, so an intention change never reloads nginx: the agent
-- posts the new document to the control socket (control), every worker sees
-- the bumped version and decodes it once. At (re)load, init() takes the
-- document the agent wrote into its runtime state file before the reload.
--
-- The caller is $mesh_caller: the service name from the CN of the client
-- certificate nginx verified against the mesh CA (ssl_verify_client on), only
-- when it is <service>.svc.<trust domain>. The path is nginx's normalized $uri,
-- which is also what the app receives (proxy_pass with a URI part); the inbound
-- server has merge_slashes off, so $uri keeps repeated slashes as Envoy does and
-- rules.decide also checks the merged form.
local cjson = require("cjson.safe")
local rules = require("meshctl_authz_rules")
local headers = require("meshctl_headers")

local _M = {}
local DICT = "meshctl_authz"
local cache = { version = -1, doc = nil }

local function store(doc)
    local ok, err = rules.validate(doc)
    if not ok then
        return nil, err
    end
    local dict = ngx.shared[DICT]
    local stored, serr = dict:set("doc", cjson.encode(doc))
    if not stored then
        return nil, "cannot store the rules: " .. tostring(serr)
    end
    dict:incr("version", 1, 0)
    return true
end

-- init_by_lua: the rules the agent wrote (key "authz" of `state`, its runtime
-- state file as meshctl_state read it, nil when there is none).
function _M.init(state, path)
    if not state or state.authz == nil then
        return
    end
    local ok, err = store(state.authz)
    if not ok then
        ngx.log(ngx.ERR, "meshctl: ignoring the authorization rules in ", path, ": ", err)
    end
end

local function current()
    local dict = ngx.shared[DICT]
    local version = dict:get("version") or 0
    if cache.version ~= version then
        local raw = dict:get("doc")
        cache = { version = version, doc = raw and cjson.decode(raw) or nil }
    end
    return cache.doc
end

local function re_full(pattern, subject)
    local from, _, err = ngx.re.find(subject, "\\A(?:" .. pattern .. ")\\z", "jo")
    if err then
        ngx.log(ngx.ERR, "meshctl: authorization regex does not compile: ", err)
        return nil
    end
    return from ~= nil
end

-- access_by_lua of an http inbound: 403 with a short reason, or on to the app.
function _M.http(service)
    local doc = current()
    local authz = doc and doc.services and doc.services[service]
    local req = {
        caller = ngx.var.mesh_caller or "",
        method = ngx.req.get_method(),
        path = ngx.var.uri,
        header = headers.reader(),
    }
    local allowed, reason = rules.decide(authz, req, re_full)
    if allowed then
        return
    end
    if ngx.var.meshctl_deny then
        ngx.var.meshctl_deny = reason  -- the access-log record's "intention"
    end
    ngx.status = ngx.HTTP_FORBIDDEN
    ngx.header["Content-Type"] = "text/plain"
    ngx.say("denied: ", reason)
    return ngx.exit(ngx.HTTP_FORBIDDEN)
end

-- content_by_lua on the control socket: POST a rules document, GET the current one.
function _M.control()
    require("meshctl_control").serve(DICT, store, function()
        return { version = ngx.shared[DICT]:get("version") or 0, doc = current() }
    end)
end

return _M
