// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title Minimal role-based access control
/// @notice Roles are bytes32 ids; every role is administered by DEFAULT_ADMIN_ROLE.
/// @dev A reduced form of OpenZeppelin's AccessControl (no per-role admins, no enumeration),
///      with plain revert strings so callers can surface the reason.
abstract contract AccessControl {
    /// @notice The role that may grant and revoke every role, including itself.
    bytes32 public constant DEFAULT_ADMIN_ROLE = 0x00;

    mapping(bytes32 role => mapping(address account => bool)) private _members;

    /// @notice `account` received `role` from `sender`.
    event RoleGranted(bytes32 indexed role, address indexed account, address indexed sender);
    /// @notice `account` lost `role`; `sender` is the admin who revoked it or the account itself.
    event RoleRevoked(bytes32 indexed role, address indexed account, address indexed sender);

    /// @dev Reverts with `reason` unless the caller holds `role`.
    modifier onlyRole(bytes32 role, string memory reason) {
        require(_members[role][msg.sender], reason);
        _;
    }

    /// @notice Whether `account` holds `role`.
    function hasRole(bytes32 role, address account) public view returns (bool) {
        return _members[role][account];
    }

    /// @notice Grants `role` to `account`. Only an admin may call this; granting a held role is a no-op.
    function grantRole(bytes32 role, address account)
        external
        onlyRole(DEFAULT_ADMIN_ROLE, "AccessControl: caller is not an admin")
    {
        require(account != address(0), "AccessControl: zero account");
        _grantRole(role, account);
    }

    /// @notice Revokes `role` from `account`. Only an admin may call this.
    function revokeRole(bytes32 role, address account)
        external
        onlyRole(DEFAULT_ADMIN_ROLE, "AccessControl: caller is not an admin")
    {
        _revokeRole(role, account);
    }

    /// @notice The caller gives up `role` (e.g. a compromised meter key).
    function renounceRole(bytes32 role) external {
        _revokeRole(role, msg.sender);
    }

    function _grantRole(bytes32 role, address account) internal {
        if (!_members[role][account]) {
            _members[role][account] = true;
            emit RoleGranted(role, account, msg.sender);
        }
    }

    function _revokeRole(bytes32 role, address account) internal {
        if (_members[role][account]) {
            _members[role][account] = false;
            emit RoleRevoked(role, account, msg.sender);
        }
    }
}
