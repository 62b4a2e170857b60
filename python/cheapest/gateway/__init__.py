"""Policy, with no HTTP in it: authenticate a key, admit a request (standing, budgets, credits, rate limits:
one decision), run and settle a generation, manage keys, report usage, take payments.

The server's handlers parse a request, call one of these, and encode the result or the `Refusal`.
"""

from cheapest.gateway.admission import Admission, RateState
from cheapest.gateway.auth import Caller, Limits
from cheapest.gateway.errors import Refusal
from cheapest.gateway.policy import Gateway

__all__ = ["Admission", "Caller", "Gateway", "Limits", "RateState", "Refusal"]
