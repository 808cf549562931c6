// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "./AccessControl.sol";
import {IERC20} from "./IERC20.sol";

/// @title Energy Market: escrowed, metered energy trades
/// @notice Buyers keep Ether in escrow here. The operator (the auction's chain service) opens a
///         trade once an auction is won: the buyer's Ether for the whole trade and the seller's
///         Energy Tokens (1 unit = 1 Wh) are locked. As the buyer's meter measures delivery,
///         cumulative delivered Wh are settled: the seller is credited the price of the new Wh
///         (pull payment, withdrawn with withdrawCredit) and the buyer receives their tokens.
///         Closing settles the last reading and frees what was not delivered.
///
///         Rounding: the Ether due for a cumulative delivery of `d` Wh at `p` wei per kWh is
///         floor(d * p / 1000). A settlement pays cost(new) - cost(old), so the seller's total for
///         a trade is always exactly floor(delivered * p / 1000) however many steps it took;
///         the buyer locks floor(wh * p / 1000) and gets cost(wh) - cost(delivered) back on close.
///
///         Delivery readings can also be signed (EIP-712) by the meter key registered for the
///         buyer's account; anyone may submit such a reading and nobody can forge or replay one.
/// @dev Checks-effects-interactions throughout, plus a reentrancy guard on every state-changing
///      entry point. The token is trusted (set once at construction). Plain Ether sent without
///      deposit() is rejected, so the contract's balance is free + locked escrow + unpaid credit
///      (Ether forced in by selfdestruct or as a block reward could only add an unowned surplus).
contract EnergyMarket is AccessControl {
    /// @notice Role allowed to open trades, settle, close any trade and register meters.
    bytes32 public constant OPERATOR_ROLE = keccak256("OPERATOR_ROLE");

    /// @notice EIP-712 type of a signed delivery reading: cumulative Wh delivered on a trade.
    bytes32 public constant DELIVERY_TYPEHASH = keccak256("Delivery(bytes32 tradeId,uint256 deliveredWh)");
    bytes32 private constant _DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    /// @notice EIP-712 domain name and version.
    string public constant EIP712_NAME = "GridTrade EnergyMarket";
    string public constant EIP712_VERSION = "1";
    /// @dev Upper bound of a non-malleable secp256k1 signature's s value (EIP-2).
    uint256 private constant _HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    enum Status {
        None,
        Open,
        Closed
    }

    /// @notice One trade; fields are packed into three storage slots.
    /// @param seller Account whose tokens are sold and who is credited.
    /// @param wh Energy traded, in Wh.
    /// @param status None (unknown id), Open or Closed.
    /// @param buyer Account whose escrow pays and who receives the tokens.
    /// @param deliveredWh Cumulative Wh settled so far.
    /// @param priceWeiPerKwh Price in wei per kWh (1000 Wh).
    struct Trade {
        address seller;
        uint64 wh;
        Status status;
        address buyer;
        uint64 deliveredWh;
        uint128 priceWeiPerKwh;
    }

    /// @notice The Energy Token traded here.
    IERC20 public immutable token;

    /// @notice Trades by their off-chain chosen id.
    mapping(bytes32 tradeId => Trade) public trades;
    /// @notice Escrow a buyer may withdraw or commit to a new trade, in wei.
    mapping(address account => uint256) public freeEscrow;
    /// @notice Escrow committed to the buyer's open trades and not yet paid out, in wei.
    mapping(address account => uint256) public lockedEscrow;
    /// @notice Ether credited to a seller for delivered energy and not yet withdrawn, in wei.
    mapping(address account => uint256) public credit;
    /// @notice Meter key registered for an account; it signs that account's delivery readings.
    mapping(address account => address) public meterOf;

    uint256 private immutable _cachedChainId;
    bytes32 private immutable _cachedDomainSeparator;
    uint256 private _entered = 1;

    /// @notice `account` added `amountWei` to its free escrow.
    event Deposited(address indexed account, uint256 amountWei);
    /// @notice `account` took `amountWei` of free escrow back.
    event Withdrawn(address indexed account, uint256 amountWei);
    /// @notice A trade was opened, locking `lockedWei` of the buyer's escrow and `wh` of the seller's tokens.
    event TradeOpened(
        bytes32 indexed tradeId,
        address indexed seller,
        address indexed buyer,
        uint256 wh,
        uint256 priceWeiPerKwh,
        uint256 lockedWei
    );
    /// @notice Delivery on `tradeId` reached `deliveredWh` (cumulative); `deltaWh` moved to the
    ///         buyer and `paidWei` was credited to the seller.
    event Settled(bytes32 indexed tradeId, uint256 deliveredWh, uint256 deltaWh, uint256 paidWei);
    /// @notice `tradeId` closed at `deliveredWh`; `refundedWei` went back to the buyer's free escrow
    ///         and `returnedWh` tokens back to the seller. `closedBy` is the caller.
    event TradeClosed(
        bytes32 indexed tradeId, address indexed closedBy, uint256 deliveredWh, uint256 refundedWei, uint256 returnedWh
    );
    /// @notice `seller` withdrew `amountWei` of credit.
    event CreditWithdrawn(address indexed seller, uint256 amountWei);
    /// @notice `meter` now signs delivery readings for `account` (zero address: none).
    event MeterRegistered(address indexed account, address indexed meter);

    /// @dev Reverts "EnergyMarket: reentrant call" when re-entered.
    modifier nonReentrant() {
        require(_entered == 1, "EnergyMarket: reentrant call");
        _entered = 2;
        _;
        _entered = 1;
    }

    /// @param token_ The Energy Token contract.
    /// @param admin Receives DEFAULT_ADMIN_ROLE and OPERATOR_ROLE.
    constructor(IERC20 token_, address admin) {
        require(address(token_) != address(0), "EnergyMarket: zero token");
        require(admin != address(0), "EnergyMarket: zero admin");
        token = token_;
        _cachedChainId = block.chainid;
        _cachedDomainSeparator = _buildDomainSeparator();
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(OPERATOR_ROLE, admin);
    }

    // ---------------------------------------------------------------- escrow

    /// @notice Adds the Ether sent to the caller's free escrow.
    /// @dev Reverts "EnergyMarket: zero deposit".
    function deposit() external payable nonReentrant {
        require(msg.value > 0, "EnergyMarket: zero deposit");
        freeEscrow[msg.sender] += msg.value;
        emit Deposited(msg.sender, msg.value);
    }

    /// @notice Sends `amountWei` of the caller's free escrow back to the caller.
    /// @dev Reverts "EnergyMarket: zero amount", "EnergyMarket: amount exceeds free escrow",
    ///      "EnergyMarket: Ether transfer failed".
    function withdraw(uint256 amountWei) external nonReentrant {
        require(amountWei > 0, "EnergyMarket: zero amount");
        uint256 free = freeEscrow[msg.sender];
        require(amountWei <= free, "EnergyMarket: amount exceeds free escrow");
        freeEscrow[msg.sender] = free - amountWei;
        emit Withdrawn(msg.sender, amountWei);
        _sendEther(msg.sender, amountWei);
    }

    /// @notice Sends the caller all Ether credited to it for delivered energy.
    /// @dev Reverts "EnergyMarket: no credit", "EnergyMarket: Ether transfer failed".
    function withdrawCredit() external nonReentrant {
        uint256 amount = credit[msg.sender];
        require(amount > 0, "EnergyMarket: no credit");
        credit[msg.sender] = 0;
        emit CreditWithdrawn(msg.sender, amount);
        _sendEther(msg.sender, amount);
    }

    // ---------------------------------------------------------------- meters

    /// @notice Registers `meter` as the key that signs delivery readings for `account`'s site;
    ///         the zero address unregisters it.
    /// @dev Reverts "EnergyMarket: caller is not the operator", "EnergyMarket: zero account".
    function registerMeter(address account, address meter)
        external
        onlyRole(OPERATOR_ROLE, "EnergyMarket: caller is not the operator")
    {
        require(account != address(0), "EnergyMarket: zero account");
        meterOf[account] = meter;
        emit MeterRegistered(account, meter);
    }

    // ---------------------------------------------------------------- trades

    /// @notice Opens trade `tradeId`: locks floor(wh * priceWeiPerKwh / 1000) wei of the buyer's
    ///         free escrow and moves `wh` tokens from the seller into the market (the seller must
    ///         have approved the market for them). The id is chosen off-chain, so a retried open
    ///         cannot create a second trade.
    /// @dev Reverts "EnergyMarket: caller is not the operator", "EnergyMarket: zero trade id",
    ///      "EnergyMarket: trade exists", "EnergyMarket: zero address", "EnergyMarket: seller is buyer",
    ///      "EnergyMarket: zero energy", "EnergyMarket: energy too large", "EnergyMarket: zero price",
    ///      "EnergyMarket: price too large", "EnergyMarket: escrow does not cover trade",
    ///      "EnergyMarket: seller tokens do not cover trade", "EnergyMarket: token allowance too low".
    function open(bytes32 tradeId, address seller, address buyer, uint256 wh, uint256 priceWeiPerKwh)
        external
        nonReentrant
        onlyRole(OPERATOR_ROLE, "EnergyMarket: caller is not the operator")
    {
        require(tradeId != bytes32(0), "EnergyMarket: zero trade id");
        require(trades[tradeId].status == Status.None, "EnergyMarket: trade exists");
        require(seller != address(0) && buyer != address(0), "EnergyMarket: zero address");
        require(seller != buyer, "EnergyMarket: seller is buyer");
        require(wh > 0, "EnergyMarket: zero energy");
        require(wh <= type(uint64).max, "EnergyMarket: energy too large");
        require(priceWeiPerKwh > 0, "EnergyMarket: zero price");
        require(priceWeiPerKwh <= type(uint128).max, "EnergyMarket: price too large");
        uint256 cost = _cost(wh, priceWeiPerKwh);
        uint256 free = freeEscrow[buyer];
        require(free >= cost, "EnergyMarket: escrow does not cover trade");
        require(token.balanceOf(seller) >= wh, "EnergyMarket: seller tokens do not cover trade");
        require(token.allowance(seller, address(this)) >= wh, "EnergyMarket: token allowance too low");

        trades[tradeId] = Trade({
            seller: seller,
            wh: uint64(wh),
            status: Status.Open,
            buyer: buyer,
            deliveredWh: 0,
            priceWeiPerKwh: uint128(priceWeiPerKwh)
        });
        freeEscrow[buyer] = free - cost;
        lockedEscrow[buyer] += cost;
        emit TradeOpened(tradeId, seller, buyer, wh, priceWeiPerKwh, cost);

        require(token.transferFrom(seller, address(this), wh), "EnergyMarket: token transfer failed");
    }

    /// @notice Settles trade `tradeId` up to the cumulative `deliveredWh`. Settling the value already
    ///         settled is a no-op, so the operator can retry safely. Reaching the trade's full
    ///         energy closes the trade.
    /// @dev Reverts "EnergyMarket: caller is not the operator", "EnergyMarket: trade not open",
    ///      "EnergyMarket: delivery goes backwards", "EnergyMarket: delivery exceeds trade".
    function settle(bytes32 tradeId, uint256 deliveredWh)
        external
        nonReentrant
        onlyRole(OPERATOR_ROLE, "EnergyMarket: caller is not the operator")
    {
        _settle(tradeId, deliveredWh);
    }

    /// @notice Settles many trades at once: `deliveredWh[i]` is the cumulative delivery of `tradeIds[i]`.
    ///         All or nothing: one invalid entry reverts the batch with that entry's reason.
    /// @dev Reverts as settle, plus "EnergyMarket: length mismatch".
    function settleBatch(bytes32[] calldata tradeIds, uint256[] calldata deliveredWh)
        external
        nonReentrant
        onlyRole(OPERATOR_ROLE, "EnergyMarket: caller is not the operator")
    {
        require(tradeIds.length == deliveredWh.length, "EnergyMarket: length mismatch");
        for (uint256 i = 0; i < tradeIds.length; ++i) {
            _settle(tradeIds[i], deliveredWh[i]);
        }
    }

    /// @notice Settles a delivery reading signed (EIP-712, type Delivery) by the meter key
    ///         registered for the trade's buyer. Anyone may submit it. A reading must be above the
    ///         delivery already settled, so an old reading cannot be replayed.
    /// @param signature 65 bytes r ‖ s ‖ v, v in {27, 28}, s in the lower half order.
    /// @dev Reverts "EnergyMarket: trade not open", "EnergyMarket: bad signature",
    ///      "EnergyMarket: signer is not the buyer's meter", "EnergyMarket: reading not above settled",
    ///      "EnergyMarket: delivery exceeds trade".
    function settleSigned(bytes32 tradeId, uint256 deliveredWh, bytes calldata signature) external nonReentrant {
        Trade storage t = trades[tradeId];
        require(t.status == Status.Open, "EnergyMarket: trade not open");
        address signer = _recover(deliveryDigest(tradeId, deliveredWh), signature);
        address meter = meterOf[t.buyer];
        require(meter != address(0) && signer == meter, "EnergyMarket: signer is not the buyer's meter");
        require(deliveredWh > t.deliveredWh, "EnergyMarket: reading not above settled");
        _settle(tradeId, deliveredWh);
    }

    /// @notice Closes trade `tradeId`: settles the cumulative `deliveredWh`, returns the buyer's
    ///         unspent escrow to their free balance and the undelivered tokens to the seller.
    ///         The buyer (Close Connection) or the operator may close.
    /// @dev The buyer's `deliveredWh` cannot be below what is settled, so a buyer can only
    ///      understate the energy since the last settlement; settle (or settleSigned) first to
    ///      bound that. Reverts "EnergyMarket: trade not open",
    ///      "EnergyMarket: caller is not the buyer or operator", "EnergyMarket: delivery goes backwards",
    ///      "EnergyMarket: delivery exceeds trade".
    function close(bytes32 tradeId, uint256 deliveredWh) external nonReentrant {
        Trade storage t = trades[tradeId];
        require(t.status == Status.Open, "EnergyMarket: trade not open");
        require(
            msg.sender == t.buyer || hasRole(OPERATOR_ROLE, msg.sender),
            "EnergyMarket: caller is not the buyer or operator"
        );
        _settle(tradeId, deliveredWh);
        if (t.status == Status.Open) {
            _close(tradeId, t);
        }
    }

    // ---------------------------------------------------------------- views

    /// @notice Wei due for a cumulative delivery of `wh` Wh at `priceWeiPerKwh`: floor(wh * price / 1000).
    function costOf(uint256 wh, uint256 priceWeiPerKwh) external pure returns (uint256) {
        return _cost(wh, priceWeiPerKwh);
    }

    /// @notice The EIP-712 domain separator of this market on the current chain.
    function domainSeparator() public view returns (bytes32) {
        return block.chainid == _cachedChainId ? _cachedDomainSeparator : _buildDomainSeparator();
    }

    /// @notice The EIP-712 digest a meter signs for a delivery reading.
    function deliveryDigest(bytes32 tradeId, uint256 deliveredWh) public view returns (bytes32) {
        bytes32 structHash = keccak256(abi.encode(DELIVERY_TYPEHASH, tradeId, deliveredWh));
        return keccak256(abi.encodePacked("\x19\x01", domainSeparator(), structHash));
    }

    // ---------------------------------------------------------------- internals

    /// @dev Moves a trade from its settled delivery to `deliveredWh`; closes it when fully delivered.
    function _settle(bytes32 tradeId, uint256 deliveredWh) private {
        Trade storage t = trades[tradeId];
        require(t.status == Status.Open, "EnergyMarket: trade not open");
        uint256 before = t.deliveredWh;
        require(deliveredWh >= before, "EnergyMarket: delivery goes backwards");
        uint256 wh = t.wh;
        require(deliveredWh <= wh, "EnergyMarket: delivery exceeds trade");
        if (deliveredWh == before) {
            return;
        }
        uint256 price = t.priceWeiPerKwh;
        address buyer = t.buyer;
        uint256 paid = _cost(deliveredWh, price) - _cost(before, price);
        uint256 deltaWh = deliveredWh - before;

        t.deliveredWh = uint64(deliveredWh); // <= wh, which fits in uint64
        lockedEscrow[buyer] -= paid;
        credit[t.seller] += paid;
        emit Settled(tradeId, deliveredWh, deltaWh, paid);
        if (deliveredWh == wh) {
            t.status = Status.Closed;
            emit TradeClosed(tradeId, msg.sender, deliveredWh, 0, 0);
        }

        require(token.transfer(buyer, deltaWh), "EnergyMarket: token transfer failed");
    }

    /// @dev Frees what an open trade did not deliver. Called after the final _settle.
    function _close(bytes32 tradeId, Trade storage t) private {
        uint256 delivered = t.deliveredWh;
        uint256 price = t.priceWeiPerKwh;
        address buyer = t.buyer;
        uint256 refund = _cost(t.wh, price) - _cost(delivered, price);
        uint256 returnedWh = t.wh - delivered;

        t.status = Status.Closed;
        lockedEscrow[buyer] -= refund;
        freeEscrow[buyer] += refund;
        emit TradeClosed(tradeId, msg.sender, delivered, refund, returnedWh);

        require(token.transfer(t.seller, returnedWh), "EnergyMarket: token transfer failed");
    }

    function _cost(uint256 wh, uint256 priceWeiPerKwh) private pure returns (uint256) {
        return wh * priceWeiPerKwh / 1000;
    }

    function _sendEther(address to, uint256 amountWei) private {
        (bool ok,) = to.call{value: amountWei}("");
        require(ok, "EnergyMarket: Ether transfer failed");
    }

    function _buildDomainSeparator() private view returns (bytes32) {
        return keccak256(
            abi.encode(
                _DOMAIN_TYPEHASH,
                keccak256(bytes(EIP712_NAME)),
                keccak256(bytes(EIP712_VERSION)),
                block.chainid,
                address(this)
            )
        );
    }

    /// @dev ecrecover with the EIP-2 malleability checks; reverts "EnergyMarket: bad signature".
    function _recover(bytes32 digest, bytes calldata signature) private pure returns (address signer) {
        require(signature.length == 65, "EnergyMarket: bad signature");
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        require(uint256(s) <= _HALF_ORDER && (v == 27 || v == 28), "EnergyMarket: bad signature");
        signer = ecrecover(digest, v, r, s);
        require(signer != address(0), "EnergyMarket: bad signature");
    }
}
