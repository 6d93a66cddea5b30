-- meshctl authorization rules: the decisions of meshctl.intentions.decide(), in Lua.
--
-- Shared by the nginx (LuaJIT) and HAProxy (Lua 5.3) plugins; only the
-- regex engine differs, so callers pass a `re_full(pattern, subject)` that
-- returns true/false for a whole-string match, or nil when the pattern does
-- not compile (then the permission is read the stricter way: a deny matches,
-- an allow does not).
--
-- The rules document (built by meshctl.intentions.authz_document):
--   {"trust_domain": "meshctl.test",
--    "services": {"api": {"default_action": "deny", "l7": true, "pending": false,
--                         "error": "", "rules": [{"source": "web", "action": "l7",
--                         "intention": "web -> api", "permissions": [...]}]}}}
-- Values never reach a proxy config: they are data, validated by the agent
-- and checked again here (validate) before they are used.
local M = {}

local ACTIONS = { allow = true, deny = true }
local KINDS = { present = true, exact = true, prefix = true, suffix = true,
                contains = true, regex = true }
local NAME = "^[a-z0-9][a-z0-9-]*$"

local function str(v)
    return type(v) == "string"
end

local function service_name(s)
    return str(s) and #s <= 63 and s:match(NAME) ~= nil and s:sub(-1) ~= "-"
end

local function list(v)
    return v == nil or type(v) == "table"
end

-- Returns true, or nil and the reason the document is refused.
function M.validate(doc)
    if type(doc) ~= "table" or not str(doc.trust_domain) or type(doc.services) ~= "table" then
        return nil, "authorization document needs trust_domain and services"
    end
    if not doc.trust_domain:match("^[a-z0-9][a-z0-9.-]*$") then
        return nil, "bad trust_domain"
    end
    for name, a in pairs(doc.services) do
        if not service_name(name) or type(a) ~= "table" then
            return nil, "bad service entry"
        end
        if not ACTIONS[a.default_action] or type(a.rules) ~= "table" then
            return nil, "bad authorization of " .. name
        end
        for _, r in ipairs(a.rules) do
            if type(r) ~= "table" or not str(r.intention)
                or not (r.source == "*" or service_name(r.source))
                or not (ACTIONS[r.action] or r.action == "l7") or not list(r.permissions) then
                return nil, "bad rule of " .. name
            end
            for _, p in ipairs(r.permissions or {}) do
                if type(p) ~= "table" or not ACTIONS[p.action] or not list(p.methods)
                    or not list(p.headers) then
                    return nil, "bad permission of " .. name
                end
                for _, k in ipairs({ "path_exact", "path_prefix", "path_regex" }) do
                    if p[k] ~= nil and not str(p[k]) then
                        return nil, "bad path in a permission of " .. name
                    end
                end
                for _, m in ipairs(p.methods or {}) do
                    if not str(m) then
                        return nil, "bad method in a permission of " .. name
                    end
                end
                for _, h in ipairs(p.headers or {}) do
                    if type(h) ~= "table" or not str(h.name) or not KINDS[h.kind]
                        or not str(h.value) then
                        return nil, "bad header match in a permission of " .. name
                    end
                end
            end
        end
    end
    return true
end

