"""Placeholder RSGI app until the API lands: only GET /healthz."""


class App:
    async def __rsgi__(self, scope, proto):
        if scope.path == "/healthz":
            proto.response_bytes(200, [("content-type", "application/json")], b'{"status":"ok"}')
        else:
            proto.response_bytes(404, [("content-type", "application/json")],
                                 b'{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}')


app = App()
