# pragma version ~=0.4.3
"""A minimal ERC-20 with the decimals it is deployed with (6, like USDC), for tests on a local EVM.

Deployed by the tests as "USDC", as a look-alike that emits the very same
Transfer events from another address, and as an 18-decimal stablecoin.
"""

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

name: public(String[32])
decimals: public(uint8)
totalSupply: public(uint256)
balanceOf: public(HashMap[address, uint256])


@deploy
def __init__(_name: String[32], _supply: uint256, _decimals: uint8):
    self.name = _name
    self.decimals = _decimals
    self.totalSupply = _supply
    self.balanceOf[msg.sender] = _supply
    log Transfer(sender=empty(address), receiver=msg.sender, value=_supply)


@internal
def _move(_from: address, _to: address, _value: uint256):
    assert self.balanceOf[_from] >= _value, "insufficient balance"
    self.balanceOf[_from] -= _value
    self.balanceOf[_to] += _value
    log Transfer(sender=_from, receiver=_to, value=_value)


@external
def transfer(_to: address, _value: uint256) -> bool:
    self._move(msg.sender, _to, _value)
    return True


@external
def transfer_split(_to: address, _first: uint256, _second: uint256) -> bool:
    # Two Transfer logs in one transaction: each log index is credited on its own.
    self._move(msg.sender, _to, _first)
    self._move(msg.sender, _to, _second)
    return True