-- The caller's service name from its certificate's CN (<service>.svc.<trust domain>),
-- or "" when the CN is not a mesh identity of this trust domain.
function M.caller(cn, trust_domain)
    if not str(cn) or not str(trust_domain) or trust_domain == "" then
        return ""
    end
    local suffix = ".svc." .. trust_domain
    if #cn <= #suffix or cn:sub(-#suffix) ~= suffix then
        return ""
    end
    local name = cn:sub(1, #cn - #suffix)
    if not service_name(name) then
        return ""
    end
    return name
end

local UNRESERVED = "^[A-Za-z0-9%-%._~]$"

-- RFC 3986 normalization as meshctl.intentions.normalize_path does it (Envoy's
-- normalize_path, merge_slashes off): unreserved escapes decoded, other escapes
-- upper-cased, dot segments removed, repeated slashes kept.
function M.normalize_path(path)
    path = (path:gsub("%%(%x%x)", function(hex)
        local c = string.char(tonumber(hex, 16))
        if c:match(UNRESERVED) then
            return c
        end
        return "%" .. hex:upper()
    end))
    local segments = {}
    for seg in (path .. "/"):gmatch("([^/]*)/") do
        segments[#segments + 1] = seg
    end
    local out = {}
    for i, seg in ipairs(segments) do
        local last = i == #segments
        if seg == "." then
            if last then
                out[#out + 1] = ""
            end
        elseif seg == ".." then
            if #out > 1 then
                out[#out] = nil
            end
            if last then
                out[#out + 1] = ""
            end
        else
            out[#out + 1] = seg
        end
    end
    local result = table.concat(out, "/")
    if result:sub(1, 1) ~= "/" then
        result = "/" .. result
    end
    return result
end

-- The path with every run of slashes merged, as meshctl.intentions.merge_slashes:
-- what an app that merges slashes itself reads, so decide() checks it too.
function M.merge_slashes(path)
    return (path:gsub("//+", "/"))
end

local function header_matches(h, req, re_full, strict)
    local v = req.header(h.name)
    local matched
    if v == nil then
        matched = false
    elseif h.kind == "present" then
        matched = true
    elseif h.kind == "regex" then
        matched = re_full(h.value, v)
        if matched == nil then
            return strict
        end
    else
        local have, want = v, h.value
        if h.ignore_case then
            have, want = have:lower(), want:lower()
        end
        if h.kind == "exact" then
            matched = have == want
        elseif h.kind == "prefix" then
            matched = have:sub(1, #want) == want
        elseif h.kind == "suffix" then
            matched = #want == 0 or (#have >= #want and have:sub(-#want) == want)
        else
            matched = have:find(want, 1, true) ~= nil
        end
    end
    return matched ~= (h.invert == true)
end

local function permission_matches(p, req, re_full)
    local strict = p.action == "deny"  -- a regex that fails to compile: deny wins
    if p.path_exact and p.path_exact ~= "" and req.path ~= p.path_exact then
        return false
    end
    if p.path_prefix and p.path_prefix ~= "" and req.path:sub(1, #p.path_prefix) ~= p.path_prefix then
        return false
    end
    if p.path_regex and p.path_regex ~= "" then
        local ok = re_full(p.path_regex, req.path)
        if ok == nil then
            ok = strict
        end
        if not ok then
            return false
        end
    end
    if p.methods and #p.methods > 0 then
        local found = false
        for _, m in ipairs(p.methods) do
            if m == req.method then
                found = true
                break
            end
        end
        if not found then
            return false
        end
    end
    for _, h in ipairs(p.headers or {}) do
        if not header_matches(h, req, re_full, strict) then
            return false
        end
    end
    return true
end

-- One evaluation of decide(), on req.path exactly as it is.
local function decide_one(a, req, re_full)
    if a == nil then
        return false, "no authorization rules for this service"
    end
    if a.pending then
        return false, "intentions not loaded yet"
    end
    if a.error ~= nil and a.error ~= "" then
        return false, "intentions could not be compiled"
    end
    if not service_name(req.caller) then
        return false, "caller has no mesh identity"
    end
    for _, r in ipairs(a.rules) do
        if r.source == "*" or r.source == req.caller then
            if r.action == "allow" then
                return true, "intention " .. r.intention .. " allows"
            elseif r.action == "deny" then
                return false, "intention " .. r.intention .. " denies"
            end
            if not a.l7 or req.method == nil then
                return false, "intention " .. r.intention .. " has L7 permissions"
            end
            for j, p in ipairs(r.permissions or {}) do
                if permission_matches(p, req, re_full) then
                    local verb = p.action == "allow" and "allows" or "denies"
                    return p.action == "allow",
                        "permission " .. j .. " of intention " .. r.intention .. " " .. verb
                end
            end
            return a.default_action == "allow", "no permission of intention " .. r.intention
                .. " matched; default " .. a.default_action
        end
    end
    return a.default_action == "allow", "no intention matched; default " .. a.default_action
end

-- decide(authorization or nil, req, re_full) -> allowed (boolean), reason (string)
-- req: {caller = "web", method = "GET" or nil for a connection, path = "/x",
--       header = function(lower-case name) -> joined values or nil}
-- req.path is the path the app receives (normalize_path: repeated slashes kept).
-- As meshctl.intentions.decide: evaluated on it and, when it has repeated
-- slashes, on its merge_slashes form too; denied if either denies, so "//admin"
-- cannot dodge a rule on "/admin". The merged form's deny is the answer when
-- there is one, else the kept form's decision.
function M.decide(a, req, re_full)
    local merged = req.path and M.merge_slashes(req.path)
    if merged ~= nil and merged ~= req.path then
        local other = {}
        for k, v in pairs(req) do
            other[k] = v
        end
        other.path = merged
        local allowed, reason = decide_one(a, other, re_full)
        if not allowed then
            return allowed, reason
        end
    end
    return decide_one(a, req, re_full)
end

return M
