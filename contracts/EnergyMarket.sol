// SPDX-License-Identifier: MIT
pragma solidity ^0.8.28; // 0.8.28: transient state variables (the reentrancy guard)

import {AccessControl} from "./AccessControl.sol";
import {EIP712} from "./EIP712.sol";
import {IERC20} from "./IERC20.sol";
import {MeterRegistry} from "./MeterRegistry.sol";

/// @title Energy Market: signed, escrowed, metered energy trades
/// @notice Buyers keep Ether in escrow here; sellers hold Energy Tokens (1 unit = 1 Wh).
///
///         A trade exists only if both parties signed for it: the seller an Offer (energy, a
///         minimum price, an expiry, a longest duration), the buyer a Bid (for that offer or, with
///         offerId 0, for any offer; energy, a maximum price, an expiry). The operator (the
///         auction's chain service) opens a trade from the two signatures, for at most what is
///         left of each and at a price between the two limits. The buyer's Ether for the whole
///         trade (reserved escrow first, then free) and the seller's tokens are locked.
///
///         The buyer's meter signs its cumulative delivery on the trade; anyone may submit it.
///         Each settlement credits the seller the price of the newly delivered Wh (pull payment,
///         withdrawn with withdrawCredit) and moves their tokens to the buyer. A trade ends when
///         fully delivered, or by close: a party or the operator may close it at any time, anyone
///         once its deadline passed. A close starts a dispute window in which a higher signed
///         delivery still settles (a buyer cannot close on an old reading to pay less); then
///         anyone finalizes it, freeing the undelivered Ether to the buyer and the undelivered
///         tokens to the seller.
///
///         Escrow per account: free (withdrawable), reserved (promised to bids: withdrawable only
///         after reservedUntil), locked (in open trades) and credit (earned by a seller). The
///         contract's balance is always the sum of all four over all accounts.
///
///         Rounding: the Ether due for a cumulative delivery of `d` Wh at `p` wei per kWh is
///         floor(d * p / 1000). A settlement pays cost(new) - cost(old), so the seller's total
///         for a trade is exactly floor(delivered * p / 1000) however many steps it took; the
///         buyer locks floor(wh * p / 1000) and gets cost(wh) - cost(delivered) back.
/// @dev EIP-712 domain "GridTrade EnergyMarket", version "2". Checks-effects-interactions
///      throughout, plus a reentrancy guard (in transient storage) on every entry point that
///      changes state. The token and the registry are trusted (set once at construction). Plain
///      Ether sent without deposit() is rejected (Ether forced in by selfdestruct or as a block
///      reward could only add an unowned surplus). Roles: the admin only grants and revokes
///      roles; the operator opens trades and may close them, but every Wei and Wh it moves was
///      signed for by its owner (or its owner's meter); the pauser stops new commitments.
contract EnergyMarket is AccessControl, EIP712 {
    /// @notice Role allowed to open trades (from signed offers and bids) and to close any trade.
    bytes32 public constant OPERATOR_ROLE = keccak256("OPERATOR_ROLE");
    /// @notice Role allowed to pause and unpause new commitments (open, reserve).
    bytes32 public constant PAUSER_ROLE = keccak256("PAUSER_ROLE");

    /// @notice EIP-712 types of the signed facts checked here.
    bytes32 public constant OFFER_TYPEHASH = keccak256(
        "Offer(bytes32 offerId,address seller,uint256 wh,uint256 minPriceWeiPerKwh,uint256 expiry,uint256 durationS)"
    );
    bytes32 public constant BID_TYPEHASH = keccak256(
        "Bid(bytes32 bidId,bytes32 offerId,address buyer,uint256 wh,uint256 maxPriceWeiPerKwh,uint256 expiry)"
    );
    bytes32 public constant DELIVERY_TYPEHASH = keccak256("Delivery(bytes32 tradeId,uint256 deliveredWh)");

    /// @notice A seller's signed offer: up to `wh` Wh at `minPriceWeiPerKwh` or more, openable until
    ///         `expiry` (Unix s); a trade opened from it runs `durationS` at most.
    struct Offer {
        bytes32 offerId;
        address seller;
        uint256 wh;
        uint256 minPriceWeiPerKwh;
        uint256 expiry;
        uint256 durationS;
    }

    /// @notice A buyer's signed bid: up to `wh` Wh of offer `offerId` (0: of any offer) at
    ///         `maxPriceWeiPerKwh` or less, until `expiry`.
    struct Bid {
        bytes32 bidId;
        bytes32 offerId;
        address buyer;
        uint256 wh;
        uint256 maxPriceWeiPerKwh;
        uint256 expiry;
    }

    /// @notice One entry of openBatch: the arguments of one `open`.
    struct Opening {
        bytes32 tradeId;
        Offer offer;
        bytes offerSig;
        Bid bid;
        bytes bidSig;
        uint256 wh;
        uint256 priceWeiPerKwh;
    }

    enum Status {
        None,
        Open,
        Closing,
        Closed
    }

    /// @notice One trade, packed into three storage slots.
    /// @param seller Account whose tokens are sold and who is credited.
    /// @param wh Energy traded, in Wh.
    /// @param status None (unknown id), Open, Closing (in its dispute window) or Closed.
    /// @param buyer Account whose escrow pays and who receives the tokens.
    /// @param deliveredWh Cumulative Wh settled so far.
    /// @param priceWeiPerKwh Price in wei per kWh (1000 Wh).
    /// @param deadline When anyone may close the trade (Unix s).
    /// @param closingAt When the trade was closed (0 while open); it settles no more from
    ///        closingAt + disputeWindow on.
    struct Trade {
        address seller;
        uint64 wh;
        Status status;
        address buyer;
        uint64 deliveredWh;
        uint128 priceWeiPerKwh;
        uint64 deadline;
        uint64 closingAt;
    }

    /// @dev An account's escrow in two slots: what deposits, bids and withdrawals touch, and what trades touch.
    struct Escrow {
        uint128 free;
        uint128 reserved;
        uint128 locked;
        uint64 reservedUntil;
    }

    /// @notice The Energy Token traded here.
    IERC20 public immutable token;
    /// @notice Where the buyers' meters are registered.
    MeterRegistry public immutable registry;
    /// @notice How long after a close a higher signed delivery still settles, in seconds.
    uint64 public immutable disputeWindow;

    /// @notice Trades by their id (keccak256 of the off-chain trade id).
    mapping(bytes32 tradeId => Trade) public trades;
    /// @notice Wh of an offer already committed to trades, by seller and offer id.
    mapping(address seller => mapping(bytes32 offerId => uint256)) public offerFilled;
    /// @notice Wh of a bid already committed to trades, by buyer and bid id.
    mapping(address buyer => mapping(bytes32 bidId => uint256)) public bidFilled;
    /// @notice Ether credited to a seller for delivered energy and not yet withdrawn, in wei.
    mapping(address account => uint256) public credit;
    /// @notice Whether open, reserve and depositAndReserve are paused.
    bool public paused;

    mapping(address account => Escrow) private _escrow;
    bool private transient _entered;

    /// @notice `account` added `amountWei` to its free escrow.
    event Deposited(address indexed account, uint256 amountWei);
    /// @notice `account` moved `amountWei` of free escrow (or of a deposit) to reserved; it stays
    ///         reserved until at least `until` (Unix s), the account's reservedUntil now.
    event Reserved(address indexed account, uint256 amountWei, uint64 until);
    /// @notice `amountWei` of `account`'s reserved escrow became free (released, withdrawn, or committed to a trade).
    event Released(address indexed account, uint256 amountWei);
    /// @notice `account` took `amountWei` of free escrow back.
    event Withdrawn(address indexed account, uint256 amountWei);
    /// @notice A trade was opened from offer `offerId` and bid `bidId`, locking `lockedWei` of the
    ///         buyer's free escrow and `wh` of the seller's tokens; anyone may close it from `deadline` on.
    event TradeOpened(
        bytes32 indexed tradeId,
        address indexed seller,
        address indexed buyer,
        uint256 wh,
        uint256 priceWeiPerKwh,
        uint256 lockedWei,
        bytes32 offerId,
        bytes32 bidId,
        uint256 deadline
    );
    /// @notice Delivery on `tradeId` reached `deliveredWh` (cumulative); `deltaWh` moved to the
    ///         buyer and `paidWei` of the buyer's locked escrow was credited to the seller.
    event Settled(bytes32 indexed tradeId, uint256 deliveredWh, uint256 deltaWh, uint256 paidWei);
    /// @notice `closedBy` closed `tradeId` at `deliveredWh`; a higher signed delivery settles until `disputeEndsAt`.
    event TradeClosing(bytes32 indexed tradeId, address indexed closedBy, uint256 deliveredWh, uint256 disputeEndsAt);
    /// @notice `tradeId` ended at `deliveredWh`; `refundedWei` went back to the buyer's free escrow
    ///         and `returnedWh` tokens back to the seller. `closedBy` is the caller.
    event TradeClosed(
        bytes32 indexed tradeId, address indexed closedBy, uint256 deliveredWh, uint256 refundedWei, uint256 returnedWh
    );
    /// @notice `seller` withdrew `amountWei` of credit.
    event CreditWithdrawn(address indexed seller, uint256 amountWei);
    /// @notice `account` paused opening trades and reserving escrow.
    event Paused(address account);
    /// @notice `account` resumed opening trades and reserving escrow.
    event Unpaused(address account);

    /// @dev Reverts "EnergyMarket: reentrant call" when re-entered.
    modifier nonReentrant() {
        require(!_entered, "EnergyMarket: reentrant call");
        _entered = true;
        _;
        _entered = false;
    }

    /// @dev Reverts "EnergyMarket: paused" while paused.
    modifier whenNotPaused() {
        require(!paused, "EnergyMarket: paused");
        _;
    }

    /// @param token_ The Energy Token.
    /// @param registry_ The meter registry (the buyers' meters sign deliveries).
    /// @param admin Receives DEFAULT_ADMIN_ROLE only.
    /// @param operator Receives OPERATOR_ROLE.
    /// @param pauser Receives PAUSER_ROLE.
    /// @param disputeWindowS Seconds after a close during which a higher signed delivery still settles.
    constructor(
        IERC20 token_,
        MeterRegistry registry_,
        address admin,
        address operator,
        address pauser,
        uint64 disputeWindowS
    ) EIP712("GridTrade EnergyMarket", "2") {
        require(address(token_) != address(0) && address(registry_) != address(0), "EnergyMarket: zero contract");
        require(
            admin != address(0) && operator != address(0) && pauser != address(0), "EnergyMarket: zero address"
        );
        token = token_;
        registry = registry_;
        disputeWindow = disputeWindowS;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(OPERATOR_ROLE, operator);
        _grantRole(PAUSER_ROLE, pauser);
    }

    // ---------------------------------------------------------------- escrow

    /// @notice Adds the Ether sent to the caller's free escrow.
    /// @dev Reverts "EnergyMarket: zero deposit".
    function deposit() external payable nonReentrant {
        require(msg.value > 0, "EnergyMarket: zero deposit");
        _escrow[msg.sender].free += _u128(msg.value);
        emit Deposited(msg.sender, msg.value);
    }

    /// @notice Adds the Ether sent to the caller's reserved escrow, reserved until at least `until`
    ///         (a bid's expiry): a site deposits for a bid in one transaction.
    /// @dev Emits Deposited then Reserved. Reverts "EnergyMarket: paused", "EnergyMarket: zero deposit".
    function depositAndReserve(uint64 until) external payable nonReentrant whenNotPaused {
        require(msg.value > 0, "EnergyMarket: zero deposit");
        Escrow storage e = _escrow[msg.sender];
        e.reserved += _u128(msg.value);
        uint64 newUntil = _extend(e, until);
        emit Deposited(msg.sender, msg.value);
        emit Reserved(msg.sender, msg.value, newUntil);
    }

    /// @notice Moves `amountWei` of free escrow to reserved and keeps all reserved escrow until at
    ///         least `until`: a bid's Ether cannot be withdrawn under it. `amountWei` may be 0, to
    ///         extend the reservation only; reservedUntil never moves back.
    /// @dev Reverts "EnergyMarket: paused", "EnergyMarket: amount exceeds free escrow".
    function reserve(uint256 amountWei, uint64 until) external nonReentrant whenNotPaused {
        Escrow storage e = _escrow[msg.sender];
        uint128 free = e.free;
        require(amountWei <= free, "EnergyMarket: amount exceeds free escrow");
        e.free = free - uint128(amountWei);
        e.reserved += uint128(amountWei);
        emit Reserved(msg.sender, amountWei, _extend(e, until));
    }

    /// @notice Moves `amountWei` of reserved escrow back to free, once reservedUntil has passed.
    /// @dev Reverts "EnergyMarket: zero amount", "EnergyMarket: escrow reserved until later",
    ///      "EnergyMarket: amount exceeds reserved escrow".
    function release(uint256 amountWei) external nonReentrant {
        require(amountWei > 0, "EnergyMarket: zero amount");
        Escrow storage e = _escrow[msg.sender];
        require(block.timestamp >= e.reservedUntil, "EnergyMarket: escrow reserved until later");
        uint128 reserved = e.reserved;
        require(amountWei <= reserved, "EnergyMarket: amount exceeds reserved escrow");
        e.reserved = reserved - uint128(amountWei);
        e.free += uint128(amountWei);
        emit Released(msg.sender, amountWei);
    }

    /// @notice Sends `amountWei` of the caller's escrow back to the caller: from free escrow first,
    ///         then from reserved escrow if reservedUntil has passed (emitting Released for that part).
    /// @dev Reverts "EnergyMarket: zero amount", "EnergyMarket: amount exceeds withdrawable escrow",
    ///      "EnergyMarket: Ether transfer failed".
    function withdraw(uint256 amountWei) external nonReentrant {
        require(amountWei > 0, "EnergyMarket: zero amount");
        Escrow storage e = _escrow[msg.sender];
        uint128 free = e.free;
        if (amountWei <= free) {
            e.free = free - uint128(amountWei);
        } else {
            uint256 fromReserved = amountWei - free;
            require(
                block.timestamp >= e.reservedUntil && fromReserved <= e.reserved,
                "EnergyMarket: amount exceeds withdrawable escrow"
            );
            e.free = 0;
            e.reserved -= uint128(fromReserved);
            emit Released(msg.sender, fromReserved);
        }
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

    // ---------------------------------------------------------------- trades

    /// @notice Opens trade `tradeId` of `wh` Wh at `priceWeiPerKwh` from `offer` (signed by its
    ///         seller) and `bid` (signed by its buyer). Locks floor(wh * price / 1000) wei of the
    ///         buyer's escrow (reserved first, then free) and moves `wh` tokens from the seller into
    ///         the market (the seller must have approved the market). The id is chosen off-chain,
    ///         so a retried open cannot create a second trade; what is left of an offer or a bid
    ///         shrinks with every trade opened from it, so neither is ever over-filled.
    /// @dev Reverts "EnergyMarket: caller is not the operator", "EnergyMarket: paused",
    ///      "EnergyMarket: zero trade id", "EnergyMarket: trade exists", "EnergyMarket: bad signature",
    ///      "EnergyMarket: offer not signed by seller", "EnergyMarket: bid not signed by buyer",
    ///      "EnergyMarket: bid is for another offer", "EnergyMarket: offer expired", "EnergyMarket: bid expired",
    ///      "EnergyMarket: seller is buyer", "EnergyMarket: zero energy", "EnergyMarket: energy too large",
    ///      "EnergyMarket: offer overfilled", "EnergyMarket: bid overfilled", "EnergyMarket: zero price",
    ///      "EnergyMarket: price below offer", "EnergyMarket: price above bid", "EnergyMarket: price too large",
    ///      "EnergyMarket: duration too large", "EnergyMarket: escrow does not cover trade", or the
    ///      token's reason when the seller's balance or allowance is short.
    function open(
        bytes32 tradeId,
        Offer calldata offer,
        bytes calldata offerSig,
        Bid calldata bid,
        bytes calldata bidSig,
        uint256 wh,
        uint256 priceWeiPerKwh
    ) external nonReentrant onlyRole(OPERATOR_ROLE, "EnergyMarket: caller is not the operator") whenNotPaused {
        _open(tradeId, offer, offerSig, bid, bidSig, wh, priceWeiPerKwh);
    }

    /// @notice Opens many trades in one transaction, each exactly as `open` would, in order (an
    ///         entry sees what the entries before it filled and locked). All or nothing: an entry
    ///         that `open` would refuse reverts the whole batch with that entry's reason, so no
    ///         entry can ride on another's signatures, fills or escrow; the operator's service
    ///         then opens the entries one by one, so one bad entry delays the others by a round
    ///         and blocks none of them.
    /// @dev Reverts "EnergyMarket: caller is not the operator", "EnergyMarket: paused", and any reason of `open`.
    function openBatch(Opening[] calldata openings)
        external
        nonReentrant
        onlyRole(OPERATOR_ROLE, "EnergyMarket: caller is not the operator")
        whenNotPaused
    {
        uint256 n = openings.length;
        for (uint256 i; i < n; ++i) {
            Opening calldata o = openings[i];
            _open(o.tradeId, o.offer, o.offerSig, o.bid, o.bidSig, o.wh, o.priceWeiPerKwh);
        }
    }

    /// @notice Settles trade `tradeId` up to the cumulative `deliveredWh` signed by the buyer's meter
    ///         (`sig`: the meter key's signature of Delivery(tradeId, deliveredWh); the key must be
    ///         registered, and not revoked, for the trade's buyer). Anyone may submit. A reading
    ///         beyond the trade settles the trade's energy; reaching it ends the trade at once.
    ///         Allowed while the trade is open, and while it is closing until its dispute window ends.
    /// @dev Reverts "EnergyMarket: trade not open", "EnergyMarket: dispute window over",
    ///      "EnergyMarket: reading not above settled", "EnergyMarket: bad signature",
    ///      "EnergyMarket: signer is not the buyer's meter".
    function settle(bytes32 tradeId, uint256 deliveredWh, bytes calldata sig) external nonReentrant {
        Trade storage t = trades[tradeId];
        Status status = t.status;
        require(status == Status.Open || status == Status.Closing, "EnergyMarket: trade not open");
        require(status == Status.Open || block.timestamp < _disputeEnd(t), "EnergyMarket: dispute window over");
        uint256 target = _target(t, deliveredWh);
        require(target > t.deliveredWh, "EnergyMarket: reading not above settled");
        _checkMeter(tradeId, deliveredWh, sig, t.buyer);
        _settle(tradeId, t, target);
    }

    /// @notice Settles many trades at once, as settle: `deliveredWh[i]`, signed by `sigs[i]`, is the
    ///         cumulative delivery of `tradeIds[i]`. Anyone may submit. An entry that would change
    ///         nothing (its trade no longer settles, or its reading is not above what is settled)
    ///         is skipped before its signature is looked at, so overlapping submitters do not fail
    ///         each other; a bad signature on any other entry reverts the whole batch.
    /// @dev Reverts "EnergyMarket: length mismatch", "EnergyMarket: bad signature",
    ///      "EnergyMarket: signer is not the buyer's meter".
    function settleBatch(bytes32[] calldata tradeIds, uint256[] calldata deliveredWh, bytes[] calldata sigs)
        external
        nonReentrant
    {
        uint256 n = tradeIds.length;
        require(deliveredWh.length == n && sigs.length == n, "EnergyMarket: length mismatch");
        for (uint256 i; i < n; ++i) {
            bytes32 tradeId = tradeIds[i];
            Trade storage t = trades[tradeId];
            Status status = t.status;
            if (status != Status.Open && (status != Status.Closing || block.timestamp >= _disputeEnd(t))) {
                continue;
            }
            uint256 target = _target(t, deliveredWh[i]);
            if (target <= t.deliveredWh) {
                continue;
            }
            _checkMeter(tradeId, deliveredWh[i], sigs[i], t.buyer);
            _settle(tradeId, t, target);
        }
    }

    /// @notice Closes open trade `tradeId`: its buyer, its seller or the operator at any time, anyone
    ///         from its deadline on. Starts the dispute window; finalize frees what was not delivered.
    /// @dev Reverts "EnergyMarket: trade not open", "EnergyMarket: caller may not close before the deadline".
    function close(bytes32 tradeId) external nonReentrant {
        Trade storage t = trades[tradeId];
        require(t.status == Status.Open, "EnergyMarket: trade not open");
        require(
            block.timestamp >= t.deadline || msg.sender == t.buyer || msg.sender == t.seller
                || hasRole(OPERATOR_ROLE, msg.sender),
            "EnergyMarket: caller may not close before the deadline"
        );
        t.status = Status.Closing;
        t.closingAt = uint64(block.timestamp);
        emit TradeClosing(tradeId, msg.sender, t.deliveredWh, block.timestamp + disputeWindow);
    }

    /// @notice Ends closing trade `tradeId` once its dispute window is over (anyone may call):
    ///         the Ether of the undelivered Wh goes back to the buyer's free escrow, the
    ///         undelivered tokens back to the seller.
    /// @dev Reverts "EnergyMarket: trade not closing", "EnergyMarket: dispute window open".
    function finalize(bytes32 tradeId) external nonReentrant {
        Trade storage t = trades[tradeId];
        require(t.status == Status.Closing, "EnergyMarket: trade not closing");
        require(block.timestamp >= _disputeEnd(t), "EnergyMarket: dispute window open");
        uint256 wh = t.wh;
        uint256 delivered = t.deliveredWh;
        uint256 price = t.priceWeiPerKwh;
        uint256 refund = _cost(wh, price) - _cost(delivered, price);
        uint256 returnedWh = wh - delivered;

        t.status = Status.Closed;
        Escrow storage e = _escrow[t.buyer];
        e.locked -= uint128(refund);
        e.free += uint128(refund);
        emit TradeClosed(tradeId, msg.sender, delivered, refund, returnedWh);

        if (returnedWh > 0) {
            require(token.transfer(t.seller, returnedWh), "EnergyMarket: token transfer failed");
        }
    }

    // ---------------------------------------------------------------- pausing

    /// @notice Stops new commitments: open, reserve and depositAndReserve. Settling, closing,
    ///         finalizing, depositing and withdrawing keep working, so nobody's funds are stuck.
    /// @dev Reverts "EnergyMarket: caller is not the pauser", "EnergyMarket: paused".
    function pause() external onlyRole(PAUSER_ROLE, "EnergyMarket: caller is not the pauser") whenNotPaused {
        paused = true;
        emit Paused(msg.sender);
    }

    /// @notice Resumes new commitments.
    /// @dev Reverts "EnergyMarket: caller is not the pauser", "EnergyMarket: not paused".
    function unpause() external onlyRole(PAUSER_ROLE, "EnergyMarket: caller is not the pauser") {
        require(paused, "EnergyMarket: not paused");
        paused = false;
        emit Unpaused(msg.sender);
    }

    // ---------------------------------------------------------------- views

    /// @notice `account`'s free escrow (withdrawable, or committed by an open), in wei.
    function freeEscrow(address account) external view returns (uint256) {
        return _escrow[account].free;
    }

    /// @notice `account`'s reserved escrow (promised to bids), in wei.
    function reservedEscrow(address account) external view returns (uint256) {
        return _escrow[account].reserved;
    }

    /// @notice Until when `account`'s reserved escrow stays reserved (Unix s).
    function reservedUntil(address account) external view returns (uint64) {
        return _escrow[account].reservedUntil;
    }

    /// @notice `account`'s escrow locked in open and closing trades, in wei.
    function lockedEscrow(address account) external view returns (uint256) {
        return _escrow[account].locked;
    }

    /// @notice All of `account`'s balances here in one call.
    function escrowOf(address account)
        external
        view
        returns (uint256 free, uint256 reserved, uint64 until, uint256 locked, uint256 credited)
    {
        Escrow storage e = _escrow[account];
        return (e.free, e.reserved, e.reservedUntil, e.locked, credit[account]);
    }

    /// @notice Wei due for a cumulative delivery of `wh` Wh at `priceWeiPerKwh`: floor(wh * price / 1000).
    function costOf(uint256 wh, uint256 priceWeiPerKwh) external pure returns (uint256) {
        return _cost(wh, priceWeiPerKwh);
    }

    /// @notice The EIP-712 digest a seller's account key signs for `offer`.
    function offerDigest(Offer calldata offer) public view returns (bytes32) {
        return _hashTypedData(keccak256(abi.encode(OFFER_TYPEHASH, offer)));
    }

    /// @notice The EIP-712 digest a buyer's account key signs for `bid`.
    function bidDigest(Bid calldata bid) public view returns (bytes32) {
        return _hashTypedData(keccak256(abi.encode(BID_TYPEHASH, bid)));
    }

    /// @notice The EIP-712 digest a buyer's meter key signs for its cumulative delivery on a trade.
    function deliveryDigest(bytes32 tradeId, uint256 deliveredWh) public view returns (bytes32) {
        return _hashTypedData(keccak256(abi.encode(DELIVERY_TYPEHASH, tradeId, deliveredWh)));
    }

    // ---------------------------------------------------------------- internals

    /// @dev open's checks and effects, then the seller's tokens pulled in.
    function _open(
        bytes32 tradeId,
        Offer calldata offer,
        bytes calldata offerSig,
        Bid calldata bid,
        bytes calldata bidSig,
        uint256 wh,
        uint256 priceWeiPerKwh
    ) private {
        require(tradeId != bytes32(0), "EnergyMarket: zero trade id");
        require(trades[tradeId].status == Status.None, "EnergyMarket: trade exists");
        _checkSigned(offer, offerSig, bid, bidSig);
        _fill(offer, bid, wh);
        _start(tradeId, offer, bid, wh, priceWeiPerKwh);

        require(token.transferFrom(offer.seller, address(this), wh), "EnergyMarket: token transfer failed");
    }

    /// @dev Moves a trade's settled delivery up to `target` (> settled, <= wh): credits the seller,
    ///      moves the tokens to the buyer, and ends the trade when it is fully delivered.
    function _settle(bytes32 tradeId, Trade storage t, uint256 target) private {
        uint256 before = t.deliveredWh;
        uint256 price = t.priceWeiPerKwh;
        address buyer = t.buyer;
        uint256 paid = _cost(target, price) - _cost(before, price);
        uint256 deltaWh = target - before;

        t.deliveredWh = uint64(target); // <= wh, which fits in uint64
        _escrow[buyer].locked -= uint128(paid);
        credit[t.seller] += paid;
        emit Settled(tradeId, target, deltaWh, paid);
        if (target == t.wh) {
            t.status = Status.Closed;
            emit TradeClosed(tradeId, msg.sender, target, 0, 0);
        }

        require(token.transfer(buyer, deltaWh), "EnergyMarket: token transfer failed");
    }

    /// @dev Reverts unless the offer and the bid were signed by their seller and buyer, the bid is
    ///      for this offer (or any), neither has expired, and seller and buyer differ.
    function _checkSigned(Offer calldata offer, bytes calldata offerSig, Bid calldata bid, bytes calldata bidSig)
        private
        view
    {
        _checkSigner(offerDigest(offer), offerSig, offer.seller, "EnergyMarket: offer not signed by seller");
        _checkSigner(bidDigest(bid), bidSig, bid.buyer, "EnergyMarket: bid not signed by buyer");
        require(bid.offerId == offer.offerId || bid.offerId == bytes32(0), "EnergyMarket: bid is for another offer");
        require(block.timestamp <= offer.expiry, "EnergyMarket: offer expired");
        require(block.timestamp <= bid.expiry, "EnergyMarket: bid expired");
        require(offer.seller != bid.buyer, "EnergyMarket: seller is buyer");
    }

    /// @dev Commits `wh` of what is left of the offer and of the bid; reverts when either would be over-filled.
    function _fill(Offer calldata offer, Bid calldata bid, uint256 wh) private {
        require(wh > 0, "EnergyMarket: zero energy");
        require(wh <= type(uint64).max, "EnergyMarket: energy too large");
        uint256 offerFill = offerFilled[offer.seller][offer.offerId] + wh;
        require(offerFill <= offer.wh, "EnergyMarket: offer overfilled");
        uint256 bidFill = bidFilled[bid.buyer][bid.bidId] + wh;
        require(bidFill <= bid.wh, "EnergyMarket: bid overfilled");
        offerFilled[offer.seller][offer.offerId] = offerFill;
        bidFilled[bid.buyer][bid.bidId] = bidFill;
    }

    /// @dev Checks the price against both limits, locks the buyer's Ether and records the trade.
    function _start(bytes32 tradeId, Offer calldata offer, Bid calldata bid, uint256 wh, uint256 priceWeiPerKwh)
        private
    {
        require(priceWeiPerKwh > 0, "EnergyMarket: zero price");
        require(priceWeiPerKwh >= offer.minPriceWeiPerKwh, "EnergyMarket: price below offer");
        require(priceWeiPerKwh <= bid.maxPriceWeiPerKwh, "EnergyMarket: price above bid");
        require(priceWeiPerKwh <= type(uint128).max, "EnergyMarket: price too large");
        require(offer.durationS <= type(uint64).max - block.timestamp, "EnergyMarket: duration too large");
        uint256 cost = _lock(bid.buyer, _cost(wh, priceWeiPerKwh));
        uint64 deadline = uint64(block.timestamp + offer.durationS);
        trades[tradeId] = Trade({
            seller: offer.seller,
            wh: uint64(wh),
            status: Status.Open,
            buyer: bid.buyer,
            deliveredWh: 0,
            priceWeiPerKwh: uint128(priceWeiPerKwh),
            deadline: deadline,
            closingAt: 0
        });
        emit TradeOpened(tradeId, offer.seller, bid.buyer, wh, priceWeiPerKwh, cost, offer.offerId, bid.bidId, deadline);
    }

    /// @dev Moves `cost` of `buyer`'s escrow to locked, taking reserved escrow first, then free
    ///      (Released reports the reserved part). Returns `cost`.
    function _lock(address buyer, uint256 cost) private returns (uint256) {
        Escrow storage e = _escrow[buyer];
        uint256 reserved = e.reserved;
        uint256 fromReserved = cost < reserved ? cost : reserved;
        uint256 fromFree = cost - fromReserved;
        require(fromFree <= e.free, "EnergyMarket: escrow does not cover trade");
        // cost <= reserved + free: both uint128, and every Wei of them is held here, so no overflow
        e.reserved = uint128(reserved - fromReserved);
        e.free -= uint128(fromFree);
        e.locked += uint128(cost);
        if (fromReserved > 0) {
            emit Released(buyer, fromReserved);
        }
        return cost;
    }

    /// @dev Reverts unless `sig` is the signature, by a meter key registered for `buyer`, of the
    ///      cumulative delivery `deliveredWh` on `tradeId`.
    function _checkMeter(bytes32 tradeId, uint256 deliveredWh, bytes calldata sig, address buyer) private view {
        address signer = _recover(deliveryDigest(tradeId, deliveredWh), sig);
        require(signer != address(0), "EnergyMarket: bad signature");
        require(registry.accountOf(signer) == buyer, "EnergyMarket: signer is not the buyer's meter");
    }

    /// @dev Reverts unless `sig` is `expected`'s signature of `digest`.
    function _checkSigner(bytes32 digest, bytes calldata sig, address expected, string memory reason) private pure {
        address signer = _recover(digest, sig);
        require(signer != address(0), "EnergyMarket: bad signature");
        require(signer == expected, reason);
    }

    /// @dev What a signed reading settles the trade to: the reading, capped at the trade's energy.
    function _target(Trade storage t, uint256 deliveredWh) private view returns (uint256) {
        uint256 wh = t.wh;
        return deliveredWh < wh ? deliveredWh : wh;
    }

    function _disputeEnd(Trade storage t) private view returns (uint256) {
        return uint256(t.closingAt) + disputeWindow;
    }

    /// @dev Keeps reservedUntil at the later of its value and `until`; returns the result.
    function _extend(Escrow storage e, uint64 until) private returns (uint64) {
        uint64 current = e.reservedUntil;
        if (until > current) {
            e.reservedUntil = until;
            return until;
        }
        return current;
    }

    function _cost(uint256 wh, uint256 priceWeiPerKwh) private pure returns (uint256) {
        return wh * priceWeiPerKwh / 1000;
    }

    /// @dev Ether amounts are stored as uint128: more than all Ether in existence.
    function _u128(uint256 amount) private pure returns (uint128) {
        require(amount <= type(uint128).max, "EnergyMarket: amount too large");
        return uint128(amount);
    }

    function _sendEther(address to, uint256 amountWei) private {
        (bool ok,) = to.call{value: amountWei}("");
        require(ok, "EnergyMarket: Ether transfer failed");
    }
}
