// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "./AccessControl.sol";
import {IERC20} from "./IERC20.sol";

/// @title Energy Token: one token is one kWh of produced energy
/// @notice ERC-20 with 3 decimals, so one base unit is one Wh. Tokens come into existence only
///         when an account holding METER_ROLE reports a production reading; each reading id
///         mints at most once, so a retried or replayed report cannot create energy twice.
contract EnergyToken is IERC20, AccessControl {
    /// @notice Role allowed to mint (the chain service's minting key or a meter's key).
    bytes32 public constant METER_ROLE = keccak256("METER_ROLE");

    /// @notice ERC-20 metadata.
    string public constant name = "Energy Token";
    string public constant symbol = "kWh";
    uint8 public constant decimals = 3;

    /// @inheritdoc IERC20
    uint256 public totalSupply;
    /// @inheritdoc IERC20
    mapping(address account => uint256) public balanceOf;
    /// @inheritdoc IERC20
    mapping(address owner => mapping(address spender => uint256)) public allowance;
    /// @notice Whether a reading id has been minted already.
    mapping(bytes32 readingId => bool) public minted;

    /// @notice `amountWh` Wh were minted to `to` for the production reading `readingId`.
    event Minted(address indexed to, uint256 amountWh, bytes32 indexed readingId);

    /// @param admin Receives DEFAULT_ADMIN_ROLE and METER_ROLE.
    constructor(address admin) {
        require(admin != address(0), "EnergyToken: zero admin");
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(METER_ROLE, admin);
    }

    /// @notice Mints `amountWh` Wh to `to` for reading `readingId`, once per reading id.
    /// @dev Reverts "EnergyToken: caller is not a meter", "EnergyToken: reading already minted",
    ///      "EnergyToken: mint to the zero address" or "EnergyToken: zero amount".
    function mint(address to, uint256 amountWh, bytes32 readingId)
        external
        onlyRole(METER_ROLE, "EnergyToken: caller is not a meter")
    {
        require(!minted[readingId], "EnergyToken: reading already minted");
        require(to != address(0), "EnergyToken: mint to the zero address");
        require(amountWh > 0, "EnergyToken: zero amount");
        minted[readingId] = true;
        totalSupply += amountWh;
        unchecked {
            balanceOf[to] += amountWh; // cannot overflow: bounded by totalSupply
        }
        emit Transfer(address(0), to, amountWh);
        emit Minted(to, amountWh, readingId);
    }

    /// @inheritdoc IERC20
    function transfer(address to, uint256 value) external returns (bool) {
        _transfer(msg.sender, to, value);
        return true;
    }

    /// @inheritdoc IERC20
    /// @dev An allowance of type(uint256).max is never decreased.
    function transferFrom(address from, address to, uint256 value) external returns (bool) {
        uint256 allowed = allowance[from][msg.sender];
        if (allowed != type(uint256).max) {
            require(allowed >= value, "ERC20: insufficient allowance");
            unchecked {
                allowance[from][msg.sender] = allowed - value;
            }
        }
        _transfer(from, to, value);
        return true;
    }

    /// @inheritdoc IERC20
    function approve(address spender, uint256 value) external returns (bool) {
        require(spender != address(0), "ERC20: approve to the zero address");
        allowance[msg.sender][spender] = value;
        emit Approval(msg.sender, spender, value);
        return true;
    }

    function _transfer(address from, address to, uint256 value) private {
        require(to != address(0), "ERC20: transfer to the zero address");
        uint256 held = balanceOf[from];
        require(held >= value, "ERC20: transfer amount exceeds balance");
        unchecked {
            balanceOf[from] = held - value;
            balanceOf[to] += value; // cannot overflow: bounded by totalSupply
        }
        emit Transfer(from, to, value);
    }
}
