-- The control-socket handler shared by meshctl's nginx modules (content_by_lua):
-- POST a whole document, validated and stored by the module's `store`, and
-- answer the new version of its shared dict; GET answers `dump()` as JSON.
local cjson = require("cjson.safe")

local _M = {}

function _M.serve(dict, store, dump)
    if ngx.req.get_method() == "POST" then
        ngx.req.read_body()
        local ok, err = store(cjson.decode(ngx.req.get_body_data() or ""))
        if not ok then
            ngx.status = 400
            ngx.say(err)
            return
        end
        ngx.say(ngx.shared[dict]:get("version"))
        return
    end
    ngx.say(cjson.encode(dump()))
end

return _M
