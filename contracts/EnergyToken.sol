// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "./AccessControl.sol";
import {EIP712} from "./EIP712.sol";
import {IERC20} from "./IERC20.sol";
import {MeterRegistry} from "./MeterRegistry.sol";

/// @title Energy Token: one token is one kWh of produced energy
/// @notice ERC-20 with 3 decimals, so one base unit is one Wh. Tokens come into existence only
///         from a production counter signed by a meter key registered in the MeterRegistry: the
///         meter signs its cumulative production (EIP-712 `Production`), anyone submits it, and
///         the token mints the increase since the meter's last mint to the account the meter is
///         registered for. A reading can therefore be minted once at most, whoever submits it
///         and however often; an older reading mints nothing; a key that is not a registered
///         meter's mints nothing. There is no other way to mint, for anyone, the admin included.
/// @dev EIP-712 domain "GridTrade EnergyToken", version "2". The registry is trusted (set once at
///      construction) and only read. Pausing stops minting only: holders keep transferring.
contract EnergyToken is IERC20, AccessControl, EIP712 {
    /// @notice Role allowed to pause and unpause minting.
    bytes32 public constant PAUSER_ROLE = keccak256("PAUSER_ROLE");
    /// @notice EIP-712 type a meter key signs: its cumulative production in Wh.
    bytes32 public constant PRODUCTION_TYPEHASH = keccak256("Production(address meter,uint256 producedWh)");

    /// @notice ERC-20 metadata.
    string public constant name = "Energy Token";
    string public constant symbol = "kWh";
    uint8 public constant decimals = 3;

    /// @notice Where meters are registered.
    MeterRegistry public immutable registry;

    /// @inheritdoc IERC20
    uint256 public totalSupply;
    /// @inheritdoc IERC20
    mapping(address account => uint256) public balanceOf;
    /// @inheritdoc IERC20
    mapping(address owner => mapping(address spender => uint256)) public allowance;
    /// @notice The highest cumulative production of `meter` minted so far, in Wh.
    mapping(address meter => uint256) public mintedOf;
    /// @notice Whether minting is paused.
    bool public paused;

    /// @notice `amountWh` Wh were minted to `to`: `meter`'s signed cumulative production reached `producedWh`.
    event Minted(address indexed to, address indexed meter, uint256 producedWh, uint256 amountWh);
    /// @notice `account` paused minting.
    event Paused(address account);
    /// @notice `account` resumed minting.
    event Unpaused(address account);

    /// @param registry_ The meter registry.
    /// @param admin Receives DEFAULT_ADMIN_ROLE (grants and revokes roles; cannot mint).
    /// @param pauser Receives PAUSER_ROLE.
    constructor(MeterRegistry registry_, address admin, address pauser) EIP712("GridTrade EnergyToken", "2") {
        require(address(registry_) != address(0), "EnergyToken: zero registry");
        require(admin != address(0) && pauser != address(0), "EnergyToken: zero address");
        registry = registry_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(PAUSER_ROLE, pauser);
    }

    // ---------------------------------------------------------------- minting

    /// @notice Mints what `meter` produced since its last mint: `producedWh` (its signed cumulative
    ///         counter) minus mintedOf(meter), to the account the meter is registered for. Anyone
    ///         may submit; the signature `sig` (the meter key's, over Production(meter, producedWh))
    ///         is what counts.
    /// @dev Reverts "EnergyToken: paused", "EnergyToken: bad signature",
    ///      "EnergyToken: meter not registered" (unknown or revoked), "EnergyToken: reading not above minted".
    function mint(address meter, uint256 producedWh, bytes calldata sig) external {
        require(!paused, "EnergyToken: paused");
        address to = _checkedAccount(meter, producedWh, sig);
        uint256 before = mintedOf[meter];
        require(producedWh > before, "EnergyToken: reading not above minted");
        uint256 amount = producedWh - before;
        mintedOf[meter] = producedWh;
        totalSupply += amount;
        _credit(to, meter, producedWh, amount);
    }

    /// @notice Mints many meters' signed counters at once (as mint, entry by entry). An entry not
    ///         above its meter's minted counter is skipped before any other check, so two
    ///         submitters of overlapping batches do not fail each other; any other bad entry
    ///         (a bad signature, an unregistered or revoked meter) reverts the whole batch.
    /// @dev Reverts as mint (but never "reading not above minted"), plus "EnergyToken: length mismatch".
    function mintBatch(address[] calldata meters, uint256[] calldata producedWh, bytes[] calldata sigs) external {
        require(!paused, "EnergyToken: paused");
        uint256 n = meters.length;
        require(producedWh.length == n && sigs.length == n, "EnergyToken: length mismatch");
        uint256 total;
        for (uint256 i; i < n; ++i) {
            address meter = meters[i];
            uint256 produced = producedWh[i];
            uint256 before = mintedOf[meter];
            if (produced <= before) {
                continue;
            }
            address to = _checkedAccount(meter, produced, sigs[i]);
            uint256 amount = produced - before;
            mintedOf[meter] = produced;
            total += amount;
            _credit(to, meter, produced, amount);
        }
        totalSupply += total;
    }

    /// @notice The EIP-712 digest a meter key signs for its cumulative production.
    function productionDigest(address meter, uint256 producedWh) public view returns (bytes32) {
        return _hashTypedData(keccak256(abi.encode(PRODUCTION_TYPEHASH, meter, producedWh)));
    }

    /// @notice Stops minting. Transfers keep working.
    /// @dev Reverts "EnergyToken: caller is not the pauser", "EnergyToken: paused".
    function pause() external onlyRole(PAUSER_ROLE, "EnergyToken: caller is not the pauser") {
        require(!paused, "EnergyToken: paused");
        paused = true;
        emit Paused(msg.sender);
    }

    /// @notice Resumes minting.
    /// @dev Reverts "EnergyToken: caller is not the pauser", "EnergyToken: not paused".
    function unpause() external onlyRole(PAUSER_ROLE, "EnergyToken: caller is not the pauser") {
        require(paused, "EnergyToken: not paused");
        paused = false;
        emit Unpaused(msg.sender);
    }

    // ---------------------------------------------------------------- ERC-20

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

    // ---------------------------------------------------------------- internals

    /// @dev The account `meter` is registered for, once `sig` is the meter key's signature of its
    ///      counter `producedWh`. The signature is checked first: whether a key is registered is
    ///      nobody's business until it has signed.
    function _checkedAccount(address meter, uint256 producedWh, bytes calldata sig) private view returns (address to) {
        address signer = _recover(productionDigest(meter, producedWh), sig);
        require(signer == meter && signer != address(0), "EnergyToken: bad signature");
        to = registry.accountOf(meter);
        require(to != address(0), "EnergyToken: meter not registered");
    }

    /// @dev Adds `amount` to `to` (totalSupply is updated by the caller, once per batch).
    function _credit(address to, address meter, uint256 producedWh, uint256 amount) private {
        unchecked {
            balanceOf[to] += amount; // cannot overflow: bounded by totalSupply, which is checked
        }
        emit Transfer(address(0), to, amount);
        emit Minted(to, meter, producedWh, amount);
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
