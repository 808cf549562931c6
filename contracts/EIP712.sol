// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title EIP-712 domain and non-malleable signature recovery
/// @notice Every signed fact of gridtrade (a meter's registration, production and deliveries; an
///         account's offers and bids) is EIP-712 typed data whose domain names the contract that
///         checks it, its version, the chain id and the contract's address. A signature made for
///         one contract or one chain is therefore worth nothing on another.
/// @dev The domain separator is computed once and cached in immutables; it is recomputed only if
///      the chain id changes (a fork), so a signature never outlives its chain. Signatures are
///      65 bytes r ‖ s ‖ v with v in {27, 28} and s in the lower half of the curve order (EIP-2):
///      the one alternative encoding of each signature is refused, so a signature is never a
///      second, distinct byte string for the same fact.
abstract contract EIP712 {
    bytes32 private constant _DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    /// @dev Upper bound of a non-malleable secp256k1 signature's s value (EIP-2).
    uint256 private constant _HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    bytes32 private immutable _hashedName;
    bytes32 private immutable _hashedVersion;
    uint256 private immutable _cachedChainId;
    bytes32 private immutable _cachedDomainSeparator;

    /// @param name The domain's name ("GridTrade EnergyMarket"...).
    /// @param version The domain's version ("2").
    constructor(string memory name, string memory version) {
        _hashedName = keccak256(bytes(name));
        _hashedVersion = keccak256(bytes(version));
        _cachedChainId = block.chainid;
        _cachedDomainSeparator = _buildDomainSeparator();
    }

    /// @notice The EIP-712 domain separator of this contract on the current chain.
    function domainSeparator() public view returns (bytes32) {
        return block.chainid == _cachedChainId ? _cachedDomainSeparator : _buildDomainSeparator();
    }

    /// @dev The digest a key signs for the struct whose EIP-712 hashStruct is `structHash`.
    function _hashTypedData(bytes32 structHash) internal view returns (bytes32 digest) {
        bytes32 separator = domainSeparator();
        assembly ("memory-safe") {
            let ptr := mload(0x40)
            mstore(ptr, hex"1901")
            mstore(add(ptr, 0x02), separator)
            mstore(add(ptr, 0x22), structHash)
            digest := keccak256(ptr, 0x42)
        }
    }

    /// @dev The signer of `digest`, or the zero address when `signature` is not 65 bytes, has a
    ///      v other than 27 or 28, a high s, or recovers no key. Callers compare the result with
    ///      the expected signer (never the zero address) and revert with their own reason.
    function _recover(bytes32 digest, bytes calldata signature) internal pure returns (address) {
        if (signature.length != 65) {
            return address(0);
        }
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (uint256(s) > _HALF_ORDER || (v != 27 && v != 28)) {
            return address(0);
        }
        return ecrecover(digest, v, r, s);
    }

    function _buildDomainSeparator() private view returns (bytes32) {
        return keccak256(abi.encode(_DOMAIN_TYPEHASH, _hashedName, _hashedVersion, block.chainid, address(this)));
    }
}
