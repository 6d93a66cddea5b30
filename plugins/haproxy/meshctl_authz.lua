-- meshctl authorization at HAProxy's inbound frontends (lua-load, shared state).
--
-- Actions (set txn.meshctl_deny to the reason when the call is denied, and
-- txn.meshctl_caller to the verified caller; the frontend turns the first into
-- a 403 or a rejected connection):
--   http-request lua.meshctl_authz <service>
--   tcp-request content lua.meshctl_authz_tcp <service>
-- Service (on the status socket): lua.meshctl_authz_control, POST a new rules
-- document (see meshctl_authz_rules) or GET the current one: intention changes
-- never reload HAProxy. At (re)load the document is read from the agent's
-- runtime state file named by the MESHCTL_STATE_FILE environment variable
-- (set with `setenv` in the global section), key "authz".
local cjson = require("cjson.safe")
local rules = require("meshctl_authz_rules")

local doc = nil
local regexes = {}

local function set_doc(new)
    local ok, err = rules.validate(new)
    if not ok then
        return nil, err
    end
    doc = new
    regexes = {}
    return true
end

local function load_file(path)
    local state, rerr = require("meshctl_state").read(path)
    if rerr then
        core.log(core.err, "meshctl: ignoring " .. path .. ": " .. rerr)
    end
    if state and state.authz ~= nil then
        local ok, err = set_doc(state.authz)
        if not ok then
            core.log(core.err, "meshctl: ignoring the authorization rules in " .. path .. ": " .. err)
        end
    end
end

load_file(os.getenv("MESHCTL_STATE_FILE"))

local function re_full(pattern, subject)
    local re = regexes[pattern]
    if re == nil then
        local ok, compiled = Regex.new("\\A(?:" .. pattern .. ")\\z", true)
        if ok then
            re = compiled
        else
            core.log(core.err, "meshctl: authorization regex does not compile: " .. tostring(compiled))
            re = false
        end
        regexes[pattern] = re
    end
    if re == false then
        return nil
    end
    return re:exec(subject)
end

local function caller_of(txn)
    local cn = txn.f:ssl_c_s_dn("CN") or ""
    local caller = rules.caller(cn, doc and doc.trust_domain or "")
    txn:set_var("txn.meshctl_caller", caller)
    return caller
end

local function authz_of(service)
    return doc and doc.services and doc.services[service]
end

core.register_action("meshctl_authz", { "http-req" }, function(txn, service)
    local caller = caller_of(txn)
    local raw = txn.sf:path() or ""
    local path = rules.normalize_path(raw)
    if path ~= raw then
        -- The app receives exactly the path that was authorized.
        txn.http:req_set_path(path)
    end
    -- The header table is built only when a rule looks at a header: building
    -- it for every request was a large part of the inbound's CPU per request.
    local headers
    local req = {
        caller = caller,
        method = txn.f:method(),
        path = path,
        header = function(name)
            headers = headers or txn.http:req_get_headers()
            local v = headers[name]
            if v == nil then
                return nil
            end
            local parts = {}
            for i = 0, #v do
                if v[i] ~= nil then
                    parts[#parts + 1] = v[i]
                end
            end
            return table.concat(parts, ",")
        end,
    }
    local allowed, reason = rules.decide(authz_of(service), req, re_full)
    if not allowed then
        txn:set_var("txn.meshctl_deny", reason)
    end
end, 1)

core.register_action("meshctl_authz_tcp", { "tcp-req" }, function(txn, service)
    local caller = caller_of(txn)
    local req = { caller = caller, method = nil, path = "", header = function() return nil end }
    local allowed, reason = rules.decide(authz_of(service), req, re_full)
    if not allowed then
        txn:set_var("txn.meshctl_deny", reason)
        -- A denied connection is otherwise an empty reply: say who and why, once.
        -- HAProxy writes a Lua log line to its stderr (the agent's proxy log; it
        -- runs without -q) and to the frontend's log targets, which are only the
        -- agent's socket (`no log` drops the global one: no second line here).
        txn:log(core.err, "meshctl: denied connection from " .. tostring(txn.f:src()) .. ":"
            .. tostring(txn.f:src_port()) .. " to " .. service .. ": caller \"" .. caller
            .. "\": " .. reason)
    end
end, 1)

local function reply(applet, status, body)
    applet:set_status(status)
    applet:add_header("content-type", "text/plain")
    applet:add_header("content-length", tostring(#body))
    applet:start_response()
    applet:send(body)
end

core.register_service("meshctl_authz_control", "http", function(applet)
    if applet.method == "POST" then
        local ok, err = set_doc(cjson.decode(applet:receive() or ""))
        if not ok then
            return reply(applet, 400, tostring(err) .. "\n")
        end
        return reply(applet, 200, "ok\n")
    end
    return reply(applet, 200, (cjson.encode({ doc = doc }) or "{}") .. "\n")
end)
