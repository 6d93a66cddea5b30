-- The agent's runtime state file (JSON, written atomically by the agent before a
-- proxy starts or reloads), as read by meshctl's Lua modules in nginx and HAProxy
-- at load time. read(path) answers the decoded document; nil when there is no
-- file (yet); nil and why when the file is there but not a JSON object.
local cjson = require("cjson.safe")

local _M = {}

function _M.read(path)
    if not path or path == "" then
        return nil
    end
    local f = io.open(path, "rb")
    if not f then
        return nil
    end
    local data = f:read("*a")
    f:close()
    local doc = cjson.decode(data)
    if type(doc) ~= "table" then
        return nil, "not a JSON object"
    end
    return doc
end

return _M
