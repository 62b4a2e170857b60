"""msgspec Structs for every request and response body, and the OpenAPI document built from them."""
