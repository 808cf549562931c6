// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "./AccessControl.sol";
import {EIP712} from "./EIP712.sol";

/// @title Meter Registry: which meter key speaks for which account
/// @notice A meter holds a key of its own. Registered here for an account, that key's signatures
///         mint the account's production (EnergyToken) and pay for its deliveries on trades where
///         the account buys (EnergyMarket). The registrar registers a meter once, ever, and only
///         with the meter key's own signature of the binding, so nobody can register a key they do
///         not hold or bind a meter to an account its key did not name. A revoked meter (a stolen
///         or retired key) stays revoked: its old signatures stop counting everywhere at once,
///         and it can never be registered again, for the same account or another.
/// @dev EIP-712 domain "GridTrade MeterRegistry", version "2". One storage slot per meter.
contract MeterRegistry is AccessControl, EIP712 {
    /// @notice Role allowed to register and revoke meters.
    bytes32 public constant REGISTRAR_ROLE = keccak256("REGISTRAR_ROLE");
    /// @notice EIP-712 type a meter key signs to be registered for an account.
    bytes32 public constant METER_KEY_TYPEHASH = keccak256("MeterKey(address meter,address account)");

    /// @notice Lifecycle of a meter key: unknown, then active, then (maybe) revoked for good.
    enum State {
        Unknown,
        Active,
        Revoked
    }

    struct Meter {
        address account;
        State state;
    }

    mapping(address meter => Meter) private _meters;

    /// @notice `meter`'s key now signs for `account`.
    event MeterRegistered(address indexed meter, address indexed account);
    /// @notice `meter`'s key no longer signs for anyone.
    event MeterRevoked(address indexed meter);

    /// @param admin Receives DEFAULT_ADMIN_ROLE (grants and revokes roles, nothing else).
    /// @param registrar Receives REGISTRAR_ROLE.
    constructor(address admin, address registrar) EIP712("GridTrade MeterRegistry", "2") {
        require(admin != address(0) && registrar != address(0), "MeterRegistry: zero address");
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(REGISTRAR_ROLE, registrar);
    }

    /// @notice Registers `meter` for `account`. `meterSig` is the meter key's EIP-712 signature of
    ///         MeterKey(meter, account): it proves the key is held and names the account.
    /// @dev Reverts "MeterRegistry: caller is not the registrar", "MeterRegistry: zero address",
    ///      "MeterRegistry: bad signature", "MeterRegistry: meter known" (active or revoked).
    function register(address meter, address account, bytes calldata meterSig)
        external
        onlyRole(REGISTRAR_ROLE, "MeterRegistry: caller is not the registrar")
    {
        require(meter != address(0) && account != address(0), "MeterRegistry: zero address");
        require(_recover(registrationDigest(meter, account), meterSig) == meter, "MeterRegistry: bad signature");
        Meter storage m = _meters[meter];
        require(m.state == State.Unknown, "MeterRegistry: meter known");
        m.account = account;
        m.state = State.Active;
        emit MeterRegistered(meter, account);
    }

    /// @notice Revokes `meter` for good: its signatures count for nobody from now on.
    /// @dev Reverts "MeterRegistry: caller is not the registrar", "MeterRegistry: meter not active".
    function revoke(address meter) external onlyRole(REGISTRAR_ROLE, "MeterRegistry: caller is not the registrar") {
        Meter storage m = _meters[meter];
        require(m.state == State.Active, "MeterRegistry: meter not active");
        m.state = State.Revoked;
        emit MeterRevoked(meter);
    }

    /// @notice The account `meter` signs for, or the zero address if it is unknown or revoked.
    function accountOf(address meter) external view returns (address) {
        Meter storage m = _meters[meter];
        return m.state == State.Active ? m.account : address(0);
    }

    /// @notice `meter`'s state and the account it was registered for (kept after a revocation).
    function meterOf(address meter) external view returns (State state, address account) {
        Meter storage m = _meters[meter];
        return (m.state, m.account);
    }

    /// @notice The EIP-712 digest a meter key signs to be registered for `account`.
    function registrationDigest(address meter, address account) public view returns (bytes32) {
        return _hashTypedData(keccak256(abi.encode(METER_KEY_TYPEHASH, meter, account)));
    }
}
