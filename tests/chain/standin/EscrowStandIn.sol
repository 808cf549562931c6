// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// STAND-IN for the escrow part of EnergyMarket v2 (tests only, never deployed elsewhere):
/// deposit, reserve, withdraw and the views a site's wallet reads, with the v2 spec's
/// rules: reserve moves free escrow to reserved and keeps the later time; withdraw takes
/// free escrow, then reserved escrow once its time has passed. No trades.
contract EscrowStandIn {
    mapping(address => uint256) public freeEscrow;
    mapping(address => uint256) public reservedEscrow;
    mapping(address => uint64) public reservedUntil;
    mapping(address => uint256) public lockedEscrow;
    mapping(address => uint256) public credit;

    function deposit() external payable {
        freeEscrow[msg.sender] += msg.value;
    }

    function reserve(uint256 amountWei, uint64 until) external {
        require(freeEscrow[msg.sender] >= amountWei, "EnergyMarket: insufficient free escrow");
        freeEscrow[msg.sender] -= amountWei;
        reservedEscrow[msg.sender] += amountWei;
        if (until > reservedUntil[msg.sender]) reservedUntil[msg.sender] = until;
    }

    function withdraw(uint256 amountWei) external {
        uint256 free = freeEscrow[msg.sender];
        if (amountWei <= free) {
            freeEscrow[msg.sender] = free - amountWei;
        } else {
            require(block.timestamp >= reservedUntil[msg.sender], "EnergyMarket: escrow reserved");
            uint256 rest = amountWei - free;
            require(reservedEscrow[msg.sender] >= rest, "EnergyMarket: insufficient escrow");
            freeEscrow[msg.sender] = 0;
            reservedEscrow[msg.sender] -= rest;
        }
        payable(msg.sender).transfer(amountWei);
    }

    function withdrawCredit() external {
        uint256 c = credit[msg.sender];
        credit[msg.sender] = 0;
        payable(msg.sender).transfer(c);
    }
}
