-- Test harness: runs meshctl_authz_rules over the cases in a JSON file and
-- writes the decisions to another, inside a real proxy's Lua (nginx: LuaJIT +
-- ngx.re; HAProxy: Lua 5.3 + its Regex class). tests/integration/test_authz_lua.py
-- compares them with meshctl.intentions.decide().
local cjson = require("cjson.safe")
local rules = require("meshctl_authz_rules")

return function(re_full, in_path, out_path)
    local f = assert(io.open(in_path, "rb"))
    local cases = assert(cjson.decode(f:read("*a")))
    f:close()
    local out = {}
    for i, c in ipairs(cases) do
        local req = {
            caller = c.caller,
            path = rules.normalize_path(c.raw_path),
            header = function(name) return c.headers[name] end,
        }
        if c.method ~= cjson.null then
            req.method = c.method
        end
        local allowed, reason = rules.decide(c.authz, req, re_full)
        local valid = rules.validate({ trust_domain = "meshctl.test", services = { api = c.authz } })
        out[i] = { allowed = allowed, reason = reason, path = req.path, valid = valid == true,
                   caller = rules.caller(c.cn, "meshctl.test") }
    end
    local o = assert(io.open(out_path, "wb"))
    o:write(cjson.encode(out))
    o:close()
end
