-- Test harness: runs meshctl_authz_rules over test cases inside a real proxy's
-- Lua (nginx: LuaJIT + ngx.re; HAProxy: Lua 5.3 + its Regex class).
-- tests/integration/test_authz_lua.py compares the decisions with
-- meshctl.intentions.decide().
local cjson = require("cjson.safe")
local rules = require("meshctl_authz_rules")

local M = {}

-- One case, its request headers answered by header(name).
local function decide(c, re_full, header)
    local req = { caller = c.caller, path = rules.normalize_path(c.raw_path), header = header }
    if c.method ~= cjson.null then
        req.method = c.method
    end
    local allowed, reason = rules.decide(c.authz, req, re_full)
    local valid = rules.validate({ trust_domain = "meshctl.test", services = { api = c.authz } })
    return { allowed = allowed, reason = reason, path = req.path, valid = valid == true,
             caller = rules.caller(c.cn, "meshctl.test") }
end

-- Every case of the JSON file in_path, headers from the file; decisions to out_path.
function M.run_file(re_full, in_path, out_path)
    local f = assert(io.open(in_path, "rb"))
    local cases = assert(cjson.decode(f:read("*a")))
    f:close()
    local out = {}
    for i, c in ipairs(cases) do
        out[i] = decide(c, re_full, function(name) return c.headers[name] end)
    end
    local o = assert(io.open(out_path, "wb"))
    o:write(cjson.encode(out))
    o:close()
end

-- nginx content_by_lua: one case per request, in its body; the headers are the
-- request's own, looked up as meshctl's nginx modules look them up.
function M.serve(re_full)
    ngx.req.read_body()
    local c = assert(cjson.decode(ngx.req.get_body_data() or ""))
    ngx.say(cjson.encode(decide(c, re_full, require("meshctl_headers").reader())))
end

return M
